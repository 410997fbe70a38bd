"""
The proof: every formula of this project checked against something independent of it.

    python -m pytest test_dpo.py          (this file, the proof; `python -m pytest` runs the whole suite)

Index: claim -> the test that proves it.
- The DPO loss is -log sigmoid(beta h) (Eq. 7), cDPO and IPO (Eq. 17) as written
    -> test_dpo_loss_matches_hand_computed_values, test_conservative_dpo_..., test_ipo_loss_...
- At step 0 the loss is log 2, every margin 0, and the reward accuracy (ties count half) 0.5
    -> test_dpo_loss_is_log2_and_ipo_loss_is_inverse_2beta_squared_when_policy_equals_reference,
       test_reward_accuracy_counts_a_tie_as_half_right
- The policy's gradient is -beta sigmoid(-beta h) [grad log pi(y_c) - grad log pi(y_r)]
    -> test_policy_gradient_follows_the_dpo_paper_identity_on_a_tiny_gpt
- Masking the prompt leaves the loss alone but moves the rewards
    -> test_masking_the_prompt_leaves_the_dpo_loss_but_changes_rewards_and_log_probs
- Only completion tokens are scored, tokenised apart from the prompt
    -> test_sequence_logps_ignores_prompt_and_padding_..., test_encode_pairs_tokenises_...
- The fast path (logits only where scored, per-batch padding, batches by length) gives the
  plain numbers; bfloat16 log-probs are summed in float32
    -> test_completion_logps_equals_sequence_logps_..., test_per_batch_padding_gives_...,
       test_bfloat16_log_probs_are_summed_in_float32
- Mean instead of sum: IPO's target becomes nats per token
    -> test_averaged_log_probs_are_the_sum_divided_by_..., test_ipo_on_averaged_log_probs_...
- The reference is frozen, computed once, carries no graph; the optimizer holds the policy only
    -> test_train_dpo_runs_the_reference_once_..., test_reference_log_probs_carry_no_graph_...,
       test_make_optimizer_holds_exactly_the_policy_parameters
- Held-out evaluation: loss, rewards and the exact KL(pi || pi_ref)
    -> test_evaluate_equals_dpo_loss_and_kl_computed_pair_by_pair_from_full_logits,
       test_evaluate_at_the_start_is_log2_with_zero_margins_zero_kl_and_chance_accuracy
- DPO's optimum is pi_ref exp(r / beta) / Z (Eq. 4); DPO drives pi(y_r) to 0, IPO stops
    -> test_population_dpo_minimiser_is_..., test_dpo_drives_..., test_ipo_stops_...
- model.py is GPT-2: the same logits as a numpy GPT-2 on the Hugging Face tensors
    -> test_from_pretrained_directory_matches_numpy_gpt2 (test_checkpoint.py), test_greedy_generate_...
- train_toy.py flips 0/4 to 4/4 (in bfloat16 too) and repeats itself exactly in a new process
    -> test_toy_experiment_flips_every_preference,
       test_toy_script_runs_from_the_command_line_with_the_numbers_of_this_process
- Bradley-Terry recovers known strengths with honest standard errors
    -> test_fit_recovers_simulated_strengths_..., test_standard_errors_match_spread_...

Sections, in this order: 1. the DPO math (dpo.py); 2. theory on a bandit; 3. the model
(model.py) against a numpy GPT-2; 4. the experiment (train_toy.py); 5. Bradley-Terry (bt.py).
The rest of the suite follows the files: test_train.py (the trainer: micro-batches, several
processes, data files, --out, stops, resume), test_checkpoint.py (the bytes and the hub),
test_sample.py (generation and sample.py), test_bench.py.

Tests that need the GPT-2 tokenizer skip with a reason when tiktoken cannot load it
offline: set TIKTOKEN_CACHE_DIR (see README.md). A few checks run only on a CUDA GPU.
"""

import contextlib
import copy
import functools
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import bt
import dpo
import train
import train_toy
from bt import fit_bradley_terry, win_probability
from dpo import dpo_loss
from checkpoint import load_safetensors
from model import GPT, GPTConfig

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


def plain_logps(model, batch, average_logps=False):
    """(chosen, rejected) log-probs by the plain definition: sequence_logps of the full logits."""
    ids, mask = batch["input_ids"], batch["loss_mask"]
    logps = dpo.sequence_logps(model(ids), ids, mask, average_logps=average_logps)
    n = ids.size(0) // 2
    return logps[:n], logps[n:]


def reference_batch(reference, pairs, **options):
    """make_batch of encoded pairs with the reference's log-probs of them (pair_logps' options)."""
    return dpo.make_batch(pairs, dpo.pair_logps(reference, pairs, **options), "cpu")


def one_step(policy, optimizer, batch, max_grad_norm=1.0, autocast=contextlib.nullcontext(), **loss):
    """dpo_step on one batch from make_batch, with the loss options given (dpo.LossConfig's)."""
    return dpo.dpo_step(policy, optimizer, batch, dpo.LossConfig(**loss), max_grad_norm, autocast)


@pytest.fixture
def policy():
    return tiny_policy()


@pytest.fixture
def reference(policy):
    return dpo.make_reference(policy)


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
def test_dpo_loss_is_log2_and_ipo_loss_is_inverse_2beta_squared_when_policy_equals_reference(beta, policy, reference):
    """At step 0 pi = pi_ref, so h = 0 on every pair and
    DPO (Eq. 7): -log sigmoid(0) = log 2;  IPO (Eq. 17): (0 - 1/(2 beta))^2 = (1/(2 beta))^2.
    Computed through the real GPT forward on a real encoded batch."""
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


def test_dpo_step_first_report_is_log2_loss_zero_margin_and_chance_accuracy(policy, reference):
    """dpo_step before any update, with the reference's log-probs of the same batch: policy =
    reference, so loss = log 2 (Eq. 7 at h = 0), every margin beta*h is exactly 0, and the
    reward accuracy, which counts a tie as half right, is 0.5: chance."""
    pairs = [encoded_pairs()[i] for i in (3, 0, 2)]
    batch = reference_batch(reference, pairs, batch_size=3)
    metrics = one_step(policy, torch.optim.SGD(policy.parameters(), lr=0.1), batch, beta=0.1)
    assert metrics["loss"] == pytest.approx(LOG2, abs=1e-7)
    assert metrics["reward_accuracy"] == 0.5 and metrics["margin"] == 0.0
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


def test_reward_accuracy_counts_a_tie_as_half_right():
    """Per pair: 1 where the margin (chosen reward - rejected reward) is > 0, 0 where < 0, and
    1/2 at an exact tie, which a coin toss would score; so a policy equal to its reference,
    every margin 0, reads 0.5. batch_metrics reports the means over the pairs, by name."""
    chosen = torch.tensor([0.5, 0.2, -1.0, 0.3], dtype=torch.float64)
    rejected = torch.tensor([-0.5, 0.2, 1.0, 0.3 - 1e-12], dtype=torch.float64)
    assert dpo.reward_accuracy(chosen, rejected).tolist() == [1.0, 0.5, 0.0, 1.0]
    losses = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    metrics = {name: value.item() for name, value in dpo.batch_metrics(losses, chosen, rejected).items()}
    # margins 1, 0, -2, 1e-12: their mean -0.25; the rewards' means 0.0 and 0.25 - 2.5e-13
    assert metrics == pytest.approx(dict(loss=0.25, reward_accuracy=0.625, margin=-0.25, chosen_reward=0.0,
                                         rejected_reward=0.25), abs=1e-12)


def test_dpo_step_with_label_smoothing_trains_on_the_conservative_dpo_loss():
    """dpo_step with LossConfig(label_smoothing=0.2), the step train.py's --label-smoothing takes:
    its loss is conservative DPO's, dpo_loss with eps = 0.2 of the plain definition's
    log-probs, which differs from plain DPO's here."""
    policy = tiny_policy(dtype=torch.float64)
    reference = dpo.make_reference(policy)
    perturb(policy)
    batch = reference_batch(reference, encoded_pairs())
    with torch.no_grad():
        logps = [*plain_logps(policy, batch), *plain_logps(reference, batch)]
        conservative = dpo.dpo_loss(*logps, beta=0.5, label_smoothing=0.2)[0].mean().item()
        plain = dpo.dpo_loss(*logps, beta=0.5)[0].mean().item()
    metrics = one_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, beta=0.5, label_smoothing=0.2)
    assert metrics["loss"] == pytest.approx(conservative, rel=1e-10)
    assert abs(conservative - plain) > 1e-4


# -----------------------------------------------------------------------------
# Sum or mean over the completion's tokens


def test_averaged_log_probs_are_the_sum_divided_by_the_token_count():
    """average_logps=True: log pi(y|x) / (number of completion tokens), in both ways of computing it.
    By hand: with all-zero logits over V = 4 tokens every token has log-prob log(1/4), so a
    completion of k tokens sums to k log(1/4) and averages log(1/4) whatever k is."""
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float32)  # 3 and 5 tokens
    labels = torch.randint(4, (2, 6), generator=torch.Generator().manual_seed(0))
    logits = torch.zeros(2, 6, 4)
    assert dpo.sequence_logps(logits, labels, mask).tolist() == pytest.approx([3 * math.log(0.25), 5 * math.log(0.25)])
    assert dpo.sequence_logps(logits, labels, mask, average_logps=True).tolist() == pytest.approx([math.log(0.25)] * 2)

    policy = tiny_policy(dtype=torch.float64)
    batch = dpo.collate(encoded_pairs())
    ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    n_tokens = torch.tensor([len(c) for _, c, _ in encoded_pairs()] + [len(r) for _, _, r in encoded_pairs()])
    with torch.no_grad():
        summed = dpo.completion_logps(policy, ids, loss_mask)
        averaged = dpo.completion_logps(policy, ids, loss_mask, average_logps=True)
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
    batch = reference_batch(reference, pairs, average_logps=True)
    with torch.no_grad():
        expected = dpo.dpo_loss(*plain_logps(policy, batch, average_logps=True),
                                *plain_logps(reference, batch, average_logps=True), beta=0.5)
        summed = dpo.dpo_loss(*plain_logps(policy, batch), *plain_logps(reference, batch), beta=0.5)
    metrics = one_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, beta=0.5,
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
    return policy, reference_batch(reference, pairs)


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
        one_step(policy, torch.optim.SGD(params, lr=0.0), batch, beta=beta, max_grad_norm=float("inf"))
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
    metrics = one_step(policy, torch.optim.SGD(policy.parameters(), lr=1.0), batch, beta=0.1,
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


def bf16_test_model_and_batch():
    """A small GPT over GPT-2's 50,257-token vocabulary, where a log-softmax in bfloat16 (8 bits
    of mantissa) would round every log-prob, and a batch of random tokens."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=4, n_embd=64))
    generator = torch.Generator().manual_seed(0)
    pairs = [tuple(torch.randint(50257, (n,), generator=generator).tolist() for n in (12, 20, 25)) for _ in range(3)]
    return model, dpo.collate(pairs)


def test_bfloat16_log_probs_are_summed_in_float32():
    """In bfloat16, under autocast or as a bfloat16 model, the logits are rounded, but
    completion_logps takes them to float32 before the log-softmax and the sum over tokens:
    its log-probs equal a float32 computation on the same bfloat16 logits (done in bfloat16,
    they are about 2 nats off here), and stay within 2e-3 of the float32 model's, relative,
    which is what bfloat16's rounding of the logits costs. Under autocast the reference's
    log-probs, computed the same way, give the policy at step 0 a loss of exactly log 2."""
    model, batch = bf16_test_model_and_batch()
    ids, mask = batch["input_ids"], batch["loss_mask"]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        float32 = dpo.completion_logps(model, ids, mask)
        with autocast:
            logits = model(ids)
            autocast_logps = dpo.completion_logps(model, ids, mask)
        bf16_model = copy.deepcopy(model).to(torch.bfloat16)
        bf16_logps = dpo.completion_logps(bf16_model, ids, mask)
        bf16_logits = bf16_model(ids)
    assert logits.dtype == torch.bfloat16 and autocast_logps.dtype == bf16_logps.dtype == torch.float32
    assert torch.allclose(autocast_logps, dpo.sequence_logps(logits.float(), ids, mask), rtol=0, atol=1e-3)
    assert torch.allclose(bf16_logps, dpo.sequence_logps(bf16_logits.float(), ids, mask), rtol=0, atol=1e-3)
    for logps in (autocast_logps, bf16_logps):
        assert ((logps - float32).abs() / float32.abs()).max() < 2e-3
        assert not torch.equal(logps, float32)  # bfloat16 was really used
    pairs = [(row[:12].tolist(), row[12:33].tolist(), row[12:33].tolist()) for row in ids[:1]]
    reference = dpo.make_reference(model)
    first = one_step(model, torch.optim.SGD(model.parameters(), lr=0.0),
                     reference_batch(reference, pairs, autocast=autocast),
                     autocast=autocast)
    assert first["loss"] == pytest.approx(LOG2, abs=1e-7) and first["margin"] == 0.0


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
    """tiktoken refuses "<|endoftext|>" inside ordinary text; the error says which text and why."""
    enc = gpt2_tokenizer()
    pairs = [{"prompt": "Say <|endoftext|> now", "chosen": " yes", "rejected": " no"}]
    with pytest.raises(ValueError, match=re.escape("special token such as '<|endoftext|>'")):
        dpo.encode_pairs(enc, pairs)


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
    as the plain definition, sequence_logps(model(ids), ids, mask), and vocab_logprobs'
    (N, V) rows are exactly the log-softmax at the positions that score completion tokens."""
    policy = tiny_policy().double()
    batch = dpo.collate(encoded_pairs())
    ids, mask = batch["input_ids"], batch["loss_mask"]
    full_logits = policy(ids)
    assert torch.allclose(dpo.completion_logps(policy, ids, mask), dpo.sequence_logps(full_logits, ids, mask),
                          atol=1e-12, rtol=0)
    scoring = torch.zeros_like(mask, dtype=torch.bool)
    scoring[:, :-1] = mask[:, 1:].bool()  # position t scores token t+1
    rows = dpo.vocab_logprobs(policy, ids, mask)
    assert torch.allclose(rows, full_logits[scoring].log_softmax(-1), atol=1e-12, rtol=0)
    assert rows.shape[0] == int(mask.sum())  # one row per completion token


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


def test_make_optimizer_holds_exactly_the_policy_parameters(policy, reference):
    """The optimizer updates the policy and only the policy: every parameter once, none of the
    reference's (a copy with the same values, so only identity tells them apart)."""
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
    batch = reference_batch(dpo.make_reference(policy), pairs)
    forwards = count_forwards(policy)
    one_step(policy, torch.optim.SGD(policy.parameters(), lr=0.1), batch)
    assert len(forwards) == 1
    assert forwards[0].shape[0] == 4  # B = 2 pairs: 2 chosen + 2 rejected rows


def test_train_dpo_runs_the_reference_once_before_training_not_per_step(policy, reference):
    """log pi_ref(y|x) does not change, so train_dpo computes it once, in batches of batch_size
    pairs, however many steps follow; the policy runs once per step."""
    reference_forwards, policy_forwards = count_forwards(reference), count_forwards(policy)
    history = dpo.train_dpo(policy, reference, encoded_pairs(), torch.optim.SGD(policy.parameters(), lr=0.1),
                            epochs=3, batch_size=2)
    assert [x.size(0) for x in reference_forwards] == [4, 4, 2]  # 5 pairs, 10 rows, in batches of 2 pairs
    assert len(history) == 3 * 3  # 3 epochs of ceil(5 / 2) = 3 steps
    assert len(policy_forwards) == len(history)


def test_train_dpo_leaves_the_reference_bit_identical_and_moves_the_policy(policy, reference):
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
                            dpo.LossConfig(beta=1.0), epochs=1, batch_size=2)
    assert history[0]["loss"] == pytest.approx(LOG2, abs=1e-6)


def test_every_epoch_gets_a_new_order_and_visits_every_pair_once():
    """epoch_batches: each epoch is a permutation of all pairs, cut into batches, and the
    generator moves on between epochs, so the orders differ (a generator seeded again for
    every epoch, an order drawn once, or one sorted by length every epoch, would repeat).
    40 pairs, all of different lengths (so that a sort leaves no tie to break at random), batch 4."""
    pairs = [([1] * (1 + i), [2], [3]) for i in range(40)]
    generator = torch.Generator().manual_seed(0)
    epochs = [dpo.epoch_batches(pairs, 4, generator) for _ in range(3)]
    for batches in epochs:
        assert sorted(i for batch in batches for i in batch) == list(range(40))
        assert all(len(batch) == 4 for batch in batches)
    flat = [[i for batch in batches for i in batch] for batches in epochs]
    assert flat[0] != flat[1] and flat[1] != flat[2] and flat[0] != flat[2]
    again = torch.Generator().manual_seed(0)
    assert dpo.epoch_batches(pairs, 4, again) == epochs[0]  # the seed decides


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


def test_train_dpo_stops_at_the_first_step_whose_loss_is_not_finite(policy, reference):
    """A learning rate of 1e30 sends the weights to +-1e30 after one step, and the next loss is
    not finite: training stops there with an error that names the step and what to try."""
    seen = []
    with pytest.raises(FloatingPointError, match=r"diverged at step 2: .* smaller learning rate"):
        dpo.train_dpo(policy, reference, encoded_pairs(), dpo.make_optimizer(policy, lr=1e30), epochs=2,
                      batch_size=2, on_step=seen.append)
    assert [m["step"] for m in seen] == [1]  # the bad step was not passed on as a result

    policy = tiny_policy()  # a finite loss with a gradient that is not: stopped at step 1
    policy.transformer.ln_f.weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(FloatingPointError, match=r"diverged at step 1: loss 0\.69.*, gradient norm (inf|nan)"):
        dpo.train_dpo(policy, dpo.make_reference(policy), encoded_pairs(), dpo.make_optimizer(policy, lr=1e-3))


def test_dpo_step_with_an_inf_or_nan_gradient_leaves_the_weights_and_the_optimizer_as_they_were(policy, reference):
    """A finite loss with a gradient that is not (every gradient of ln_f's weight times inf):
    dpo_step reports the norm, which stops train_dpo, and does not apply the gradient, which
    would make AdamW's every weight nan; the weights are the ones before the step, to the bit."""
    policy.transformer.ln_f.weight.register_hook(lambda grad: grad * float("inf"))
    before = [p.detach().clone() for p in policy.parameters()]
    optimizer = dpo.make_optimizer(policy, lr=1e-2)
    metrics = one_step(policy, optimizer, reference_batch(reference, encoded_pairs()))
    assert math.isfinite(metrics["loss"]) and not math.isfinite(metrics["grad_norm"])
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert optimizer.state_dict()["state"] == {}  # AdamW never stepped


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


def test_train_dpo_averages_the_reference_log_probs_it_computes_when_asked_to_average(policy, reference):
    """train_dpo with average_logps and without cached reference log-probs must average the
    reference's too: at step 0, where policy = reference, the loss is then log 2 (Eq. 7 at
    h = 0). Summed reference log-probs against averaged policy ones would give another loss."""
    history = dpo.train_dpo(policy, reference, encoded_pairs(), torch.optim.SGD(policy.parameters(), lr=0.0),
                            dpo.LossConfig(average_logps=True), epochs=1, batch_size=len(PAIRS))
    assert history[0]["loss"] == pytest.approx(LOG2, abs=1e-6)


# -----------------------------------------------------------------------------
# Evaluation on held-out pairs


def test_evaluate_at_the_start_is_log2_with_zero_margins_zero_kl_and_chance_accuracy(policy, reference):
    """Before training the policy is the reference, and evaluate runs both on the same batches:
    loss exactly log 2 (Eq. 7 at h = 0), every margin 0 (so the reward accuracy, ties counted
    half, is 0.5), KL 0; one forward pass of each model per batch."""
    policy_forwards, reference_forwards = count_forwards(policy), count_forwards(reference)
    m = dpo.evaluate(policy, reference, encoded_pairs(), batch_size=2)
    assert m["loss"] == pytest.approx(LOG2, abs=1e-7)
    assert m["margin"] == 0.0 and m["reward_accuracy"] == 0.5 and m["kl"] == 0.0
    assert len(policy_forwards) == len(reference_forwards) == 3  # 5 pairs, batches of 2


def test_evaluate_frees_each_batch_before_the_next_forward_pass(monkeypatch):
    """Memory bounded by one batch: the (N, V) log-prob tensors of a batch are gone before the
    next batch's forward pass. A loop that only rebinds its names would still hold the last
    batch's two while it computes the next: twice the batch's share of the peak."""
    made, alive_at_each_forward = [], []
    real = dpo.vocab_logprobs

    def recorded(model, ids, mask):
        alive_at_each_forward.append(sum(ref() is not None for ref in made))
        logprobs = real(model, ids, mask)
        made.append(weakref.ref(logprobs))
        return logprobs

    monkeypatch.setattr(dpo, "vocab_logprobs", recorded)
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
    m = dpo.evaluate(policy, reference, encoded_pairs(), dpo.LossConfig("ipo", beta=0.5), batch_size=3)
    assert min(kls) > 0 and abs(np.mean(margins)) > 1e-3  # the policy really moved
    assert m["loss"] == pytest.approx(np.mean(losses), rel=1e-9)
    assert m["margin"] == pytest.approx(np.mean(margins), rel=1e-9)
    assert m["reward_accuracy"] == pytest.approx(np.mean([x > 0 for x in margins]))
    assert min(abs(x) for x in margins) > 0  # no tie here: the tie rule has its own test
    assert m["kl"] == pytest.approx(np.mean(kls), rel=1e-9)


@pytest.mark.parametrize("loss_type, label_smoothing, loss", [("dpo", 0.1, (0.41326168751822286 + 1.5514132779827524) / 2),
                                                             ("ipo", 0.0, (1.0 + 16.0) / 2)])
def test_evaluation_metrics_are_the_loss_asked_for_over_the_pairs_and_the_kl_over_all_positions(loss_type,
                                                                                              label_smoothing, loss):
    """evaluation_metrics of evaluation_numbers' six rows, written here: FIXED's log-probs (beta
    0.5), each pair's KL summed over its positions, and their number. The loss is the mean of
    the loss asked for (cDPO's or IPO's hand-computed values above); margins 1 and -1.5; the KL
    is the sum over all positions over their number, (0.3 + 0.9) / (2 + 4) = 0.2, not the mean of
    each pair's mean (0.15 + 0.225) / 2 = 0.1875."""
    numbers = torch.tensor([FIXED[k] for k in ("pc", "pr", "rc", "rr")] + [[0.3, 0.9], [2.0, 4.0]],
                           dtype=torch.float64)
    metrics = dpo.evaluation_metrics(numbers, dpo.LossConfig(loss_type, beta=0.5, label_smoothing=label_smoothing))
    assert metrics == pytest.approx(dict(loss=loss, reward_accuracy=0.5, margin=-0.25, chosen_reward=-0.25,
                                         rejected_reward=0.0, kl=0.2), rel=1e-12)


def test_pair_logps_scores_only_the_pairs_of_the_batches_given_and_counts_them_as_it_goes():
    """pair_logps with batches (a process's share under torchrun): the pairs in them get the
    plain definition's log-probs, the others 0 (the processes' shares are added up); progress
    is told the pairs done of the pairs in those batches."""
    model = tiny_policy(dtype=torch.float64)
    pairs = encoded_pairs()
    seen = []
    chosen, rejected = dpo.pair_logps(model, pairs, batches=[[0, 3], [4]], progress=lambda *done: seen.append(done))
    with torch.no_grad():
        expected = plain_logps(model, dpo.collate(pairs))
    for got, plain in zip((chosen, rejected), expected):
        assert torch.allclose(got[[0, 3, 4]], plain[[0, 3, 4]], rtol=0, atol=1e-12)
        assert got[[1, 2]].tolist() == [0.0, 0.0]
    assert seen == [(2, 3), (3, 3)]


def test_kl_is_taken_in_the_direction_kl_policy_to_reference():
    """KL is not symmetric: evaluate's KL equals KL(pi || pi_ref) from torch.distributions and
    differs from KL(pi_ref || pi) on the same model pair."""
    policy = tiny_policy().double()
    reference = dpo.make_reference(policy)
    perturb(policy, std=0.3)
    batch = dpo.collate(encoded_pairs())
    scored = dpo.vocab_logprobs  # (N, V) log-probs at the completion positions
    with torch.no_grad():
        p, q = scored(policy, *batch.values()), scored(reference, *batch.values())
    Categorical = torch.distributions.Categorical
    forward = torch.distributions.kl_divergence(Categorical(logits=p), Categorical(logits=q)).mean().item()
    backward = torch.distributions.kl_divergence(Categorical(logits=q), Categorical(logits=p)).mean().item()
    assert abs(forward - backward) > 1e-3
    kl = dpo.evaluate(policy, reference, encoded_pairs(), batch_size=8)["kl"]
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
        metrics = one_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, beta=0.5)
        evaluation = dpo.evaluate(policy, reference, pairs)
        results[device] = torch.cat(reference_logps), metrics, evaluation, [p.grad.cpu() for p in policy.parameters()]
    (cpu_logps, cpu_metrics, cpu_eval, cpu_grads), (gpu_logps, gpu_metrics, gpu_eval, gpu_grads) = results.values()
    assert torch.allclose(gpu_logps, cpu_logps, rtol=0, atol=1e-4)
    assert cpu_eval["kl"] > 0 and cpu_metrics["margin"] != 0
    assert gpu_metrics == pytest.approx(cpu_metrics, rel=1e-4, abs=1e-6)
    assert gpu_eval == pytest.approx(cpu_eval, rel=1e-4, abs=1e-6)
    for g_gpu, g_cpu in zip(gpu_grads, cpu_grads):
        assert torch.allclose(g_gpu, g_cpu, rtol=1e-3, atol=1e-6)


# =============================================================================
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
# Tests for model.py's network: its logits, its size, its initialisation, its tied head
# and generate. Every check compares it with something written here independently of it:
# - `gpt2`, a numpy GPT-2 forward pass after picoGPT (Jay Mody), reading the Hugging Face
#   tensors exactly as the hub stores them (Conv1D weights are (in, out), so x @ W + b);
# - `gpt_holding`, which puts such tensors into a GPT by this file's own reading of the
#   layout, so that generate is tested here without model.py's loading code (section 8
#   tests that, and the logits of what it loads, on files written by hand);
# - closed forms: the chain rule for the tied matrix, GPT-2's parameter count and the
#   standard deviations of its initialisation (GPT-2 paper, Section 2.3).


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


def numpy_greedy(params, n_head, prompt, n_new):
    """Append argmax of the last position's logits, n_new times, using the numpy model."""
    seq = list(prompt)
    for _ in range(n_new):
        seq.append(int(numpy_logits(params, n_head, [seq])[0, -1].argmax()))
    return seq


def model_logits(model, idx):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(idx))).double().numpy()


# ---------------------------------------------------------------------------
# Random GPT-2 weights in the hub's layout, and a GPT holding them.

TINY = dict(n_layer=2, n_head=2, n_embd=16, vocab_size=61, n_positions=32)
TINY_CONFIG = GPTConfig(block_size=32, vocab_size=61, n_layer=2, n_head=2, n_embd=16)


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


@pytest.fixture
def tiny():
    """(config.json, weights) of a tiny GPT-2: random hub-layout float32 arrays, no masks."""
    config = hub_config(**TINY)
    return config, random_gpt2_params(config)


def gpt_holding(params, dtype=torch.float32):
    """A TINY GPT holding hub-layout params, put in by this file's own reading of the layout:
    "transformer." before every name, the four Conv1D weights turned from (in, out) into
    nn.Linear's (out, in), and the head the same matrix as wte."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = {"transformer." + name: torch.from_numpy(np.ascontiguousarray(a.T if name.endswith(conv1d) else a))
             for name, a in params.items()}
    model = GPT(TINY_CONFIG)
    model.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]})
    return model.to(dtype).eval()


def random_tokens(B=2, T=32, V=61, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, T))


def assert_matches_numpy(model, params, n_head=TINY["n_head"], idx=None, atol=1e-5):
    """model's logits are the numpy GPT-2's on the same weights (random tokens by default)."""
    idx = random_tokens() if idx is None else idx
    np.testing.assert_allclose(model_logits(model, idx), numpy_logits(params, n_head, idx),
                               rtol=0, atol=atol)


# ---------------------------------------------------------------------------
# The library leaves the process alone.

@pytest.mark.parametrize("module", ["checkpoint", "model", "dpo"])
def test_importing_the_library_sets_no_environment_variable(monkeypatch, module):
    """A library sets no process-wide state on import (MKL_CBWR, say, is the scripts' to
    set): the module's top level, executed afresh in an emptied environment, leaves it empty.
    (Emptied, so that even a setdefault of a variable this process already has would show.)"""
    for variable in list(os.environ):
        monkeypatch.delenv(variable)
    spec = importlib.util.spec_from_file_location(f"{module}_imported_afresh", ROOT / f"{module}.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert dict(os.environ) == {}


# ---------------------------------------------------------------------------
# The forward pass.

def test_numpy_gpt2_tells_tanh_gelu_from_erf_gelu(monkeypatch, tiny):
    """The parity checks (generate's below, from_pretrained's in section 8) can fail: the erf
    GELU moves these logits by more than 1e-4."""
    config, params = tiny
    idx = random_tokens(B=1)
    tanh_logits = numpy_logits(params, config["n_head"], idx)
    monkeypatch.setitem(globals(), "gelu", lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2))))
    assert np.abs(numpy_logits(params, config["n_head"], idx) - tanh_logits).max() > 1e-4


def test_sequence_longer_than_block_size_raises_value_error():
    """wpe has block_size rows; a longer input must fail loudly, naming both numbers."""
    with pytest.raises(ValueError) as err:
        GPT(TINY_CONFIG)(torch.zeros(1, 33, dtype=torch.long))
    assert "33" in str(err.value) and "32" in str(err.value)


# ---------------------------------------------------------------------------
# Size, initialisation, tying.

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


def test_initialisation_is_gpt2s_normal_0_02_with_residual_projections_scaled_by_1_over_sqrt_2_n_layer():
    """Every weight matrix is drawn from N(0, 0.02^2) (initializer_range in GPT-2's
    config.json), except the two projections that end in the residual stream (attn.c_proj,
    mlp.c_proj), whose std is scaled by 1/sqrt(N) for N = 2 n_layer residual layers (GPT-2
    paper, Section 2.3); biases are 0 and layer-norm gains 1.
    Each tensor's sample std is within 3% of its std (the smallest has 16,384 numbers: 5
    standard errors), and 4.55% of its numbers lie beyond 2 std, as for a normal law
    (a uniform law of the same std has none there)."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=512, n_layer=8, n_head=8, n_embd=256)
    residual = re.compile(r"transformer\.h\.\d+\.(attn|mlp)\.c_proj\.weight")
    other_matrix = re.compile(r"transformer\.(wte|wpe|h\.\d+\.attn\.c_attn|h\.\d+\.mlp\.c_fc)\.weight")
    gain = re.compile(r"transformer\.(h\.\d+\.ln_[12]|ln_f)\.weight")
    for name, p in GPT(config).named_parameters():
        p = p.detach().double()
        if gain.fullmatch(name) or name.endswith(".bias"):
            assert torch.equal(p, torch.full_like(p, 1.0 if gain.fullmatch(name) else 0.0)), name
            continue
        assert residual.fullmatch(name) or other_matrix.fullmatch(name), name
        std = 0.02 / math.sqrt(2 * config.n_layer) if residual.fullmatch(name) else 0.02
        assert abs(p.std().item() / std - 1) < 0.03, (name, p.std().item(), std)
        assert abs(p.mean().item()) < 5 * std / math.sqrt(p.numel()), name
        assert abs((p.abs() > 2 * std).double().mean().item() - 0.0455) < 0.01, name


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


# ---------------------------------------------------------------------------
# generate: greedy, top-k and temperature, each against the numpy GPT-2.

@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=1)])
def test_greedy_generate_equals_argmax_loop_of_numpy_gpt2(tiny, sampling):
    """temperature 0 is greedy decoding; so is sampling restricted to the top 1 token."""
    config, params = tiny
    prompt = random_tokens(B=2, T=5)
    out = gpt_holding(params).generate(torch.as_tensor(prompt), max_new_tokens=10, **sampling)
    assert out.shape == (2, 15)
    for row, p in zip(out.tolist(), prompt):
        assert row == numpy_greedy(params, config["n_head"], p, 10)


def test_top_k_sampling_draws_every_one_of_the_k_most_likely_tokens_and_no_other(tiny):
    """top_k=3 keeps each row's 3 highest logits and samples among them. 1,000 draws after
    each of two prompts (a batch of 2,000 rows, one new token each): the set of tokens drawn
    is exactly numpy's 3 most likely for that prompt. Each of the 3 has a probability of at
    least 10% once renormalised, so missing one in 1,000 draws has odds below 1e-45; and
    each prompt's cut, applied to the other's logits, would keep another number of tokens.
    So this fails only if top_k keeps the wrong tokens, too many or too few, in any row."""
    config, params = tiny
    prompts = random_tokens(B=2, T=5, seed=9)
    last = numpy_logits(params, config["n_head"], prompts)[:, -1]  # (2, V)
    best3 = np.argsort(last, axis=-1)[:, -3:]
    assert (softmax(np.take_along_axis(last, best3, axis=-1)) > 0.1).all()
    cut = np.sort(last, axis=-1)[:, [-3]]  # (2, 1)
    assert ((last >= cut[::-1]).sum(axis=-1) != 3).all()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = gpt_holding(params).generate(torch.as_tensor(prompts).repeat_interleave(1000, dim=0),
                                           max_new_tokens=1, top_k=3)
    drawn = out[:, -1].view(2, 1000)
    for row, expected in zip(drawn.tolist(), best3.tolist()):
        assert set(row) == set(expected)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_each_step_samples_softmax_of_logits_over_temperature_given_the_last_block_size_tokens(tiny, monkeypatch,
                                                                                               temperature):
    """Each step samples from softmax(logits / T) at the last position, the logits of the last
    block_size tokens so far: with a 28-token prompt the window slides past block_size 32 after
    4 of the 10 steps. The probabilities handed to torch.multinomial are numpy's, step by step.
    (Greedy decoding cannot show the window: this tiny random model soon repeats one token,
    whatever it sees; probabilities move with every token and every position.)"""
    config, params = tiny
    handed = []
    real_multinomial = torch.multinomial

    def recording_multinomial(probs, num_samples, *args, **kwargs):
        handed.append(probs.double().numpy().copy())
        return real_multinomial(probs, num_samples, *args, **kwargs)
    monkeypatch.setattr(torch, "multinomial", recording_multinomial)
    prompt = random_tokens(B=2, T=28, seed=4)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = gpt_holding(params).generate(torch.as_tensor(prompt), max_new_tokens=10, temperature=temperature)
    assert len(handed) == 10
    for step, probs in enumerate(handed):
        window = out[:, : 28 + step][:, -32:].numpy()
        expected = softmax(numpy_logits(params, config["n_head"], window)[:, -1] / temperature)
        np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-7)
# =============================================================================
# 4. The experiment: train_toy.py flips 0/4 to 4/4, and repeats itself in a new process
# =============================================================================


def run_toy(out, *args):
    """train_toy.py's main in this process (no second torch import), output captured by pytest."""
    gpt2_tokenizer()
    return train.main(["--out", str(out), *args], train_toy.parse_args, train_toy.run)


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


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


def without_times(records, also=()):
    """metrics.jsonl's records without the timings (and the keys in `also`)."""
    leave_out = {"train_s", "tokens_per_s", "peak_memory_bytes", *also}
    return [{k: v for k, v in r.items() if k not in leave_out} for r in records]


@pytest.fixture(scope="session")
def sft_cache():
    return {}


def reuse_sft(monkeypatch, sft_cache):
    """The tiny model's SFT warm-up is the same computation in every toy run of this process
    (same seed, same pairs); it runs once, and later runs start from its weights. The run in a
    new process (the command-line test) does it itself and must end with the same weights,
    which is what makes this safe."""
    real = train_toy.sft_warmup

    def cached(model, tokens, seed, log):
        key = (json.dumps(tokens), seed, train_toy.SFT_STEPS, str(next(model.parameters()).device))
        if key not in sft_cache:
            records = []
            real(model, tokens, seed, lambda record, line=None: records.append((record, line)))
            sft_cache[key] = ({k: v.clone() for k, v in model.state_dict().items()}, records)
        state, records = sft_cache[key]
        model.load_state_dict(state)
        model.eval()
        for record, line in records:
            log(record, line)

    monkeypatch.setattr(train_toy, "sft_warmup", cached)


@pytest.fixture(autouse=True)
def sft_once(monkeypatch, sft_cache):
    reuse_sft(monkeypatch, sft_cache)


@pytest.fixture(scope="module")
def command_line_run(tmp_path_factory):
    """`python train_toy.py --model tiny` in a new process, as a user types it, started before
    this section's tests and collected by the last of them, so that it runs beside them.
    OMP_WAIT_POLICY=PASSIVE keeps the idle threads of the two processes from spinning; it
    changes no number."""
    out = tmp_path_factory.mktemp("cli") / "toy-dpo"
    args = ["--model", "tiny", "--loss", "dpo", "--out", str(out)]
    process = subprocess.Popen([sys.executable, str(ROOT / "train_toy.py"), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    yield out, process
    process.kill()


@pytest.fixture(scope="module")
def tiny_dpo_run(tmp_path_factory, sft_cache, command_line_run):
    """The toy's tiny run in this process: (its folder, its summary). The same run in a new
    process (command_line_run) starts first and runs beside this section's tests."""
    out = tmp_path_factory.mktemp("toy") / "toy-dpo"
    with pytest.MonkeyPatch.context() as monkeypatch:
        reuse_sft(monkeypatch, sft_cache)
        return out, run_toy(out, "--model", "tiny", "--loss", "dpo")


@pytest.mark.parametrize("loss, dtype", [("dpo", "float32"), ("ipo", "float32"), ("dpo", "bfloat16")])
def test_toy_experiment_flips_every_preference(loss, dtype, tiny_dpo_run, tmp_path):
    """The whole story of train_toy.py --model tiny: after SFT on the intuitive completions the
    model prefers none of the chosen (counter-intuitive) ones; after DPO / IPO it prefers all four,
    and every pair is ranked right by the implicit reward. Under bfloat16 autocast too, where
    the step-0 evaluation (policy = reference, same batches, same autocast) still has every
    margin exactly 0 and the loss at h = 0 (log 2 for DPO)."""
    out, summary = tiny_dpo_run
    if (loss, dtype) != ("dpo", "float32"):
        out, summary = tmp_path, run_toy(tmp_path, "--model", "tiny", "--loss", loss, "--dtype", dtype)
    assert summary["preferred_before"] == 0 and summary["preferred_after"] == 4
    assert summary["final_reward_accuracy"] == 1.0 and summary["dtype"] == dtype
    first_eval = next(r for r in read_metrics(out) if r.get("phase") == "eval")
    assert first_eval["step"] == 0 and first_eval["margin"] == 0.0 and first_eval["kl"] == 0.0
    at_h_0 = LOG2 if loss == "dpo" else (1 / (2 * summary["beta"])) ** 2  # Eq. 7 / Eq. 17 at h = 0
    assert first_eval["loss"] == pytest.approx(at_h_0, rel=1e-7) and first_eval["reward_accuracy"] == 0.5


def test_chosen_preferred_counts_strictly_more_likely_and_not_a_tie():
    """count_preferred, the headline's "chosen preferred": log pi(chosen) > log pi(rejected),
    strictly; a tie is not a preference (unlike the reward accuracy, where it counts half)."""
    chosen, rejected = torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.tensor([-2.0, -2.0, -1.0, -4.0 - 1e-6])
    assert train_toy.count_preferred((chosen, rejected)) == 2


def test_toy_run_reports_the_held_out_pairs_it_never_trained_on(tiny_dpo_run):
    """Four held-out pairs, disjoint from the training pairs: evaluated at step 0 and at the end,
    and their log-probs after training are what the saved policy gives them, scored again here.
    The final held-out reward accuracy is the share of pairs whose margin, computed here from
    those log-probs, is > 0 (ties half)."""
    out, summary = tiny_dpo_run
    assert summary["eval_preferred_before"] == 0
    assert [r["step"] for r in read_metrics(out) if r.get("phase") == "eval"] == [0, 12]
    model = GPT.from_pretrained(out, device=summary["device"])
    chosen, rejected = dpo.pair_logps(model, dpo.encode_pairs(gpt2_tokenizer(), train_toy.TOY_EVAL_PAIRS),
                                      batch_size=summary["batch_size"])
    assert summary["eval_logps_after"] == {"chosen": chosen.tolist(), "rejected": rejected.tolist()}
    before, after = summary["eval_logps_before"], summary["eval_logps_after"]
    margins = [(ac - bc) - (ar - br) for bc, br, ac, ar in zip(before["chosen"], before["rejected"],
                                                                after["chosen"], after["rejected"])]
    assert summary["final_eval_reward_accuracy"] == pytest.approx(np.mean([(m > 0) + 0.5 * (m == 0) for m in margins]))
    assert not {p["prompt"] for p in train_toy.TOY_EVAL_PAIRS} & {p["prompt"] for p in train_toy.TOY_PAIRS}


def test_toy_metrics_file_has_every_step_and_a_summary(tiny_dpo_run):
    """metrics.jsonl: SFT lines at steps 1, 20, 40, 60; one line per DPO step, 6 epochs x 2
    batches; the summary last, equal
    to what main() returned. train_tokens counts the toy pairs' real tokens, here from the
    tokenizer itself: each epoch sees every pair once, its prompt twice (chosen and rejected
    rows). The run folder holds the SFT-trained reference: no GPT-2 name would load it."""
    out, summary = tiny_dpo_run
    records = read_metrics(out)
    assert [r["step"] for r in records if r.get("phase") == "sft"] == [1, 20, 40, 60]
    steps = [r for r in records if r.get("phase") == "dpo"]
    assert [(r["step"], r["epoch"]) for r in steps] == [(s, (s + 1) // 2) for s in range(1, 13)]
    assert records[-1] == json.loads(json.dumps(summary)) and summary["summary"] is True
    per_epoch = sum(2 * len(p) + len(c) + len(r) for p, c, r in dpo.encode_pairs(gpt2_tokenizer(), train_toy.TOY_PAIRS))
    assert summary["train_tokens"] == 6 * per_epoch < summary["train_positions"]  # the pairs differ: some padding
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "merges.txt", "metrics.jsonl", "model.safetensors",
                                                     "reference.safetensors", "run.json", "tokenizer_config.json",
                                                     "vocab.json"]
    import sample
    _, reference, loss = sample.load(str(out), summary["device"], compare=True)  # as sample.py --compare does
    chosen, _ = dpo.pair_logps(reference, dpo.encode_pairs(gpt2_tokenizer(), train_toy.TOY_PAIRS), batch_size=2)
    assert chosen.tolist() == summary["logps_before"]["chosen"]  # the reference the run measured against
    assert loss == dpo.LossConfig("dpo", beta=0.1)


def test_training_seconds_leave_out_the_evaluations(tmp_path, monkeypatch):
    """train_s is the time of the training steps alone: every held-out evaluation (at step 0,
    every --eval-every steps, at the end) is made to take 0.2 s longer here, and train_s stays
    below the wall time of dpo.train_dpo minus the two evaluations inside it."""
    import time
    real_evaluate, real_train = dpo.evaluate, dpo.train_dpo
    walls = []

    def slow_evaluate(*args, **kwargs):
        time.sleep(0.2)
        return real_evaluate(*args, **kwargs)

    def timed_train(*args, **kwargs):
        start = time.perf_counter()
        history = real_train(*args, **kwargs)
        walls.append(time.perf_counter() - start)
        return history

    monkeypatch.setattr(dpo, "evaluate", slow_evaluate)
    monkeypatch.setattr(dpo, "train_dpo", timed_train)
    summary = run_toy(tmp_path, "--model", "tiny", "--epochs", "3", "--eval-every", "2")
    assert [r["step"] for r in read_metrics(tmp_path) if r.get("phase") == "eval"] == [0, 2, 4, 6]
    assert 0 < summary["train_s"] <= walls[0] - 2 * 0.2


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


@needs_cuda
def test_toy_run_on_cuda_gives_the_same_numbers_twice(tmp_path):
    """train.start_processes asks PyTorch for deterministic CUDA kernels: two runs, the same weights."""
    for name in ("a", "b"):
        run_toy(tmp_path / name, "--model", "tiny", "--epochs", "2", "--device", "cuda", "--dtype", "float32")
    assert_same_checkpoint(tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors")


def test_default_run_without_network_or_cache_says_how_to_get_weights(tmp_path, monkeypatch):
    """Offline with nothing cached, `python train_toy.py` stops with a short message that says
    where the weights go and the alternatives (--weights, --model tiny), not a traceback, and
    leaves no folder it made for --out behind."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as stop:
        run_toy(tmp_path / "runs" / "out")
    message = str(stop.value)
    assert message.startswith("error: ") and "--weights" in message and "--model tiny" in message
    assert str(tmp_path / "hf" / "hub" / "models--openai-community--gpt2") in message
    assert not (tmp_path / "runs").exists()


def test_a_tokenizer_that_cannot_load_says_what_is_missing_and_how_to_provide_it(tmp_path, monkeypatch):
    """Offline without tiktoken's cached files: one short line, what is missing and
    TIKTOKEN_CACHE_DIR, instead of the HTTP library's message."""
    import tiktoken

    def offline(name):
        raise ConnectionError("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net', port=443): ...")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(SystemExit) as stop:  # not run_toy, which skips where the tokenizer cannot load
        train.main(["--out", str(tmp_path / "out"), "--model", "tiny"], train_toy.parse_args, train_toy.run)
    assert "vocab.bpe and encoder.json" in str(stop.value) and "TIKTOKEN_CACHE_DIR" in str(stop.value)
    assert "openaipublic" not in str(stop.value) and "\n" not in str(stop.value)


def test_weights_option_trains_a_local_checkpoint(tiny_dpo_run, tmp_path, capsys):
    """--weights loads a local checkpoint (here the tiny run's output, config.json beside it) and
    trains it; the run names the file, not --model, whose sizes it does not have."""
    out, _ = tiny_dpo_run
    summary = run_toy(tmp_path / "again", "--model", "gpt2", "--weights", str(out), "--epochs", "1")
    assert summary["preferred_before"] == 4  # it was trained to prefer the chosen completions already
    assert summary["weights"] == str(out) and capsys.readouterr().out.startswith(f"model {out}: 2 layers, 64 wide, ")
    assert (tmp_path / "again" / "reference.safetensors").is_file()  # a file, not a name, made the reference


def test_plot_without_matplotlib_is_refused_before_training(tmp_path, monkeypatch):
    """--plot needs matplotlib; without it the run stops at once with the pip command."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        run_toy(tmp_path / "out", "--model", "tiny", "--plot", str(tmp_path / "curves.png"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, message", [
    (["--epochs", "0"], "argument --epochs: must be a finite number > 0"),
    (["--beta", "-0.1"], "argument --beta: must be a finite number > 0"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0"),
    (["--init", "random"], "--model tiny is always built here"),
    (["--out", __file__], "is a file; --out must be a folder"),
    (["--plot", "OUT/curves.png"], "--plot must be outside --out"),
])
def test_bad_options_are_refused_with_a_message(options, message, tmp_path, capsys):
    """Nonsensical options stop the script at once (argparse's exit code 2) with what was wrong."""
    options = [str(tmp_path / "out" / "curves.png") if x == "OUT/curves.png" else x for x in options]
    with pytest.raises(SystemExit) as stop:
        run_toy(tmp_path / "out", "--model", "tiny", *options)
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

def test_toy_script_runs_from_the_command_line_with_the_numbers_of_this_process(tiny_dpo_run, command_line_run):
    """`python train_toy.py --model tiny` in a new process that does its own SFT: exit 0, the
    headline and the last line printed, and the same numbers as the same run inside this test
    process: every metrics.jsonl line but the timings, and the trained weights to the byte.
    (Same seed, same device, same numbers: see train.py on MKL_CBWR.)"""
    out, _ = tiny_dpo_run
    cli, process = command_line_run
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "chosen preferred: training pairs 0/4 -> 4/4, held-out pairs 0/4 -> " in stdout
    assert re.search(r"\ntraining: [\d.]+ s, [\d,]+ tokens/s, \d+% padding; peak memory [\d,]+ MiB", stdout)
    assert without_times(read_metrics(cli), ("out",)) == without_times(read_metrics(out), ("out",))
    assert_same_checkpoint(cli / "model.safetensors", out / "model.safetensors")


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


