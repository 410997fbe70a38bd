"""
The proof: every formula of this project checked against something independent of it.

    python -m pytest test_dpo.py          (about a minute on a 2-core CPU; no network)

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
- Only completion tokens are scored, tokenised apart from the prompt; HH-RLHF dialogues split
  at the last shared assistant turn
    -> test_sequence_logps_ignores_prompt_and_padding_..., test_encode_pairs_tokenises_...,
       test_split_prompt_cuts_hh_dialogues_at_the_last_shared_assistant_turn_or_whitespace
- The fast path (logits only where scored, per-batch padding, batches by length) gives the
  plain numbers; bfloat16 log-probs are summed in float32
    -> test_completion_logps_equals_sequence_logps_..., test_per_batch_padding_gives_...,
       test_bfloat16_log_probs_are_summed_in_float32
- Mean instead of sum: IPO's target becomes nats per token
    -> test_averaged_log_probs_are_the_sum_divided_by_..., test_ipo_on_averaged_log_probs_...
- The reference is frozen, computed once, carries no graph; the optimizer holds the policy only
    -> test_train_dpo_runs_the_reference_once_..., test_reference_log_probs_carry_no_graph_...,
       test_make_optimizer_holds_exactly_the_policy_parameters
- Micro-batches of any sizes give the gradient of one pass (and mean / N does not); every
  pair of a step reaches exactly one process; the schedule is the formula
    -> test_micro_batches_of_different_sizes_give_the_gradient_of_one_pass,
       test_a_step_is_shared_out_among_processes_and_micro_batches_every_pair_once,
       test_learning_rate_warms_up_linearly_then_stays_or_decays_linearly
- Held-out evaluation: loss, rewards and the exact KL(pi || pi_ref)
    -> test_evaluate_equals_dpo_loss_and_kl_computed_pair_by_pair_from_full_logits,
       test_evaluate_at_the_start_is_log2_with_zero_margins_zero_kl_and_chance_accuracy
- DPO's optimum is pi_ref exp(r / beta) / Z (Eq. 4); DPO drives pi(y_r) to 0, IPO stops
    -> test_population_dpo_minimiser_is_..., test_dpo_drives_..., test_ipo_stops_...
- model.py is GPT-2: the same logits as a numpy GPT-2 on the Hugging Face tensors
    -> test_from_pretrained_directory_matches_numpy_gpt2, ..._float64_matches_numpy_gpt2_to_1e_9
- train_toy.py flips 0/4 to 4/4 (in bfloat16 too) and repeats itself exactly in a new process
    -> test_toy_experiment_flips_every_preference,
       test_toy_script_runs_from_the_command_line_with_the_numbers_of_this_process
- --out: a folder of the user's is refused and left alone; a failure, Ctrl-C or kill at any
  moment leaves the earlier --out byte for byte; leftovers of a killed save are cleaned up
    -> test_out_holding_files_this_script_did_not_write_is_refused_and_left_alone,
       test_ctrl_c_and_kill_during_training_and_saving_leave_the_earlier_out,
       test_leftovers_of_a_save_killed_half_way_are_cleaned_up_by_the_next_run
- A resumed run ends bit-identical to an uninterrupted one; torchrun trains what one process does
    -> test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one,
       test_torchrun_with_two_processes_trains_what_one_process_trains
- Bradley-Terry recovers known strengths with honest standard errors
    -> test_fit_recovers_simulated_strengths_..., test_standard_errors_match_spread_...
- .safetensors by hand: every dtype round-trips, malformed files are refused; a folder is
  replaced as one unit and only its own files are ever deleted; the download is verified
    -> test_every_dtype_round_trips_exactly_..., test_load_safetensors_rejects_malformed_...,
       test_replace_folder_..., test_from_pretrained_gpt2_downloads_into_hub_cache_...

Sections, in this order: 1. the DPO math (dpo.py); 2. theory on a bandit; 3. the model
(model.py) against a numpy GPT-2; 4. end to end (train_toy.py); 5. Bradley-Terry (bt.py);
6. bench.py's steps and pairs; 7. checkpoints, safetensors and the hub (checkpoint.py).

Tests that need the GPT-2 tokenizer skip with a reason when tiktoken cannot load it
offline: set TIKTOKEN_CACHE_DIR (see README.md). A few checks run only on a CUDA GPU, and
a few only where Hugging Face's transformers and safetensors packages are installed
(cross-checks; never needed).
"""

import argparse
import contextlib
import copy
import errno
import functools
import hashlib
import http.server
import importlib.util
import json
import math
import os
import pickle
import re
import shutil
import signal
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
import checkpoint
import dpo
import train_toy
from bt import fit_bradley_terry, win_probability
from dpo import dpo_loss
from checkpoint import SAFETENSORS_DTYPES, hub_cache_dir, load_safetensors, save_safetensors, write_atomically
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


def one_step(policy, optimizer, batch, **options):
    """dpo_step on one batch from make_batch, its only micro-batch."""
    return dpo.dpo_step(policy, optimizer, [batch], len(batch["reference_chosen_logps"]), **options)


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
    every margin 0, reads 0.5. summed_numbers adds the per-pair numbers and counts the pairs."""
    chosen = torch.tensor([0.5, 0.2, -1.0, 0.3], dtype=torch.float64)
    rejected = torch.tensor([-0.5, 0.2, 1.0, 0.3 - 1e-12], dtype=torch.float64)
    assert dpo.reward_accuracy(chosen, rejected).tolist() == [1.0, 0.5, 0.0, 1.0]
    losses = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    sums = dpo.summed_numbers(losses, chosen, rejected)
    assert sums.tolist() == pytest.approx([1.0, 2.5, 1.0 + 0.0 - 2.0 + 1e-12, 0.0, 1.0 - 1e-12, 4.0], abs=1e-15)
    assert dpo.means(sums) == pytest.approx(dict(loss=0.25, reward_accuracy=0.625, margin=-0.25, chosen_reward=0.0,
                                                 rejected_reward=0.25), abs=1e-12)


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


@pytest.mark.parametrize("pair, message", [
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt' must be a non-empty string, got ''"),
    ({"prompt": "x", "chosen": "a", "rejected": ""}, "field 'rejected' must be a non-empty string"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a non-empty string, got 3"),
    ({"prompt": "x", "chosen": "a"}, "field 'rejected' must be a non-empty string, got None"),
])
def test_encode_pair_names_the_field_that_is_not_a_non_empty_string(pair, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dpo.encode_pair(CharTokenizer(), pair)
    with pytest.raises(ValueError, match="no preference pairs"):
        dpo.encode_pairs(CharTokenizer(), [])


# Anthropic's HH-RLHF gives two whole dialogues per line, no prompt: they share everything
# up to the last answer.
HH_CHOSEN = "\n\nHuman: Is the sea salty?\n\nAssistant: Yes.\n\nHuman: Why?\n\nAssistant: Rivers carry salt into it."
HH_REJECTED = "\n\nHuman: Is the sea salty?\n\nAssistant: Yes.\n\nHuman: Why?\n\nAssistant: Because of the fish."


@pytest.mark.parametrize("chosen, rejected, expected", [
    # the last "\n\nAssistant:" the two share ends the prompt (the DPO authors' split of HH)
    (HH_CHOSEN, HH_REJECTED, (HH_CHOSEN[:-len(" Rivers carry salt into it.")], " Rivers carry salt into it.",
                              " Because of the fish.")),
    # the answers share their first words: still split at the marker, not after "Rivers"
    (HH_CHOSEN, HH_CHOSEN.replace("into it.", "too."), (HH_CHOSEN[:-len(" Rivers carry salt into it.")],
                                                        " Rivers carry salt into it.", " Rivers carry salt too.")),
    # no marker: the shared text up to its last whitespace, which starts both completions
    ("The cat sat on the mat", "The cat sat on the bed", ("The cat sat on the", " mat", " bed")),
    ("The cat sat on the bat", "The cat sat on the bed", ("The cat sat on the", " bat", " bed")),  # not " b"+"at"
    ("Hi there", "Hi there friend", ("Hi", " there", " there friend")),  # one is a prefix of the other
    ("A\nB yes", "A\nB no", ("A\nB", " yes", " no")),
    ("Q: colour?\nred", "Q: colour?\nblue", ("Q: colour?", "\nred", "\nblue")),  # any whitespace, a newline too
])
def test_split_prompt_cuts_hh_dialogues_at_the_last_shared_assistant_turn_or_whitespace(chosen, rejected, expected):
    """dpo.split_prompt, against prompts and completions written out by hand. The completions
    start with the whitespace before their first word, as GPT-2's tokens do, so that no word
    is cut in two between prompt and completion."""
    prompt, chosen_completion, rejected_completion = dpo.split_prompt(chosen, rejected)
    assert (prompt, chosen_completion, rejected_completion) == expected
    assert prompt + chosen_completion == chosen and prompt + rejected_completion == rejected


@pytest.mark.parametrize("chosen, rejected, message", [
    ("Same text", "Same text", "the same text"),
    ("Apples", "Pears", "share no beginning"),
    ("Sunshine", "Sunset", "share no beginning"),  # shared "Suns", but no whitespace to cut at
    ("\n\nHuman: Hi?\n\nAssistant:", "\n\nHuman: Hi?\n\nAssistant: Hello.", "the chosen dialogue ends where"),
])
def test_split_prompt_refuses_pairs_it_cannot_split(chosen, rejected, message):
    with pytest.raises(ValueError, match=message):
        dpo.split_prompt(chosen, rejected)


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
    """log pi_ref(y|x) does not change, so train_dpo computes it in ceil(N / 8) forwards of up
    to 8 pairs in total, however many steps follow; the policy runs once per step."""
    reference_forwards, policy_forwards = count_forwards(reference), count_forwards(policy)
    history = dpo.train_dpo(policy, reference, encoded_pairs(), torch.optim.SGD(policy.parameters(), lr=0.1),
                            epochs=3, batch_size=2)
    assert [x.size(0) for x in reference_forwards] == [10]  # 5 pairs, 10 rows, in one batch of 8 pairs
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
                            epochs=1, batch_size=2, beta=1.0)
    assert history[0]["loss"] == pytest.approx(LOG2, abs=1e-6)


def test_count_training_steps_is_the_number_of_steps_training_steps_takes():
    """The count the script prints and schedules with, against the steps themselves, for runs
    of pairs below, at and across the 50-batch chunks epoch_batches shuffles within."""
    for n_pairs, batch_size in [(1, 1), (7, 3), (8, 8), (9, 8), (399, 8), (400, 8), (401, 8), (1234, 3), (151, 1)]:
        pairs = [([1] * (1 + i % 13), [2], [3]) for i in range(n_pairs)]
        steps = dpo.training_steps(pairs, batch_size, epochs=2, seed=0)
        assert dpo.count_training_steps(n_pairs, batch_size, epochs=2) == len(steps), (n_pairs, batch_size)


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


def test_train_dpo_shows_the_policy_a_new_order_every_epoch():
    """Through train_dpo itself: with one pair per step, the policy's inputs over each of four
    epochs are the five pairs in four orders that are not all the same (a generator seeded
    again every epoch, or a sort by length, would repeat the first). The five pairs' lengths
    all differ, so that a sort would leave no tie to break at random."""
    policy = tiny_policy()
    reference = dpo.make_reference(policy)  # before the hook: a deep copy would copy it too
    forwards = count_forwards(policy)
    pairs = encoded_pairs(PAIRS[:4] + [{"prompt": "the sun", "chosen": " is", "rejected": " hot"}])
    assert len({dpo.longest_row(pair) for pair in pairs}) == 5
    dpo.train_dpo(policy, reference, pairs, torch.optim.SGD(policy.parameters(), lr=0.0), epochs=4, batch_size=1)
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


def test_train_dpo_stops_at_the_first_step_whose_loss_is_not_finite(policy, reference):
    """A learning rate of 1e30 sends the weights to +-1e30 after one step, and the next loss is
    not finite: training stops there with an error that names the step and what to try."""
    seen = []
    with pytest.raises(FloatingPointError, match=r"diverged at step 2: .* smaller learning rate"):
        dpo.train_dpo(policy, reference, encoded_pairs(), dpo.make_optimizer(policy, lr=1e30), epochs=2,
                      batch_size=2, on_step=lambda numbers, pairs: seen.append(numbers))
    assert [m["step"] for m in seen] == [1]  # the bad step was not passed on as a result

    policy = tiny_policy()  # a finite loss with a gradient that is not: stopped at step 1
    policy.transformer.ln_f.weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(FloatingPointError, match=r"diverged at step 1: loss 0\.69.*, gradient norm (inf|nan)"):
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


def test_train_dpo_averages_the_reference_log_probs_it_computes_when_asked_to_average(policy, reference):
    """train_dpo(average_logps=True) without cached reference log-probs must average the
    reference's too: at step 0, where policy = reference, the loss is then log 2 (Eq. 7 at
    h = 0). Summed reference log-probs against averaged policy ones would give another loss."""
    history = dpo.train_dpo(policy, reference, encoded_pairs(), torch.optim.SGD(policy.parameters(), lr=0.0),
                            epochs=1, batch_size=len(PAIRS), average_logps=True)
    assert history[0]["loss"] == pytest.approx(LOG2, abs=1e-6)


# -----------------------------------------------------------------------------
# Micro-batches, several processes and the learning-rate schedule


def accumulated_gradient(policy, batch_pairs, reference_logps, micro_batches):
    """The gradient dpo_step leaves in the policy for the pairs split into micro_batches (lists
    of indices into batch_pairs), with a learning rate of 0 and no clipping."""
    batches = [dpo.make_batch([batch_pairs[i] for i in part], [x[part] for x in reference_logps], "cpu")
               for part in micro_batches]
    dpo.dpo_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batches, len(batch_pairs), beta=0.5,
                 max_grad_norm=float("inf"))
    return [p.grad.clone() for p in policy.parameters()]


def test_micro_batches_of_different_sizes_give_the_gradient_of_one_pass():
    """Gradient accumulation: micro-batches of 3 and 5 pairs, each adding sum(losses) / 8,
    give the gradient of the mean loss over all 8 pairs in one pass, to float64 rounding.
    The negative control is the common mistake, each micro-batch's mean divided by the number
    of micro-batches (Hugging Face's Trainer until 2024): it weighs the 3 pairs' losses by
    1/6 each and the 5 pairs' by 1/10, and gives another gradient."""
    words = ["a b", "cd e", "f", "gh ij k", "l m", "nop", "q r s t", "uv"]
    pairs = encoded_pairs([{"prompt": w, "chosen": " x" * (1 + i % 3), "rejected": " y" * (1 + i % 4)}
                           for i, w in enumerate(words)])
    policy = tiny_policy(dtype=torch.float64)
    reference = dpo.make_reference(policy)
    perturb(policy)
    reference_logps = dpo.pair_logps(reference, pairs)
    one_pass = accumulated_gradient(policy, pairs, reference_logps, [list(range(8))])
    accumulated = accumulated_gradient(policy, pairs, reference_logps, [[0, 1, 2], [3, 4, 5, 6, 7]])
    for g, expected in zip(accumulated, one_pass):
        assert torch.allclose(g, expected, rtol=0, atol=1e-12 * expected.abs().max().item())

    mean_over_n = [torch.zeros_like(g) for g in one_pass]
    for part in ([0, 1, 2], [3, 4, 5, 6, 7]):
        losses = dpo.dpo_loss(*plain_logps(policy, dpo.collate([pairs[i] for i in part])),
                              *[x[part] for x in reference_logps], beta=0.5)[0]
        for total, g in zip(mean_over_n, torch.autograd.grad(losses.mean() / 2, list(policy.parameters()))):
            total += g
    assert max((g - e).abs().max().item() / e.abs().max().item() for g, e in zip(mean_over_n, one_pass)) > 1e-3


def test_a_step_is_shared_out_among_processes_and_micro_batches_every_pair_once(monkeypatch):
    """my_micro_batches, as process r of `count` sees it (process_rank_and_count replaced
    here): over all processes every pair of the step comes exactly once, with weight 1; a
    process that a short step leaves without pairs gets a pair with weight 0, so that it
    still joins the gradient sync."""
    def shares(indices, count, grad_accum):
        result = []
        for rank in range(count):
            monkeypatch.setattr(dpo, "process_rank_and_count", lambda rank=rank: (rank, count))
            result.append(dpo.my_micro_batches(indices, grad_accum))
        return result

    for n_pairs, count, grad_accum in [(8, 2, 2), (7, 2, 2), (3, 2, 2), (5, 1, 3), (8, 4, 1)]:
        indices = list(range(10, 10 + n_pairs))
        counted = [i for share in shares(indices, count, grad_accum) for part, w in share if w == 1.0 for i in part]
        assert sorted(counted) == indices, (n_pairs, count, grad_accum)
        assert all(1 <= len(share) <= grad_accum for share in shares(indices, count, grad_accum))
    assert shares([10], 2, 1) == [[([10], 0.0)], [([10], 1.0)]]  # one pair, two processes
    assert shares([10, 11, 12], 2, 2) == [[([10], 1.0)], [([11], 1.0), ([12], 1.0)]]


def test_a_micro_batch_of_weight_0_changes_neither_the_gradient_nor_the_numbers():
    """The placeholder a process without pairs runs (weight 0) adds exactly nothing."""
    policy = tiny_policy(dtype=torch.float64)
    reference = dpo.make_reference(policy)
    perturb(policy)
    pairs = encoded_pairs()
    reference_logps = dpo.pair_logps(reference, pairs)
    batch = dpo.make_batch(pairs[:2], [x[:2] for x in reference_logps], "cpu")
    placeholder = dpo.make_batch(pairs[4:], [x[4:] for x in reference_logps], "cpu", weight=0.0)
    results = []
    for micro_batches in ([batch], [batch, placeholder]):
        numbers = dpo.dpo_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), micro_batches, 2, beta=0.5)
        results.append((numbers, [p.grad.clone() for p in policy.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.parametrize("decay", ["none", "linear"])
def test_learning_rate_warms_up_linearly_then_stays_or_decays_linearly(decay):
    """learning_rate(step), steps 1..100, lr 1e-3, 10 warmup steps: lr * step / 10 up to step 10;
    then lr ("none") or lr * (100 - step + 1) / 90 ("linear": lr at step 11, lr / 90 at step 100)."""
    lr, warmup, total = 1e-3, 10, 100
    at = [dpo.learning_rate(step, lr, warmup, decay, total) for step in range(1, total + 1)]
    assert at[0] == pytest.approx(1e-4) and at[4] == pytest.approx(5e-4) and at[9] == pytest.approx(1e-3)
    if decay == "none":
        assert at[10:] == [lr] * 90
    else:
        assert at[10] == pytest.approx(lr) and at[54] == pytest.approx(lr * 46 / 90)
        assert at[99] == pytest.approx(lr / 90) and all(a > b for a, b in zip(at[10:], at[11:]))
    assert [dpo.learning_rate(s, lr) for s in (1, 50)] == [lr, lr]  # no warmup, no decay: constant


def test_train_dpo_sets_each_step_s_learning_rate_and_resumes_where_it_was_told(policy, reference, monkeypatch):
    """lr_at(step) is the learning rate the optimizer holds when that step's update is made
    (read inside dpo_step, before the update); start_step=2 takes exactly the steps that an
    uninterrupted run takes after its second."""
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    real, seen_lr = dpo.dpo_step, []

    def recording(*args, **kwargs):
        seen_lr.append(optimizer.param_groups[0]["lr"])
        return real(*args, **kwargs)

    monkeypatch.setattr(dpo, "dpo_step", recording)
    runs = {}
    for start in (0, 2):
        runs[start] = []
        dpo.train_dpo(policy, reference, encoded_pairs(), optimizer, epochs=2, batch_size=2,
                      lr_at=lambda step: step / 100, start_step=start,
                      on_step=lambda m, pairs, start=start: runs[start].append((m["step"], pairs)))
    assert seen_lr == [s / 100 for s in range(1, 7)] + [s / 100 for s in range(3, 7)]
    assert runs[2] == runs[0][2:] and [step for step, _ in runs[0]] == list(range(1, 7))


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
    m = dpo.evaluate(policy, reference, encoded_pairs(), batch_size=3, beta=0.5, loss_type="ipo")
    assert min(kls) > 0 and abs(np.mean(margins)) > 1e-3  # the policy really moved
    assert m["loss"] == pytest.approx(np.mean(losses), rel=1e-9)
    assert m["margin"] == pytest.approx(np.mean(margins), rel=1e-9)
    assert m["reward_accuracy"] == pytest.approx(np.mean([x > 0 for x in margins]))
    assert min(abs(x) for x in margins) > 0  # no tie here: the tie rule has its own test
    assert m["kl"] == pytest.approx(np.mean(kls), rel=1e-9)


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
# 4. End to end: train_toy.py flips 0/4 to 4/4; --data; --out; stops; resume; torchrun
# =============================================================================


def run_toy(out, *args):
    """train_toy.py's main() in this process (no second torch import), output captured by pytest."""
    gpt2_tokenizer()
    return train_toy.main(["--out", str(out), *args])


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def folder_bytes(folder):
    """{relative path: bytes} of everything under folder, hidden files included: to compare a
    folder before and after, to the byte."""
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


def write_pairs(path, pairs, prefix=b""):
    path.write_bytes(prefix + "".join(json.dumps(p) + "\n" for p in pairs).encode())
    return path


def numbered_pairs(n):
    """n pairs of varied lengths, all different, for --data runs."""
    words = "red green blue cold warm small large quick slow bright".split()
    return [{"prompt": f"Item {i}: " + " ".join(words[: 1 + i % 7]),
             "chosen": " yes" + " indeed" * (i % 5) + ".", "rejected": " no" + " never" * (i % 3) + "."}
            for i in range(n)]


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


def skip_greedy_completions(monkeypatch):
    """Empty completions instead of greedy ones, for runs whose completions no test looks at."""
    monkeypatch.setattr(train_toy, "greedy_completions", lambda model, enc, pairs: [""] * len(pairs))


@pytest.fixture
def quick_sft(monkeypatch):
    """For tests of the plumbing (data, errors, saving), which need a trained model, not a good
    one: 5 steps of the tiny model's SFT warm-up instead of 60, and no greedy completions
    (a quarter of a second a run; the toy runs above show them)."""
    monkeypatch.setattr(train_toy, "SFT_STEPS", 5)
    skip_greedy_completions(monkeypatch)


@pytest.fixture(scope="module")
def tiny_dpo_run(tmp_path_factory, sft_cache):
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
    assert summary["preferred_before"] == 0 and summary["preferred_after"] == 4 == summary["n_pairs"]
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
    assert summary["n_eval_pairs"] == 4 and summary["eval_preferred_before"] == 0
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
    batches, the first loss log 2 (policy = reference, Eq. 7 at h = 0); the summary last, equal
    to what main() returned. train_tokens counts the toy pairs' real tokens, here from the
    tokenizer itself: each epoch sees every pair once, its prompt twice (chosen and rejected rows)."""
    out, summary = tiny_dpo_run
    records = read_metrics(out)
    assert [r["step"] for r in records if r.get("phase") == "sft"] == [1, 20, 40, 60]
    steps = [r for r in records if r.get("phase") == "dpo"]
    assert [(r["step"], r["epoch"]) for r in steps] == [(s, (s + 1) // 2) for s in range(1, 13)]
    assert steps[0]["loss"] == pytest.approx(LOG2, abs=1e-6) and steps[0]["reward_accuracy"] == 0.5
    assert records[-1] == json.loads(json.dumps(summary)) and summary["summary"] is True
    per_epoch = sum(2 * len(p) + len(c) + len(r) for p, c, r in dpo.encode_pairs(gpt2_tokenizer(), train_toy.TOY_PAIRS))
    assert summary["train_tokens"] == 6 * per_epoch < summary["train_positions"]  # the pairs differ: some padding
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "model.safetensors"]


def test_training_seconds_leave_out_the_evaluations(tmp_path, monkeypatch, quick_sft):
    """train_s is the time of the training steps alone: every held-out evaluation (at step 0,
    every --eval-every steps, at the end) is made to take 0.2 s longer here, and train_s stays
    below the wall time of dpo.train_dpo minus the two evaluations inside it."""
    import time
    real_evaluate, real_train = train_toy.dpo.evaluate, train_toy.dpo.train_dpo
    walls = []

    def slow_evaluate(*args, **kwargs):
        time.sleep(0.2)
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
    """train_toy.py asks PyTorch for deterministic CUDA kernels: two runs, the same weights."""
    for name in ("a", "b"):
        run_toy(tmp_path / name, "--model", "tiny", "--epochs", "2", "--device", "cuda", "--dtype", "float32")
    assert_same_checkpoint(tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors")


# -----------------------------------------------------------------------------
# Your own pairs: --data, held-out evaluation, long pairs, HH-RLHF's format


def test_eval_fraction_holds_out_a_seeded_disjoint_part_of_the_data():
    """split_off_eval: round(fraction * N) pairs held out, the rest trained on, no pair in both,
    none lost, each part in the file's order, texts and tokens together; the same seed gives
    the same split."""
    texts = numbered_pairs(50)
    pairs = train_toy.Pairs(texts, [(i,) for i in range(50)], "pairs.jsonl")
    train, held_out = train_toy.split_off_eval(pairs, 0.2, seed=0)
    assert len(held_out.texts) == 10 and len(train.texts) == 40
    for part in (train, held_out):
        assert [texts.index(t) for t in part.texts] == [i for (i,) in part.tokens]  # in order, together
    assert sorted(train.tokens + held_out.tokens) == pairs.tokens
    assert train_toy.split_off_eval(pairs, 0.2, seed=0) == (train, held_out)
    assert train_toy.split_off_eval(pairs, 0.2, seed=1)[1] != held_out
    with pytest.raises(ValueError, match="at least one pair for training and one for evaluation"):
        train_toy.split_off_eval(train_toy.Pairs(texts[:3], [0, 1, 2], "x"), 0.1, seed=0)


def test_data_run_trains_on_the_training_part_only_and_pads_little(tmp_path, quick_sft):
    """--data with --eval-fraction: the held-out pairs are evaluated, never trained on (the
    steps' real tokens add up to the training pairs alone), and batches of similar lengths
    keep padding well under a third of the positions the policy processes. A file saved with
    a UTF-8 byte-order mark, as Windows editors write them, reads like any other."""
    pairs = numbered_pairs(40)
    data = write_pairs(tmp_path / "pairs.jsonl", pairs, prefix=b"\xef\xbb\xbf")
    summary = run_toy(tmp_path / "out", "--model", "tiny", "--data", str(data), "--eval-fraction", "0.25",
                      "--epochs", "1", "--batch-size", "4")
    assert summary["n_pairs"] == 30 and summary["n_eval_pairs"] == 10
    enc = gpt2_tokenizer()  # the split itself is test_eval_fraction_holds_out_a_seeded_disjoint_part_of_the_data's
    train, _ = train_toy.split_off_eval(train_toy.Pairs(pairs, dpo.encode_pairs(enc, pairs), "x"), 0.25, seed=0)
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in train.tokens)
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


def test_hh_rlhf_dialogues_without_a_prompt_are_split_and_trained_on(tmp_path, quick_sft):
    """A --data line of HH-RLHF's form, {"chosen", "rejected"} as two whole dialogues, trains
    like the prompt form: the prompt is their shared beginning up to the last assistant turn
    (dpo.split_prompt), as the printed table and the summary's counts show."""
    lines = [{"chosen": f"\n\nHuman: Question {i}?\n\nAssistant: A kind answer {i}.",
              "rejected": f"\n\nHuman: Question {i}?\n\nAssistant: Go away."} for i in range(3)]
    data = write_pairs(tmp_path / "hh.jsonl", lines + numbered_pairs(1))  # both forms in one file
    enc = gpt2_tokenizer()
    assert train_toy.read_pairs(data, enc).texts[1:3] == [
        {"prompt": f"\n\nHuman: Question {i}?\n\nAssistant:", "chosen": f" A kind answer {i}.",
         "rejected": " Go away.", "line": i + 1} for i in (1, 2)]
    summary = run_toy(tmp_path / "out", "--model", "tiny", "--data", str(data), "--epochs", "1")
    assert summary["n_pairs"] == 4 and summary["n_eval_pairs"] == 0
    expected = dpo.encode_pairs(enc, [{"prompt": f"\n\nHuman: Question {i}?\n\nAssistant:",
                                       "chosen": f" A kind answer {i}.", "rejected": " Go away."} for i in range(3)])
    assert summary["train_tokens"] == sum(2 * len(p) + len(c) + len(r) for p, c, r in
                                          expected + dpo.encode_pairs(enc, numbered_pairs(1)))


@pytest.mark.parametrize("content, message", [
    (b"", "no preference pairs"),
    (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n', "line 2: field 'rejected'"),
    (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\nnot json\n', "line 2: not valid JSON"),
    (b'["a", "b", "c"]\n', "line 1: expected a JSON object"),
    (b'{"prompt": "", "chosen": "b", "rejected": "c"}\n', "line 1: field 'prompt' must be a non-empty string"),
    (b'\n{"prompt": "x <|endoftext|>", "chosen": " b", "rejected": " c"}\n', "line 2: the text holds a special token"),
    (b'{"prompt": "a", "chosen": "b", "rejected": "\xff"}\n', "line 1: not UTF-8 text"),
    (b'{"chosen": "Same", "rejected": "Same"}\n', "line 1: chosen and rejected are the same text"),
    (b'{"prompt": "a", "chosen": " b", "rejected": "c"}\n{"prompt": "a", "chosen": " b", "rejected": " b"}\n',
     "line 2: chosen and rejected are the same text"),
    (b'{"chosen": "Apples", "rejected": "Pears"}\n', "line 1: chosen and rejected share no beginning"),
    (None, "no such file"),
    ("folder", "not a file"),
])
def test_bad_data_file_is_refused_before_any_model_is_built(content, message, tmp_path, monkeypatch):
    """A --data file that is missing or holds a bad line stops the run with the file, the line
    number and the problem, before any model is built (building one fails here), and nothing
    is written."""
    data = tmp_path / "pairs.jsonl"
    if content == "folder":
        data.mkdir()
    elif content is not None:
        data.write_bytes(content)
    monkeypatch.setattr(train_toy, "GPT", None)  # building a model now would be a TypeError, not this message
    with pytest.raises(SystemExit) as stop:
        run_toy(tmp_path / "out", "--model", "tiny", "--data", str(data))
    assert message in str(stop.value) and str(data) in str(stop.value)
    assert str(stop.value).startswith("error: ") and "\n" not in str(stop.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["pairs.jsonl"] if content is not None else [])


def test_pairs_of_exactly_the_context_or_max_length_are_kept_and_one_token_more_is_not():
    """A pair's longer row, prompt + completion + <|endoftext|>, must fit the context (here
    1024): a pair of exactly 1024 tokens is kept, one of 1025 is an error naming its line and
    the way through; --max-length N keeps rows of exactly N tokens and leaves out N + 1."""
    enc = gpt2_tokenizer()

    def pairs_of(*n_tokens):  # " a" is one token: prompt "x" (1) + n - 2 times " a" + eot
        texts = [{"prompt": "x", "chosen": " a" * (n - 2), "rejected": " b", "line": i + 1}
                 for i, n in enumerate(n_tokens)]
        return train_toy.Pairs(texts, dpo.encode_pairs(enc, texts), "long.jsonl")

    fit = lambda pairs, max_length=None: train_toy.pairs_that_fit(
        pairs, argparse.Namespace(max_length=max_length), context=1024)
    assert [dpo.longest_row(t) for t in pairs_of(1024, 12).tokens] == [1024, 12]
    assert fit(pairs_of(1024, 12)) == pairs_of(1024, 12) == fit(pairs_of(1024, 12), max_length=1024)
    with pytest.raises(ValueError, match="long.jsonl line 2: .* 1025 tokens, longer than the model.s context of 1024 "
                                         r"\(2 of 4 pairs are\); .* --max-length 1024"):
        fit(pairs_of(12, 1025, 30, 1030))  # the first of the two is named
    assert [p["line"] for p in fit(pairs_of(12, 1025, 30, 31), max_length=30).texts] == [1, 3]
    with pytest.raises(ValueError, match="all 2 pairs are longer than --max-length 11"):
        fit(pairs_of(12, 30), max_length=11)
    with pytest.raises(ValueError, match="--max-length 2000 is longer than the model's context of 1024"):
        fit(pairs_of(12), max_length=2000)


def test_held_out_pairs_longer_than_the_context_are_an_error_naming_their_file(tmp_path, quick_sft):
    """The held-out pairs must fit the context as the training pairs must."""
    data = write_pairs(tmp_path / "train.jsonl", numbered_pairs(3))
    held_out = write_pairs(tmp_path / "eval.jsonl", [{"prompt": "x", "chosen": " a" * 1100, "rejected": " b"}])
    with pytest.raises(SystemExit, match=f"{re.escape(str(held_out))} line 1: prompt \\+ completion is 1102 tokens"):
        run_toy(tmp_path / "out", "--model", "tiny", "--data", str(data), "--eval-data", str(held_out))


def test_max_length_leaves_pairs_out_and_says_how_many(tmp_path, quick_sft, capsys):
    """Through the script: --max-length 20 leaves out the pairs with a longer row, and says so."""
    data = write_pairs(tmp_path / "pairs.jsonl", numbered_pairs(6) + [{"prompt": "x", "chosen": " a" * 40,
                                                                      "rejected": " b"}])
    summary = run_toy(tmp_path / "out", "--model", "tiny", "--data", str(data), "--max-length", "20", "--epochs", "1")
    assert summary["n_pairs"] == 6 and "left out 1 of 7 pairs longer than --max-length 20" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# --out: what it holds, what it refuses, and what survives a failure at any moment


@pytest.fixture
def earlier_out(tiny_dpo_run, tmp_path):
    """An --out that an earlier run filled, in a folder of its own: (path, its bytes)."""
    out = tmp_path / "runs" / "toy-dpo"
    shutil.copytree(tiny_dpo_run[0], out)
    return out, folder_bytes(out)


def assert_left_as_it_was(earlier_out):
    """The earlier --out byte for byte, and nothing beside it: no temporary or old folder."""
    out, before = earlier_out
    assert folder_bytes(out) == before
    assert [p.name for p in out.parent.iterdir()] == [out.name]


@pytest.mark.parametrize("content", [
    {"thesis.txt": b"two years of work"},
    {"config.json": b"{}", "model.safetensors": b"a model of someone else's"},  # ours by name, not by origin
    {"metrics.jsonl": b"{}\n", "notes": b"mine"},
])
def test_out_holding_files_this_script_did_not_write_is_refused_and_left_alone(content, tmp_path, monkeypatch):
    """--out pointed at a folder of the user's: refused before anything loads (building a model
    would fail here), naming what is there; every file is still there, byte for byte."""
    out = tmp_path / "mydocs"
    out.mkdir()
    for name, data in content.items():
        (out / name).write_bytes(data)
    monkeypatch.setattr(train_toy, "load_tokenizer", None)  # loading anything would be a TypeError instead
    with pytest.raises(SystemExit) as stop:
        run_toy(out, "--model", "tiny")
    assert f"--out {out} holds " in str(stop.value) and "give a new or empty folder" in str(stop.value)
    assert folder_bytes(out) == content and sorted(p.name for p in tmp_path.iterdir()) == ["mydocs"]


def test_out_that_is_the_current_folder_or_holds_it_is_refused(tmp_path, monkeypatch, capsys):
    """`--out .` (or a folder above this one) would be replaced as a whole: refused at once."""
    (tmp_path / "mine.txt").write_text("keep me")
    (tmp_path / "sub").mkdir()
    for cwd, out in ((tmp_path, "."), (tmp_path / "sub", ".."), (tmp_path / "sub", str(tmp_path))):
        monkeypatch.chdir(cwd)
        with pytest.raises(SystemExit) as stop:
            train_toy.main(["--model", "tiny", "--out", out])
        assert stop.value.code == 2 and "is the folder you are in, or holds it" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == [
        "mine.txt", "sub"]


def test_an_earlier_runs_out_is_replaced_by_the_new_run(earlier_out, quick_sft):
    """A previous run's --out (only files this script writes) is replaced, as one unit, by the
    new run's files; nothing is left beside it."""
    out, before = earlier_out
    summary = run_toy(out, "--model", "tiny", "--epochs", "1")
    assert folder_bytes(out) != before and read_metrics(out)[-1] == json.loads(json.dumps(summary))
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_a_diverging_run_stops_names_the_step_and_keeps_the_earlier_out(earlier_out, quick_sft):
    """--lr 1e30: the loss stops being finite at step 2; the run exits with a one-line error
    naming the step and a smaller learning rate, and the earlier --out is left as it was."""
    with pytest.raises(SystemExit) as stop:
        run_toy(earlier_out[0], "--model", "tiny", "--lr", "1e30")
    assert "diverged at step 2" in str(stop.value) and "learning rate" in str(stop.value)
    assert_left_as_it_was(earlier_out)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("a bug")])
def test_a_failure_while_saving_leaves_the_earlier_out_and_nothing_beside_it(failure, earlier_out, quick_sft,
                                                                             monkeypatch):
    """A save that fails half-way (here once the weights are written, before the rest): the
    earlier --out is byte-identical and no temporary folder is left. A full disk is an
    expected failure, one line saying where and that the earlier results are untouched; a bug
    in the code keeps its traceback."""
    real = checkpoint.save_safetensors

    def save_then_fail(tensors, path, metadata=None):
        real(tensors, path, metadata)
        assert Path(path).is_file()  # half of the folder is written
        raise failure

    monkeypatch.setattr(checkpoint, "save_safetensors", save_then_fail)
    with pytest.raises(SystemExit if isinstance(failure, OSError) else RuntimeError) as stop:
        run_toy(earlier_out[0], "--model", "tiny", "--epochs", "1")
    if isinstance(failure, OSError):
        assert str(stop.value) == (f"error: could not save to {earlier_out[0]} (No space left on device); it is as "
                                   "it was before this save")
    assert_left_as_it_was(earlier_out)


def test_an_out_that_cannot_be_written_is_refused_before_anything_loads(tmp_path, monkeypatch):
    """A save renames a new folder into place beside --out: if that cannot be done there (a
    read-only disk; here mkdir fails as it would), the run stops at once, not after training."""
    real = Path.mkdir

    def read_only(path, *args, **kwargs):
        if path.parent == tmp_path / "runs":
            raise OSError(errno.EROFS, "Read-only file system")
        return real(path, *args, **kwargs)

    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(Path, "mkdir", read_only)
    monkeypatch.setattr(train_toy, "load_tokenizer", None)  # loading anything would be a TypeError instead
    with pytest.raises(SystemExit) as stop:
        run_toy(tmp_path / "runs" / "out", "--model", "tiny")
    assert str(stop.value) == f"error: --out {tmp_path / 'runs' / 'out'}: cannot write in {tmp_path / 'runs'} " \
                              "(Read-only file system)"


def interrupt_while_emptying_the_old_folder(monkeypatch):
    """Ctrl-C once a save's new folder is in place, while the old one is being emptied;
    returns the real checkpoint.remove_ours, to put back."""
    real = checkpoint.remove_ours

    def interrupted(folder, names):
        if folder.name.endswith(".old"):
            raise KeyboardInterrupt
        return real(folder, names)

    monkeypatch.setattr(checkpoint, "remove_ours", interrupted)
    return real


def test_ctrl_c_once_the_new_files_are_in_place_says_they_are(tmp_path, quick_sft, monkeypatch):
    """A stop while the old folder is being emptied, after the new files took its place: the
    message names the new save (which --out does hold), and the next run removes the old
    folder left beside it."""
    out = tmp_path / "out"
    run_toy(out, "--model", "tiny", "--epochs", "1")
    real = interrupt_while_emptying_the_old_folder(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        run_toy(out, "--model", "tiny", "--epochs", "2", "--save-every", "1")
    assert str(stop.value).startswith(f"stopped after step 1 (Ctrl-C or SIGTERM); {out} holds the save of step 1")
    assert torch.load(out / "resume.pt", weights_only=True)["step"] == 1
    assert len(list(tmp_path.glob(".out.*.old"))) == 1
    monkeypatch.setattr(checkpoint, "remove_ours", real)
    with pytest.raises(SystemExit, match="options differ"):  # the next run: cleans up, then refuses --epochs 3
        run_toy(out, "--model", "tiny", "--epochs", "3", "--save-every", "1", "--resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_ctrl_c_after_the_last_save_says_the_run_finished_not_to_resume(tmp_path, quick_sft, monkeypatch):
    """A stop after the final save is in place (here while the old folder is emptied): --out
    holds the finished run, which --resume would refuse, so the message must not offer it."""
    out = tmp_path / "out"
    run_toy(out, "--model", "tiny", "--epochs", "1")
    interrupt_while_emptying_the_old_folder(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        run_toy(out, "--model", "tiny", "--epochs", "1", "--save-every", "100")
    assert str(stop.value) == f"stopped after step 2 (Ctrl-C or SIGTERM); {out} holds the finished run"
    assert read_metrics(out)[-1]["summary"] is True


def test_leftovers_of_a_save_killed_half_way_are_cleaned_up_by_the_next_run(earlier_out, quick_sft):
    """A SIGKILL or a power cut during a save leaves a hidden .NAME.XXXXXXXX.tmp folder beside
    --out, and, between its two renames, --out missing with the earlier files in a .old
    folder. The next run, before anything else, puts the earlier files back and removes the
    rest; here it then fails on a bad option of its own (--resume without a checkpoint), so
    that what it restored can be checked byte for byte."""
    out, before = earlier_out
    old, tmp = out.with_name(f".{out.name}.0123abcd.old"), out.with_name(f".{out.name}.89abcdef.tmp")
    out.rename(old)
    tmp.mkdir()
    (tmp / "config.json").write_text("{}")
    (tmp / ".model.safetensors.00ff00ff.tmp").write_bytes(b"half a file")
    with pytest.raises(SystemExit, match="holds no resume.pt"):
        run_toy(out, "--model", "tiny", "--resume")
    assert_left_as_it_was((out, before))


def ctrl_c():
    raise KeyboardInterrupt


def interrupt_at_step(monkeypatch, n, interrupt=ctrl_c):
    """The n-th call of dpo.dpo_step calls interrupt() first: a Ctrl-C, or a kill."""
    real, calls = dpo.dpo_step, []

    def counting(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            interrupt()
        return real(*args, **kwargs)

    monkeypatch.setattr(dpo, "dpo_step", counting)


def signal_run(out, *options):
    """train_toy.py in a new process that prints "saving" once the first file of its save is
    written, and then waits for the test's signal."""
    script = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
import checkpoint, train_toy
train_toy.SFT_STEPS = 1
real = checkpoint.save_safetensors

def paused(*args, **kwargs):
    real(*args, **kwargs)
    print("saving", flush=True)
    time.sleep(120)

checkpoint.save_safetensors = paused
train_toy.main(["--model", "tiny", "--out", {str(out)!r}, *{list(options)!r}])
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}  # beside this process on two cores
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env)


def test_ctrl_c_and_kill_during_training_and_saving_leave_the_earlier_out(tiny_dpo_run, tmp_path, monkeypatch):
    """Real signals: SIGTERM (kill, a cluster scheduler's stop) sent from outside to a process
    while it saves, and Ctrl-C (SIGINT) during training, which this process sends to itself
    meanwhile. Each ends with exit code 1 and one line on stderr that says where the run
    stopped and that nothing was saved, no traceback, and the earlier --out byte for byte with
    nothing beside it. (What SIGKILL or a power cut leaves is tested above, as the files it leaves.)"""
    killed = tmp_path / "killed" / "toy-dpo"
    shutil.copytree(tiny_dpo_run[0], killed)
    process = signal_run(killed, "--epochs", "1")
    before = folder_bytes(tiny_dpo_run[0])

    out = tmp_path / "in-process" / "toy-dpo"  # meanwhile, in this process
    shutil.copytree(tiny_dpo_run[0], out)
    monkeypatch.setattr(train_toy, "SFT_STEPS", 1)
    skip_greedy_completions(monkeypatch)
    interrupt_at_step(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(SystemExit) as stop:
        run_toy(out, "--model", "tiny", "--epochs", "1")
    assert stop.value.code == f"stopped after step 1 (Ctrl-C or SIGTERM); nothing was saved and {out} is as it was"
    assert folder_bytes(out) == before and [p.name for p in out.parent.iterdir()] == ["toy-dpo"]
    assert signal.getsignal(signal.SIGTERM) is not signal.default_int_handler  # main put the old handler back

    try:
        for line in process.stdout:  # the run's own lines, then the marker
            if line.strip() == "saving":
                break
        else:
            pytest.fail(f"the run ended before it saved: {process.stderr.read()}")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 1 and stderr == (f"stopped after step 2 (Ctrl-C or SIGTERM); nothing was saved and "
                                                  f"{killed} is as it was\n"), stderr
    assert folder_bytes(killed) == before and [p.name for p in killed.parent.iterdir()] == ["toy-dpo"]


def test_ctrl_c_after_a_checkpoint_says_which_step_was_kept(tmp_path, quick_sft, monkeypatch):
    """Stopped at step 5 with --save-every 2: the message names the checkpoint of step 4 that
    --out holds and --resume continues from, and that is what --out holds."""
    interrupt_at_step(monkeypatch, 5)
    with pytest.raises(SystemExit) as stop:
        run_toy(tmp_path / "out", "--model", "tiny", "--save-every", "2")
    assert str(stop.value) == (f"stopped after step 4 (Ctrl-C or SIGTERM); {tmp_path / 'out'} holds the save of step "
                               "4; --resume continues from it")
    assert torch.load(tmp_path / "out" / "resume.pt", weights_only=True)["step"] == 4
    assert [r["step"] for r in read_metrics(tmp_path / "out") if r.get("phase") == "dpo"] == [1, 2, 3, 4]


# -----------------------------------------------------------------------------
# Resume, torchrun, and the options


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, quick_sft, monkeypatch):
    """--save-every 1, stopped by Ctrl-C during step 3, then --resume: the same policy, optimizer
    state, gradient scaler, reference log-probs and metrics (but the timings) as a run never
    stopped, compared with torch.equal. In float16, so that the scaler must be saved and
    restored (its growth tracker counts the steps), with a warmup of 2 steps and a linear
    decay, so that the schedule must resume too (from its start, step 3 would be warmup's
    lr / 2, not lr), and held-out evaluations before and after the cut."""
    options = ["--model", "tiny", "--epochs", "2", "--save-every", "1", "--eval-every", "2", "--warmup-steps", "2",
               "--lr-decay", "linear", "--dtype", "float16"]
    run_toy(tmp_path / "whole", *options)
    real = dpo.dpo_step
    interrupt_at_step(monkeypatch, 3)
    with pytest.raises(SystemExit, match="holds the save of step 2"):
        run_toy(tmp_path / "cut", *options)
    monkeypatch.setattr(dpo, "dpo_step", real)
    run_toy(tmp_path / "cut", *options, "--resume")
    whole, cut = (torch.load(tmp_path / name / "resume.pt", weights_only=True) for name in ("whole", "cut"))
    assert whole["step"] == cut["step"] == 4 and whole["scaler"] == cut["scaler"]
    assert whole["scaler"]["_growth_tracker"] == 4  # a fresh scaler after resuming would count 2
    whole_weights, cut_weights = (load_safetensors(tmp_path / name / "model.safetensors") for name in ("whole", "cut"))
    assert whole_weights.keys() == cut_weights.keys()
    assert all(torch.equal(whole_weights[k], cut_weights[k]) for k in whole_weights)
    state_a, state_b = whole["optimizer"]["state"], cut["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and all(
        torch.equal(state_a[i][k], state_b[i][k]) for i in state_a for k in state_a[i])
    assert all(torch.equal(a, b) for a, b in zip(whole["reference_logps"], cut["reference_logps"]))
    steps = [r for r in read_metrics(tmp_path / "whole") if r.get("phase") == "dpo"]
    assert max(r["grad_norm"] for r in steps) < 100  # unscaled before clipping (scaled, they would be ~65536x)
    # the summary's token counts are of the steps each process took: 4, and 2 after resuming
    tokens = ("train_tokens", "train_positions")
    assert without_times(read_metrics(tmp_path / "cut"), tokens) == without_times(read_metrics(tmp_path / "whole"), tokens)
    per_epoch = read_metrics(tmp_path / "whole")[-1]["train_tokens"] / 2  # the 2 steps of an epoch: all 4 pairs
    assert read_metrics(tmp_path / "cut")[-1]["train_tokens"] == per_epoch
    start = load_safetensors(tmp_path / "whole" / "reference.safetensors")
    assert not all(torch.equal(start[k], whole_weights[k]) for k in start)  # it did train


def test_resume_refuses_options_or_pairs_that_would_change_the_numbers(tmp_path, quick_sft):
    """--resume with any of the options that change the numbers (each one of
    RESUME_MUST_MATCH), or other training or held-out pairs, is refused, naming what changed,
    and so are resuming a finished run and a resume.pt that cannot be read or is not ours; the checkpoint in
    --out is left as it was."""
    out = tmp_path / "out"
    base = ["--model", "tiny", "--epochs", "1", "--save-every", "1"]
    run_toy(out, *base)
    before = folder_bytes(out)
    other_pairs = write_pairs(tmp_path / "pairs.jsonl", train_toy.TOY_PAIRS[:3])
    other_eval = write_pairs(tmp_path / "eval.jsonl", train_toy.TOY_EVAL_PAIRS[:3])
    changes = {"model": (["--model", "gpt2", "--weights", str(out)], "--model tiny -> gpt2"),
               "loss": (["--loss", "ipo"], "--loss dpo -> ipo"), "beta": (["--beta", "0.2"], "--beta 0.1 -> 0.2"),
               "label_smoothing": (["--label-smoothing", "0.1"], "--label-smoothing 0.0 -> 0.1"),
               "average_logps": (["--average-logps"], "--average-logps False -> True"),
               "lr": (["--lr", "0.002"], "--lr 0.001 -> 0.002"), "epochs": (["--epochs", "2"], "--epochs 1 -> 2"),
               "batch_size": (["--batch-size", "4"], "--batch-size 2 -> 4"), "seed": (["--seed", "1"], "--seed 0 -> 1"),
               "dtype": (["--dtype", "bfloat16"], "--dtype float32 -> bfloat16"),
               "warmup_steps": (["--warmup-steps", "1"], "--warmup-steps 0 -> 1"),
               "lr_decay": (["--lr-decay", "linear"], "--lr-decay none -> linear")}
    assert set(changes) == set(train_toy.RESUME_MUST_MATCH)
    cases = [*changes.values(), (["--data", str(other_pairs)], "these are not the pairs of the run"),
             (["--eval-data", str(other_eval)], "these are not the pairs of the run"),
             ([], f"the run in {out} has finished (step 2)")]
    for change, message in cases:
        with pytest.raises(SystemExit) as stop:
            run_toy(out, *base, "--resume", *change)
        assert message in str(stop.value) and "\n" not in str(stop.value), change
    assert folder_bytes(out) == before
    (out / "resume.pt").write_bytes(before["resume.pt"][:1000])  # cut short, as a disk can leave a copy
    with pytest.raises(SystemExit, match="resume.pt cannot be read"):
        run_toy(out, *base, "--resume")
    torch.save({"step": 1}, out / "resume.pt")  # tensors and plain values, but not this script's
    with pytest.raises(SystemExit, match="resume.pt is not a checkpoint that this script saved$"):
        run_toy(out, *base, "--resume")


TORCHRUN_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
import dpo, train_toy
train_toy.SFT_STEPS = 1
train_toy.greedy_completions = lambda model, enc, pairs: [""] * len(pairs)  # not what is compared here
real = dpo.train_dpo
def train_and_keep(model, *args, **kwargs):
    history = real(model, *args, **kwargs)
    torch.save(model.module.state_dict(), {out!r} + f"/rank{{torch.distributed.get_rank()}}.pt")
    return history
dpo.train_dpo = train_and_keep
train_toy.main(sys.argv[1:])
"""


def test_torchrun_with_two_processes_trains_what_one_process_trains(tmp_path, monkeypatch, command_line_run):
    """`torchrun --standalone --nproc_per_node=2` on the CPU (gloo), batches of 3 pairs in 2
    micro-batches per process, against one process (this one) with the same 4 micro-batches
    per step: both processes end with identical parameters, equal to the one process's to
    float rounding (far below how far training moved them), with the same step numbers and
    held-out evaluations. The last step of each epoch holds a single pair, so one process has
    none of it and must still join the gradient sync."""
    script = tmp_path / "keep_weights.py"
    script.write_text(TORCHRUN_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    common = ["--model", "tiny", "--epochs", "2", "--batch-size", "3", "--eval-every", "2", "--save-every", "100"]
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(script), *common, "--grad-accum", "2", "--out", str(tmp_path / "two")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
                           start_new_session=True)  # a group of its own: a hang is killed, workers included
    try:
        _, stderr = two.communicate(timeout=300)
    finally:
        os.killpg(two.pid, signal.SIGKILL) if two.poll() is None else None
    assert two.returncode == 0, stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    kept = {}
    real = dpo.train_dpo

    def train_and_keep(model, *args, **kwargs):
        history = real(model, *args, **kwargs)
        kept.update({k: v.clone() for k, v in model.state_dict().items()})
        return history

    monkeypatch.setattr(dpo, "train_dpo", train_and_keep)
    monkeypatch.setattr(train_toy, "SFT_STEPS", 1)
    skip_greedy_completions(monkeypatch)
    run_toy(tmp_path / "one", *common, "--grad-accum", "4")
    start = GPT.from_pretrained(tmp_path / "one" / "reference.safetensors").state_dict()  # where DPO began
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    difference = max((ranks[0][k] - kept[k]).abs().max().item() for k in kept)
    moved = max((kept[k] - start[k]).abs().max().item() for k in kept)
    assert difference < 1e-4 and moved > 100 * difference, (difference, moved)
    records = {name: read_metrics(tmp_path / name) for name in ("one", "two")}
    assert [r["processes"] for r in (records["one"][-1], records["two"][-1])] == [1, 2]
    steps, evals = ([[r for r in rs if r.get("phase") == phase] for rs in records.values()] for phase in ("dpo", "eval"))
    assert [r["step"] for r in steps[0]] == [r["step"] for r in steps[1]] == [1, 2, 3, 4]
    assert [r["step"] for r in evals[0]] == [r["step"] for r in evals[1]] == [0, 2, 4]
    for a, b in [*zip(*steps), *zip(*evals)]:
        assert a.keys() == b.keys() and all(a[k] == (b[k] if isinstance(b[k], str) else
                                                     pytest.approx(b[k], rel=1e-4, abs=1e-6)) for k in a)


@pytest.fixture(scope="module")
def command_line_run(tiny_dpo_run, tmp_path_factory):
    """`python train_toy.py --model tiny` in a new process, as a user types it, started at once
    and collected by the test that needs it: the torchrun test asks for it first, so that the
    two run side by side. OMP_WAIT_POLICY=PASSIVE keeps their idle threads from spinning; it
    changes no number."""
    out = tmp_path_factory.mktemp("cli") / "toy-dpo"
    args = ["--model", "tiny", "--loss", "dpo", "--device", tiny_dpo_run[1]["device"], "--out", str(out)]
    process = subprocess.Popen([sys.executable, str(ROOT / "train_toy.py"), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    yield out, process
    process.kill()


def test_toy_script_runs_from_the_command_line_with_the_numbers_of_this_process(tiny_dpo_run, command_line_run):
    """`python train_toy.py --model tiny` in a new process that does its own SFT: exit 0, the
    headline and the last line printed, and the same numbers as the same run inside this test
    process: every metrics.jsonl line but the timings, and the trained weights to the byte.
    (Same seed, same device, same numbers: see train_toy.py on MKL_CBWR.)"""
    out, _ = tiny_dpo_run
    cli, process = command_line_run
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "chosen preferred: training pairs 0/4 -> 4/4, held-out pairs 0/4 -> " in stdout
    assert re.search(r"\ntraining: [\d.]+ s, [\d,]+ tokens/s, \d+% padding; peak memory [\d,]+ MiB", stdout)
    assert without_times(read_metrics(cli)) == without_times(read_metrics(out))
    assert_same_checkpoint(cli / "model.safetensors", out / "model.safetensors")


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


def test_a_tokenizer_that_cannot_load_says_what_is_missing_and_how_to_provide_it(tmp_path, monkeypatch):
    """Offline without tiktoken's cached files: two short lines, what is missing and
    TIKTOKEN_CACHE_DIR, instead of the HTTP library's message."""
    import tiktoken

    def offline(name):
        raise ConnectionError("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net', port=443): ...")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(SystemExit) as stop:
        train_toy.main(["--model", "tiny", "--out", str(tmp_path / "out")])
    lines = str(stop.value).splitlines()
    assert len(lines) == 2 and "vocab.bpe and encoder.json, about 1.5 MB" in lines[0]
    assert "TIKTOKEN_CACHE_DIR" in lines[1] and "openaipublic" not in str(stop.value)


def test_weights_option_trains_a_local_checkpoint(tiny_dpo_run, tmp_path, capsys):
    """--weights loads a local checkpoint (here the tiny run's output, config.json beside it) and
    trains it; the run names the file, not --model, whose sizes it does not have."""
    out, _ = tiny_dpo_run
    summary = run_toy(tmp_path / "again", "--model", "gpt2", "--weights", str(out), "--epochs", "1")
    assert summary["preferred_before"] == 4  # it was trained to prefer the chosen completions already
    assert summary["weights"] == str(out) and capsys.readouterr().out.startswith(f"model {out}: 2 layers, 64 wide, ")
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
    (["--label-smoothing", "0.7"], "--label-smoothing must be in [0, 0.5), got 0.7"),
    (["--loss", "ipo", "--label-smoothing", "0.1"], "--label-smoothing is for --loss dpo"),
    (["--init", "random"], "--model tiny is always built here"),
    (["--warmup-steps", "-1"], "--warmup-steps must be 0 or more"),
    (["--out", __file__], "is a file; --out must be a folder"),
    (["--out", __file__ + "/sub"], "is a file; --out must be a folder"),
    (["--plot", "OUT/curves.png"], "--plot must be outside --out"),
    pytest.param(["--device", "cuda"], "this torch sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_options_are_refused_with_a_message(options, message, tmp_path, capsys):
    """Nonsensical options stop the script at once (argparse's exit code 2) with what was wrong."""
    options = [str(tmp_path / "out" / "curves.png") if x == "OUT/curves.png" else x for x in options]
    with pytest.raises(SystemExit) as stop:
        train_toy.main(["--model", "tiny", "--out", str(tmp_path / "out"), *options])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
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
# 6. bench.py: the three steps it times compute what they say (no timing is asserted),
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
    """bench.py --write-pairs makes a --data file: train_toy.read_pairs reads every pair; with
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
    encoded = train_toy.read_pairs(tmp_path / "pairs.jsonl", enc).tokens
    assert len(encoded) == 300
    prompts = [len(p) for p, _, _ in encoded]
    completions = [len(c) for _, c, _ in encoded] + [len(r) for _, _, r in encoded]
    assert 14 <= min(prompts) < 30 and 130 < max(prompts) <= 146
    assert 5 <= min(completions) < 20 and 135 < max(completions) <= 151
    bench.main(["--write-pairs", "20", str(tmp_path / "same.jsonl"), "--same-length"])
    same = train_toy.read_pairs(tmp_path / "same.jsonl", enc).tokens
    assert {(len(p), len(c), len(r)) for p, c, r in same} == {(80, 78, 78)}
    assert len({tuple(c) for _, c, _ in same}) == 20  # one length, not one text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.jsonl", "other.jsonl", "pairs.jsonl", "same.jsonl"]
# =============================================================================
# 7. Checkpoints, safetensors and the hub: both real layouts, files written by hand here,
#    folders compared to the byte, a fake hub on 127.0.0.1
# =============================================================================
# Tests for checkpoint.py and for model.py's loading and saving. Besides section 3's numpy
# GPT-2, what they are checked against is written here:
# - `write_safetensors` / `read_safetensors`, a tiny safetensors writer and reader
#   (format: 8-byte little-endian header length N, N bytes of JSON, then raw data);
# - `write_checkpoint`, GPT-2 checkpoints in the hub's layout and in transformers' (model.py
#   states both);
# - `tree`, a whole folder read back from the disk, to compare before and after to the byte;
# - `FakeHub`, an HTTP server that answers like huggingface.co (a 302 to a CDN for
#   model.safetensors, with the sha256 only in X-Linked-Etag; a 200 with a git-sha1 ETag
#   for config.json), as checkpoint.py, section 3, says the real one does.


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

def write_checkpoint(directory, params, config, layout="hub", lm_head=False):
    """Write config.json + model.safetensors the way the hub ("hub") or transformers'
    save_pretrained ("transformers") does (model.py states both layouts)."""
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
def tiny_dir(tmp_path, tiny):
    """A directory holding the tiny checkpoint in the hub's layout."""
    config, params = tiny
    return write_checkpoint(tmp_path / "ckpt", params, config)


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


def test_from_pretrained_float64_matches_numpy_gpt2_to_1e_9(tiny, tiny_dir):
    """dtype=torch.float64 loads every tensor in float64, still tied. In float64 rounding is
    gone, so even small slips (eps 1e-6, a GELU variant) would show far above 1e-9."""
    _, params = tiny
    model = GPT.from_pretrained(str(tiny_dir), dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.lm_head.weight is model.transformer.wte.weight  # .to(dtype) kept the tie
    assert_matches_numpy(model, params, atol=1e-9)


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


@pytest.mark.parametrize("spelling", [dict(activation_function="gelu_pytorch_tanh"), dict(n_inner=None),
                                      dict(n_inner=4 * 16)], ids=["gelu_pytorch_tanh", "n_inner null", "n_inner 4C"])
def test_config_json_may_spell_gpt2s_choices_as_transformers_does(tmp_path, tiny, spelling):
    """transformers calls the tanh GELU "gelu_new" or "gelu_pytorch_tanh", and writes GPT-2's
    MLP width as n_inner null or 4 x n_embd: the same GPT-2, so it loads, with its logits."""
    config, params = tiny
    write_checkpoint(tmp_path, params, {**config, **spelling})
    assert_matches_numpy(GPT.from_pretrained(str(tmp_path)), params)


# ---------------------------------------------------------------------------
# from_pretrained refuses a checkpoint it would compute wrongly: a model that runs and is
# wrong is worse than an error. Each edit is to the tiny hub checkpoint's tensors or its
# config.json; each message names the file and the problem.

REFUSED = {  # what is wrong: (edit(tensors, config), what the message must say)
    "a tensor missing": (lambda p, c: p.pop("h.1.mlp.c_fc.bias"),
                         r"missing tensor\(s\) transformer\.h\.1\.mlp\.c_fc\.bias"),
    "a tensor GPT-2 does not have": (lambda p, c: p.update({"h.0.mlp.c_gate.weight": np.zeros((16, 64), np.float32)}),
                                     r"unexpected tensor\(s\) transformer\.h\.0\.mlp\.c_gate\.weight"),
    "a shape config.json does not give": (lambda p, c: p.update({"wpe.weight": p["wpe.weight"][:31]}),
                                          r"wpe\.weight.*\(31, 16\) in the file.*expects \(32, 16\)"),
    "an output head not tied to wte": (lambda p, c: p.update({"lm_head.weight": p["wte.weight"] + 1.0}),
                                       r"lm_head\.weight differs from wte\.weight"),
    "the erf GELU": (lambda p, c: c.update(activation_function="gelu"),
                     r"activation_function 'gelu' is not GPT-2's tanh GELU"),
    "layer norm eps 1e-6": (lambda p, c: c.update(layer_norm_epsilon=1e-6), r"layer_norm_epsilon 1e-06"),
    "an MLP of 2 x n_embd": (lambda p, c: c.update(n_inner=32), r"n_inner 32"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_from_pretrained_refuses_a_checkpoint_it_would_compute_wrongly_naming_the_problem(tmp_path, tiny, case):
    """A ValueError naming the folder and what does not fit, instead of a model that runs:
    a missing tensor would stay random, an unknown one would be dropped, an untied head or a
    config.json asking for another activation, eps or MLP width would be silently ignored."""
    edit, message = REFUSED[case]
    config, params = tiny
    edit(params, config)
    write_checkpoint(tmp_path / "ckpt", params, config)
    with pytest.raises(ValueError, match=message) as err:
        GPT.from_pretrained(str(tmp_path / "ckpt"))
    assert str(tmp_path / "ckpt") in str(err.value)


@pytest.mark.parametrize("content, why", [
    (b'{"n_embd": 16,', "Expecting property name enclosed in double quotes: line 1 column 15 (char 14)"),
    (b'{"n_embd": "\xff"}', "'utf-8' codec can't decode byte 0xff in position 12: invalid start byte"),
], ids=["cut short", "not UTF-8"])
def test_a_config_json_that_is_not_json_is_refused_naming_it_and_what_to_do(tiny_dir, content, why):
    """A config.json cut short, or not UTF-8, is a ValueError naming that file, what is wrong
    and the way out (without it the sizes come from the tensors), not a bare decoding error."""
    (tiny_dir / "config.json").write_bytes(content)
    with pytest.raises(ValueError) as err:
        GPT.from_pretrained(str(tiny_dir))
    assert str(err.value) == (f"{tiny_dir / 'config.json'}: not valid JSON ({why}); delete it to read the sizes "
                              "off the weights")


# ---------------------------------------------------------------------------
# safetensors: round trip, independent parsing, malformed files.

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


def test_every_dtype_checkpoint_py_knows_is_tested_here():
    """The round trip below covers the whole of checkpoint.py's dtype table, no more, no less."""
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


def current_umask():
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Atomic writes must not leave owner-only files (as mkstemp makes them): the result is
    as open() makes it under the umask."""
    GPT(TINY_CONFIG).save_pretrained(tmp_path)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~current_umask(), name


# ---------------------------------------------------------------------------
# Atomic writes (checkpoint.py, section 1): a file with write_atomically, a folder with
# replace_folder, and what a replace_folder killed half-way leaves, with clean_leftovers.
# Each test reads the whole folder around the target from the disk, before and after.

def tree(root):
    """{path below root: the file's bytes, "folder", or "link to TARGET"}, hidden names
    included and links not followed: a folder's whole state, to compare to the byte."""
    entries = {}
    for folder, subfolders, files in os.walk(root):
        for name in subfolders + files:
            p = Path(folder, name)
            entries[str(p.relative_to(root))] = (f"link to {os.readlink(p)}" if p.is_symlink()
                                                 else "folder" if p.is_dir() else p.read_bytes())
    return entries


def make_folder(folder, files):
    """Write {relative path: bytes} into folder, making the folders on the way."""
    for name, data in files.items():
        (Path(folder) / name).parent.mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_bytes(data)
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder)


def inside(folder, files):
    """What tree() shows of {relative path: bytes} written into `folder`, folders included."""
    entries = {folder: "folder"}
    for name, data in files.items():
        for parent in reversed(Path(name).parents[:-1]):  # data/pairs.jsonl: the folder data
            entries[f"{folder}/{parent}"] = "folder"
        entries[f"{folder}/{name}"] = data
    return entries


OURS = ("config.json", "model.safetensors", "metrics.jsonl")  # what replace_folder may delete
OLD = {"config.json": b'{"run": "old"}', "model.safetensors": b"old weights", "metrics.jsonl": b'{"step": 1}\n'}
NEW = {"config.json": b'{"run": "new"}', "model.safetensors": b"new weights"}
FAILURES = {  # what can interrupt a write
    "a bug": lambda: RuntimeError("a bug"),
    "Ctrl-C": KeyboardInterrupt,
    "a full disk": lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
}


@pytest.mark.parametrize("before", [None, b"old bytes"], ids=["no file", "a file"])
def test_write_atomically_puts_the_new_bytes_in_place_and_nothing_beside_them(tmp_path, before):
    """write(tmp) gets a fresh name .NAME.XXXXXXXX.tmp beside path and makes the file there;
    then path holds exactly the new bytes, with the permissions open() gives under the umask
    (not mkstemp's 0600), and nothing else is in the folder. A reader that had the old file
    open goes on reading the old bytes: path was renamed over, not written into."""
    path = tmp_path / "out.bin"
    if before is not None:
        path.write_bytes(before)
    given = []

    def write(tmp):
        given.append(tmp)
        assert tmp.parent == tmp_path and not os.path.lexists(tmp), tmp
        tmp.write_bytes(b"new bytes")
    if before is None:
        write_atomically(path, write)
    else:
        with open(path, "rb") as reader:  # opened before the write, read after it
            write_atomically(path, write)
            assert reader.read() == before
    assert len(given) == 1 and re.fullmatch(r"\.out\.bin\.[0-9a-f]{8}\.tmp", given[0].name)
    assert tree(tmp_path) == {"out.bin": b"new bytes"}
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("before", [None, b"old bytes"], ids=["no file", "a file"])
def test_write_atomically_that_fails_leaves_the_old_file_and_nothing_beside_it(tmp_path, before, failure):
    """An exception inside write, even Ctrl-C, goes on as it was, and the folder is byte for
    byte what it was: the old file (or none), and no half-written temporary."""
    path = tmp_path / "out.bin"
    if before is not None:
        path.write_bytes(before)
    exception = FAILURES[failure]()

    def write_half(tmp):
        tmp.write_bytes(b"new by")
        raise exception
    with pytest.raises(type(exception)) as err:
        write_atomically(path, write_half)
    assert err.value is exception
    assert tree(tmp_path) == ({} if before is None else {"out.bin": before})


@pytest.mark.parametrize("before", ["nothing", "an empty folder", "an earlier run"])
def test_replace_folder_puts_the_new_files_in_place_of_the_old_and_nothing_beside_them(tmp_path, capsys, before):
    """write(tmp) gets a new, empty folder .NAME.XXXXXXXX.tmp beside path; afterwards path
    holds exactly what it wrote. The earlier run's files (and a temporary write_atomically
    left among them) are all among `names`, so they are deleted and no warning is printed."""
    out = tmp_path / "out"
    if before == "an empty folder":
        out.mkdir()
    elif before == "an earlier run":
        make_folder(out, {**OLD, ".model.safetensors.0123abcd.tmp": b"half of an old save"})
    given = []

    def write(tmp):
        given.append(tmp)
        assert tmp.parent == tmp_path and list(tmp.iterdir()) == [], tmp
        make_folder(tmp, NEW)
    checkpoint.replace_folder(out, write, OURS)
    assert len(given) == 1 and re.fullmatch(r"\.out\.[0-9a-f]{8}\.tmp", given[0].name)
    assert tree(tmp_path) == inside("out", NEW)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("foreign", [
    {"thesis.txt": b"two years of work"},
    {"data/pairs.jsonl": b'{"prompt": "mine"}\n'},  # a folder of the user's
    {"model.safetensors.bak": b"a copy kept by hand"},
    {".model.safetensors.edit.tmp": b"not write_atomically's: no 8 hex digits"},
    {".notes.txt.0123abcd.tmp": b"a temporary of a file not in names"},
], ids=["a file", "a folder", "a backup", "a look-alike temporary", "a temporary of another file"])
def test_replace_folder_never_deletes_a_file_it_was_not_given_the_name_of(tmp_path, capsys, foreign):
    """A file that is not one of `names` (nor write_atomically's temporary for one) is never
    deleted: the old folder, renamed aside, is emptied of this project's files only and stays
    with the user's, byte for byte, and a warning on stderr says where they are."""
    out = make_folder(tmp_path / "out", {**OLD, **foreign})
    checkpoint.replace_folder(out, lambda tmp: make_folder(tmp, NEW), OURS)
    after = tree(tmp_path)
    (old,) = [name for name in after if "/" not in name and name != "out"]
    assert re.fullmatch(r"\.out\.[0-9a-f]{8}\.old", old)
    assert after == {**inside("out", NEW), **inside(old, foreign)}
    warning = capsys.readouterr().err
    assert str(tmp_path / old) in warning and Path(next(iter(foreign))).parts[0] in warning


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("before", ["nothing", "an earlier run"])
def test_replace_folder_that_fails_inside_write_leaves_the_folder_as_it_was(tmp_path, capsys, before, failure):
    """An exception inside write (a bug, Ctrl-C, a full disk) after it wrote a file and half
    of another goes on as it was; the folder around path is byte for byte what it was, with
    nothing beside path: the new files, write_atomically's temporary among them, are gone."""
    if before == "an earlier run":
        make_folder(tmp_path / "out", {**OLD, "thesis.txt": b"the user's"})
    expected = tree(tmp_path)
    exception = FAILURES[failure]()

    def write_then_fail(tmp):
        make_folder(tmp, {"model.safetensors": b"new weights", ".config.json.89abcdef.tmp": b'{"ru'})
        raise exception
    with pytest.raises(type(exception)) as err:
        checkpoint.replace_folder(tmp_path / "out", write_then_fail, OURS)
    assert err.value is exception
    assert tree(tmp_path) == expected
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("failure", FAILURES)
def test_replace_folder_failing_between_its_two_renames_puts_the_old_folder_back(tmp_path, monkeypatch, failure):
    """The one moment path is missing: the old folder has been renamed aside and the new
    one not yet into place. An exception there (here from the second os.replace) puts the
    old folder back: the folder around path is byte for byte what it was."""
    make_folder(tmp_path / "out", {**OLD, "thesis.txt": b"the user's"})
    expected = tree(tmp_path)
    exception, real_replace, renames = FAILURES[failure](), os.replace, []

    def replace_failing_the_second_time(source, target):
        renames.append((Path(source).name, Path(target).name))
        if len(renames) == 2:
            raise exception
        real_replace(source, target)
    monkeypatch.setattr(checkpoint.os, "replace", replace_failing_the_second_time)
    with pytest.raises(type(exception)) as err:
        checkpoint.replace_folder(tmp_path / "out", lambda tmp: make_folder(tmp, NEW), OURS)
    assert err.value is exception
    assert renames[0][0] == "out" and renames[1][1] == "out"  # it did fail between the two
    assert tree(tmp_path) == expected


def test_replace_folder_through_a_symlink_replaces_the_folder_it_points_to(tmp_path):
    """--out may be a link to a folder elsewhere (a bigger disk): the folder is replaced and
    the link, still pointing at it, is left as it was."""
    make_folder(tmp_path / "disk" / "run", OLD)
    (tmp_path / "out").symlink_to(Path("disk") / "run")
    checkpoint.replace_folder(tmp_path / "out", lambda tmp: make_folder(tmp, NEW), OURS)
    assert tree(tmp_path) == {"out": "link to disk/run", "disk": "folder", **inside("disk/run", NEW)}


def leave_leftovers(folder, old_files):
    """Beside folder/out: its earlier files in .out.abcd1234.old, where replace_folder's
    first rename put them, and a .out.0123abcd.tmp folder of a save killed while writing, with
    a whole file and half of another (write_atomically's temporary)."""
    make_folder(folder / ".out.abcd1234.old", old_files)
    make_folder(folder / ".out.0123abcd.tmp", {"model.safetensors": b"new weights",
                                               ".config.json.89abcdef.tmp": b'{"ru'})


def test_clean_leftovers_after_a_kill_between_the_two_renames_puts_the_old_folder_back(tmp_path):
    """A SIGKILL or a power cut between replace_folder's two renames leaves out missing and
    its files waiting in .out.abcd1234.old. clean_leftovers renames that folder back, whole
    (the user's file in it too), and empties and removes the half-written .tmp folder."""
    earlier = {**OLD, "notes.txt": b"the user's"}
    leave_leftovers(tmp_path, earlier)
    checkpoint.clean_leftovers(tmp_path / "out", OURS)
    assert tree(tmp_path) == inside("out", earlier)


def test_clean_leftovers_beside_a_present_folder_removes_them_and_leaves_the_folder(tmp_path):
    """With out in place, a leftover .old folder holds files already replaced (a kill after
    the second rename), and a .tmp folder a save that never finished: both go, and out is
    left byte for byte."""
    make_folder(tmp_path / "out", NEW)
    leave_leftovers(tmp_path, OLD)
    checkpoint.clean_leftovers(tmp_path / "out", OURS)
    assert tree(tmp_path) == inside("out", NEW)


@pytest.mark.parametrize("leftover", [".out.abcd1234.old", ".out.0123abcd.tmp"])
def test_clean_leftovers_keeps_a_file_it_was_not_given_the_name_of(tmp_path, capsys, leftover):
    """A leftover holding a file of the user's is emptied of this project's files only, and
    stays, with that file byte for byte, named in a warning on stderr."""
    make_folder(tmp_path / "out", NEW)
    make_folder(tmp_path / leftover, {**OLD, "thesis.txt": b"two years of work"})
    checkpoint.clean_leftovers(tmp_path / "out", OURS)
    assert tree(tmp_path) == {**inside("out", NEW), **inside(leftover, {"thesis.txt": b"two years of work"})}
    warning = capsys.readouterr().err
    assert str(tmp_path / leftover) in warning and "thesis.txt" in warning


@pytest.mark.parametrize("out_present", [True, False], ids=["out present", "out missing"])
def test_clean_leftovers_leaves_alone_what_only_looks_like_a_leftover(tmp_path, out_present):
    """Only a folder named exactly .out.XXXXXXXX.old or .tmp (8 lower-case hex digits) is
    replace_folder's: another pattern, a plain file of that name, another target's leftover,
    or a link (which must not be followed to delete what it points to) are left as they are,
    and none of them is renamed into out's place."""
    if out_present:
        make_folder(tmp_path / "out", NEW)
    for name in (".out.xyz.old", ".out.ABCD1234.old", ".out.abcd12345.old", "out.abcd1234.old",
                 ".out.abcd1234.old.bak", ".other.abcd1234.old", ".out.abcd1234.tmp.d"):
        make_folder(tmp_path / name, OLD)
    (tmp_path / ".out.abcd1234.old").write_bytes(b"a file, not a folder")
    make_folder(tmp_path / "elsewhere", OLD)
    (tmp_path / ".out.0123abcd.tmp").symlink_to("elsewhere")
    expected = tree(tmp_path)
    checkpoint.clean_leftovers(tmp_path / "out", OURS)
    assert tree(tmp_path) == expected
    checkpoint.clean_leftovers(tmp_path / "missing" / "out", OURS)  # a folder that is not there: no error
    assert tree(tmp_path) == expected


# ---------------------------------------------------------------------------
# A run's folder (checkpoint.py, section 1): tried before the run (prepare_run_folder),
# refused unless it is ours (refuse_others), saved as one unit (save_folder); the files in
# it, each renamed over the old one; and JSON Lines read back (section 4).

RUN = "--out runs/may"  # the option the messages name


def test_prepare_run_folder_makes_the_missing_parents_and_leaves_nothing_else(tmp_path):
    """--out may be several folders down a path that is not there yet: they are made, and the
    folder made beside --out to try a save there is gone again."""
    checkpoint.prepare_run_folder(tmp_path / "runs" / "may" / "out", OURS, RUN)
    assert tree(tmp_path) == {"runs": "folder", "runs/may": "folder"}


@pytest.mark.skipif(os.name != "posix", reason="needs /, which is a mount point on POSIX systems")
@pytest.mark.parametrize("through_a_link", [False, True], ids=["/", "a link to /"])
def test_prepare_run_folder_refuses_a_mount_point_even_through_a_link(tmp_path, through_a_link):
    """A mount point cannot be renamed aside, so a save there would fail only after the run.
    A link to one counts as what it points to, since that is the folder a save replaces."""
    out = Path("/")
    if through_a_link:
        (tmp_path / "out").symlink_to("/")
        out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        checkpoint.prepare_run_folder(out, OURS, RUN)
    assert str(err.value) == f"{RUN} is a mount point, which a save cannot replace as a whole; give a folder inside it"
    assert tree(tmp_path) == ({"out": "link to /"} if through_a_link else {})


REFUSED_OR_OURS = {  # what the folder holds (None: no folder): the names returned, or the names the refusal shows
    "no folder": (None, []),
    "an empty folder": ({}, []),
    "an earlier run": (OLD, ["config.json", "metrics.jsonl", "model.safetensors"]),
    "our names but no metrics.jsonl": ({"model.safetensors": b"theirs", "config.json": b"{}"},
                                       "config.json, model.safetensors"),
    "three files of the user's": ({**OLD, "c.txt": b"", "a.txt": b"", "b.txt": b""}, "a.txt, b.txt, c.txt"),
    "five files of the user's": ({**OLD, **{f"{c}.txt": b"" for c in "edcba"}}, "a.txt, b.txt, c.txt ..."),
}


@pytest.mark.parametrize("case", REFUSED_OR_OURS)
def test_refuse_others_returns_our_names_or_refuses_showing_the_first_three_of_the_rest(tmp_path, case):
    """A folder is ours when it holds only files of `names`, metrics.jsonl among them: its names
    come back, sorted. Otherwise the refusal shows what else is there, the first three in
    sorted order; the folder is left as it was either way."""
    files, expected = REFUSED_OR_OURS[case]
    out = tmp_path / "out" if files is None else make_folder(tmp_path / "out", files)
    before = tree(tmp_path)
    if isinstance(expected, list):
        assert checkpoint.refuse_others(out, OURS, "metrics.jsonl", RUN) == expected
    else:
        with pytest.raises(ValueError) as err:
            checkpoint.refuse_others(out, OURS, "metrics.jsonl", RUN)
        assert str(err.value) == (f"{RUN} holds {expected}, which this script did not write. It only ever "
                                  "replaces its own output: give a new or empty folder")
    assert tree(tmp_path) == before


def test_save_folder_makes_the_missing_parents_of_the_folder(tmp_path):
    """The folders on the way to --out may have gone since the run began: a save makes them."""
    checkpoint.save_folder(tmp_path / "runs" / "may" / "out", lambda tmp: make_folder(tmp, NEW), OURS)
    assert tree(tmp_path) == {"runs": "folder", "runs/may": "folder", **inside("runs/may/out", NEW)}


@pytest.mark.parametrize("out", ["notes.txt/out", "notes.txt"], ids=["below a file", "a file"])
def test_save_folder_that_cannot_save_says_why_and_that_the_folder_is_as_it_was(tmp_path, out):
    """Whether the parent cannot be made (a file is in the way) or the folder cannot be
    replaced (it is a file), the OSError says why, in words, and that nothing changed."""
    make_folder(tmp_path, {"notes.txt": b"the user's"})
    out = tmp_path / out
    why = (os.strerror(errno.EEXIST) if out.name == "out" else
           f"{out.resolve()} is a file, not a folder: refusing to replace it with one")
    with pytest.raises(OSError) as err:
        checkpoint.save_folder(out, lambda tmp: make_folder(tmp, NEW), OURS)
    assert str(err.value) == f"could not save to {out} ({why}); it is as it was before this save"
    assert tree(tmp_path) == {"notes.txt": b"the user's"}


def tensors_as_lists(state):
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


RUN_FILES = {  # saver: (what it is given, the file read back without checkpoint.py, what that must give)
    "save_json": (checkpoint.save_json, {"n_embd": 16, "bias": True, "names": ["a"]}, Path.read_bytes,
                  b'{\n  "n_embd": 16,\n  "bias": true,\n  "names": [\n    "a"\n  ]\n}'),
    "save_jsonl": (checkpoint.save_jsonl, [{"step": 1}, {"loss": 0.5}], Path.read_bytes,
                   b'{"step": 1}\n{"loss": 0.5}\n'),
    "save_state": (checkpoint.save_state, {"step": 3, "lr": [1e-3, 5e-4], "x": torch.tensor([1.5, -2.0])},
                   lambda path: tensors_as_lists(torch.load(path, weights_only=True)),
                   {"step": 3, "lr": [1e-3, 5e-4], "x": [1.5, -2.0]}),
}


@pytest.mark.parametrize("saver", RUN_FILES)
def test_each_run_file_is_written_whole_and_renamed_over_the_old_one(tmp_path, saver):
    """config.json (indented, as the hub's), metrics.jsonl (a line per record, each ended) and
    resume.pt hold what they were given, and each is written beside its name and renamed over
    it (write_atomically): a reader that had the old file open still reads the old bytes,
    which a file written in place would have changed under it."""
    save, value, read, expected = RUN_FILES[saver]
    path = tmp_path / "file"
    path.write_bytes(b"old bytes")
    with open(path, "rb") as reader:
        save(value, path)
        assert reader.read() == b"old bytes"
    assert read(path) == expected
    assert sorted(tmp_path.iterdir()) == [path]


class RunsCode:
    """Unpickled, this makes the folder `path`: the proof that code named in a file ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_load_state_never_runs_code_that_a_resume_pt_names(tmp_path):
    """Unpickling may call any function a file names; load_state refuses a file that names
    anything but tensors and plain values, before calling it."""
    ran = tmp_path / "code-ran"
    torch.save({"step": 3, "payload": RunsCode(ran)}, tmp_path / "resume.pt")
    with pytest.raises(ValueError) as err:
        checkpoint.load_state(tmp_path / "resume.pt", "--resume")
    assert not ran.exists()
    assert str(err.value) == (f"--resume: {tmp_path / 'resume.pt'} cannot be read (not a torch.save file of "
                              "tensors and plain values)")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, about the plain pickle
@pytest.mark.parametrize("content", [b"", b"hello world\n", b'{"step": 3}', pickle.dumps({"step": 3})],
                         ids=["empty", "text", "json", "a plain pickle"])
def test_load_state_of_a_file_torch_save_did_not_write_is_a_one_line_error(tmp_path, content):
    """An empty resume.pt (a full disk), or another kind of file under its name: the same
    one-line ValueError, which train_toy prints, never a traceback (torch raises EOFError,
    KeyError or pickle.UnpicklingError for these)."""
    path = tmp_path / "resume.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^--resume: {re.escape(str(path))} cannot be read \((empty|not a torch"
                                         r"\.save file of tensors and plain values)\)$"):
        checkpoint.load_state(path, "--resume")


def test_load_state_of_a_cut_file_names_the_option_the_file_and_the_first_line_of_torchs_reason(tmp_path):
    """A resume.pt cut short (a full disk, a copy interrupted): a one-line ValueError, which
    train_toy prints as it is, saying which option and file, and why in torch's own words."""
    path = tmp_path / "resume.pt"
    torch.save({"step": 3, "x": torch.arange(4.0)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(RuntimeError) as torch_says:
        torch.load(path, weights_only=True)
    with pytest.raises(ValueError) as err:
        checkpoint.load_state(path, "--resume")
    assert str(err.value) == f"--resume: {path} cannot be read ({str(torch_says.value).splitlines()[0]})"


def read_each(record, line):
    """read_jsonl's parse: (line, record), and a ValueError for a record holding "bad"."""
    if "bad" in record:
        raise ValueError("a bad record")
    return line, record


JSONL = {  # the file's bytes (None: no file): the (line, record) pairs read, or (exception, message)
    "a BOM, CRLF, blank lines and no last newline": (
        b'\xef\xbb\xbf{"a": 1}\r\n\r\n  \t\r\n{"b": 2}\n\n{"c": 3}', [(1, {"a": 1}), (4, {"b": 2}), (6, {"c": 3})]),
    "a BOM on line 2": (b'{"a": 1}\n\xef\xbb\xbf{"b": 2}\n',
                        (ValueError, "{path} line 2: not valid JSON (Unexpected UTF-8 BOM (decode using utf-8-sig))")),
    "not JSON": (b'{"a": 1}\n\n{"b": \n', (ValueError, "{path} line 3: not valid JSON (Expecting value)")),
    "a list": (b'{"a": 1}\n[1, 2]\n', (ValueError, "{path} line 2: expected a JSON object, got list")),
    "a string": (b'"a"\n', (ValueError, "{path} line 1: expected a JSON object, got str")),
    "bad UTF-8": (b'{"a": 1}\n{"a": "\xff"}\n', (ValueError, "{path} line 2: not UTF-8 text (invalid start byte at byte 7)")),
    "a record parse refuses": (b'{"a": 1}\n{"bad": 2}\n', (ValueError, "{path} line 2: a bad record")),
    "no file": (None, (FileNotFoundError, "--data {path}: no such file")),
    "a folder": ("folder", (FileNotFoundError, "--data {path}: not a file")),
}


@pytest.mark.parametrize("case", JSONL)
def test_read_jsonl_reads_each_object_with_its_line_or_names_the_file_and_line_at_fault(tmp_path, case):
    """Lines are counted from 1, blank ones included; blank lines (CRLF or spaces too) are
    skipped and a BOM is allowed on line 1 only. Every error names the file, and the line
    or --data, and says what is wrong there."""
    content, expected = JSONL[case]
    path = tmp_path / "pairs.jsonl"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    if isinstance(expected, list):
        assert checkpoint.read_jsonl(path, read_each, "--data") == expected
    else:
        with pytest.raises(expected[0]) as err:
            checkpoint.read_jsonl(path, read_each, "--data")
        assert type(err.value) is expected[0] and str(err.value) == expected[1].format(path=path)


# ---------------------------------------------------------------------------
# Downloading from the hub, against a fake hub on 127.0.0.1 (checkpoint.py, section 3,
# states how the real one answers).

COMMIT = "607a30d783dfa663caf39e06633721c8d4cfcd7e"  # the gpt2 commit many caches hold
REPO_DIR = "models--openai-community--gpt2"  # its folder in the hub cache


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
    for blob in (sha256, sha1):
        assert (repo / "blobs" / blob).stat().st_mode & 0o777 == 0o666 & ~current_umask()

    assert_matches_numpy(GPT.from_pretrained("gpt2"), params)  # server gone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_matches_numpy(GPT.from_pretrained("gpt2"), params)


WRONG_SHA256 = hashlib.sha256(b"some other file").hexdigest()
CORRUPT = "the file is corrupt: its sha256 is {sha256} but the hub says " + WRONG_SHA256
CUT = "it stopped after {half} of {whole} bytes"
DOWNLOAD_FAULTS = {  # what goes wrong: (how the fake hub answers, None: nothing listens; what the error says)
    "nothing listening": (None, "Connection refused"),
    "cut short, sha256 stated": (dict(truncate=True), CUT),
    "cut short, only the size stated": (dict(truncate=True, no_linked_etag=True), CUT),
    "a sha256 that is not the file's": (dict(linked_etag=WRONG_SHA256), CORRUPT),
    "a mirror's sha256 ETag that is not the file's": (dict(direct=True, linked_etag=WRONG_SHA256), CORRUPT),
}


@pytest.mark.parametrize("fault", DOWNLOAD_FAULTS)
def test_failed_download_raises_connection_error_saying_what_and_keeps_nothing(hub_cache, tiny_repo, monkeypatch,
                                                                                fault):
    """A download that fails, or brings bytes that are not the file the hub describes, is a
    ConnectionError (an OSError, as a network failure is) naming the URL and what went wrong,
    and nothing is cached: a half or corrupt file must never look like a cached model.
    Without a stated sha256 only X-Linked-Size can tell a cut download from a whole one."""
    _, _, files = tiny_repo
    hub_options, problem = DOWNLOAD_FAULTS[fault]
    weights = files["model.safetensors"]
    problem = problem.format(half=len(weights) // 2, whole=len(weights), sha256=hashlib.sha256(weights).hexdigest())
    with contextlib.ExitStack() as stack:
        if hub_options is None:
            monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
        else:
            stack.enter_context(serving(FakeHub(files, **hub_options), monkeypatch))
        with pytest.raises(ConnectionError) as err:
            GPT.from_pretrained("gpt2")
    url = f"{os.environ['HF_ENDPOINT']}/openai-community/gpt2/resolve/main/model.safetensors"
    assert str(err.value).startswith(f"could not download {url}: ") and problem in str(err.value)
    assert files_under(hub_cache.parent) == []


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


def test_a_mirror_serving_files_directly_is_checked_by_its_sha256_etag(hub_cache, tiny_repo, monkeypatch):
    """HF_ENDPOINT may be a mirror that answers 200 with the bytes and a 64-hex ETag: that ETag
    is the sha256 to check (a wrong one is refused, above), and names the blob, while a 40-hex
    one is git's blob id."""
    params, _, files = tiny_repo
    with serving(FakeHub(files, direct=True), monkeypatch):
        assert_matches_numpy(GPT.from_pretrained("gpt2"), params)
    assert files_under(hub_cache / REPO_DIR / "blobs") == sorted([
        hashlib.sha256(files["model.safetensors"]).hexdigest(), git_blob_sha1(files["config.json"])])


@pytest.mark.parametrize("where", ["a file where the cache should be", "a full disk during the download"])
def test_a_cache_that_cannot_be_written_is_an_os_error_saying_where_and_what_to_set(tmp_path, hub_cache, tiny_repo,
                                                                                     monkeypatch, where):
    """Not the network's fault, so not a ConnectionError: an OSError naming the cache folder,
    the system's reason, and the variables that move the cache. A download cut by a full
    disk keeps nothing of what it had written."""
    _, _, files = tiny_repo
    with contextlib.ExitStack() as stack:
        if where == "a file where the cache should be":
            (tmp_path / "not-a-folder").write_text("")
            monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "not-a-folder" / "hub"))
            monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
            cache, reason = tmp_path / "not-a-folder" / "hub", os.strerror(errno.ENOTDIR)
        else:
            def disk_fills(response, f, url, expected_size):  # the disk is full after 100 bytes
                f.write(response.read(100))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            monkeypatch.setattr(checkpoint, "stream_to_file", disk_fills)
            stack.enter_context(serving(FakeHub(files), monkeypatch))
            cache, reason = hub_cache, os.strerror(errno.ENOSPC)
        with pytest.raises(OSError) as err:
            GPT.from_pretrained("gpt2")
    assert not isinstance(err.value, ConnectionError)
    assert str(err.value).startswith(f"cannot write to the Hugging Face cache at {cache / REPO_DIR} ({reason}); ")
    assert "HF_HUB_CACHE or HF_HOME" in str(err.value)
    assert files_under(hub_cache.parent) == []


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
    """Offline means no network, whichever way HF_HUB_OFFLINE says yes; the message says
    where in the cache the file should be."""
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    with pytest.raises(FileNotFoundError) as err:
        GPT.from_pretrained("gpt2")
    assert str(hub_cache / REPO_DIR / "snapshots" / "<commit>" / "model.safetensors") in str(err.value)


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
