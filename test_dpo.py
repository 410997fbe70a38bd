"""
The proof: every formula of this project checked against something independent of it.

    python -m pytest test_dpo.py          (under a minute on a 2-core CPU; no network)

Index: claim -> the test that proves it.
- The DPO loss is -log sigmoid(beta h) (Eq. 7), cDPO and IPO (Eq. 17) as written
    -> test_dpo_loss_matches_hand_computed_values, test_conservative_dpo_..., test_ipo_loss_...
- At step 0 the loss is log 2 and every margin 0
    -> test_dpo_loss_is_log2_and_ipo_loss_is_inverse_2beta_squared_when_policy_equals_reference
- The policy's gradient is -beta sigmoid(-beta h) [grad log pi(y_c) - grad log pi(y_r)]
    -> test_policy_gradient_follows_the_dpo_paper_identity_on_a_tiny_gpt
- Masking the prompt leaves the loss alone but moves the rewards
    -> test_masking_the_prompt_leaves_the_dpo_loss_but_changes_rewards_and_log_probs
- Only completion tokens are scored, tokenised apart from the prompt
    -> test_sequence_logps_ignores_prompt_and_padding_..., test_encode_pairs_tokenises_...
- The fast path (logits only where scored, per-batch padding, batches by length) gives the
  plain numbers
    -> test_completion_logps_equals_sequence_logps_..., test_per_batch_padding_gives_...,
       test_batches_by_length_cover_every_pair_once_...
- Mean instead of sum: IPO's target becomes nats per token
    -> test_averaged_log_probs_are_the_sum_divided_by_..., test_ipo_on_averaged_log_probs_...
- The reference is frozen, computed once, carries no graph; the optimizer holds the policy only
    -> test_train_dpo_runs_the_reference_once_..., test_reference_log_probs_carry_no_graph_...,
       test_make_optimizer_holds_exactly_the_policy_parameters
- Held-out evaluation: loss, rewards and the exact KL(pi || pi_ref); at step 0 one forward pass
    -> test_evaluate_equals_dpo_loss_and_kl_computed_pair_by_pair_from_full_logits,
       test_evaluate_at_the_start_is_log2_with_zero_margins_and_zero_kl
- DPO's optimum is pi_ref exp(r / beta) / Z (Eq. 4); DPO drives pi(y_r) to 0, IPO stops
    -> test_population_dpo_minimiser_is_..., test_dpo_drives_..., test_ipo_stops_...
- model.py is GPT-2: the same logits as a numpy GPT-2 on the Hugging Face tensors
    -> test_from_pretrained_directory_matches_numpy_gpt2, ..._float64_matches_numpy_gpt2_to_1e_9
- .safetensors by hand: every dtype round-trips, malformed files are refused
    -> test_every_dtype_round_trips_exactly_..., test_load_safetensors_rejects_malformed_...
- The download is verified and nothing half-written is kept
    -> test_from_pretrained_gpt2_downloads_into_hub_cache_..., test_failed_download_...
- Bradley-Terry recovers known strengths with honest standard errors
    -> test_fit_recovers_simulated_strengths_..., test_standard_errors_match_spread_...
- train_toy.py flips 0/4 to 4/4, reports held-out pairs, repeats itself exactly
    -> test_toy_experiment_flips_every_preference, test_toy_run_reports_the_held_out_pairs_...,
       test_toy_script_runs_from_the_command_line_with_the_numbers_of_this_process
- A failed run leaves an earlier --out as it was
    -> test_a_diverging_run_stops_..., test_a_failure_while_saving_leaves_...

Sections, in this order: 1. the DPO math (dpo.py); 2. theory on a bandit; 3. the model
(model.py) against a numpy GPT-2; 4. checkpoints, safetensors and the hub; 5. Bradley-Terry
(bt.py); 6. end to end (train_toy.py); 7. bench.py's steps and pairs.

Tests that need the GPT-2 tokenizer skip with a reason when tiktoken cannot load it
offline: set TIKTOKEN_CACHE_DIR (see README.md). Three checks run only on a CUDA GPU (the
model and a DPO step there, against the numpy GPT-2 and the CPU; train_toy's deterministic
mode), and three only where Hugging Face's transformers and safetensors packages are
installed (cross-checks; never needed).
"""

import contextlib
import copy
import functools
import hashlib
import http.server
import importlib.util
import inspect
import json
import math
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import urllib.parse
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import bt
import dpo
import train_toy
from bt import fit_bradley_terry, win_probability
from dpo import dpo_loss
from model import (GPT, SAFETENSORS_DTYPES, GPTConfig, hub_cache_dir, load_safetensors, save_safetensors,
                   write_atomically)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this torch sees none")
ROOT = Path(__file__).resolve().parent

# =============================================================================
# 1. The DPO math: losses, gradients, masking, the reference, the step and the loop
# =============================================================================
# Every check is against something independent of dpo.py: a closed form, a number worked
# out by hand (the arithmetic is in a comment), a finite difference, a separate backward
# pass, a plain loop over positions, or the plain definition on full logits. The equations:
#     h      = [log pi(y_c) - log pi_ref(y_c)] - [log pi(y_r) - log pi_ref(y_r)]
#     DPO    L = -log sigmoid(beta h)                              (Rafailov et al. 2023, Eq. 7)
#     cDPO   L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (Mitchell 2023)
#     IPO    L = (h - 1/(2 beta))^2                                (Azar et al. 2023, Eq. 17)
#     reward = beta (log pi(y) - log pi_ref(y))                    (Rafailov et al. 2023, Eq. 5)


LOG2 = math.log(2)  # -log sigmoid(0) = log(1 + e^0) = log 2


class CharTokenizer:
    """A stand-in for tiktoken: one token per character of " abc...z", id 0 is <|endoftext|>."""
    alphabet = " abcdefghijklmnopqrstuvwxyz"
    eot_token = 0

    def encode(self, text):
        return [1 + self.alphabet.index(c) for c in text]  # " " -> 1, "a" -> 2, ..., "z" -> 27


PAIRS = [
    {"prompt": "the cat", "chosen": " sat", "rejected": " ran away"},
    {"prompt": "a dog", "chosen": " barked", "rejected": " hid"},
    {"prompt": "birds", "chosen": " sing", "rejected": " fly south"},
    {"prompt": "fish", "chosen": " swim", "rejected": " walk"},
    {"prompt": "the sun", "chosen": " is hot", "rejected": " is cold"},
]


def encoded_pairs(pairs=PAIRS):
    return dpo.encode_pairs(CharTokenizer(), pairs)


def tiny_policy(seed=0, dropout=0.0, dtype=torch.float32):
    """A 2-layer GPT over CharTokenizer's 28 tokens. Token embeddings of std 0.5 (GPT-2 uses
    0.02) make its next-token distributions far from uniform, so that differences show."""
    torch.manual_seed(seed)
    config = GPTConfig(block_size=32, vocab_size=32, n_layer=2, n_head=2, n_embd=16, dropout=dropout)
    policy = GPT(config).to(dtype)
    with torch.no_grad():
        policy.transformer.wte.weight.normal_(0.0, 0.5)  # tied to lm_head: scales the logits
    return policy


def perturb(model, std=0.05, seed=1):
    """Move every weight a little, so that a policy differs from its reference (h != 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def count_forwards(model):
    """Record the input of every forward call of `model` (a forward hook)."""
    inputs = []
    model.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    return inputs


def four_logps(h_values, dtype=torch.float64):
    """Policy/reference chosen/rejected log-probs whose h = (pc - rc) - (pr - rr) is h_values."""
    h = torch.tensor(h_values, dtype=dtype)
    pc, pr = -5.0 + h / 2, -5.0 - h / 2  # h/2 - (-h/2) = h
    rc, rr = torch.full_like(h, -5.0), torch.full_like(h, -5.0)
    return [t.clone().requires_grad_(True) for t in (pc, pr, rc, rr)]


def plain_logps(model, batch, average=False):
    """(chosen, rejected) log-probs by the plain definition: sequence_logps of the full logits."""
    ids, mask = batch["input_ids"], batch["loss_mask"]
    logps = dpo.sequence_logps(model(ids), ids, mask, average=average)
    n = ids.size(0) // 2
    return logps[:n], logps[n:]


def gpt2_tokenizer():
    """tiktoken's GPT-2 encoding, or a skip that says how to make it load offline."""
    try:
        import tiktoken
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no tiktoken, or no cached BPE files and no network
        pytest.skip(f"GPT-2 tokenizer not loadable ({type(e).__name__}); set TIKTOKEN_CACHE_DIR to a folder "
                    "holding tiktoken's gpt2 files (README.md, 'Offline')")


# -----------------------------------------------------------------------------
# The losses at initialisation, where the policy is the reference


@pytest.mark.parametrize("beta", [0.1, 0.25, 2.0])
def test_dpo_loss_is_log2_and_ipo_loss_is_inverse_2beta_squared_when_policy_equals_reference(beta):
    """At step 0 pi = pi_ref, so h = 0 on every pair and
    DPO (Eq. 7): -log sigmoid(0) = log 2;  IPO (Eq. 17): (0 - 1/(2 beta))^2 = (1/(2 beta))^2.
    Computed through the real GPT forward on a real encoded batch."""
    policy = tiny_policy()
    reference = dpo.make_reference(policy)
    batch = dpo.collate(encoded_pairs())
    chosen, rejected = plain_logps(policy, batch)
    with torch.no_grad():
        reference_chosen, reference_rejected = plain_logps(reference, batch)
    n = len(PAIRS)
    assert torch.all(chosen < 0) and torch.all(rejected < 0)  # real log-probs, not zeros
    args = (chosen, rejected, reference_chosen, reference_rejected)

    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(*args, beta=beta, loss_type="dpo")
    assert losses.shape == (n,)
    assert torch.allclose(losses.double(), torch.full((n,), LOG2, dtype=torch.float64), rtol=0, atol=1e-7)
    assert torch.all(chosen_rewards == 0) and torch.all(rejected_rewards == 0)

    losses, _, _ = dpo.dpo_loss(*args, beta=beta, loss_type="ipo")
    target = (1 / (2 * beta)) ** 2  # beta = 0.1: 25; 0.25: 4; 2.0: 0.0625
    assert torch.allclose(losses.double(), torch.full((n,), target, dtype=torch.float64), rtol=1e-6, atol=0)


def test_dpo_step_first_report_is_log2_loss_zero_accuracy_zero_margin():
    """dpo_step before any update, with the reference's log-probs of the same batch: policy =
    reference, so loss = log 2 (Eq. 7 at h = 0) and every margin beta*h is exactly 0 (so no
    pair counts as ranked right)."""
    policy = tiny_policy()
    reference = dpo.make_reference(policy)
    pairs = [encoded_pairs()[i] for i in (3, 0, 2)]
    batch = dpo.make_batch(pairs, dpo.pair_logps(reference, pairs, batch_size=3), "cpu")
    metrics = dpo.dpo_step(policy, torch.optim.SGD(policy.parameters(), lr=0.1), batch, beta=0.1)
    assert metrics["loss"] == pytest.approx(LOG2, abs=1e-7)
    assert metrics["reward_accuracy"] == 0.0 and metrics["margin"] == 0.0
    assert metrics["chosen_reward"] == 0.0 and metrics["rejected_reward"] == 0.0
    assert metrics["grad_norm"] > 0  # the first step does move the policy


# -----------------------------------------------------------------------------
# Loss values and rewards on fixed inputs, worked out by hand

# Two pairs, beta = 0.5:
#   pair 0: pc=-1, pr=-3, rc=-2, rr=-2: h = (-1+2) - (-3+2) = 1 - (-1) = 2,  beta h = 1
#   pair 1: pc=-4, pr=-1, rc=-2, rr=-2: h = (-4+2) - (-1+2) = -2 - 1 = -3, beta h = -1.5
FIXED = dict(pc=[-1.0, -4.0], pr=[-3.0, -1.0], rc=[-2.0, -2.0], rr=[-2.0, -2.0], beta=0.5)


def fixed_inputs():
    return [torch.tensor(FIXED[k], dtype=torch.float64, requires_grad=True) for k in ("pc", "pr", "rc", "rr")]


def test_dpo_loss_matches_hand_computed_values():
    """DPO, Eq. 7: -log sigmoid(beta h) = log(1 + e^(-beta h))."""
    losses, _, _ = dpo.dpo_loss(*fixed_inputs(), beta=FIXED["beta"], loss_type="dpo")
    # pair 0: log(1 + e^-1)  = log(1.36787944...) = 0.31326168751822286
    # pair 1: log(1 + e^1.5) = log(5.48168907...) = 1.7014132779827524
    assert losses.tolist() == pytest.approx([0.31326168751822286, 1.7014132779827524], rel=1e-12)


def test_conservative_dpo_loss_matches_hand_computed_values():
    """Conservative DPO (Mitchell 2023): -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    Since log(1 + e^x) - log(1 + e^-x) = x, this is log(1 + e^(-beta h)) + eps beta h."""
    losses, _, _ = dpo.dpo_loss(*fixed_inputs(), beta=FIXED["beta"], loss_type="dpo", label_smoothing=0.1)
    # pair 0: 0.9 log(1 + e^-1) + 0.1 log(1 + e^1)    = 0.31326168751822286 + 0.1 * 1    = 0.41326168751822286
    # pair 1: 0.9 log(1 + e^1.5) + 0.1 log(1 + e^-1.5) = 1.7014132779827524 + 0.1 * -1.5 = 1.5514132779827524
    assert losses.tolist() == pytest.approx([0.41326168751822286, 1.5514132779827524], rel=1e-12)


def test_ipo_loss_matches_hand_computed_values():
    """IPO, Eq. 17: (h - 1/(2 beta))^2; with beta = 0.5 the target margin 1/(2 beta) is 1."""
    losses, _, _ = dpo.dpo_loss(*fixed_inputs(), beta=FIXED["beta"], loss_type="ipo")
    # pair 0: (2 - 1)^2 = 1;  pair 1: (-3 - 1)^2 = 16
    assert losses.tolist() == pytest.approx([1.0, 16.0], rel=1e-12)


@pytest.mark.parametrize("loss_type, label_smoothing", [("dpo", 0.0), ("dpo", 0.1), ("ipo", 0.0)])
def test_rewards_are_beta_times_logratio_and_detached(loss_type, label_smoothing):
    """The implicit reward (Eq. 5) beta (log pi(y) - log pi_ref(y)), for reporting only: no gradient."""
    _, chosen_rewards, rejected_rewards = dpo.dpo_loss(
        *fixed_inputs(), beta=FIXED["beta"], loss_type=loss_type, label_smoothing=label_smoothing)
    # chosen:   0.5 * (-1 - -2) = 0.5,   0.5 * (-4 - -2) = -1
    # rejected: 0.5 * (-3 - -2) = -0.5,  0.5 * (-1 - -2) = 0.5
    assert chosen_rewards.tolist() == [0.5, -1.0]
    assert rejected_rewards.tolist() == [-0.5, 0.5]
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_losses_stay_finite_for_huge_margins_with_the_right_asymptotics():
    """With h = +-1e4 and beta = 0.1, beta h = +-1000 and sigmoid(-1000) underflows to 0, so
    log(sigmoid(.)) would be -inf. Asymptotically log(1 + e^(-x)) -> 0 for x -> +inf and
    -> -x for x -> -inf: DPO gives ~0 and ~beta*1e4 = 1000; cDPO (eps = 0.1) gives
    ~eps*1000 = 100 and ~(1-eps)*1000 = 900. Gradients stay finite too."""
    for dtype in (torch.float32, torch.float64):
        for label_smoothing, expected in [(0.0, [0.0, 1000.0]), (0.1, [100.0, 900.0])]:
            inputs = four_logps([1e4, -1e4], dtype=dtype)
            losses, _, _ = dpo.dpo_loss(*inputs, beta=0.1, label_smoothing=label_smoothing)
            assert torch.all(torch.isfinite(losses))
            assert losses.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-6)
            losses.sum().backward()
            assert all(torch.all(torch.isfinite(x.grad)) for x in inputs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta=0.0), "beta"), (dict(beta=-0.1), "beta"), (dict(beta=float("nan")), "beta"),
    (dict(loss_type="sigmoid"), "loss_type"),
    (dict(label_smoothing=-0.1), "label_smoothing"), (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
])
def test_dpo_loss_rejects_invalid_beta_loss_type_and_label_smoothing(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpo.dpo_loss(*fixed_inputs(), **kwargs)


# -----------------------------------------------------------------------------
# Sum or mean over the completion's tokens


def test_averaged_log_probs_are_the_sum_divided_by_the_token_count():
    """average=True: log pi(y|x) / (number of completion tokens), in both ways of computing it.
    By hand: with all-zero logits over V = 4 tokens every token has log-prob log(1/4), so a
    completion of k tokens sums to k log(1/4) and averages log(1/4) whatever k is."""
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float32)  # 3 and 5 tokens
    labels = torch.randint(4, (2, 6), generator=torch.Generator().manual_seed(0))
    logits = torch.zeros(2, 6, 4)
    assert dpo.sequence_logps(logits, labels, mask).tolist() == pytest.approx([3 * math.log(0.25), 5 * math.log(0.25)])
    assert dpo.sequence_logps(logits, labels, mask, average=True).tolist() == pytest.approx([math.log(0.25)] * 2)

    policy = tiny_policy(dtype=torch.float64)
    batch = dpo.collate(encoded_pairs())
    ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    n_tokens = torch.tensor([len(c) for _, c, _ in encoded_pairs()] + [len(r) for _, _, r in encoded_pairs()])
    with torch.no_grad():
        summed = dpo.completion_logps(policy, ids, loss_mask)
        averaged = dpo.completion_logps(policy, ids, loss_mask, average=True)
    assert torch.allclose(averaged, summed / n_tokens, rtol=1e-12, atol=0)
    assert len(set(n_tokens.tolist())) > 1  # completions of different lengths: the division matters


def test_ipo_on_averaged_log_probs_targets_nats_per_token():
    """The same log-probs, summed and averaged, through IPO (Eq. 17) with beta = 0.25 (target 2).
    Chosen: 2 tokens, rejected: 4 tokens. Summed: pc=-2, pr=-8, rc=-4, rr=-4, so
    h = (-2+4) - (-8+4) = 6 and L = (6-2)^2 = 16. Averaged: pc=-1, pr=-2, rc=-2, rr=-1, so
    h = (-1+2) - (-2+1) = 2 and L = 0: IPO's target is then in nats per token."""
    summed = [torch.tensor([x], dtype=torch.float64) for x in (-2.0, -8.0, -4.0, -4.0)]
    tokens = [2, 4, 2, 4]
    averaged = [x / k for x, k in zip(summed, tokens)]
    assert dpo.dpo_loss(*summed, beta=0.25, loss_type="ipo")[0].item() == pytest.approx(16.0)
    assert dpo.dpo_loss(*averaged, beta=0.25, loss_type="ipo")[0].item() == pytest.approx(0.0)


def test_dpo_step_with_average_logps_trains_on_per_token_means():
    """dpo_step(average_logps=True) takes the DPO loss of per-token mean log-probs: its loss and
    rewards equal dpo_loss of the plain definition's means, with the reference's means."""
    policy = tiny_policy(dtype=torch.float64)
    reference = dpo.make_reference(policy)
    perturb(policy)
    pairs = encoded_pairs()
    batch = dpo.make_batch(pairs, dpo.pair_logps(reference, pairs, average=True), "cpu")
    with torch.no_grad():
        expected = dpo.dpo_loss(*plain_logps(policy, batch, average=True), *plain_logps(reference, batch, average=True),
                                beta=0.5)
        summed = dpo.dpo_loss(*plain_logps(policy, batch), *plain_logps(reference, batch), beta=0.5)
    metrics = dpo.dpo_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, beta=0.5,
                           average_logps=True)
    assert metrics["loss"] == pytest.approx(expected[0].mean().item(), rel=1e-10)
    assert metrics["chosen_reward"] == pytest.approx(expected[1].mean().item(), rel=1e-10)
    assert abs(metrics["loss"] - summed[0].mean().item()) > 1e-4  # the sum would have given another loss


# -----------------------------------------------------------------------------
# Gradients with respect to the four log-prob inputs


def dloss_dh(h, beta, loss_type, label_smoothing):
    """dL/dh in closed form. dh/d(pc, pr, rc, rr) = (+1, -1, -1, +1)."""
    if loss_type == "ipo":
        return 2 * (h - 1 / (2 * beta))
    eps = label_smoothing
    # d/dx -log sigmoid(x) = -sigmoid(-x); d/dx -log sigmoid(-x) = sigmoid(x)
    return -(1 - eps) * beta * torch.sigmoid(-beta * h) + eps * beta * torch.sigmoid(beta * h)


@pytest.mark.parametrize("loss_type, label_smoothing", [("dpo", 0.0), ("dpo", 0.2), ("ipo", 0.0)])
def test_loss_gradients_wrt_log_probs_match_closed_forms(loss_type, label_smoothing):
    """DPO (Section 4): dL/d log pi(y_c) = -beta sigmoid(-beta h), dL/d log pi(y_r) = +beta sigmoid(-beta h),
    the negatives for the reference; cDPO adds +eps beta sigmoid(beta h) to the first;
    IPO: dL/d log pi(y_c) = 2 (h - 1/(2 beta)), with the same sign pattern."""
    beta = 0.3
    h_values = [-4.0, -0.5, 0.0, 0.7, 3.0, 9.0]
    inputs = four_logps(h_values)
    losses, _, _ = dpo.dpo_loss(*inputs, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    losses.sum().backward()
    g = dloss_dh(torch.tensor(h_values, dtype=torch.float64), beta, loss_type, label_smoothing)
    for x, sign in zip(inputs, (+1, -1, -1, +1)):
        assert torch.allclose(x.grad, sign * g, rtol=1e-12, atol=1e-15)
    if loss_type == "dpo" and label_smoothing == 0:  # the policy chosen gradient is -beta sigmoid(-beta h) < 0
        assert torch.all(inputs[0].grad < 0)  # so gradient descent raises log pi(y_c)


@pytest.mark.parametrize("loss_type, label_smoothing", [("dpo", 0.0), ("dpo", 0.2), ("ipo", 0.0)])
def test_losses_pass_gradcheck_in_float64(loss_type, label_smoothing):
    """Autograd's gradient of each loss equals its finite-difference Jacobian."""
    inputs = [torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(i)).requires_grad_(True)
              for i in range(4)]
    assert torch.autograd.gradcheck(
        lambda *x: dpo.dpo_loss(*x, beta=0.7, loss_type=loss_type, label_smoothing=label_smoothing)[0], inputs)


# -----------------------------------------------------------------------------
# Gradients with respect to the model's parameters


def perturbed_policy_and_batch(n_pairs):
    """A float64 tiny GPT moved away from its reference (so h != 0), and a batch of n_pairs of
    PAIRS with the reference's log-probs in it."""
    policy = tiny_policy(dtype=torch.float64)
    reference = dpo.make_reference(policy)
    perturb(policy)
    pairs = encoded_pairs()[:n_pairs]
    return policy, dpo.make_batch(pairs, dpo.pair_logps(reference, pairs), "cpu")


def test_policy_gradient_follows_the_dpo_paper_identity_on_a_tiny_gpt():
    """DPO paper, Section 4: grad L = -beta sigmoid(-beta h) [grad log pi(y_c) - grad log pi(y_r)].
    Left: the gradient dpo_step leaves in the policy (learning rate 0, no clipping).
    Right: grad log pi(y_c) and grad log pi(y_r) from two separate backward passes."""
    beta = 0.5
    policy, batch = perturbed_policy_and_batch(1)
    ids, mask = batch["input_ids"], batch["loss_mask"]

    params = list(policy.parameters())
    chosen_logp = dpo.sequence_logps(policy(ids[:1]), ids[:1], mask[:1])[0]
    grad_chosen = torch.autograd.grad(chosen_logp, params)
    rejected_logp = dpo.sequence_logps(policy(ids[1:]), ids[1:], mask[1:])[0]
    grad_rejected = torch.autograd.grad(rejected_logp, params)
    h = ((chosen_logp.item() - batch["reference_chosen_logps"].item())
         - (rejected_logp.item() - batch["reference_rejected_logps"].item()))
    assert abs(h) > 0.05  # the perturbation moved the policy: the weight is not just beta/2
    weight = -beta / (1 + math.exp(beta * h))  # -beta sigmoid(-beta h)

    for _ in range(2):  # the second step's gradient is its own, not added to the first's
        dpo.dpo_step(policy, torch.optim.SGD(params, lr=0.0), batch, beta=beta, max_grad_norm=float("inf"))
    for p, gc, gr in zip(params, grad_chosen, grad_rejected):
        expected = weight * (gc - gr)
        assert (p.grad - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_dpo_loss_gradient_matches_central_finite_differences_on_model_parameters():
    """d L / d theta from autograd equals (L(theta + eps) - L(theta - eps)) / (2 eps) for a few
    single weights of a float64 tiny GPT, L the mean DPO loss (Eq. 7) over two pairs."""
    beta, eps = 0.5, 1e-6
    policy, batch = perturbed_policy_and_batch(2)

    def loss():
        return dpo.dpo_loss(*plain_logps(policy, batch), batch["reference_chosen_logps"],
                            batch["reference_rejected_logps"], beta=beta)[0].mean()

    loss().backward()
    entries = [("transformer.wte.weight", (2, 3)), ("transformer.wpe.weight", (4, 0)),
               ("transformer.h.0.attn.c_attn.weight", (5, 7)), ("transformer.h.1.mlp.c_fc.bias", (9,)),
               ("transformer.ln_f.weight", (1,))]
    named = dict(policy.named_parameters())
    for name, index in entries:
        p = named[name]
        with torch.no_grad():
            original = p[index].item()
            p[index] = original + eps
            up = loss().item()
            p[index] = original - eps
            down = loss().item()
            p[index] = original
        numerical = (up - down) / (2 * eps)
        assert abs(p.grad[index].item()) > 1e-4, name  # a weight the loss depends on
        assert p.grad[index].item() == pytest.approx(numerical, rel=1e-5, abs=1e-9), name


def test_dpo_step_clips_the_gradient_to_max_grad_norm_and_reports_the_unclipped_norm():
    """Gradient clipping (max-norm): after dpo_step the policy's gradient has total norm
    max_grad_norm, in the direction of the unclipped gradient of the mean loss, taken here by
    a separate backward pass; the reported grad_norm is the norm before clipping."""
    policy, batch = perturbed_policy_and_batch(len(PAIRS))
    losses, _, _ = dpo.dpo_loss(*plain_logps(policy, batch), batch["reference_chosen_logps"],
                                batch["reference_rejected_logps"], beta=0.1)
    unclipped = torch.autograd.grad(losses.mean(), list(policy.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in unclipped)).item()
    max_norm = norm / 4  # so that clipping must act
    weights_before = [p.detach().clone() for p in policy.parameters()]
    metrics = dpo.dpo_step(policy, torch.optim.SGD(policy.parameters(), lr=1.0), batch, beta=0.1,
                           max_grad_norm=max_norm)
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-9)
    for p, before, g in zip(policy.parameters(), weights_before, unclipped):  # (clip_grad_norm_ adds 1e-6 to norm)
        assert torch.allclose(p.grad, g * max_norm / norm, rtol=1e-5, atol=1e-12)
        assert torch.allclose(before - p.detach(), g * max_norm / norm, rtol=1e-5, atol=1e-12)  # the step took it


# -----------------------------------------------------------------------------
# Log-probabilities of completions, masking and tokenisation


def loop_sequence_logps(logits, labels, loss_mask):
    """log pi(y|x) by hand: for each completion token t, log softmax of logits[t-1] at token t."""
    B, T, V = logits.shape
    totals = np.zeros(B)
    for b in range(B):
        for t in range(1, T):
            if loss_mask[b, t]:
                z = logits[b, t - 1]
                log_normaliser = z.max() + np.log(np.exp(z - z.max()).sum())
                totals[b] += z[labels[b, t]] - log_normaliser
    return totals


LOGPS_MASK = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0],   # prompt of 3, completion of 3, 2 padding
                           [0, 1, 1, 1, 1, 1, 1, 1],   # prompt of 1, completion fills the row
                           [0, 0, 0, 0, 0, 0, 1, 0]])  # prompt of 6, completion of 1, 1 padding


def random_logits_and_labels(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(3, 8, 11, generator=generator, dtype=dtype)  # (B, T, V)
    labels = torch.randint(0, 11, (3, 8), generator=generator)  # (B, T)
    return logits, labels


def test_sequence_logps_matches_a_plain_loop_over_positions():
    """log pi(y|x) = sum over completion tokens t of log softmax(logits[t-1])[y_t]: the logits at
    position t-1 score the token at t, and only tokens with loss_mask 1 count."""
    logits, labels = random_logits_and_labels(torch.float32)
    got = dpo.sequence_logps(logits, labels, LOGPS_MASK.float())
    expected = loop_sequence_logps(logits.double().numpy(), labels.numpy(), LOGPS_MASK.numpy())
    assert got.shape == (3,)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5)


def test_sequence_logps_of_float64_logits_keeps_float64_precision():
    """A float64 model gets float64 log-probs: gradient and finite-difference checks
    in float64 rely on it. (Upcasting half precision is fine; downcasting is not.)"""
    logits, labels = random_logits_and_labels(torch.float64)
    got = dpo.sequence_logps(logits, labels, LOGPS_MASK.double())
    expected = loop_sequence_logps(logits.numpy(), labels.numpy(), LOGPS_MASK.numpy())
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_sequence_logps_ignores_prompt_and_padding_but_not_completion_positions():
    """Only the logits that predict a completion token (position t-1 for each t with loss_mask 1)
    and the completion labels themselves enter log pi(y|x)."""
    logits, labels = random_logits_and_labels(torch.float64)
    mask = LOGPS_MASK.double()
    before = dpo.sequence_logps(logits, labels, mask)

    predicts_completion = torch.zeros_like(LOGPS_MASK, dtype=torch.bool)
    predicts_completion[:, :-1] = LOGPS_MASK[:, 1:].bool()  # logits at t-1 score token t
    changed = logits.clone()
    changed[~predicts_completion] = 100 * torch.randn_like(changed[~predicts_completion])
    changed_labels = labels.clone()
    changed_labels[LOGPS_MASK == 0] = (labels[LOGPS_MASK == 0] + 1) % 11  # prompt and padding labels
    assert torch.equal(dpo.sequence_logps(changed, changed_labels, mask), before)

    # row 2's only completion token is at t = 6, scored by the logits at position 5
    changed = logits.clone()
    changed[2, 5, labels[2, 6]] += 1.0
    after = dpo.sequence_logps(changed, labels, mask)
    assert torch.equal(after[:2], before[:2]) and after[2] > before[2]
    changed_labels = labels.clone()
    changed_labels[2, 6] = (labels[2, 6] + 1) % 11
    assert dpo.sequence_logps(logits, changed_labels, mask)[2] != before[2]


def test_masking_the_prompt_leaves_the_dpo_loss_but_changes_rewards_and_log_probs():
    """Scoring the prompt's tokens too adds log pi(x) to both log pi(y_c|x) and log pi(y_r|x)
    (and log pi_ref(x) to the reference's): the pair shares the prompt, so these cancel in
    h = (pc - rc) - (pr - rr) and the DPO loss is unchanged. The rewards beta (log pi - log
    pi_ref) and the log-probs themselves, which are what gets reported, do change: each
    reward moves by beta (log pi(x) - log pi_ref(x))."""
    policy = tiny_policy(dtype=torch.float64)
    reference = dpo.make_reference(policy)
    perturb(policy)
    batch = dpo.collate(encoded_pairs())
    row_lengths = [len(p) + len(c) for p, c, _ in encoded_pairs()] + [len(p) + len(r) for p, _, r in encoded_pairs()]
    prompt_too = torch.zeros_like(batch["loss_mask"])
    for row, length in enumerate(row_lengths):
        prompt_too[row, 1:length] = 1.0  # every token but the first, which nothing scores either way
    unmasked = dict(batch, loss_mask=prompt_too)
    with torch.no_grad():
        masked_args = (*plain_logps(policy, batch), *plain_logps(reference, batch))
        unmasked_args = (*plain_logps(policy, unmasked), *plain_logps(reference, unmasked))
    loss, chosen_reward, rejected_reward = dpo.dpo_loss(*masked_args, beta=0.5)
    loss_u, chosen_reward_u, rejected_reward_u = dpo.dpo_loss(*unmasked_args, beta=0.5)
    assert torch.allclose(loss_u, loss, rtol=1e-10, atol=0)
    assert (chosen_reward_u - chosen_reward).abs().min() > 1e-3
    assert torch.allclose(chosen_reward_u - chosen_reward, rejected_reward_u - rejected_reward, rtol=1e-9, atol=0)
    assert (masked_args[0] - unmasked_args[0]).abs().min() > 0.1  # the log-probs differ by log pi(x)


def test_collate_puts_chosen_rows_first_masks_exactly_the_completion_and_pads_right():
    """Rows 0..B-1 are the chosen completions, B..2B-1 the rejected ones in the same order;
    each row is prompt ids + completion ids + <|endoftext|>, padded on the right (id 0) to
    the batch's longest row, and loss_mask is 1 on exactly the completion tokens (eot included)."""
    enc = CharTokenizer()  # " " -> 1, "a" -> 2, "b" -> 3, "c" -> 4, "d" -> 5, "e" -> 6; eot 0
    pairs = [{"prompt": "ab", "chosen": "c", "rejected": "de"}, {"prompt": "e", "chosen": "a", "rejected": "b"}]
    encoded = dpo.encode_pairs(enc, pairs)
    assert encoded == [([2, 3], [4, 0], [5, 6, 0]), ([6], [2, 0], [3, 0])]
    batch = dpo.collate(encoded)
    assert batch["input_ids"].tolist() == [[2, 3, 4, 0, 0],   # "ab" + "c"  + eot, 1 padding
                                           [6, 2, 0, 0, 0],   # "e"  + "a"  + eot, 2 padding
                                           [2, 3, 5, 6, 0],   # "ab" + "de" + eot
                                           [6, 3, 0, 0, 0]]   # "e"  + "b"  + eot, 2 padding
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0],
                                           [0, 1, 1, 0, 0],
                                           [0, 0, 1, 1, 1],
                                           [0, 1, 1, 0, 0]]
    assert dpo.collate(encoded[1:])["input_ids"].tolist() == [[6, 2, 0], [6, 3, 0]]  # its own longest row
    chosen, rejected = dpo.chosen_and_rejected(torch.arange(4))
    assert chosen.tolist() == [0, 1] and rejected.tolist() == [2, 3]


def test_encode_pairs_tokenises_prompt_and_completion_apart_with_gpt2_bpe():
    """The scored tokens must be exactly enc.encode(completion): tokenising prompt + completion as
    one string lets BPE merge across the boundary ("Hello wor" + "ld" -> "Hello", " world")."""
    enc = gpt2_tokenizer()
    pairs = [{"prompt": "Hello wor", "chosen": "ld", "rejected": "m!"},
             {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " five"}]
    assert enc.encode("Hello wor" + "ld") != enc.encode("Hello wor") + enc.encode("ld")  # why apart matters
    batch = dpo.collate(dpo.encode_pairs(enc, pairs))
    rows = [(p["prompt"], p["chosen"]) for p in pairs] + [(p["prompt"], p["rejected"]) for p in pairs]
    assert batch["input_ids"].shape[0] == 4
    for row, (prompt, completion) in enumerate(rows):
        expected = enc.encode(prompt) + enc.encode(completion) + [enc.eot_token]
        n_prompt = len(enc.encode(prompt))
        ids, mask = batch["input_ids"][row], batch["loss_mask"][row]
        assert ids[:len(expected)].tolist() == expected
        assert mask.tolist() == [0] * n_prompt + [1] * (len(expected) - n_prompt) + [0] * (len(ids) - len(expected))
    assert batch["input_ids"][0, :4].tolist() == [15496, 476, 335, 50256]  # "Hello", " wor", "ld", eot


def test_special_token_text_in_the_data_is_a_clear_error():
    """tiktoken refuses "<|endoftext|>" inside ordinary text; the error names the pair's text."""
    enc = gpt2_tokenizer()
    pairs = [{"prompt": "Say <|endoftext|> now", "chosen": " yes", "rejected": " no"}]
    with pytest.raises(ValueError, match=re.escape("cannot tokenise prompt 'Say <|endoftext|> now'")):
        dpo.encode_pairs(enc, pairs)


def test_encode_pairs_rejects_empty_prompt_empty_completion_and_no_pairs():
    enc = CharTokenizer()
    with pytest.raises(ValueError, match="prompt"):
        dpo.encode_pairs(enc, [{"prompt": "", "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match="completion"):
        dpo.encode_pairs(enc, [{"prompt": "x", "chosen": "a", "rejected": ""}])
    with pytest.raises(ValueError, match="pairs"):
        dpo.encode_pairs(enc, [])


def test_longest_row_is_the_prompt_plus_the_longer_completion():
    """What must fit the model's context: "abc" + "defg" + eot = 3 + 5 = 8 tokens."""
    (pair,) = dpo.encode_pairs(CharTokenizer(), [{"prompt": "abc", "chosen": "de", "rejected": "defg"}])
    assert dpo.longest_row(pair) == 8 == dpo.collate([pair])["input_ids"].shape[1]


def test_log_probs_of_pairs_longer_than_the_context_are_a_clear_error():
    """Pairs longer than the context fail loudly in the model's forward pass, not silently."""
    reference = dpo.make_reference(tiny_policy())
    long_pair = encoded_pairs([{"prompt": "a" * 30, "chosen": "bc", "rejected": "d"}])  # 30 + 3 > 32
    with pytest.raises(ValueError, match="context"):
        dpo.pair_logps(reference, long_pair)


# -----------------------------------------------------------------------------
# The fast path of the log-probs, against the plain definitions


def test_logits_at_scores_exactly_the_selected_positions():
    """GPT.forward(idx, logits_at=mask) is model(idx)[mask]: the same numbers, only fewer rows."""
    policy = tiny_policy()
    ids = torch.randint(28, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.rand(3, 10, generator=torch.Generator().manual_seed(1)) < 0.4
    full = policy(ids)
    assert policy(ids, logits_at=mask).shape == (int(mask.sum()), 32)
    assert torch.allclose(policy(ids, logits_at=mask), full[mask], atol=1e-6, rtol=0)


def test_completion_logps_equals_sequence_logps_of_the_full_logits():
    """completion_logps (logits only where a completion token is scored) gives the same log pi(y|x)
    as the plain definition, sequence_logps(model(ids), ids, mask), and next_token_logprobs'
    (N, V) rows are exactly the log-softmax at the positions that score completion tokens."""
    policy = tiny_policy().double()
    batch = dpo.collate(encoded_pairs())
    ids, mask = batch["input_ids"], batch["loss_mask"]
    full_logits = policy(ids)
    assert torch.allclose(dpo.completion_logps(policy, ids, mask), dpo.sequence_logps(full_logits, ids, mask),
                          atol=1e-12, rtol=0)
    scoring = torch.zeros_like(mask, dtype=torch.bool)
    scoring[:, :-1] = mask[:, 1:].bool()  # position t scores token t+1
    vocab_logprobs = dpo.next_token_logprobs(policy, ids, mask)
    assert torch.allclose(vocab_logprobs, full_logits[scoring].log_softmax(-1), atol=1e-12, rtol=0)
    assert vocab_logprobs.shape[0] == int(mask.sum())  # one row per completion token


def test_per_batch_padding_gives_the_log_probs_of_one_padded_batch():
    """pair_logps pads each batch to its own longest row; batches of 2 pairs give the log-probs
    that one batch of all five gives, to float32 rounding, in the pairs' order."""
    policy = tiny_policy()
    pairs = encoded_pairs()
    one_batch = dpo.pair_logps(policy, pairs, batch_size=len(pairs))
    with torch.no_grad():
        plain = plain_logps(policy, dpo.collate(pairs))
    for got, expected in zip(dpo.pair_logps(policy, pairs, batch_size=2), one_batch):
        assert torch.allclose(got, expected, rtol=0, atol=1e-5)
    for got, expected in zip(one_batch, plain):
        assert torch.allclose(got, expected, rtol=0, atol=1e-5)
    batches = dpo.batches_by_length(pairs, 2)
    assert batches != [[0, 1], [2, 3], [4]]  # computed out of the pairs' order, and put back in it
    assert len({dpo.collate([pairs[i] for i in index])["input_ids"].shape[1] for index in batches}) > 1


def test_batches_by_length_cover_every_pair_once_and_pad_less_than_the_file_order():
    """The passes without a gradient batch pairs of similar length: every pair exactly once,
    lengths non-decreasing, and fewer padding positions than batches in the file's order."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (40, 3), generator=generator).tolist()
    pairs = [([1] * p, [2] * c, [3] * r) for p, c, r in lengths]
    batches = dpo.batches_by_length(pairs, 8)
    flat = [i for index in batches for i in index]
    assert sorted(flat) == list(range(40)) and [len(index) for index in batches] == [8] * 5
    assert [dpo.longest_row(pairs[i]) for i in flat] == sorted(dpo.longest_row(p) for p in pairs)

    def padding(batches):
        return sum(dpo.collate([pairs[i] for i in index])["loss_mask"].numel() for index in batches) \
            - sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)
    in_file_order = [list(range(start, start + 8)) for start in range(0, 40, 8)]
    assert padding(batches) < 0.5 * padding(in_file_order)


# -----------------------------------------------------------------------------
# The reference, the step and the loop


def test_make_reference_returns_a_frozen_copy_sharing_no_storage():
    policy = tiny_policy(dropout=0.1).train()
    reference = dpo.make_reference(policy)
    assert reference is not policy
    assert not reference.training and policy.training  # eval mode for the copy only
    assert all(not p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in policy.parameters())  # the policy was not frozen instead
    policy_storage = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    assert not policy_storage & {p.untyped_storage().data_ptr() for p in reference.parameters()}
    for p, q in zip(policy.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)
    assert not torch.equal(next(policy.parameters()), next(reference.parameters()))


def test_reference_log_probs_carry_no_graph_even_for_a_model_that_is_not_frozen():
    """pair_logps runs without autograd: cached log-probs with a graph would keep every batch's
    activations alive for the whole of training. Checked on a policy whose parameters do
    require gradients, where a forward pass with autograd on would record one."""
    policy = tiny_policy()
    assert all(p.requires_grad for p in policy.parameters())
    assert dpo.completion_logps(policy, *dpo.collate(encoded_pairs()).values()).grad_fn is not None  # would
    for logps in dpo.pair_logps(policy, encoded_pairs()):
        assert logps.grad_fn is None and not logps.requires_grad


def test_make_optimizer_holds_exactly_the_policy_parameters():
    """The optimizer updates the policy and only the policy: every parameter once, none of the
    reference's (a copy with the same values, so only identity tells them apart)."""
    policy = tiny_policy()
    reference = dpo.make_reference(policy)
    optimizer = dpo.make_optimizer(policy, lr=1e-3)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(held) == len({id(p) for p in held}) == len(list(policy.parameters()))
    assert {id(p) for p in held} == {id(p) for p in policy.parameters()}
    assert not {id(p) for p in held} & {id(p) for p in reference.parameters()}
    assert isinstance(optimizer, torch.optim.AdamW)


def test_dpo_step_runs_the_policy_once_on_chosen_and_rejected_together():
    """One forward of 2B rows per step: chosen and rejected share it (and the reference none)."""
    policy = tiny_policy()
    pairs = [encoded_pairs()[i] for i in (4, 1)]
    batch = dpo.make_batch(pairs, dpo.pair_logps(dpo.make_reference(policy), pairs), "cpu")
    forwards = count_forwards(policy)
    dpo.dpo_step(policy, torch.optim.SGD(policy.parameters(), lr=0.1), batch)
    assert len(forwards) == 1
    assert forwards[0].shape[0] == 4  # B = 2 pairs: 2 chosen + 2 rejected rows


def test_train_dpo_runs_the_reference_once_before_training_not_per_step():
    """log pi_ref(y|x) does not change, so train_dpo computes it in ceil(N / 8) forwards of up
    to 8 pairs in total, however many steps follow; the policy runs once per step."""
    policy = tiny_policy()
    reference = dpo.make_reference(policy)
    reference_forwards, policy_forwards = count_forwards(reference), count_forwards(policy)
    history = dpo.train_dpo(policy, reference, encoded_pairs(), torch.optim.SGD(policy.parameters(), lr=0.1),
                            epochs=3, batch_size=2)
    assert [x.size(0) for x in reference_forwards] == [10]  # 5 pairs, 10 rows, in one batch of 8 pairs
    assert len(history) == 3 * 3  # 3 epochs of ceil(5 / 2) = 3 steps
    assert len(policy_forwards) == len(history)


def test_train_dpo_leaves_the_reference_bit_identical_and_moves_the_policy():
    policy = tiny_policy()
    reference = dpo.make_reference(policy)
    reference_before = copy.deepcopy(reference.state_dict())
    policy_before = copy.deepcopy(policy.state_dict())
    dpo.train_dpo(policy, reference, encoded_pairs(), dpo.make_optimizer(policy, lr=1e-2), epochs=2, batch_size=2)
    assert all(torch.equal(reference_before[k], v) for k, v in reference.state_dict().items())
    assert all(p.grad is None for p in reference.parameters())
    assert not all(torch.equal(policy_before[k], v) for k, v in policy.state_dict().items())


def test_train_dpo_turns_dropout_off_so_the_first_loss_is_log2():
    """With dropout on, pi and pi_ref would see different random masks at step 0 and h != 0;
    train_dpo must evaluate both without dropout so that the first loss is log 2 (Eq. 7, h = 0),
    here to float32 rounding (the reference's log-probs were computed in batches of another shape)."""
    policy = tiny_policy(dropout=0.1).train()
    reference = dpo.make_reference(policy)
    ids = dpo.collate(encoded_pairs())["input_ids"]
    with torch.no_grad():  # dropout does change this model's outputs: the test can fail
        assert not torch.allclose(policy(ids), policy(ids), atol=1e-3)
    history = dpo.train_dpo(policy, reference, encoded_pairs(), torch.optim.SGD(policy.parameters(), lr=0.1),
                            epochs=1, batch_size=2, beta=1.0)
    assert history[0]["loss"] == pytest.approx(LOG2, abs=1e-6)


def test_every_epoch_gets_a_new_order_and_visits_every_pair_once():
    """epoch_batches: each epoch is a permutation of all pairs, cut into batches, and the
    generator moves on between epochs, so the orders differ (a generator seeded again for
    every epoch, or an order drawn once, would repeat). 40 pairs, batch 4."""
    pairs = [([1] * (1 + i % 7), [2] * (1 + i % 5), [3]) for i in range(40)]
    generator = torch.Generator().manual_seed(0)
    epochs = [dpo.epoch_batches(pairs, 4, generator) for _ in range(3)]
    for batches in epochs:
        assert sorted(i for batch in batches for i in batch) == list(range(40))
        assert all(len(batch) == 4 for batch in batches)
    flat = [[i for batch in batches for i in batch] for batches in epochs]
    assert flat[0] != flat[1] and flat[1] != flat[2] and flat[0] != flat[2]
    again = torch.Generator().manual_seed(0)
    assert dpo.epoch_batches(pairs, 4, again) == epochs[0]  # the seed decides


def test_train_dpo_shows_the_policy_a_new_order_every_epoch():
    """Through train_dpo itself: with one pair per step, the policy's inputs over each of four
    epochs are the five pairs in four orders that are not all the same (a generator seeded
    again every epoch would repeat the first)."""
    policy = tiny_policy()
    reference = dpo.make_reference(policy)  # before the hook: a deep copy would copy it too
    forwards = count_forwards(policy)
    dpo.train_dpo(policy, reference, encoded_pairs(), torch.optim.SGD(policy.parameters(), lr=0.0),
                  epochs=4, batch_size=1)
    epochs = [tuple(tuple(x[0].tolist()) for x in forwards[e * 5:(e + 1) * 5]) for e in range(4)]
    assert all(sorted(epoch) == sorted(epochs[0]) for epoch in epochs)  # every pair once per epoch
    assert len(set(epochs)) > 1


def test_epoch_batches_put_pairs_of_similar_length_together():
    """Sorting by length within chunks of shuffled pairs: far less padding than batches of
    shuffled pairs alone, counted as padded positions over all positions, with lengths
    spread from 2 to 200 tokens."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 200, (400,), generator=generator).tolist()
    pairs = [([1], [2] * n, [3] * max(1, n - 5)) for n in lengths]

    def padding(batches):
        positions = sum(2 * len(b) * max(dpo.longest_row(pairs[i]) for i in b) for b in batches)
        tokens = sum(2 * len(pairs[i][0]) + len(pairs[i][1]) + len(pairs[i][2]) for b in batches for i in b)
        return 1 - tokens / positions

    grouped = padding(dpo.epoch_batches(pairs, 8, generator))
    order = torch.randperm(400, generator=generator).tolist()
    shuffled = padding([order[i:i + 8] for i in range(0, 400, 8)])
    assert shuffled > 0.3 and grouped < 0.1


def test_train_dpo_is_deterministic_given_initial_weights_and_seed():
    def run(seed):
        policy = tiny_policy()
        reference = dpo.make_reference(policy)
        return dpo.train_dpo(policy, reference, encoded_pairs(), torch.optim.AdamW(policy.parameters(), lr=1e-2),
                             epochs=2, batch_size=2, seed=seed)

    assert run(seed=0) == run(seed=0)
    assert run(seed=0) != run(seed=1)  # the seed does choose the order of the batches


def test_train_dpo_stops_at_the_first_step_whose_loss_is_not_finite():
    """A learning rate of 1e30 sends the weights to +-1e30 after one step, and the next loss is
    not finite: training stops there with an error that names the step and what to try."""
    policy = tiny_policy()
    reference = dpo.make_reference(policy)
    seen = []
    with pytest.raises(RuntimeError, match=r"diverged at step 2: .* smaller learning rate"):
        dpo.train_dpo(policy, reference, encoded_pairs(), dpo.make_optimizer(policy, lr=1e30), epochs=2,
                      batch_size=2, on_step=seen.append)
    assert [m["step"] for m in seen] == [1]  # the bad step was not passed on as a result

    policy = tiny_policy()  # a finite loss with a gradient that is not: stopped at step 1
    policy.transformer.ln_f.weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(RuntimeError, match=r"diverged at step 1: loss 0\.69.*, gradient norm (inf|nan)"):
        dpo.train_dpo(policy, dpo.make_reference(policy), encoded_pairs(), dpo.make_optimizer(policy, lr=1e-3))


def test_cached_reference_log_probs_keep_the_model_precision():
    """A float64 reference gives float64 cached log-probs, equal to a direct computation."""
    reference = tiny_policy().double()
    pairs = encoded_pairs()
    chosen, rejected = dpo.pair_logps(reference, pairs, batch_size=3)
    with torch.no_grad():
        direct = plain_logps(reference, dpo.collate(pairs))
    assert chosen.dtype == torch.float64
    assert torch.allclose(chosen, direct[0], atol=1e-12, rtol=0)
    assert torch.allclose(rejected, direct[1], atol=1e-12, rtol=0)


# -----------------------------------------------------------------------------
# Evaluation on held-out pairs


def test_evaluate_at_the_start_is_log2_with_zero_margins_and_zero_kl():
    """Before training the policy is the reference, and evaluate runs both on the same batches:
    loss exactly log 2 (Eq. 7 at h = 0), every margin 0, KL 0. Passing the reference as the
    policy gives the same numbers and log-probs, bit for bit, from one forward pass per batch
    instead of two; and the log-probs are pair_logps' on the same batches."""
    policy = tiny_policy()
    reference = dpo.make_reference(policy)
    policy_forwards, reference_forwards = count_forwards(policy), count_forwards(reference)
    m, logps = dpo.evaluate(policy, reference, encoded_pairs(), batch_size=2)
    assert m["loss"] == pytest.approx(LOG2, abs=1e-7)
    assert m["margin"] == 0.0 and m["reward_accuracy"] == 0.0 and m["kl"] == 0.0
    assert len(policy_forwards) == len(reference_forwards) == 3  # 5 pairs, batches of 2
    reference_forwards.clear()
    m_once, logps_once = dpo.evaluate(reference, reference, encoded_pairs(), batch_size=2)
    assert len(reference_forwards) == 3  # one forward per batch serves both models
    assert m_once == m
    for once, twice, measured in zip(logps_once, logps, dpo.pair_logps(policy, encoded_pairs(), batch_size=2)):
        assert torch.equal(once, twice) and torch.equal(twice, measured)


def test_evaluate_frees_each_batch_before_the_next_forward_pass(monkeypatch):
    """Memory bounded by one batch: the (N, V) log-prob tensors of a batch are gone before the
    next batch's forward pass. A loop that only rebinds its names would still hold the last
    batch's two while it computes the next: twice the batch's share of the peak."""
    made, alive_at_each_forward = [], []
    real = dpo.next_token_logprobs

    def recorded(model, ids, mask):
        alive_at_each_forward.append(sum(ref() is not None for ref in made))
        logprobs = real(model, ids, mask)
        made.append(weakref.ref(logprobs))
        return logprobs

    monkeypatch.setattr(dpo, "next_token_logprobs", recorded)
    policy = tiny_policy()
    dpo.evaluate(policy, dpo.make_reference(policy), encoded_pairs(), batch_size=2)
    assert alive_at_each_forward == [0, 1] * 3  # 3 batches: the policy's, then the reference's forward


def test_evaluate_equals_dpo_loss_and_kl_computed_pair_by_pair_from_full_logits():
    """evaluate's numbers for a perturbed policy, against an independent computation: each pair
    alone, through the plain definition on full logits; the loss and rewards from dpo_loss on
    those log-probs, and the KL as sum_v pi log(pi / pi_ref) at every completion position
    (chosen and rejected rows), averaged over positions."""
    policy = tiny_policy().double()
    reference = dpo.make_reference(policy)
    perturb(policy, std=0.1)
    losses, margins, kls = [], [], []
    for pair in encoded_pairs():
        batch = dpo.collate([pair])
        with torch.no_grad():
            loss, c, r = dpo.dpo_loss(*plain_logps(policy, batch), *plain_logps(reference, batch), beta=0.5,
                                      loss_type="ipo")
            p = policy(batch["input_ids"])[:, :-1].log_softmax(-1)
            q = reference(batch["input_ids"])[:, :-1].log_softmax(-1)
        losses.append(loss.item())
        margins.append((c - r).item())
        kls += (p.exp() * (p - q)).sum(-1)[batch["loss_mask"][:, 1:].bool()].tolist()
    m, (chosen, rejected) = dpo.evaluate(policy, reference, encoded_pairs(), batch_size=3, beta=0.5, loss_type="ipo")
    with torch.no_grad():
        expected_chosen, expected_rejected = plain_logps(policy, dpo.collate(encoded_pairs()))
    assert torch.allclose(chosen, expected_chosen, rtol=0, atol=1e-12)  # in the pairs' order
    assert torch.allclose(rejected, expected_rejected, rtol=0, atol=1e-12)
    assert min(kls) > 0 and abs(np.mean(margins)) > 1e-3  # the policy really moved
    assert m["loss"] == pytest.approx(np.mean(losses), rel=1e-9)
    assert m["margin"] == pytest.approx(np.mean(margins), rel=1e-9)
    assert m["reward_accuracy"] == pytest.approx(np.mean([x > 0 for x in margins]))
    assert m["kl"] == pytest.approx(np.mean(kls), rel=1e-9)


def test_kl_is_taken_in_the_direction_kl_policy_to_reference():
    """KL is not symmetric: evaluate's KL equals KL(pi || pi_ref) from torch.distributions and
    differs from KL(pi_ref || pi) on the same model pair."""
    policy = tiny_policy().double()
    reference = dpo.make_reference(policy)
    perturb(policy, std=0.3)
    batch = dpo.collate(encoded_pairs())
    scored = dpo.next_token_logprobs  # (N, V) log-probs at the completion positions
    with torch.no_grad():
        p, q = scored(policy, *batch.values()), scored(reference, *batch.values())
    Categorical = torch.distributions.Categorical
    forward = torch.distributions.kl_divergence(Categorical(logits=p), Categorical(logits=q)).mean().item()
    backward = torch.distributions.kl_divergence(Categorical(logits=q), Categorical(logits=p)).mean().item()
    assert abs(forward - backward) > 1e-3
    kl = dpo.evaluate(policy, reference, encoded_pairs(), batch_size=8)[0]["kl"]
    assert kl == pytest.approx(forward, rel=1e-9)


@needs_cuda
def test_dpo_step_on_cuda_computes_what_the_cpu_step_computes():
    """The same reference log-probs, step numbers and gradients on the GPU as on the CPU, to
    float32 rounding: the device changes where the numbers are computed, not which."""
    results = {}
    pairs = [encoded_pairs()[i] for i in (3, 0, 2)]
    for device in ("cpu", "cuda"):
        policy = tiny_policy()
        reference = dpo.make_reference(policy)
        perturb(policy)  # h != 0, so that the loss and rewards are not at their trivial values
        policy.to(device)
        reference.to(device)
        reference_logps = dpo.pair_logps(reference, pairs)
        batch = dpo.make_batch(pairs, reference_logps, device)
        metrics = dpo.dpo_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, beta=0.5)
        evaluation, _ = dpo.evaluate(policy, reference, pairs)
        results[device] = torch.cat(reference_logps), metrics, evaluation, [p.grad.cpu() for p in policy.parameters()]
    (cpu_logps, cpu_metrics, cpu_eval, cpu_grads), (gpu_logps, gpu_metrics, gpu_eval, gpu_grads) = results.values()
    assert torch.allclose(gpu_logps, cpu_logps, rtol=0, atol=1e-4)
    assert cpu_eval["kl"] > 0 and cpu_metrics["margin"] != 0
    assert gpu_metrics == pytest.approx(cpu_metrics, rel=1e-4, abs=1e-6)
    assert gpu_eval == pytest.approx(cpu_eval, rel=1e-4, abs=1e-6)
    for g_gpu, g_cpu in zip(gpu_grads, cpu_grads):
        assert torch.allclose(g_gpu, g_cpu, rtol=1e-3, atol=1e-6)


# 2. Theory on a bandit: DPO's optimum is pi_ref exp(r / beta) / Z; IPO stops, DPO does not
# =============================================================================


# -----------------------------------------------------------------------------
# Theory on a bandit
#
# One prompt with K = 4 possible answers, so a policy is a softmax over 4 logits
# and every expectation is an exact finite sum: no sampling, no GPT.

REFERENCE_PROBS = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
REFERENCE_LOGPS = REFERENCE_PROBS.log()
TRUE_REWARDS = torch.tensor([0.0, 1.0, -0.5, 0.5], dtype=torch.float64)  # best answer is not the reference's favourite


def policy_at_reference():
    """Logits of a policy that starts equal to the reference, as DPO training does."""
    return REFERENCE_LOGPS.clone().requires_grad_(True)


def population_dpo_loss(logits, beta):
    """Expected DPO loss over all pairs: answers drawn from the reference, labelled by Bradley-Terry.

    Ordered pair (i, j) means "i chosen, j rejected"; its weight is the probability of
    drawing {i, j} from the reference times P(i > j) = sigmoid(r_i - r_j) (DPO paper, Eq. 1).
    """
    chosen, rejected = torch.tensor([(i, j) for i in range(4) for j in range(4) if i != j]).T
    weights = REFERENCE_PROBS[chosen] * REFERENCE_PROBS[rejected] * torch.sigmoid(TRUE_REWARDS[chosen] - TRUE_REWARDS[rejected])
    policy_logps = torch.log_softmax(logits, dim=0)
    losses, _, _ = dpo_loss(policy_logps[chosen], policy_logps[rejected],
                            REFERENCE_LOGPS[chosen], REFERENCE_LOGPS[rejected], beta=beta)
    return (weights * losses).sum()


def single_pair_loss(logits, beta, loss_type, chosen=2, rejected=0):
    """Loss on the one pair in the data: answer 2 always chosen over answer 0 (deterministic)."""
    policy_logps = torch.log_softmax(logits, dim=0)
    losses, _, _ = dpo_loss(policy_logps[[chosen]], policy_logps[[rejected]],
                            REFERENCE_LOGPS[[chosen]], REFERENCE_LOGPS[[rejected]], beta=beta, loss_type=loss_type)
    return losses.sum()


def minimise_with_lbfgs(loss_fn, logits):
    """Run L-BFGS in float64 to its limit: these losses are smooth and convex in the logits."""
    optimizer = torch.optim.LBFGS([logits], lr=1.0, max_iter=500, tolerance_grad=1e-13, tolerance_change=0.0,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(logits)
        loss.backward()
        return loss

    optimizer.step(closure)
    return logits.detach()


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_population_dpo_minimiser_is_reference_tilted_by_exp_reward_over_beta(beta):
    """DPO paper, Eq. 4: the KL-regularised optimum is pi* = pi_ref exp(r / beta) / Z, and the
    DPO loss (Eq. 7) under Bradley-Terry preferences (Eq. 1) is minimised exactly there."""
    logits = minimise_with_lbfgs(lambda logits: population_dpo_loss(logits, beta), policy_at_reference())
    expected = REFERENCE_PROBS * torch.exp(TRUE_REWARDS / beta)
    expected = expected / expected.sum()
    assert torch.max(torch.abs(torch.softmax(logits, dim=0) - expected)) < 1e-8  # L-BFGS reaches ~1e-12


def descend_at_fixed_speed(loss_fn, logits, n_steps, step_size=0.1):
    """Gradient descent with steps of fixed length, so progress does not depend on how steep
    the loss is (like Adam, roughly). DPO's gradient shrinks like exp(-margin), so plain
    gradient descent would crawl for large beta even though it never stops."""
    for _ in range(n_steps):
        (grad,) = torch.autograd.grad(loss_fn(logits), logits)
        with torch.no_grad():
            logits -= step_size * grad / grad.norm()
    return logits


@pytest.mark.parametrize("beta", [0.1, 1.0, 10.0])
def test_dpo_drives_rejected_probability_to_zero_under_deterministic_preferences(beta):
    """DPO paper, Eq. 7 on one pair that is always chosen the same way: -log sigmoid(beta h)
    decreases in h with no minimum, so whatever beta, descent sends pi(rejected) -> 0. The
    KL penalty that beta stands for stops acting when preferences are deterministic, the
    overfitting IPO was designed to avoid (Azar et al. 2023)."""
    logits, chosen, rejected = policy_at_reference(), 2, 0
    loss_fn = lambda logits: single_pair_loss(logits, beta, "dpo")
    losses, rejected_log_odds = [], []  # log(pi(rejected) / pi(chosen)) after every 50 steps
    for _ in range(4):
        logits = descend_at_fixed_speed(loss_fn, logits, n_steps=50)
        policy_logps = torch.log_softmax(logits.detach(), dim=0)
        losses.append(loss_fn(logits).item())
        rejected_log_odds.append((policy_logps[rejected] - policy_logps[chosen]).item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))  # still going down
    assert all(later < earlier - 1.0 for earlier, later in zip(rejected_log_odds, rejected_log_odds[1:]))  # at full speed
    assert torch.softmax(logits.detach(), dim=0)[rejected] < 1e-3
    (grad,) = torch.autograd.grad(loss_fn(logits), logits)
    assert grad[rejected] > 0  # the loss still asks for pi(rejected) to fall further


@pytest.mark.parametrize("beta", [0.1, 1.0, 10.0])
def test_ipo_stops_at_finite_closed_form_under_deterministic_preferences(beta):
    """IPO (Azar et al. 2023, Eq. 17): (h - 1/(2 beta))^2 has its minimum at h = 1/(2 beta),
    i.e. log(pi(chosen)/pi(rejected)) = log(pi_ref(chosen)/pi_ref(rejected)) + 1/(2 beta),
    even when the preference is deterministic; beta keeps its meaning as a regulariser."""
    chosen, rejected = 2, 0
    loss_fn = lambda logits: single_pair_loss(logits, beta, "ipo")
    logits = minimise_with_lbfgs(loss_fn, policy_at_reference()).requires_grad_(True)
    policy_logps = torch.log_softmax(logits.detach(), dim=0)
    expected = (REFERENCE_LOGPS[chosen] - REFERENCE_LOGPS[rejected]).item() + 1 / (2 * beta)
    assert (policy_logps[chosen] - policy_logps[rejected]).item() == pytest.approx(expected, abs=1e-6)
    (grad,) = torch.autograd.grad(loss_fn(logits), logits)
    assert grad.abs().max() < 1e-8  # a true minimum: optimising longer would not move it


# =============================================================================


def test_python_dpo_py_shows_dpo_falling_towards_zero_and_ipo_stopping_at_its_closed_form():
    """dpo.bandit_experiment, which `python dpo.py` prints: two answers, answer 0 always chosen,
    a 50/50 reference. IPO's pi(y_rejected) settles at 1 / (1 + exp(1/(2 beta))), the point
    where log(pi_c / pi_r) = 1/(2 beta) (IPO paper, Eq. 17); DPO's keeps falling, below IPO's."""
    results = dpo.bandit_experiment(betas=(0.5, 2.0), checkpoints=(10, 100, 300))
    for beta in (0.5, 2.0):
        dpo_path, ipo_path = results["dpo", beta], results["ipo", beta]
        assert ipo_path[-1] == pytest.approx(1 / (1 + torch.tensor(1 / (2 * beta)).exp().item()), abs=1e-4)
        assert dpo_path[0] > dpo_path[1] > dpo_path[2] and dpo_path[-1] < ipo_path[-1]


# =============================================================================
# 3. The model: GPT-2 against an independent numpy forward pass
# =============================================================================
# Tests for model.py: GPT-2 forward pass, checkpoint loading and saving, generation, download,
# atomic writes.
#
# Every check compares model.py against something written here independently of it:
# - `gpt2`, a numpy GPT-2 forward pass after picoGPT (Jay Mody), reading the Hugging Face
#   tensors exactly as the hub stores them (Conv1D weights are (in, out), so x @ W + b);
# - `write_safetensors` / `read_safetensors`, a tiny safetensors writer and reader
#   (format: 8-byte little-endian header length N, N bytes of JSON, then raw data);
# - `FakeHub`, an HTTP server that answers like huggingface.co (a 302 to a CDN for
#   model.safetensors, with the sha256 only in X-Linked-Etag; a 200 with a git-sha1 ETag
#   for config.json).
# The facts about the real files and the real hub that these fakes imitate are stated in
# model.py, in the chapter that relies on each. Read model.py next.


# ---------------------------------------------------------------------------
# An independent GPT-2 forward pass in numpy (after picoGPT).

def gelu(x):
    """GPT-2's "gelu_new": the tanh approximation (the exact erf GELU breaks parity)."""
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def layer_norm(x, g, b, eps=1e-5):
    mean, var = x.mean(axis=-1, keepdims=True), x.var(axis=-1, keepdims=True)
    return g * (x - mean) / np.sqrt(var + eps) + b


def linear(x, w, b):
    return x @ w + b  # w is (in, out): the Conv1D orientation of the checkpoint


def causal_self_attention(x, c_attn, c_proj, n_head):  # x: (T, C)
    q, k, v = np.split(linear(x, *c_attn), 3, axis=-1)  # 3 x (T, C)
    mask = np.triu(np.full((len(x), len(x)), -np.inf), k=1)  # token t sees tokens 0..t only
    heads = [softmax(qh @ kh.T / np.sqrt(qh.shape[-1]) + mask) @ vh  # (T, C / n_head)
             for qh, kh, vh in zip(*(np.split(a, n_head, axis=-1) for a in (q, k, v)))]
    return linear(np.hstack(heads), *c_proj)  # (T, C)


def mlp(x, c_fc, c_proj):
    return linear(gelu(linear(x, *c_fc)), *c_proj)  # (T, 4C) -> (T, C)


def gpt2(tokens, p, n_head):
    """Logits (T, V) of one token sequence; p maps hub names ("h.0.attn.c_attn.weight") to arrays."""
    def wb(name):
        return p[name + ".weight"], p[name + ".bias"]
    x = p["wte.weight"][tokens] + p["wpe.weight"][: len(tokens)]  # (T, C)
    for i in range(len({k.split(".")[1] for k in p if k.startswith("h.")})):
        h = f"h.{i}."
        x = x + causal_self_attention(layer_norm(x, *wb(h + "ln_1")), wb(h + "attn.c_attn"),
                                      wb(h + "attn.c_proj"), n_head)
        x = x + mlp(layer_norm(x, *wb(h + "ln_2")), wb(h + "mlp.c_fc"), wb(h + "mlp.c_proj"))
    return layer_norm(x, *wb("ln_f")) @ p["wte.weight"].T  # (T, V): the head is tied to wte


def numpy_logits(params, n_head, idx):
    """gpt2() on each row of idx (B, T), in float64 so that only model.py's rounding shows.
    (Called "numpy" rather than "reference": in DPO the reference is the frozen model.)"""
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    return np.stack([gpt2(np.asarray(row), p64, n_head) for row in idx])  # (B, T, V)


def model_logits(model, idx):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(idx))).double().numpy()


# ---------------------------------------------------------------------------
# A test-side safetensors writer and reader (struct + json only).

ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NP_TO_ST = {np.dtype(v): k for k, v in ST_DTYPES.items()}


def safetensors_bytes(header, data, align=False):
    """A safetensors file: 8-byte little-endian length N, N bytes of JSON header, then data."""
    text = json.dumps(header, separators=(",", ":")).encode()
    if align:  # what transformers' writer does: pad with spaces so the data is 8-byte aligned
        text += b" " * (-len(text) % 8)
    elif len(text) % 8 == 0:  # like the hub's gpt2 file, whose data starts at byte 14,291
        text += b" "
    assert (len(text) % 8 == 0) == align
    return struct.pack("<Q", len(text)) + text + data


def write_safetensors(path, arrays, align=False):
    """Write numpy arrays back to back, in dict order, with {"format": "pt"} metadata."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, a in arrays.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": NP_TO_ST[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    Path(path).write_bytes(safetensors_bytes(header, b"".join(chunks), align))


def bf16_to_float32(raw):
    """BF16 is the top half of a float32's bits."""
    return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path):
    """Return (header, {name: np.ndarray}); BF16 is widened to float32."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    arrays = {}
    for name, info in header.items():
        if name != "__metadata__":
            begin, end = info["data_offsets"]
            a = (bf16_to_float32(data[begin:end]) if info["dtype"] == "BF16"
                 else np.frombuffer(data[begin:end], ST_DTYPES[info["dtype"]]))
            arrays[name] = a.reshape(info["shape"])
    return header, arrays


# ---------------------------------------------------------------------------
# Test-side GPT-2 checkpoints in the two real layouts.

TINY = dict(n_layer=2, n_head=2, n_embd=16, vocab_size=61, n_positions=32)
TINY_CONFIG = GPTConfig(block_size=32, vocab_size=61, n_layer=2, n_head=2, n_embd=16)
COMMIT = "607a30d783dfa663caf39e06633721c8d4cfcd7e"  # the gpt2 commit many caches hold
REPO_DIR = "models--openai-community--gpt2"  # its folder in the hub cache


def hub_config(n_layer, n_head, n_embd, vocab_size, n_positions):
    """config.json as openai-community/gpt2 has it, resized."""
    return {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
            "attn_pdrop": 0.1, "bos_token_id": vocab_size - 1, "embd_pdrop": 0.1,
            "eos_token_id": vocab_size - 1, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
            "model_type": "gpt2", "n_ctx": n_positions, "n_embd": n_embd, "n_head": n_head,
            "n_layer": n_layer, "n_positions": n_positions, "resid_pdrop": 0.1,
            "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
            "summary_type": "cls_index", "summary_use_proj": True,
            "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
            "vocab_size": vocab_size}


def random_gpt2_params(config, seed=0):
    """Random float32 weights named and shaped as in the hub's model.safetensors (no masks).

    The scales keep activations O(1), so that a formula slip (erf GELU, a missing transpose,
    a wrong eps) moves the logits far more than float32 rounding does."""
    rng = np.random.default_rng(seed)
    C, L = config["n_embd"], config["n_layer"]

    def normal(*shape, mean=0.0, std=1.0):
        return (mean + std * rng.standard_normal(shape)).astype(np.float32)

    p = {"wte.weight": normal(config["vocab_size"], C, std=2 * C**-0.5),  # logits O(1)
         "wpe.weight": normal(config["n_positions"], C, std=0.5)}
    for i in range(L):
        for name, (n_in, n_out) in {"ln_1": (0, C), "attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C),
                                    "ln_2": (0, C), "mlp.c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}.items():
            p[f"h.{i}.{name}.weight"] = (normal(n_in, n_out, std=n_in**-0.5) if n_in  # Conv1D: (in, out)
                                         else normal(n_out, mean=1.0, std=0.2))  # layer norm gain
            p[f"h.{i}.{name}.bias"] = normal(n_out, std=0.2)
    p["ln_f.weight"], p["ln_f.bias"] = normal(C, mean=1.0, std=0.2), normal(C, std=0.2)
    return p


def write_checkpoint(directory, params, config, layout="hub", lm_head=False):
    """Write config.json + model.safetensors the way the hub ("hub") or transformers'
    save_pretrained ("transformers") does (model.py, chapter 4, states both layouts)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "hub":  # no prefix, causal-mask buffers, data not 8-byte aligned
        mask = np.tril(np.ones((config["n_positions"],) * 2, np.float32))[None, None]  # (1, 1, P, P)
        tensors = {**params, **{f"h.{i}.attn.bias": mask for i in range(config["n_layer"])}}
    else:  # "transformer." prefix, no masks, header padded to a multiple of 8
        tensors = {"transformer." + k: v for k, v in params.items()}
    if lm_head:
        tensors["lm_head.weight"] = params["wte.weight"]
    write_safetensors(directory / "model.safetensors", tensors, align=(layout == "transformers"))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


@pytest.fixture
def tiny():
    """(config.json, weights) of a tiny GPT-2: random hub-layout float32 arrays, no masks."""
    config = hub_config(**TINY)
    return config, random_gpt2_params(config)


@pytest.fixture
def tiny_dir(tmp_path, tiny):
    """A directory holding the tiny checkpoint in the hub's layout."""
    config, params = tiny
    return write_checkpoint(tmp_path / "ckpt", params, config)




def random_tokens(B=2, T=32, V=61, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, T))


def assert_matches_numpy(model, params, n_head=TINY["n_head"], idx=None, atol=1e-5):
    """model's logits are the numpy GPT-2's on the same weights (random tokens by default)."""
    idx = random_tokens() if idx is None else idx
    np.testing.assert_allclose(model_logits(model, idx), numpy_logits(params, n_head, idx),
                               rtol=0, atol=atol)


# ---------------------------------------------------------------------------
# The library leaves the process alone.

def test_importing_model_sets_no_environment_variable(monkeypatch):
    """A library sets no process-wide state on import (MKL_CBWR, say, is the scripts' to
    set): model.py's top level, executed afresh, leaves os.environ exactly as it was."""
    monkeypatch.delenv("MKL_CBWR", raising=False)
    before = dict(os.environ)
    spec = importlib.util.spec_from_file_location("model_imported_afresh", inspect.getsourcefile(GPT))
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert dict(os.environ) == before


# ---------------------------------------------------------------------------
# The network: size, shapes, tying.

def count_params(C, L, V, P):
    """GPT-2's parameters: embeddings, 12C^2 + 13C per block, the final layer norm."""
    return V * C + P * C + L * (12 * C * C + 13 * C) + 2 * C


def test_default_config_is_gpt2_124m_with_124439808_parameters():
    """The tied head is counted once: the hub file's 548,090,880 data bytes / 4 floats,
    minus its 12 causal masks of 1024 x 1024, is 124,439,808."""
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(GPTConfig())
    n = sum(p.numel() for p in model.parameters())
    assert n == 124_439_808 == count_params(C=768, L=12, V=50257, P=1024)
    assert 548_090_880 // 4 - 12 * 1024 * 1024 == n


def test_tiny_model_has_as_many_parameters_as_the_hub_checkpoint_has_floats(tiny):
    """Every checkpoint tensor (masks aside) is a parameter, and nothing else is."""
    _, params = tiny
    model = GPT(TINY_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == sum(a.size for a in params.values())


def test_lm_head_is_tied_to_token_embedding():
    """GPT-2 has no separate output matrix: logits = x @ wte.T (the checkpoint has no lm_head).
    Tied the plain way, as GPT-2 and nanoGPT do: one Parameter held by both modules."""
    model = GPT(TINY_CONFIG)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_tied_matrix_gradient_is_the_head_part_plus_the_lookup_part():
    """The tied matrix W gets a gradient from both its uses (chain rule): from the head,
    logits = h @ W.T, dL/dW = sum over positions of dL/dlogits (V,) outer h (C,); from the
    lookup, x0 = W[idx] + pos, row idx[b, t] gets dL/dx0[b, t]. Both are computed here by
    hand, in float64, from the activations h and dL/dx0; a model that dropped either use
    from the gradient (an untied copy, a detached head) would fail."""
    torch.manual_seed(0)
    model = GPT(TINY_CONFIG)
    wte = model.transformer.wte.weight
    idx = torch.randint(61, (2, 9))
    idx[0, :4] = 7  # a repeated token: its rows add up
    weights = torch.randn(2, 9, 61)  # loss = sum(logits * weights), so dL/dlogits = weights
    seen = {}
    model.transformer.ln_f.register_forward_hook(lambda module, inputs, h: seen.update(h=h))

    def keep_x0(module, inputs, x0):  # drop's output: the lookup plus the positions
        x0.retain_grad()
        seen.update(x0=x0)
    model.transformer.drop.register_forward_hook(keep_x0)
    (model(idx) * weights).sum().backward()

    head_part = torch.einsum("btv,btc->vc", weights.double(), seen["h"].detach().double())
    lookup_part = torch.zeros(61, 16, dtype=torch.float64)
    for b in range(2):
        for t in range(9):
            lookup_part[idx[b, t]] += seen["x0"].grad[b, t].double()
    assert lookup_part.abs().max() > 1e-3 and head_part.abs().max() > 1e-3  # both parts matter
    torch.testing.assert_close(wte.grad.double(), head_part + lookup_part, rtol=1e-5, atol=1e-6)


def test_logits_have_shape_batch_time_vocab():
    """The model scores every position, not only the last (DPO needs all of them)."""
    logits = GPT(TINY_CONFIG)(torch.zeros(3, 7, dtype=torch.long))
    assert logits.shape == (3, 7, 61)


def test_sequence_longer_than_block_size_raises_value_error():
    """wpe has block_size rows; a longer input must fail loudly, naming both numbers."""
    with pytest.raises(ValueError) as err:
        GPT(TINY_CONFIG)(torch.zeros(1, 33, dtype=torch.long))
    assert "33" in str(err.value) and "32" in str(err.value)


# =============================================================================
# 4. Checkpoints, safetensors and the hub: both real layouts, files written by hand here,
#    a fake hub on 127.0.0.1
# =============================================================================


# ---------------------------------------------------------------------------
# from_pretrained against the numpy GPT-2.

@pytest.mark.parametrize("layout", ["hub", "transformers"])
@pytest.mark.parametrize("lm_head", [False, True])
def test_from_pretrained_directory_matches_numpy_gpt2(tmp_path, tiny, layout, lm_head):
    """Both real layouts load: hub (no prefix, mask buffers, unaligned data) and
    transformers (prefix, padded header), with or without a redundant lm_head.weight."""
    config, params = tiny
    write_checkpoint(tmp_path / "ckpt", params, config, layout, lm_head)
    model = GPT.from_pretrained(str(tmp_path / "ckpt"))
    assert not model.training  # dropout off: logits must be deterministic
    assert model.lm_head.weight is model.transformer.wte.weight  # still one tensor, for training
    assert_matches_numpy(model, params)


def test_from_pretrained_bare_safetensors_file_uses_config_json_beside_it(tmp_path):
    """n_head=2 cannot come from shapes (16 / 64 is not whole); config.json must supply it."""
    config = hub_config(**TINY)
    params = random_gpt2_params(config, seed=1)
    write_checkpoint(tmp_path, params, config)
    model = GPT.from_pretrained(str(tmp_path / "model.safetensors"))
    assert_matches_numpy(model, params)


def test_from_pretrained_bare_file_without_config_infers_config_from_shapes(tmp_path):
    """n_layer, n_embd, vocab_size and block_size are in the shapes; with GPT-2's n_embd=768,
    n_head=12 is GPT-2's (head size 64)."""
    config = hub_config(n_layer=1, n_head=12, n_embd=768, vocab_size=61, n_positions=8)
    params = random_gpt2_params(config)
    write_checkpoint(tmp_path, params, config)
    (tmp_path / "config.json").unlink()
    model = GPT.from_pretrained(str(tmp_path / "model.safetensors"))
    assert_matches_numpy(model, params, n_head=12, idx=random_tokens(T=8))


def test_from_pretrained_bare_file_of_a_width_gpt2_never_had_asks_for_config_json(tiny_dir):
    """With n_embd=16 the head count is anybody's guess; guessing wrong would load a model
    that runs and is wrong, so without config.json the file is refused."""
    (tiny_dir / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        GPT.from_pretrained(str(tiny_dir / "model.safetensors"))


def test_from_pretrained_refuses_an_untied_output_head(tmp_path, tiny):
    """This GPT ties the head to wte, as GPT-2 does; a different lm_head.weight cannot be honoured."""
    config, params = tiny
    params["lm_head.weight"] = params["wte.weight"] + 1.0
    write_checkpoint(tmp_path, params, config)
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        GPT.from_pretrained(str(tmp_path))


def test_from_pretrained_float64_matches_numpy_gpt2_to_1e_9(tiny, tiny_dir):
    """In float64 rounding is gone, so even small slips (eps 1e-6, a GELU variant) would show."""
    _, params = tiny
    model = GPT.from_pretrained(str(tiny_dir), dtype=torch.float64)
    assert model.transformer.wte.weight.dtype == torch.float64
    assert model.lm_head.weight is model.transformer.wte.weight  # .to(dtype) kept the tie
    assert_matches_numpy(model, params, atol=1e-9)


def test_numpy_gpt2_tells_tanh_gelu_from_erf_gelu(monkeypatch, tiny):
    """The parity checks above can fail: the erf GELU moves these logits by more than 1e-4."""
    config, params = tiny
    idx = random_tokens(B=1)
    tanh_logits = numpy_logits(params, config["n_head"], idx)
    monkeypatch.setitem(globals(), "gelu", lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2))))
    assert np.abs(numpy_logits(params, config["n_head"], idx) - tanh_logits).max() > 1e-4


# ---------------------------------------------------------------------------
# from_pretrained refuses checkpoints that do not fit.

def load_edited_checkpoint(directory, edit):
    """Write the tiny hub checkpoint with edit(tensors) applied, then load it."""
    config = hub_config(**TINY)
    params = random_gpt2_params(config)
    edit(params)
    write_checkpoint(directory, params, config)
    return GPT.from_pretrained(str(directory))


def test_from_pretrained_missing_tensor_raises_value_error_naming_it(tmp_path):
    """A silently random-initialised layer would be a wrong model that still runs."""
    with pytest.raises(ValueError, match=re.escape("h.1.mlp.c_fc.bias")):
        load_edited_checkpoint(tmp_path, lambda p: p.pop("h.1.mlp.c_fc.bias"))


def test_from_pretrained_unexpected_tensor_raises_value_error_naming_it(tmp_path):
    """An unknown tensor means the file is not the architecture we think it is."""
    def add(p):
        p["h.0.mlp.c_gate.weight"] = np.zeros((16, 64), np.float32)
    with pytest.raises(ValueError, match=re.escape("h.0.mlp.c_gate.weight")):
        load_edited_checkpoint(tmp_path, add)


def test_from_pretrained_shape_mismatch_raises_value_error_naming_tensor_and_shapes(tmp_path):
    """config.json says 32 positions, the file's wpe has 31: say which tensor and both shapes."""
    def shrink(p):
        p["wpe.weight"] = p["wpe.weight"][:31]
    with pytest.raises(ValueError) as err:
        load_edited_checkpoint(tmp_path, shrink)
    message = str(err.value)
    assert "wpe.weight" in message
    assert re.search(r"31\D{1,4}16", message) and re.search(r"32\D{1,4}16", message), message


# ---------------------------------------------------------------------------
# safetensors: round trip, independent parsing, malformed files, atomic writes.

def test_save_safetensors_round_trip_and_header_parsed_independently(tmp_path):
    """dtype strings, shapes and contiguous offsets are what the format spec says; values,
    dtypes and metadata survive; a transposed view is written by value, not by storage."""
    path = tmp_path / "t.safetensors"
    w = torch.randn(3, 5)
    tensors = {"f32": torch.randn(2, 3), "f16": torch.randn(4).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "transposed": w.t(), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    save_safetensors(tensors, path, metadata={"format": "pt", "note": "hello"})

    header, arrays = read_safetensors(path)
    assert header["__metadata__"] == {"format": "pt", "note": "hello"}
    assert {k: v["dtype"] for k, v in header.items() if k != "__metadata__"} == {
        "f32": "F32", "f16": "F16", "bf16": "BF16", "transposed": "F32", "scalar": "F32", "empty": "F32"}
    assert {k: v["shape"] for k, v in header.items() if k != "__metadata__"} == {
        k: list(t.shape) for k, t in tensors.items()}
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # no gaps
    n_header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert 8 + n_header + spans[-1][1] == path.stat().st_size
    for name, t in tensors.items():
        np.testing.assert_array_equal(arrays[name], t.float().numpy())

    loaded = load_safetensors(path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name


EVERY_DTYPE = {  # name in the file: values that each dtype must keep exactly, extremes included
    "F64": ([1 / 3, -0.0, -1e308, 5e-324, np.inf], np.float64, torch.float64),
    "F32": ([1 / 3, -0.0, -3.4e38, 1e-45, -np.inf], np.float32, torch.float32),
    "F16": ([1 / 3, -0.0, 65504.0, -6e-8, np.inf], np.float16, torch.float16),
    "BF16": ([1.5, -2.0, 2.0**127, -np.inf, -(2.0**-133)], None, torch.bfloat16),  # exact in BF16
    "I64": ([-(2**63), 2**63 - 1, -1, 0, 50256], np.int64, torch.int64),
    "I32": ([-(2**31), 2**31 - 1, -1, 0, 7], np.int32, torch.int32),
    "I16": ([-(2**15), 2**15 - 1, -1, 0, 7], np.int16, torch.int16),
    "I8": ([-128, 127, -1, 0, -7], np.int8, torch.int8),  # signed: the negatives must come back negative
    "U8": ([0, 255, 1, 128, 7], np.uint8, torch.uint8),
    "BOOL": ([True, False, True, True, False], np.bool_, torch.bool),
}


def test_every_dtype_model_py_knows_is_tested_here():
    """The round trip below covers the whole of model.py's dtype table, no more, no less."""
    assert set(SAFETENSORS_DTYPES) == set(EVERY_DTYPE)


@pytest.mark.parametrize("name", EVERY_DTYPE)
def test_every_dtype_round_trips_exactly_through_files_read_and_written_independently(tmp_path, name):
    """save_safetensors writes each dtype under its spec name with the values a plain
    little-endian reader decodes (I8 as signed two's complement, BOOL as 0/1 bytes), and
    load_safetensors decodes a file the test-side writer made to the same values and dtype."""
    values, np_dtype, torch_dtype = EVERY_DTYPE[name]
    t = torch.tensor(values, dtype=torch_dtype).reshape(5, 1)
    save_safetensors({"t": t}, tmp_path / "ours.safetensors")
    header, arrays = read_safetensors(tmp_path / "ours.safetensors")
    assert header["t"]["dtype"] == name and header["t"]["shape"] == [5, 1]
    expected = np.array(values, np.float32 if name == "BF16" else np_dtype).reshape(5, 1)
    np.testing.assert_array_equal(arrays["t"], expected)
    if expected.dtype.kind == "f":
        np.testing.assert_array_equal(np.signbit(arrays["t"]), np.signbit(expected))  # -0.0 too

    if name == "BF16":  # the test-side writer has no BF16: its bits are a float32's top half
        data = (expected.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        entry = {"dtype": "BF16", "shape": [5, 1], "data_offsets": [0, len(data)]}
        (tmp_path / "theirs.safetensors").write_bytes(safetensors_bytes({"t": entry}, data))
    else:
        write_safetensors(tmp_path / "theirs.safetensors", {"t": expected})
    for path in ("ours.safetensors", "theirs.safetensors"):
        loaded = load_safetensors(tmp_path / path)["t"]
        assert loaded.dtype == torch_dtype and loaded.shape == (5, 1), path
        assert loaded.view(torch.uint8).tolist() == t.view(torch.uint8).tolist(), path  # bit for bit


def test_load_safetensors_reads_hand_written_f16_and_bf16_at_unaligned_offsets(tmp_path):
    """A 6-byte F16 tensor first pushes the F32 and BF16 data off any alignment."""
    f16 = np.array([1.5, -2.0, 65504.0], np.float16)
    f32 = np.array([[0.1, -3e38], [1e-45, 7.0]], np.float32)
    bf16_bits = np.array([0x3FC0, 0xC000, 0x7F80], np.uint16)  # 1.5, -2.0, +inf
    data = f16.tobytes() + f32.tobytes() + bf16_bits.tobytes()
    header = {"__metadata__": {"format": "pt"},
              "half": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
              "single": {"dtype": "F32", "shape": [2, 2], "data_offsets": [6, 22]},
              "brain": {"dtype": "BF16", "shape": [3], "data_offsets": [22, 28]}}
    (tmp_path / "t.safetensors").write_bytes(safetensors_bytes(header, data))
    loaded = load_safetensors(tmp_path / "t.safetensors")
    assert loaded["half"].dtype == torch.float16 and loaded["brain"].dtype == torch.bfloat16
    np.testing.assert_array_equal(loaded["half"].numpy(), f16)
    np.testing.assert_array_equal(loaded["single"].numpy(), f32)
    np.testing.assert_array_equal(loaded["brain"].float().numpy(), [1.5, -2.0, np.inf])


def one_tensor(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


EIGHT_BYTES = np.arange(2, dtype=np.float32).tobytes()
MALFORMED = {  # name: (file bytes, what the message must say)
    "shorter than the length prefix": (b"\x10\x00\x00", r"(?i)truncat|short|small|header"),
    "truncated data": (safetensors_bytes({"a": one_tensor(shape=[4], offsets=[0, 16])}, EIGHT_BYTES * 2)[:-5],
                       r"(?i)truncat|short|offset|range|beyond|exceed|end"),
    "header length past the end": (struct.pack("<Q", 1000) + b'{"a":1}', r"(?i)header"),
    "header length above 100 MB": (struct.pack("<Q", 2**62) + b"{}", r"(?i)header"),
    "header not JSON": (struct.pack("<Q", 5) + b"{oops", r"(?i)json"),
    "header a JSON list": (safetensors_bytes([1, 2], b""), r"(?i)object|dict|mapping"),
    "offsets overlap": (safetensors_bytes({"a": one_tensor(offsets=[0, 8]), "b": one_tensor(offsets=[4, 12])},
                                          EIGHT_BYTES + EIGHT_BYTES[:4]), r"(?i)overlap|contiguous|offset"),
    "gap between tensors": (safetensors_bytes({"a": one_tensor(offsets=[0, 8]), "b": one_tensor(offsets=[12, 20])},
                                              EIGHT_BYTES * 2 + EIGHT_BYTES[:4]), r"(?i)gap|contiguous|offset"),
    "offsets past the data": (safetensors_bytes({"a": one_tensor(offsets=[8, 16])}, EIGHT_BYTES),
                              r"(?i)offset|range|beyond|exceed|truncat|gap|contiguous"),
    "end before begin": (safetensors_bytes({"a": one_tensor(offsets=[8, 0])}, EIGHT_BYTES),
                         r"(?i)offset|range|order|byte|size"),
    "byte count != numel * itemsize": (safetensors_bytes({"a": one_tensor(shape=[3], offsets=[0, 8])}, EIGHT_BYTES),
                                       r"(?i)byte|size|numel|shape"),
    "unknown dtype": (safetensors_bytes({"a": one_tensor(dtype="X3")}, EIGHT_BYTES), r"(?i)dtype|X3"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_load_safetensors_rejects_malformed_file_with_value_error_naming_path(tmp_path, case):
    """A broken download must say what is wrong and where, not crash deep inside numpy/json."""
    content, pattern = MALFORMED[case]
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=pattern) as err:
        load_safetensors(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("extra", [b"\0", b"\0" * 8, EIGHT_BYTES * 3])
def test_load_safetensors_refuses_bytes_after_the_last_tensor(tmp_path, extra):
    """The spec (and its reference reader) wants the tensors to tile the data exactly: bytes
    after the last tensor mean the header and the file disagree (a file appended to, or the
    wrong header). The message names the problem, how many bytes, and the file."""
    path = tmp_path / "trailing.safetensors"
    path.write_bytes(safetensors_bytes({"a": one_tensor()}, EIGHT_BYTES + extra))
    with pytest.raises(ValueError, match=rf"{len(extra)} trailing bytes after the last tensor") as err:
        load_safetensors(path)
    assert str(path) in str(err.value)
    path.write_bytes(safetensors_bytes({"a": one_tensor()}, EIGHT_BYTES))  # the same file, without them,
    assert load_safetensors(path)["a"].tolist() == [0.0, 1.0]  # loads


def test_save_safetensors_replaces_the_file_atomically(tmp_path):
    """Written to a temporary file, then os.replace'd: a reader that has the old file open
    keeps reading the old bytes, and only the target file remains."""
    path = tmp_path / "x.safetensors"
    save_safetensors({"a": torch.ones(3)}, path)
    old = path.read_bytes()
    with open(path, "rb") as reader:
        save_safetensors({"a": torch.zeros(300)}, path)
        assert reader.read() == old
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_failed_save_safetensors_keeps_old_file_and_leaves_no_temp_files(tmp_path):
    """A save that dies half-way must not destroy the previous checkpoint or leave debris.
    A meta tensor has a dtype and a shape but no bytes, so writing it fails mid-file."""
    path = tmp_path / "x.safetensors"
    save_safetensors({"a": torch.ones(3)}, path)
    for bad in ("not a tensor", torch.empty(3, device="meta")):
        for target in (path, tmp_path / "new.safetensors"):
            with pytest.raises(Exception):  # any error, as long as it is raised
                save_safetensors({"a": torch.zeros(3), "b": bad}, target)
            assert os.listdir(tmp_path) == ["x.safetensors"]
            assert torch.equal(load_safetensors(path)["a"], torch.ones(3))


# ---------------------------------------------------------------------------
# write_atomically: the one helper every write goes through (train_toy.py uses it for
# its whole output folder).

def tree(root):
    """{relative path: bytes} of every file below root (or of root itself, if a file)."""
    root = Path(root)
    if root.is_file():
        return {".": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_file(tmp):
    tmp.write_bytes(b"new file")


def write_folder(tmp):
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"new weights")
    (tmp / "metrics.jsonl").write_text('{"step": 1}\n')


WRITERS = {"file": (write_file, {".": b"new file"}),
           "folder": (write_folder, {"metrics.jsonl": b'{"step": 1}\n', "model.safetensors": b"new weights"})}


@pytest.fixture(params=["nothing", "file", "folder"])
def old(request, tmp_path):
    """What is at tmp_path/out before the write: nothing, a file, or a folder with a subfolder."""
    path = tmp_path / "out"
    if request.param == "file":
        path.write_bytes(b"old file")
    elif request.param == "folder":
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "old.bin").write_bytes(b"old weights")
        (path / "notes.txt").write_text("old notes")
    return path


@pytest.mark.parametrize("kind", WRITERS)
def test_write_atomically_puts_the_new_file_or_folder_in_place_and_nothing_else(old, kind):
    """On success path holds exactly what write(tmp) made (old contents gone, a folder's too),
    tmp was a fresh name in the same folder, and no temporary sibling is left. The files get
    the permissions open() gives under the umask, not mkstemp's 0600."""
    write, expected = WRITERS[kind]
    given = []

    def recording_write(tmp):
        given.append(tmp)
        assert tmp.parent == old.parent and not os.path.lexists(tmp)
        write(tmp)
    write_atomically(old, recording_write)
    assert tree(old) == expected
    assert os.listdir(old.parent) == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    for p in [old, *old.rglob("*")]:
        if p.is_file():
            assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("kind", WRITERS)
def test_write_atomically_that_fails_leaves_the_old_contents_and_no_temporary(old, kind, error):
    """An exception inside write (even KeyboardInterrupt) propagates, path is byte for byte
    what it was (or still absent), and the half-written file or folder is gone."""
    before = tree(old) if old.exists() else None
    write, _ = WRITERS[kind]

    def failing_write(tmp):
        write(tmp)  # half done...
        raise error("interrupted")
    with pytest.raises(error, match="interrupted"):
        write_atomically(old, failing_write)
    assert (tree(old) if old.exists() else None) == before
    assert os.listdir(old.parent) == (["out"] if before is not None else [])


# ---------------------------------------------------------------------------
# save_pretrained writes what the hub serves.

def test_save_pretrained_writes_hub_layout_that_numpy_gpt2_reproduces(tmp_path):
    """No prefix, no lm_head, Conv1D (in, out) weights: the numpy GPT-2, which reads
    the hub layout, must reproduce the model's own logits from the saved file alone."""
    torch.manual_seed(0)
    model = GPT(TINY_CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial layer norms and biases too
            p.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    assert {k: config[k] for k in TINY} == TINY

    header, arrays = read_safetensors(tmp_path / "model.safetensors")
    assert header["__metadata__"]["format"] == "pt"
    expected = {k: v.shape for k, v in random_gpt2_params(hub_config(**TINY)).items()}
    masks = {k for k in arrays if re.fullmatch(r"h\.\d+\.attn\.(masked_)?bias", k)}  # optional buffers
    assert {k: a.shape for k, a in arrays.items() if k not in masks} == expected
    assert arrays["h.0.attn.c_attn.weight"].shape == (16, 48)  # (in, out), not nn.Linear's (out, in)
    params = {k: a for k, a in arrays.items() if k not in masks}
    assert_matches_numpy(model, params)


def test_save_pretrained_then_from_pretrained_round_trips_exactly(tmp_path, tiny, tiny_dir):
    """Loading a hub checkpoint and saving it gives back the same tensors bit for bit,
    and reloading the saved directory gives identical logits."""
    _, params = tiny
    model = GPT.from_pretrained(str(tiny_dir))
    model.save_pretrained(tmp_path / "out")
    _, arrays = read_safetensors(tmp_path / "out" / "model.safetensors")
    for name, a in params.items():
        np.testing.assert_array_equal(arrays[name], a, err_msg=name)
    again = GPT.from_pretrained(str(tmp_path / "out"))
    assert np.array_equal(model_logits(again, random_tokens()), model_logits(model, random_tokens()))


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Atomic writes must not leave owner-only files (as mkstemp makes them): the result is
    as open() makes it under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    GPT(TINY_CONFIG).save_pretrained(tmp_path)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# ---------------------------------------------------------------------------
# generate

def numpy_greedy(params, n_head, prompt, n_new):
    """Append argmax of the last position's logits, n_new times, using the numpy model."""
    seq = list(prompt)
    for _ in range(n_new):
        seq.append(int(numpy_logits(params, n_head, [seq])[0, -1].argmax()))
    return seq


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=1)])
def test_greedy_generate_equals_argmax_loop_of_numpy_gpt2(tiny, tiny_dir, sampling):
    """temperature 0 is greedy decoding; so is sampling restricted to the top 1 token."""
    config, params = tiny
    model = GPT.from_pretrained(str(tiny_dir))
    prompt = random_tokens(B=2, T=5)
    out = model.generate(torch.as_tensor(prompt), max_new_tokens=10, **sampling)
    assert out.shape == (2, 15)
    for row, p in zip(out.tolist(), prompt):
        assert row == numpy_greedy(params, config["n_head"], p, 10)


# ---------------------------------------------------------------------------
# Downloading from the hub, against a fake hub on 127.0.0.1 (model.py, chapter 5, states
# how the real one answers).

def git_blob_sha1(data):
    """The ETag the hub gives files stored in git (config.json): git's object id."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeHub:
    files: dict  # filename -> bytes
    repo: str = "openai-community/gpt2"  # where the files live; another name = a renamed repo
    truncate: bool = False  # the CDN promises the whole file, sends half, hangs up
    linked_etag: str = ""  # override X-Linked-Etag (a wrong sha256)
    no_linked_etag: bool = False  # a hub that states no sha256: only the size can catch a cut
    direct: bool = False  # a mirror that serves large files itself, 200 with a sha256 ETag
    config_etag: str = ""  # override config.json's ETag (a wrong git blob sha1)
    requests: list = field(default_factory=list)


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    """Answers like huggingface.co; HTTP/1.0, so every connection closes after one answer."""

    def do_HEAD(self):
        self.answer(send_body=False)

    def do_GET(self):
        self.answer(send_body=True)

    def log_message(self, *args):  # keep test output quiet
        pass

    def send(self, status, headers, body=b"", send_body=True):
        self.send_response(status)
        for key, value in {**headers, "Content-Length": headers.get("Content-Length", len(body))}.items():
            self.send_header(key, str(value))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def answer(self, send_body):
        hub = self.server.hub
        hub.requests.append((self.command, self.path))
        path = urllib.parse.urlsplit(self.path).path
        m = re.fullmatch(r"/(.+)/resolve/main/([^/]+)", path)
        if path.startswith("/cdn/") and path[5:] in hub.files:  # the CDN: its own, different ETag
            data = hub.files[path[5:]]
            headers = {"ETag": f'"{hashlib.sha256(b"cdn" + data).hexdigest()}"', "Content-Length": len(data)}
            self.send(200, headers, data[: len(data) // 2] if hub.truncate else data, send_body)
        elif m and m[1] != hub.repo:  # renamed repo: a relative redirect to the new hub path
            self.send(307, {"Location": f"/{hub.repo}/resolve/main/{m[2]}"})
        elif m and m[2] == "config.json":  # small file in git: 200 directly
            data = hub.files["config.json"]
            etag = hub.config_etag or git_blob_sha1(data)
            self.send(200, {"ETag": f'"{etag}"', "X-Repo-Commit": COMMIT}, data, send_body)
        elif m and m[2] in hub.files and hub.direct:  # a mirror: the bytes at once, sha256 as ETag
            data = hub.files[m[2]]
            etag = hub.linked_etag or hashlib.sha256(data).hexdigest()
            self.send(200, {"ETag": f'"{etag}"', "X-Repo-Commit": COMMIT}, data, send_body)
        elif m and m[2] in hub.files:  # LFS file: 302 to the CDN; the hub's facts only here
            data, port = hub.files[m[2]], self.server.server_address[1]
            cdn = f"http://localhost:{port}/cdn/{m[2]}?X-Amz-Signature=f00d"  # same server, another host name
            headers = {"Location": cdn, "X-Linked-Size": len(data), "X-Repo-Commit": COMMIT,
                       "X-Linked-Etag": f'"{hub.linked_etag or hashlib.sha256(data).hexdigest()}"'}
            if hub.no_linked_etag:
                del headers["X-Linked-Etag"]
            self.send(302, headers)
        else:
            self.send(404, {"X-Error-Code": "EntryNotFound"})


@contextlib.contextmanager
def serving(hub, monkeypatch):
    """Run the fake hub in a daemon thread with HF_ENDPOINT pointing at it; always shut it down."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHubHandler)
    server.hub = hub
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port_url():
    """A URL where nothing listens: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def files_under(root):
    """Every file and symlink below root, relative to it, sorted."""
    return sorted(str(Path(d, f).relative_to(root)) for d, _, fs in os.walk(root) for f in fs)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache at $HF_HOME/hub under tmp_path; no other hub setting leaks in."""
    for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME", "HF_ENDPOINT",
                "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf" / "hub"


@pytest.fixture
def no_network(hub_cache, monkeypatch):
    """HF_ENDPOINT at a port where nothing listens: any download attempt fails at once."""
    url = closed_port_url()
    monkeypatch.setenv("HF_ENDPOINT", url)
    return url


@pytest.fixture
def tiny_repo(tiny, tiny_dir):
    """(params, config, files) of the tiny checkpoint in the hub layout, as the hub would serve it."""
    config, params = tiny
    files = {name: (tiny_dir / name).read_bytes() for name in ("config.json", "model.safetensors")}
    return params, config, files


@pytest.mark.parametrize("env, expected", [
    ({"HF_HUB_CACHE": "/a", "HF_HOME": "/b", "XDG_CACHE_HOME": "/c"}, "/a"),
    ({"HF_HOME": "/b", "XDG_CACHE_HOME": "/c"}, "/b/hub"),
    ({"XDG_CACHE_HOME": "/c"}, "/c/huggingface/hub"),
    ({"HOME": "/home/u"}, "/home/u/.cache/huggingface/hub"),
])
def test_hub_cache_dir_follows_huggingface_hub_precedence(monkeypatch, env, expected):
    """The same order huggingface_hub uses, so an existing cache is found and reused."""
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert Path(hub_cache_dir()) == Path(expected)


def test_from_pretrained_gpt2_downloads_into_hub_cache_then_reuses_it_offline(hub_cache, tiny_repo, monkeypatch):
    """The cache after a download looks like huggingface_hub's (blob named by sha256,
    relative symlink, refs/main, files readable as open() makes them), and a second call
    needs no network at all."""
    params, config, files = tiny_repo
    with serving(FakeHub(files), monkeypatch) as hub:
        assert_matches_numpy(GPT.from_pretrained("gpt2"), params)
        assert any("/cdn/model.safetensors" in path for _, path in hub.requests)
        n_requests = len(hub.requests)
        GPT.from_pretrained("gpt2")
        assert len(hub.requests) == n_requests  # answered from the cache

    sha256, sha1 = hashlib.sha256(files["model.safetensors"]).hexdigest(), git_blob_sha1(files["config.json"])
    assert files_under(hub_cache) == sorted([
        f"{REPO_DIR}/blobs/{sha256}", f"{REPO_DIR}/blobs/{sha1}", f"{REPO_DIR}/refs/main",
        f"{REPO_DIR}/snapshots/{COMMIT}/config.json", f"{REPO_DIR}/snapshots/{COMMIT}/model.safetensors"])
    repo = hub_cache / REPO_DIR
    assert (repo / "refs" / "main").read_text().strip() == COMMIT
    assert (repo / "blobs" / sha256).read_bytes() == files["model.safetensors"]
    for name, blob in [("model.safetensors", sha256), ("config.json", sha1)]:
        assert os.readlink(repo / "snapshots" / COMMIT / name) == f"../../blobs/{blob}"
    umask = os.umask(0)
    os.umask(umask)
    for blob in (sha256, sha1):
        assert (repo / "blobs" / blob).stat().st_mode & 0o777 == 0o666 & ~umask

    assert_matches_numpy(GPT.from_pretrained("gpt2"), params)  # server gone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_matches_numpy(GPT.from_pretrained("gpt2"), params)


@pytest.mark.parametrize("fault", ["truncate", "wrong sha256"])
def test_failed_download_raises_and_leaves_nothing_cached(hub_cache, tiny_repo, monkeypatch, fault):
    """A half or corrupt file must never look like a cached model; config.json, which did
    download correctly, may stay."""
    _, _, files = tiny_repo
    wrong = hashlib.sha256(b"some other file").hexdigest()
    hub = FakeHub(files, truncate=(fault == "truncate"), linked_etag=wrong if fault == "wrong sha256" else "")
    with serving(hub, monkeypatch), pytest.raises((RuntimeError, ValueError)) as err:
        GPT.from_pretrained("gpt2")
    if fault == "wrong sha256":
        assert "sha256" in str(err.value).lower()
    config_files = {f"{REPO_DIR}/blobs/{git_blob_sha1(files['config.json'])}", f"{REPO_DIR}/refs/main",
                    f"{REPO_DIR}/snapshots/{COMMIT}/config.json"}
    assert set(files_under(hub_cache.parent)) <= config_files


def test_config_json_not_matching_its_git_blob_sha1_is_not_kept(hub_cache, tiny_repo, monkeypatch, capsys):
    """config.json's ETag is git's blob id of its bytes: a mismatch is reported and the file
    is not kept. The weights, already verified, stay; the known gpt2 config then stands in,
    which these tiny weights do not fit, so loading them fails."""
    _, _, files = tiny_repo
    with serving(FakeHub(files, config_etag=git_blob_sha1(b"another config")), monkeypatch), \
            pytest.raises(ValueError, match="missing tensor.*of the configured size"):
        GPT.from_pretrained("gpt2")
    assert "corrupt: its git blob sha1" in capsys.readouterr().err
    sha256 = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert files_under(hub_cache) == sorted([f"{REPO_DIR}/blobs/{sha256}", f"{REPO_DIR}/refs/main",
                                             f"{REPO_DIR}/snapshots/{COMMIT}/model.safetensors"])


def test_truncated_download_is_caught_by_its_size_when_no_sha256_is_stated(hub_cache, tiny_repo, monkeypatch):
    """Without X-Linked-Etag only X-Linked-Size can tell a cut download from a whole one."""
    _, _, files = tiny_repo
    with serving(FakeHub(files, truncate=True, no_linked_etag=True), monkeypatch), \
            pytest.raises(RuntimeError) as err:
        GPT.from_pretrained("gpt2")
    half, whole = len(files["model.safetensors"]) // 2, len(files["model.safetensors"])
    assert f"stopped after {half} of {whole} bytes" in str(err.value)
    assert files_under(hub_cache.parent) == []


def test_a_whole_download_without_a_stated_sha256_goes_straight_into_the_snapshot(hub_cache, tiny_repo,
                                                                                   monkeypatch):
    """With no hash from the hub there is no blob name, and the CDN's own ETag must not be
    taken for one: the checked-by-size file is kept as a plain file in the snapshot."""
    params, _, files = tiny_repo
    with serving(FakeHub(files, no_linked_etag=True), monkeypatch):
        assert_matches_numpy(GPT.from_pretrained("gpt2"), params)
    weights = hub_cache / REPO_DIR / "snapshots" / COMMIT / "model.safetensors"
    assert not weights.is_symlink() and weights.read_bytes() == files["model.safetensors"]
    assert files_under(hub_cache / REPO_DIR / "blobs") == [git_blob_sha1(files["config.json"])]


@pytest.mark.parametrize("good", [True, False])
def test_a_mirror_serving_files_directly_is_checked_by_its_sha256_etag(hub_cache, tiny_repo, monkeypatch, good):
    """HF_ENDPOINT may be a mirror that answers 200 with the bytes and a 64-hex ETag: that ETag
    is the sha256 to check (and a wrong one is refused), while a 40-hex one is git's blob id."""
    params, _, files = tiny_repo
    wrong = "" if good else hashlib.sha256(b"another file").hexdigest()
    with serving(FakeHub(files, direct=True, linked_etag=wrong), monkeypatch):
        if good:
            assert_matches_numpy(GPT.from_pretrained("gpt2"), params)
        else:
            with pytest.raises(RuntimeError, match="corrupt: its sha256"):
                GPT.from_pretrained("gpt2")
            assert files_under(hub_cache.parent) == []


def test_an_unwritable_cache_is_a_clear_error(tmp_path, no_network, monkeypatch):
    """A cache folder that cannot be made (here: a file is in the way) says where and what to set."""
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "not-a-folder" / "hub"))
    with pytest.raises(RuntimeError, match="cannot write to the Hugging Face cache .* HF_HUB_CACHE"):
        GPT.from_pretrained("gpt2")


def test_from_pretrained_follows_relative_redirect_of_renamed_repo(hub_cache, tiny_repo, monkeypatch):
    """A renamed repo answers 307 with a relative Location on the hub itself."""
    params, _, files = tiny_repo
    with serving(FakeHub(files, repo="openai-community/gpt2-renamed"), monkeypatch) as hub:
        model = GPT.from_pretrained("gpt2")
    assert any(path.startswith("/openai-community/gpt2-renamed/") for _, path in hub.requests)
    assert_matches_numpy(model, params)


@pytest.mark.parametrize("value", ["1", "on", "Yes", "TRUE"])
def test_offline_and_not_cached_raises_file_not_found_saying_where_to_put_it(hub_cache, no_network, monkeypatch,
                                                                             value):
    """Offline means no network; the message tells the user where the file should be."""
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    with pytest.raises(FileNotFoundError) as err:
        GPT.from_pretrained("gpt2")
    assert str(hub_cache) in str(err.value) and "--weights" in str(err.value)


def test_connection_refused_raises_runtime_error_with_url_and_weights_hint(no_network):
    """No network: say which URL failed and how to use a local file instead."""
    with pytest.raises(RuntimeError) as err:
        GPT.from_pretrained("gpt2")
    assert f"{no_network}/openai-community/gpt2/resolve/main/" in str(err.value)
    assert "--weights" in str(err.value)


def test_existing_hub_cache_is_used_without_network_preferring_refs_main(tmp_path, hub_cache, no_network,
                                                                          tiny_repo):
    """A cache made by huggingface_hub is reused as is; of several snapshots, refs/main's wins."""
    params, config, files = tiny_repo
    stale = write_checkpoint(tmp_path / "stale", random_gpt2_params(config, seed=7), config)
    repo = hub_cache / REPO_DIR
    for commit, model_bytes in [("1" * 40, (stale / "model.safetensors").read_bytes()),
                                ("5" * 40, files["model.safetensors"]),
                                ("9" * 40, (stale / "model.safetensors").read_bytes())]:
        sha256 = hashlib.sha256(model_bytes).hexdigest()
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / sha256).write_bytes(model_bytes)
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "model.safetensors").symlink_to(f"../../blobs/{sha256}")
        (repo / "snapshots" / commit / "config.json").write_bytes(files["config.json"])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("5" * 40)
    assert_matches_numpy(GPT.from_pretrained("gpt2"), params)


def test_cache_under_the_old_gpt2_repo_name_is_reused(hub_cache, no_network, tiny_repo):
    """transformers' from_pretrained("gpt2") cached it as models--gpt2 (before the rename to
    openai-community/gpt2); that copy is found too, with no network."""
    params, _, files = tiny_repo
    snapshot = hub_cache / "models--gpt2" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)  # copies, as on systems without symlinks
    assert_matches_numpy(GPT.from_pretrained("gpt2"), params)


@needs_cuda
def test_model_on_cuda_matches_numpy_gpt2_and_decodes_the_same_tokens(tiny, tiny_dir):
    """The GPU path loads onto the GPU and computes the same GPT-2 as the numpy forward pass,
    to float32 rounding (PyTorch keeps TF32 off for float32 matmuls unless asked)."""
    config, params = tiny
    model = GPT.from_pretrained(str(tiny_dir), device="cuda")
    assert all(p.is_cuda for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight  # .to("cuda") kept the tie
    idx = random_tokens()
    with torch.no_grad():
        logits = model(torch.as_tensor(idx, device="cuda")).double().cpu().numpy()
    np.testing.assert_allclose(logits, numpy_logits(params, config["n_head"], idx), rtol=0, atol=1e-4)
    prompt = random_tokens(B=2, T=5)
    out = model.generate(torch.as_tensor(prompt, device="cuda"), max_new_tokens=10, temperature=0)
    for row, p in zip(out.tolist(), prompt):
        assert row == numpy_greedy(params, config["n_head"], p, 10)


# ---------------------------------------------------------------------------
# Cross-checks with Hugging Face's own libraries. The project never needs them and CI does
# not install them; where they are installed, these check the hand-written safetensors code
# and the weight mapping against the implementations everyone else uses.

def test_safetensors_library_reads_our_files_and_we_read_its_files(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="cross-check needs the safetensors package")
    tensors = {"f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 3).bfloat16(),
               "f64": torch.randn(2, dtype=torch.float64), "i64": torch.tensor([1, -2, 2**40]),
               "i8": torch.tensor([-128, 127, -1], dtype=torch.int8), "bool": torch.tensor([True, False])}
    save_safetensors(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt", "note": "x"})
    theirs = safetensors_torch.load_file(str(tmp_path / "ours.safetensors"))
    assert set(theirs) == set(tensors)
    assert all(theirs[k].dtype == t.dtype and torch.equal(theirs[k], t) for k, t in tensors.items())
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}

    safetensors_torch.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    ours = load_safetensors(tmp_path / "theirs.safetensors")
    assert set(ours) == set(tensors)
    assert all(ours[k].dtype == t.dtype and torch.equal(ours[k], t) for k, t in tensors.items())


def transformers_gpt2():
    """A GPT2LMHeadModel of TINY's shape with weights far from their initialisation."""
    transformers = pytest.importorskip("transformers", reason="cross-check needs the transformers package")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).eval()
    with torch.no_grad():
        for p in hf.parameters():  # non-trivial layer norms and biases too
            p.normal_(0.0, 0.3)
    return transformers, hf


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(torch.as_tensor(idx)).logits.double().numpy()


def test_transformers_gpt2_checkpoint_loads_with_the_same_logits(tmp_path):
    """transformers' own save_pretrained output (its real layout, not our imitation of it)
    loads here, and this GPT-2 computes transformers' GPT-2 logits."""
    _, hf = transformers_gpt2()
    hf.save_pretrained(tmp_path / "hf")
    model = GPT.from_pretrained(str(tmp_path / "hf"))
    idx = random_tokens()
    np.testing.assert_allclose(model_logits(model, idx), hf_logits(hf, idx), rtol=0, atol=1e-4)


def test_transformers_gpt2_loads_what_save_pretrained_writes(tmp_path):
    """The other way: transformers reads save_pretrained's hub-layout files as GPT-2."""
    transformers, hf = transformers_gpt2()
    hf.save_pretrained(tmp_path / "hf")
    GPT.from_pretrained(str(tmp_path / "hf")).save_pretrained(tmp_path / "ours")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    idx = random_tokens()
    np.testing.assert_array_equal(hf_logits(again, idx), hf_logits(hf, idx))


# =============================================================================
# 5. Bradley-Terry: the preference model under DPO, fitted on its own
# =============================================================================
#
# Independent references used below: a log-likelihood and gradient written out
# per comparison, closed forms for two items, and simulation from known strengths.

def simulate_comparisons(true_scores, n_comparisons, rng):
    """Pairs drawn uniformly; i beats j with probability 1 / (1 + exp(-(s_i - s_j)))."""
    n = len(true_scores)
    i = rng.integers(0, n, n_comparisons)
    j = (i + rng.integers(1, n, n_comparisons)) % n  # any item but i
    i_wins = rng.random(n_comparisons) < 1 / (1 + np.exp(-(true_scores[i] - true_scores[j])))
    return np.stack([np.where(i_wins, i, j), np.where(i_wins, j, i)], axis=1)  # (N, 2) winner, loser


def objective_gradient(comparisons, scores, l2):
    """d/ds of sum log sigmoid(s_w - s_l) - (l2/2)||s||^2, one comparison at a time."""
    grad = -l2 * scores
    for winner, loser in comparisons:
        upset = 1 / (1 + math.exp(scores[winner] - scores[loser]))  # P(loser wins) = d log sigmoid(m) / dm
        grad[winner] += upset
        grad[loser] -= upset
    return grad


TRUE_SCORES = np.array([-1.5, -0.8, 0.0, 0.3, 0.9, 1.4])
SIMULATED = simulate_comparisons(TRUE_SCORES, 3000, np.random.default_rng(0))


@functools.cache
def simulated_fit(l2=0.0):
    """fit_bradley_terry(SIMULATED, l2=l2), fitted once for all the tests that read it."""
    return fit_bradley_terry(SIMULATED, l2=l2)


def two_items(wins, losses):
    """Comparisons of item 0 with item 1: 0 wins `wins` times and loses `losses` times."""
    return [(0, 1)] * wins + [(1, 0)] * losses


def test_fit_recovers_simulated_strengths_within_three_standard_errors():
    """The MLE is consistent and its standard errors measure its error (Bradley & Terry 1952)."""
    fit = simulated_fit()
    truth = TRUE_SCORES - TRUE_SCORES.mean()  # the fit reports mean-zero scores
    assert fit.converged
    assert abs(fit.scores.sum()) < 1e-12
    assert np.all(np.abs(fit.scores - truth) < 3 * fit.standard_errors)
    assert np.all(fit.standard_errors < 0.1)  # 3000 comparisons pin each score down this well


@pytest.mark.parametrize("l2", [0.0, 0.1, 5.0])
def test_scores_sum_to_zero_up_to_rounding_and_so_does_their_covariance(l2):
    """Only differences are identified, so the fit reports the mean-zero scores: their sum is
    at most n eps max|s|, the rounding of subtracting the mean (without that last
    subtraction, Newton's round-off drift leaves 25-125 times more here). The covariance is
    that of the mean-zero scores: Var(sum of scores) = 0, so each row sums to zero."""
    fit = simulated_fit(l2)
    n = len(fit.scores)
    assert abs(fit.scores.sum()) <= n * np.finfo(float).eps * np.abs(fit.scores).max()
    assert np.max(np.abs(fit.covariance.sum(axis=1))) <= n * np.finfo(float).eps * np.abs(fit.covariance).max()


@pytest.mark.parametrize("l2", [0.0, 5.0])
def test_gradient_of_objective_is_zero_at_the_fit(l2):
    """First-order optimality (KKT) of the concave objective, gradient written out per comparison."""
    fit = simulated_fit(l2)
    grad = objective_gradient(SIMULATED, fit.scores, l2)
    assert np.max(np.abs(grad)) < 1e-8  # a sum of 3000 terms of size ~0.5


def test_reported_log_likelihood_is_the_sum_over_comparisons():
    """log_likelihood = sum log sigmoid(s_w - s_l); objective subtracts (l2/2)||s||^2."""
    fit = simulated_fit(5.0)
    s = fit.scores
    expected = sum(-math.log1p(math.exp(-(s[w] - s[l]))) for w, l in SIMULATED)
    assert fit.log_likelihood == pytest.approx(expected, rel=1e-12)
    assert fit.objective == pytest.approx(expected - 2.5 * np.sum(s**2), rel=1e-12)


def test_win_probability_is_logistic_in_score_difference():
    """P(i beats j) = sigmoid(s_i - s_j) (Bradley & Terry 1952), including extreme gaps."""
    scores = np.array([0.3, -1.2, 2.0, -4.5])
    for i in range(4):
        for j in range(4):
            assert win_probability(scores, i, j) == pytest.approx(1 / (1 + math.exp(-(scores[i] - scores[j]))), rel=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a naive 1 / (1 + exp(800)) overflows
        assert win_probability([800.0, 0.0], 0, 1) == 1.0
        assert 0.0 <= win_probability([800.0, 0.0], 1, 0) < 1e-300


def test_relabelling_items_permutes_the_scores():
    """Item names carry no information: relabel i as perm[i] and score i moves to perm[i]."""
    perm = np.array([3, 5, 0, 1, 4, 2])
    fit = simulated_fit()
    relabelled = fit_bradley_terry(perm[SIMULATED])
    np.testing.assert_allclose(relabelled.scores[perm], fit.scores, atol=1e-10)
    np.testing.assert_allclose(relabelled.standard_errors[perm], fit.standard_errors, rtol=1e-8)


@pytest.mark.parametrize("wins, losses", [(30, 10), (7, 13), (1, 1)])
def test_two_items_score_gap_is_log_odds_of_wins(wins, losses):
    """With two items the MLE solves wins/(wins+losses) = sigmoid(s0 - s1): s0 - s1 = log(wins/losses)."""
    fit = fit_bradley_terry(two_items(wins, losses))
    assert fit.scores[0] - fit.scores[1] == pytest.approx(math.log(wins / losses), abs=1e-12)
    assert fit.scores[0] == pytest.approx(-fit.scores[1], abs=1e-14)


def test_two_items_standard_errors_match_closed_form():
    """Fisher information for d = s0 - s1 is n p (1 - p), p = sigmoid(d); s0 = d/2 so se(s0) = se(d)/2."""
    wins, losses = 30, 10
    n, p = wins + losses, wins / (wins + losses)
    se_gap = 1 / math.sqrt(n * p * (1 - p))
    fit = fit_bradley_terry(two_items(wins, losses))
    np.testing.assert_allclose(fit.standard_errors, [se_gap / 2, se_gap / 2], rtol=1e-10)
    assert fit.covariance[0, 1] == pytest.approx(-se_gap**2 / 4, rel=1e-10)  # s1 = -s0


def test_two_items_with_penalty_solve_the_penalised_stationarity_equation():
    """With s0 = d/2 = -s1, d/dd of the objective is wins sigmoid(-d) - losses sigmoid(d) - l2 d / 2.

    Solved here by bisection; the penalty shrinks d below the unpenalised log(wins/losses).
    """
    wins, losses, l2 = 30, 10, 4.0
    slope = lambda d: wins / (1 + math.exp(d)) - losses / (1 + math.exp(-d)) - l2 * d / 2
    lo, hi = 0.0, math.log(wins / losses)  # slope(lo) > 0 > slope(hi)
    for _ in range(100):
        mid = (lo + hi) / 2
        if slope(mid) > 0:
            lo = mid
        else:
            hi = mid
    fit = fit_bradley_terry(two_items(wins, losses), l2=l2)
    assert fit.scores[0] - fit.scores[1] == pytest.approx(lo, abs=1e-10)
    assert lo < math.log(wins / losses) - 0.1


def test_standard_errors_match_spread_over_repeated_simulations():
    """Inverse Fisher information on the mean-zero scores is the MLE's covariance, asymptotically."""
    rng = np.random.default_rng(1)
    fits = [fit_bradley_terry(simulate_comparisons(TRUE_SCORES, 1000, rng)) for _ in range(300)]
    spread = np.std([f.scores for f in fits], axis=0)  # (6,) empirical standard deviation per item
    reported = np.mean([f.standard_errors for f in fits], axis=0)
    np.testing.assert_allclose(reported, spread, rtol=0.15)  # 300 replicates: spread known to ~4%


# Data for which no maximum-likelihood scores exist (Ford 1957), and what the error must say.
NO_MLE = {
    "item never wins": ([(0, 1), (1, 0), (0, 2), (1, 2)], None, r"items \[2\] never win"),
    "item never loses": ([(0, 1), (1, 0), (2, 0), (2, 1)], None, r"items \[2\] never lose"),
    "item never compared": ([(0, 1), (1, 0)], 3, r"items \[2\] appear in no comparison"),
    "two groups never compared": (
        [(0, 1), (1, 2), (2, 0), (3, 4), (4, 5), (5, 3)], None, "not strongly connected"),
    "one group never beats the other": (
        [(0, 1), (1, 2), (2, 0), (3, 4), (4, 5), (5, 3), (0, 3), (1, 4)], None,
        r"no item in \[3, 4, 5\] ever beat an item in \[0, 1, 2\]"),
}


@pytest.mark.parametrize("comparisons, n_items, message", NO_MLE.values(), ids=NO_MLE.keys())
def test_missing_mle_raises_value_error_that_suggests_l2(comparisons, n_items, message):
    """Ford (1957): the MLE exists iff every split of the items has a win in each direction."""
    with pytest.raises(ValueError, match=message):
        fit_bradley_terry(comparisons, n_items=n_items)
    with pytest.raises(ValueError, match=r"l2 > 0"):
        fit_bradley_terry(comparisons, n_items=n_items)


@pytest.mark.parametrize("comparisons, n_items, message", NO_MLE.values(), ids=NO_MLE.keys())
def test_penalty_gives_finite_scores_where_mle_does_not_exist(comparisons, n_items, message):
    """The l2 penalty makes the objective strictly concave, so its maximum exists and is stationary."""
    fit = fit_bradley_terry(comparisons, n_items=n_items, l2=0.1)
    assert fit.converged
    assert np.all(np.isfinite(fit.scores)) and np.all(np.isfinite(fit.standard_errors))
    assert np.max(np.abs(objective_gradient(comparisons, fit.scores, 0.1))) < 1e-9


BAD_INPUT = {
    "empty": ([], None, "empty"),
    "wrong shape": ([(0, 1, 2)], None, r"shape \(N, 2\)"),
    "not integers": ([(0.0, 1.0)], None, "integer"),
    "negative index": ([(0, 1), (-1, 0)], None, "comparison 1 .* negative"),
    "index out of range": ([(0, 1), (3, 0)], 3, r"comparison 1 .* >= n_items=3"),
    "item against itself": ([(0, 1), (1, 0), (2, 2)], None, r"comparison 2 \[2, 2\] compares an item with itself"),
    "negative l2": ([(0, 1), (1, 0)], None, "l2 must be >= 0"),
}


@pytest.mark.parametrize("comparisons, n_items, message", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_invalid_input_raises_value_error_saying_what_is_wrong(comparisons, n_items, message):
    l2 = -1.0 if message.startswith("l2") else 0.0
    with pytest.raises(ValueError, match=message):
        fit_bradley_terry(comparisons, n_items=n_items, l2=l2)


# -----------------------------------------------------------------------------
# `python bt.py`

ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)\s+(\d+\.\d+)\s*$")


def test_python_bt_py_prints_the_fit_of_its_example():
    """`python bt.py`, as a user types it, prints one row per item: its wins and games
    (counted here from the comparisons), the true score, and fit_bradley_terry's score and
    standard error on the same comparisons, to the three decimals shown; then P(4 beats 0)."""
    result = subprocess.run([sys.executable, "bt.py"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = [ROW.match(line).groups() for line in result.stdout.splitlines() if ROW.match(line)]
    true_scores, comparisons = bt.example_comparisons()
    fit = fit_bradley_terry(comparisons)
    assert [int(r[0]) for r in rows] == list(range(len(true_scores)))
    printed = np.array([[float(x) for x in r[3:]] for r in rows])  # true score, fitted, std. error
    np.testing.assert_allclose(printed, np.stack([true_scores, fit.scores, fit.standard_errors], axis=1),
                               rtol=0, atol=0.0005 + 1e-12)
    for item, wins, games, *_ in rows:
        item = int(item)
        assert int(wins) == np.sum(comparisons[:, 0] == item)
        assert int(games) == np.sum(comparisons == item)
    p = 1 / (1 + math.exp(-(fit.scores[4] - fit.scores[0])))
    assert f"P(item 4 beats item 0) = {p:.3f}" in result.stdout


# =============================================================================
# 6. End to end: train_toy.py --model tiny flips 0/4 to 4/4, and --data at real sizes
# =============================================================================




def run_toy(out, *args):
    """train_toy.py's main() in this process (no second torch import), output captured by pytest."""
    gpt2_tokenizer()
    return train_toy.main(["--out", str(out), *args])


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def folder_bytes(folder):
    """{relative path: bytes} of every file under folder: to compare a folder before and after."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def assert_same_checkpoint(path, expected_path):
    """The two safetensors files are equal to the byte. If not, the message names the tensors
    that differ and by how much (a plain `==` on the bytes would have pytest diff megabytes)."""
    if Path(path).read_bytes() == Path(expected_path).read_bytes():
        return
    got, expected = load_safetensors(path), load_safetensors(expected_path)
    differ = {name: float((got[name].double() - expected[name].double()).abs().max())
              for name in expected if name in got and not torch.equal(got[name], expected[name])}
    pytest.fail(f"{path} differs from {expected_path}: tensors only in one: "
                f"{sorted(set(got) ^ set(expected))}; largest |difference| per tensor: {differ}")


def write_pairs(path, pairs):
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def numbered_pairs(n):
    """n pairs of varied lengths, all different, for --data runs."""
    words = "red green blue cold warm small large quick slow bright".split()
    return [{"prompt": f"Item {i}: " + " ".join(words[: 1 + i % 7]),
             "chosen": " yes" + " indeed" * (i % 5) + ".", "rejected": " no" + " never" * (i % 3) + "."}
            for i in range(n)]


@pytest.fixture
def quick_sft(monkeypatch):
    """For tests of the plumbing (data, errors, saving), which need a trained model, not a good
    one: 5 steps of the tiny model's SFT warm-up instead of 60."""
    monkeypatch.setattr(train_toy, "SFT_STEPS", 5)


@pytest.fixture(scope="module")
def tiny_dpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy-dpo")
    return out, run_toy(out, "--model", "tiny", "--loss", "dpo")


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_toy_experiment_flips_every_preference(loss, tiny_dpo_run, tmp_path):
    """The whole story of train_toy.py --model tiny: after SFT on the intuitive completions the
    model prefers none of the chosen (counter-intuitive) ones; after DPO / IPO it prefers all four,
    and every pair of the last step is ranked right by the implicit reward."""
    out, summary = tiny_dpo_run if loss == "dpo" else (tmp_path, run_toy(tmp_path, "--model", "tiny", "--loss", "ipo"))
    assert summary["preferred_before"] == 0 and summary["preferred_after"] == 4 == summary["n_pairs"]
    assert summary["final_reward_accuracy"] == 1.0
    # the headline counts agree with the logged log-probs themselves
    before, after = summary["logps_before"], summary["logps_after"]
    assert sum(c > r for c, r in zip(before["chosen"], before["rejected"])) == 0
    assert sum(c > r for c, r in zip(after["chosen"], after["rejected"])) == 4


def test_toy_run_reports_the_held_out_pairs_it_never_trained_on(tiny_dpo_run):
    """Four held-out pairs: measured before and after, evaluated at step 0 and at the end, and
    counted in the summary from their own log-probs. At step 0 the policy is the reference on
    the same batches: loss log 2, margin 0 and KL 0 exactly."""
    out, summary = tiny_dpo_run
    assert summary["n_eval_pairs"] == 4
    for key, logps in (("eval_preferred_before", "eval_logps_before"), ("eval_preferred_after", "eval_logps_after")):
        assert summary[key] == sum(c > r for c, r in zip(summary[logps]["chosen"], summary[logps]["rejected"]))
    assert summary["eval_preferred_before"] == 0
    evals = [r for r in read_metrics(out) if r.get("phase") == "eval"]
    assert [r["step"] for r in evals] == [0, 12]
    assert evals[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert evals[0]["margin"] == 0.0 and evals[0]["kl"] == 0.0
    assert evals[-1]["kl"] > 0 and summary["final_eval_reward_accuracy"] == evals[-1]["reward_accuracy"]
    # the held-out numbers are the held-out pairs', scored again here by the saved policy
    model = GPT.from_pretrained(out, device=summary["device"])
    chosen, rejected = dpo.pair_logps(model, dpo.encode_pairs(gpt2_tokenizer(), train_toy.TOY_EVAL_PAIRS),
                                      batch_size=summary["batch_size"])
    assert summary["eval_logps_after"] == {"chosen": chosen.tolist(), "rejected": rejected.tolist()}
    # evaluate()'s reward accuracy at the end, against the margins of measure()'s log-probs
    assert summary["final_eval_reward_accuracy"] == train_toy.reward_accuracy(
        summary["eval_logps_before"], summary["eval_logps_after"], summary["beta"])
    held_out_prompts = {p["prompt"] for p in train_toy.TOY_EVAL_PAIRS}
    assert not held_out_prompts & {p["prompt"] for p in train_toy.TOY_PAIRS}  # disjoint from the training pairs


def test_toy_metrics_file_has_every_step_and_a_summary(tiny_dpo_run):
    """metrics.jsonl: the SFT lines, one line per DPO step (6 epochs x 2 batches), the first DPO loss
    log 2 (policy == reference, DPO paper Eq. 7 at h = 0), and a summary line last."""
    out, summary = tiny_dpo_run
    records = read_metrics(out)
    steps = [r for r in records if r.get("phase") == "dpo"]
    assert len(steps) == 6 * 2 and [r["step"] for r in steps] == list(range(1, 13))
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert any(r.get("phase") == "sft" for r in records)
    last = records[-1]
    assert last["summary"] is True and last == json.loads(json.dumps(summary))
    for key in ("load_s", "reference_s", "train_s", "eval_s", "tokens_per_s", "peak_memory_bytes", "preferred_before",
                "preferred_after", "n_eval_pairs", "eval_preferred_before", "eval_preferred_after",
                "final_eval_reward_accuracy"):
        assert key in last


def test_train_seconds_leave_out_the_evaluations_and_tokens_are_the_real_tokens(tmp_path, monkeypatch, quick_sft):
    """train_s is the time of the training steps alone: every held-out evaluation (at step 0,
    every --eval-every steps, at the end) is made to take 0.5 s longer here, and train_s stays
    below the wall time of dpo.train_dpo minus the two evaluations inside it, while eval_s
    holds all four. tokens: the real (not padding) tokens of every step, counted here from the
    toy pairs themselves: each epoch sees every pair once, the prompt twice (chosen and rejected
    rows). tokens_per_s is the one over the other."""
    import time
    real_evaluate, real_train = train_toy.dpo.evaluate, train_toy.dpo.train_dpo
    walls = []

    def slow_evaluate(*args, **kwargs):
        time.sleep(0.5)
        return real_evaluate(*args, **kwargs)

    def timed_train(*args, **kwargs):
        start = time.perf_counter()
        history = real_train(*args, **kwargs)
        walls.append(time.perf_counter() - start)
        return history

    monkeypatch.setattr(train_toy.dpo, "evaluate", slow_evaluate)
    monkeypatch.setattr(train_toy.dpo, "train_dpo", timed_train)
    summary = run_toy(tmp_path, "--model", "tiny", "--epochs", "3", "--eval-every", "2")
    assert [r["step"] for r in read_metrics(tmp_path) if r.get("phase") == "eval"] == [0, 2, 4, 6]
    assert 0 < summary["train_s"] <= walls[0] - 2 * 0.5 and summary["eval_s"] >= 4 * 0.5
    per_epoch = sum(2 * len(p) + len(c) + len(r) for p, c, r in dpo.encode_pairs(gpt2_tokenizer(), train_toy.TOY_PAIRS))
    assert summary["train_tokens"] == 3 * per_epoch
    assert summary["train_positions"] > summary["train_tokens"]  # the toy pairs differ in length: some padding
    assert summary["tokens_per_s"] == pytest.approx(summary["train_tokens"] / summary["train_s"], rel=1e-12)


def test_toy_checkpoint_reloads_with_the_trained_log_probs(tiny_dpo_run):
    """The saved policy, opened with from_pretrained, scores every completion exactly as the
    trained policy did in the run (logps_after in the summary): bit for bit through the same
    function, and to float32 rounding through the plain definition."""
    out, summary = tiny_dpo_run
    device = summary["device"]  # the same kernels as in the run: cuda where it ran on cuda
    model = GPT.from_pretrained(out, device=device)
    pairs = dpo.encode_pairs(gpt2_tokenizer(), train_toy.TOY_PAIRS)
    chosen, rejected = dpo.pair_logps(model, pairs, batch_size=summary["batch_size"])
    assert chosen.tolist() == summary["logps_after"]["chosen"] and rejected.tolist() == summary["logps_after"]["rejected"]
    batch = dpo.collate(pairs)
    with torch.no_grad():
        plain = dpo.sequence_logps(model(batch["input_ids"].to(device)), batch["input_ids"].to(device),
                                   batch["loss_mask"].to(device))
    assert plain.tolist() == pytest.approx(summary["logps_after"]["chosen"] + summary["logps_after"]["rejected"],
                                           abs=1e-4)
    assert json.loads((out / "config.json").read_text())["n_layer"] == 2


def test_toy_run_is_reproducible_with_the_same_seed(tiny_dpo_run, tmp_path):
    """Same seed, same device: every logged number but the timings is identical."""
    out, _ = tiny_dpo_run
    run_toy(tmp_path, "--model", "tiny", "--loss", "dpo")
    timing = {"load_s", "sft_s", "reference_s", "train_s", "eval_s", "tokens_per_s", "peak_memory_bytes"}
    strip = lambda records: [{k: v for k, v in r.items() if k not in timing} for r in records]
    assert strip(read_metrics(tmp_path)) == strip(read_metrics(out))
    assert_same_checkpoint(tmp_path / "model.safetensors", out / "model.safetensors")


@needs_cuda
def test_toy_run_on_cuda_is_deterministic_inside_and_leaves_the_settings_as_they_were(tmp_path, monkeypatch):
    """train_toy.py asks PyTorch for deterministic CUDA kernels during its run only: inside the
    run they are on; after it, on success or on an error, the settings are as before."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    seen, real_run = [], train_toy.run

    def run_and_record_the_settings(args, device):
        seen.append((torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return real_run(args, device)

    monkeypatch.setattr(train_toy, "run", run_and_record_the_settings)
    run_toy(tmp_path / "ok", "--model", "tiny", "--epochs", "1", "--device", "cuda")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(SystemExit):
        run_toy(tmp_path / "bad", "--model", "tiny", "--device", "cuda", "--data", str(tmp_path / "bad.jsonl"))
    assert seen == [(True, ":4096:8")] * 2
    assert torch.are_deterministic_algorithms_enabled() == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error():
    """--device cuda on a CPU-only torch: a sentence, not torch's assertion deep in .to()."""
    from train_toy import resolve_device
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_toy_script_runs_from_the_command_line_with_the_numbers_of_this_process(tiny_dpo_run, tmp_path):
    """`python train_toy.py --model tiny` as a user types it: exit 0, the headline and timing
    printed, and the same trained weights, to the byte, as the same run inside this test
    process (tiny_dpo_run), whose memory holds whatever the tests before it left. (Same seed,
    same device, same numbers across processes: see train_toy.py on MKL_CBWR.)"""
    out, summary = tiny_dpo_run
    args = ["--model", "tiny", "--loss", "dpo", "--device", summary["device"], "--out", str(tmp_path / "cli")]
    result = subprocess.run([sys.executable, str(ROOT / "train_toy.py"), *args],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "chosen preferred: training pairs 0/4 -> 4/4, held-out pairs 0/4 -> " in result.stdout
    assert "peak memory" in result.stdout and "tokens/s" in result.stdout
    assert_same_checkpoint(tmp_path / "cli" / "model.safetensors", out / "model.safetensors")


MKL_MODE = """
import ctypes, os, torch
import {module}
torch.ones(2, 2) @ torch.ones(2, 2)
lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
print(hex(lib.mkl_serv_cbwr_get(-1)))  # -1: all of MKL's reproducibility settings
"""


def mkl_mode_after_importing(module, **env):
    """MKL's reproducibility mode as MKL itself reports it after a matrix product, in a new
    process that imports `module` first; None where torch is not linked with Intel's MKL."""
    env = {**{k: v for k, v in os.environ.items() if k != "MKL_CBWR"}, **env}
    result = subprocess.run([sys.executable, "-c", MKL_MODE.format(module=module)],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    return result.stdout.strip() if result.returncode == 0 else None


def test_the_scripts_put_mkl_in_its_strict_reproducible_mode_and_the_library_does_not():
    """train_toy.py (and bench.py, which imports it) own their processes and set
    MKL_CBWR=AUTO,STRICT before torch loads MKL, which reads it only at its first matrix
    product; so MKL itself is asked, after a product, whether the mode took. 0x10002 is
    MKL_CBWR_AUTO | MKL_CBWR_STRICT; 0x3, MKL_CBWR_COMPATIBLE, a user's own choice, is kept.
    Importing the library (dpo, and model through it) leaves MKL as it is."""
    library = mkl_mode_after_importing("dpo")
    if library is None:
        pytest.skip("this torch is not linked with Intel's MKL (or cannot be asked for its mode)")
    assert library != "0x10002"  # the library sets nothing, so the script's check below can fail
    assert mkl_mode_after_importing("train_toy") == "0x10002"
    assert mkl_mode_after_importing("train_toy", MKL_CBWR="COMPATIBLE") == "0x3"


# -----------------------------------------------------------------------------
# Your own pairs: --data, held-out evaluation, long pairs


def test_eval_fraction_holds_out_a_seeded_disjoint_part_of_the_data():
    """split_off_eval: round(fraction * N) pairs held out, the rest trained on, no pair in both,
    none lost, each part in the file's order; the same seed gives the same split."""
    from train_toy import split_off_eval
    pairs = numbered_pairs(50)
    train, held_out = split_off_eval(pairs, 0.2, seed=0)
    assert len(held_out) == 10 and len(train) == 40
    prompts = lambda ps: [p["prompt"] for p in ps]
    assert not set(prompts(train)) & set(prompts(held_out))
    assert sorted(prompts(train) + prompts(held_out)) == sorted(prompts(pairs))
    order = prompts(pairs)
    assert prompts(train) == sorted(prompts(train), key=order.index)
    assert split_off_eval(pairs, 0.2, seed=0) == (train, held_out)
    assert split_off_eval(pairs, 0.2, seed=1)[1] != held_out
    with pytest.raises(ValueError, match="at least one pair for training and one for evaluation"):
        split_off_eval(pairs[:3], 0.1, seed=0)


def test_data_run_trains_on_the_training_part_only_and_pads_little(tmp_path, quick_sft):
    """--data with --eval-fraction: the held-out pairs are evaluated, never trained on (the
    steps' real tokens add up to the training pairs alone), and batches of similar lengths
    keep padding well under a third of the positions the policy processes."""
    pairs = numbered_pairs(40)
    data = write_pairs(tmp_path / "pairs.jsonl", pairs)
    summary = run_toy(tmp_path / "out", "--model", "tiny", "--data", str(data), "--eval-fraction", "0.25",
                      "--epochs", "1", "--batch-size", "4")
    assert summary["n_pairs"] == 30 and summary["n_eval_pairs"] == 10
    train, _ = train_toy.split_off_eval([dict(p, line=i + 1) for i, p in enumerate(pairs)], 0.25, seed=0)
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in dpo.encode_pairs(gpt2_tokenizer(), train))
    assert summary["train_tokens"] == tokens
    assert 1 - summary["train_tokens"] / summary["train_positions"] < 1 / 3
    assert [r["step"] for r in read_metrics(tmp_path / "out") if r.get("phase") == "eval"] == [0, 8]


def test_eval_data_and_eval_every(tmp_path, quick_sft):
    """--eval-data PATH: those pairs are the held-out ones; --eval-every N adds evaluations."""
    data = write_pairs(tmp_path / "train.jsonl", numbered_pairs(6))
    held_out = write_pairs(tmp_path / "eval.jsonl", numbered_pairs(9)[6:])
    summary = run_toy(tmp_path / "out", "--model", "tiny", "--data", str(data), "--eval-data", str(held_out),
                      "--epochs", "2", "--eval-every", "2")
    assert summary["n_pairs"] == 6 and summary["n_eval_pairs"] == 3
    assert [r["step"] for r in read_metrics(tmp_path / "out") if r.get("phase") == "eval"] == [0, 2, 4, 6]


@pytest.mark.parametrize("content, message", [
    ("", "no preference pairs"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n', "line 2: field 'rejected'"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\nnot json\n', "line 2: not valid JSON"),
    ('["a", "b", "c"]\n', "line 1: expected a JSON object"),
    ('{"prompt": "", "chosen": "b", "rejected": "c"}\n', "line 1: field 'prompt' must be a non-empty string"),
])
def test_bad_data_file_is_refused_before_any_training(content, message, tmp_path):
    """A malformed --data file stops the run with the line number and the problem, and nothing
    is trained or written."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(content)
    with pytest.raises(SystemExit) as stop:
        run_toy(tmp_path / "out", "--model", "tiny", "--data", str(data))
    assert message in str(stop.value) and str(data) in str(stop.value)
    assert not (tmp_path / "out").exists()


def test_pair_longer_than_the_context_is_refused_and_max_length_leaves_it_out(tmp_path, quick_sft):
    """A pair that does not fit the model's context (1024 tokens) is an error naming its line and
    the way through; with --max-length N the pairs with a row over N tokens are left out, and
    the run says how many."""
    pairs = numbered_pairs(5)
    pairs[3]["prompt"] = "word " * 1100
    data = write_pairs(tmp_path / "long.jsonl", pairs)
    with pytest.raises(SystemExit, match="line 4: .* longer than the model.s context of 1024 .* --max-length"):
        run_toy(tmp_path / "out", "--model", "tiny", "--data", str(data))
    assert not (tmp_path / "out").exists()
    summary = run_toy(tmp_path / "out", "--model", "tiny", "--data", str(data), "--max-length", "1024", "--epochs", "1")
    assert summary["n_pairs"] == 4
    with pytest.raises(SystemExit, match="--max-length 2000 is longer than the model's context of 1024"):
        run_toy(tmp_path / "out2", "--model", "tiny", "--data", str(data), "--max-length", "2000")


def test_a_diverging_run_stops_names_the_step_and_keeps_the_earlier_out(tiny_dpo_run, tmp_path, quick_sft):
    """--lr 1e30: the loss stops being finite at step 2; the run exits with an error naming the
    step and a smaller --lr, and an --out from an earlier run is left byte for byte as it was."""
    out = tmp_path / "out"
    import shutil
    shutil.copytree(tiny_dpo_run[0], out)
    before = folder_bytes(out)
    with pytest.raises(SystemExit) as stop:
        run_toy(out, "--model", "tiny", "--lr", "1e30")
    assert "diverged at step 2" in str(stop.value) and "--lr" in str(stop.value)
    assert folder_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing half-written beside it


def test_a_failure_while_saving_leaves_the_earlier_out_and_no_temporary_folder(tiny_dpo_run, tmp_path, quick_sft, monkeypatch):
    """--out is written as one unit: if saving fails half-way (here after the weights, before
    metrics.jsonl), the earlier --out is untouched and no temporary folder is left beside it."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(tiny_dpo_run[0], out)
    before = folder_bytes(out)
    real_save = GPT.save_pretrained

    def save_then_fail(model, directory):
        real_save(model, directory)
        assert (Path(directory) / "model.safetensors").is_file()  # half of the folder is written
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(train_toy.GPT, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="simulated"):
        run_toy(out, "--model", "tiny", "--epochs", "1")
    assert folder_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_default_run_without_network_or_cache_says_how_to_get_weights(tmp_path, monkeypatch):
    """Offline with nothing cached, `python train_toy.py` stops with a short message that says
    where the weights go and the alternatives (--weights, --model tiny), not a traceback."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as stop:
        run_toy(tmp_path / "out")
    message = str(stop.value)
    assert message.startswith("error: ") and "--weights" in message and "--model tiny" in message
    assert str(tmp_path / "hf" / "hub" / "models--openai-community--gpt2") in message
    assert not (tmp_path / "out").exists()


def test_weights_option_trains_a_local_checkpoint(tiny_dpo_run, tmp_path):
    """--weights loads a local checkpoint (here the tiny run's output, config.json beside it) and trains it."""
    out, _ = tiny_dpo_run
    summary = run_toy(tmp_path / "again", "--model", "gpt2", "--weights", str(out), "--epochs", "1")
    assert summary["preferred_before"] == 4  # it was trained to prefer the chosen completions already
    assert (tmp_path / "again" / "model.safetensors").is_file()


def test_plot_without_matplotlib_is_refused_before_training(tmp_path, monkeypatch):
    """--plot needs matplotlib; without it the run stops at once with the pip command."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        run_toy(tmp_path / "out", "--model", "tiny", "--plot", str(tmp_path / "curves.png"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, message", [
    (["--epochs", "0"], "argument --epochs: must be a finite number > 0"),
    (["--batch-size", "0"], "argument --batch-size: must be a finite number > 0"),
    (["--beta", "-0.1"], "argument --beta: must be a finite number > 0"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0"),
    (["--eval-fraction", "1.5"], "argument --eval-fraction: must be between 0 and 1"),
    (["--eval-fraction", "0.1"], "--eval-fraction holds out part of --data"),
    (["--eval-fraction", "0.1", "--eval-data", "x.jsonl"], "not allowed with argument"),
    (["--data", "x.jsonl", "--eval-every", "2"], "--eval-every evaluates held-out pairs"),
    (["--label-smoothing", "0.7"], "label_smoothing must be in [0, 0.5)"),
    (["--loss", "ipo", "--label-smoothing", "0.1"], "label_smoothing is for loss_type='dpo'"),
    (["--init", "random"], "--model tiny is always built here"),
    (["--out", __file__], "is a file; --out must be a folder"),
    (["--out", __file__ + "/sub"], "is a file; --out must be a folder"),
])
def test_bad_options_are_refused_with_a_message(options, message, tmp_path, capsys):
    """Nonsensical options stop the script at once (argparse's exit code 2) with what was wrong."""
    with pytest.raises(SystemExit) as stop:
        train_toy.main(["--model", "tiny", "--out", str(tmp_path / "out"), *options])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# =============================================================================
# 7. bench.py: the three steps it times compute what they say (no timing is asserted),
#    and the pairs it writes for timing --data are the lengths it says
# =============================================================================
#
# A tiny GPT in float64 instead of GPT-2 124M, so that two ways of computing the same
# numbers agree to round-off and the tests take seconds.

BENCH_CONFIG = GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture
def bench_tiny():
    """bench.build's policy, reference and batch on the tiny GPT in float64 (3 pairs of 5 prompt
    and 7 completion tokens), the policy moved away from the reference so that the DPO loss is
    not log 2 and its gradient's norm is over bench's clipping limit of 1."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        policy, reference, batch = bench.build(BENCH_CONFIG, 3, 5, 7, torch.device("cpu"))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
        yield policy, reference, batch
    finally:
        torch.set_default_dtype(previous)


def gradients(model):
    return [p.grad.clone() for p in model.parameters()]


def total_norm(tensors):
    return torch.cat([t.flatten() for t in tensors]).norm().item()


def test_random_pairs_are_what_dpo_collate_expects():
    """Lists of ints, below the vocabulary, with the lengths asked for; collate puts the chosen
    rows first and the rejected rows after them, each with the same prompt, and scores exactly
    the completion tokens."""
    pairs = bench.random_pairs(3, 5, 7, vocab_size=101, seed=0)
    assert [(len(p), len(c), len(r)) for p, c, r in pairs] == [(5, 7, 7)] * 3
    assert all(isinstance(t, int) and 0 <= t < 101 for pair in pairs for ids in pair for t in ids)
    assert pairs != bench.random_pairs(3, 5, 7, vocab_size=101, seed=1)
    batch = dpo.collate(pairs)
    chosen, rejected = dpo.chosen_and_rejected(batch["input_ids"])
    assert chosen[:, :5].tolist() == rejected[:, :5].tolist() == [p for p, _, _ in pairs]
    assert chosen[:, 5:].tolist() == [c for _, c, _ in pairs]
    assert rejected[:, 5:].tolist() == [r for _, _, r in pairs]
    assert batch["loss_mask"].tolist() == [[0.0] * 5 + [1.0] * 7] * 6


def test_straightforward_step_and_dpo_step_give_the_same_loss_gradients_and_update(bench_tiny):
    """(a), four forward passes with logits at every position, and (b), dpo.dpo_step on the
    cached reference log-probs, are two computations of one DPO step (DPO paper, Eq. 7): the
    same loss, the same clipped gradients and, from the same optimizer, the same parameters
    after the update. So the benchmark's (a) / (b) measures the design alone."""
    policy, reference, batch = bench_tiny
    twin = copy.deepcopy(policy)
    straightforward = bench.make_steps(policy, reference, batch)["a"]
    dpo_step = bench.make_steps(twin, reference, batch)["b"]
    loss_a = straightforward(dpo.make_optimizer(policy, lr=1e-2))
    loss_b = dpo_step(dpo.make_optimizer(twin, lr=1e-2))
    assert abs(loss_a - 0.6931) > 0.01  # not log 2: the policy is not the reference
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    assert total_norm(gradients(policy)) == pytest.approx(1.0, rel=1e-5)  # clipped to norm 1 in both
    for name, p, q in zip(dict(policy.named_parameters()), policy.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14, msg=f"gradient of {name}")
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10, msg=f"{name} after the update")


def test_floor_step_takes_the_next_token_loss_of_the_completions_and_clips_it(bench_tiny):
    """(c) returns the mean next-token loss over the completion tokens, here computed from
    logits at every position and dpo.sequence_logps, and leaves that loss's gradient, clipped
    to norm 1 as torch.nn.utils.clip_grad_norm_ does (scale 1 / (norm + 1e-6)); then it updates."""
    policy, reference, batch = bench_tiny
    ids, mask = batch["input_ids"], batch["loss_mask"]
    twin = copy.deepcopy(policy)
    expected = -dpo.sequence_logps(twin(ids), ids, mask).sum() / mask[:, 1:].sum()
    expected.backward()
    norm = total_norm(gradients(twin))
    assert norm > 1.0  # so clipping has something to do
    before = [p.detach().clone() for p in policy.parameters()]
    loss = bench.make_steps(policy, reference, batch)["c"](dpo.make_optimizer(policy, lr=1e-2))
    assert loss == pytest.approx(expected.item(), rel=1e-12)
    for p, q in zip(policy.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad / (norm + 1e-6), rtol=1e-10, atol=1e-14)
    assert all(not torch.equal(p, b) for p, b in zip(policy.parameters(), before))


def test_steps_take_turns_through_every_order():
    """time_in_turns calls each step once per round, and over 6 rounds of three steps each
    order comes once: every step is first, second and third twice. It returns one median per
    step, in seconds."""
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    medians = bench.time_in_turns(steps, 6, torch.device("cpu"))
    rounds = [tuple(calls[i:i + 3]) for i in range(0, len(calls), 3)]
    assert len(rounds) == 6 and set(rounds) == {("a", "b", "c"), ("a", "c", "b"), ("b", "a", "c"),
                                                 ("b", "c", "a"), ("c", "a", "b"), ("c", "b", "a")}
    assert set(medians) == {"a", "b", "c"} and all(0 <= s < 1 for s in medians.values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc/self/status")
def test_cpu_peak_is_in_bytes():
    """ru_maxrss is in KiB on Linux; bench reports bytes: the process's high-water mark, which
    /proc/self/status also gives as VmHWM (in kB), times 1024."""
    with open("/proc/self/status") as f:
        vm_hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    peak = bench.peak_memory_bytes(torch.device("cpu"))
    assert abs(peak - 1024 * vm_hwm) < 4_000_000  # the kernel's two readings of it round a little apart


def test_written_pairs_load_as_data_with_the_token_counts_the_docstring_gives(tmp_path):
    """bench.py --write-pairs makes a --data file: train_toy.load_pairs reads every pair; with
    GPT-2's tokenizer prompts are 14 to 146 tokens and completions 4 to 150 (+ <|endoftext|>),
    spread over that range; with --same-length every pair is 80 + 78 tokens per row. The same
    seed writes the same bytes, another seed other pairs."""
    enc = gpt2_tokenizer()
    assert all(len(enc.encode(" " + word)) == 1 for word in bench.WORDS)  # k words are k tokens
    bench.main(["--write-pairs", "300", str(tmp_path / "pairs.jsonl")])
    bench.write_pairs(tmp_path / "again.jsonl", 300)
    bench.write_pairs(tmp_path / "other.jsonl", 300, seed=1)
    assert (tmp_path / "pairs.jsonl").read_bytes() == (tmp_path / "again.jsonl").read_bytes()
    assert (tmp_path / "pairs.jsonl").read_bytes() != (tmp_path / "other.jsonl").read_bytes()
    encoded = dpo.encode_pairs(enc, train_toy.load_pairs(tmp_path / "pairs.jsonl"))
    assert len(encoded) == 300
    prompts = [len(p) for p, _, _ in encoded]
    completions = [len(c) for _, c, _ in encoded] + [len(r) for _, _, r in encoded]
    assert 14 <= min(prompts) < 30 and 130 < max(prompts) <= 146
    assert 5 <= min(completions) < 20 and 135 < max(completions) <= 151
    bench.main(["--write-pairs", "20", str(tmp_path / "same.jsonl"), "--same-length"])
    same = dpo.encode_pairs(enc, train_toy.load_pairs(tmp_path / "same.jsonl"))
    assert {(len(p), len(c), len(r)) for p, c, r in same} == {(80, 78, 78)}
    assert len({tuple(c) for _, c, _ in same}) == 20  # one length, not one text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.jsonl", "other.jsonl", "pairs.jsonl", "same.jsonl"]
