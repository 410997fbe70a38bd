"""
The trainer, proven: train.py's step against dpo.dpo_step, micro-batches, several processes,
the schedule, data files as preference data sets come, --out, stops, resume and torchrun.

    python -m pytest test_train.py

Index: claim -> the test that proves it.
- One process, one micro-batch: train.py's step is dpo.dpo_step, gradient and update exactly;
  micro-batches of any sizes and several processes give the gradient of one pass
    -> test_one_micro_batch_in_one_process_is_dpo_step_exactly,
       test_micro_batches_of_different_sizes_give_the_gradient_of_one_pass,
       test_a_step_is_shared_out_among_processes_and_micro_batches_every_pair_once,
       test_torchrun_with_two_processes_trains_what_one_process_trains
- The schedule is the formula, each step's lr is in its line and in metrics.jsonl
    -> test_learning_rate_warms_up_linearly_then_stays_or_decays_linearly, test_each_step_records_its_learning_rate
- Every shape of pair data sets use, in every file format, trains to the same numbers; pairs
  that cannot be trained on are left out and counted, malformed records stop the run
    -> test_the_same_pairs_in_every_shape_and_format_train_to_the_same_numbers,
       test_pairs_that_cannot_be_trained_on_are_left_out_counted_and_named, test_bad_data_file_is_refused_...
- --out: a folder of the user's (or one that only looks like ours) is refused and left alone; a
  failure, Ctrl-C or kill at any moment leaves the earlier --out byte for byte
    -> test_out_holding_files_this_project_did_not_write_is_refused_and_left_alone,
       test_ctrl_c_and_kill_during_training_and_saving_leave_the_earlier_out
- A resumed run, given only its folder, ends bit-identical to an uninterrupted one
    -> test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one
"""

import argparse
import errno
import gzip
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import dpo
import train
from checkpoint import load_safetensors
from model import GPT
from test_dpo import (ROOT, encoded_pairs, gpt2_tokenizer, perturb, plain_logps, read_metrics,
                      tiny_policy, without_times)


def run_train(out, *args):
    """train.py's main in this process (no second torch import), output captured by pytest; no
    answers at the end unless asked for (test_sample.py tests them)."""
    gpt2_tokenizer()
    return train.main(["--out", str(out), "--model", "tiny", "--answers", "0", *args])


def folder_bytes(folder):
    """{relative path: bytes} of everything under folder, hidden files included: to compare a
    folder before and after, to the byte."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def write_pairs(path, pairs, prefix=b""):
    path.write_bytes(prefix + "".join(json.dumps(p) + "\n" for p in pairs).encode())
    return path


def numbered_pairs(n):
    """n pairs of varied lengths, all different, for --data runs."""
    words = "red green blue cold warm small large quick slow bright".split()
    return [{"prompt": f"Item {i}: " + " ".join(words[: 1 + i % 7]),
             "chosen": " yes" + " indeed" * (i % 5) + ".", "rejected": " no" + " never" * (i % 3) + "."}
            for i in range(n)]


@pytest.fixture
def data(tmp_path):
    """Eight pairs in a --data file."""
    return write_pairs(tmp_path / "pairs.jsonl", numbered_pairs(8))


# =============================================================================
# 1. The step: micro-batches, processes, the schedule
# =============================================================================


def step_gradient(policy, pairs, reference_logps, parts, weights=None):
    """The gradient train.train_step leaves in the policy for the pairs split into micro-batches
    `parts` (lists of indices into pairs), with a learning rate of 0 and no clipping; and its metrics."""
    batches = [{**dpo.make_batch([pairs[i] for i in part], [x[part] for x in reference_logps], "cpu"),
                "weight": 1.0 if weights is None else weights[k]} for k, part in enumerate(parts)]
    metrics = train.train_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batches, len(pairs),
                               dpo.LossConfig(beta=0.5), torch.autocast("cpu", enabled=False),
                               max_grad_norm=float("inf"))
    return [p.grad.clone() for p in policy.parameters()], metrics


def moved_policy_and_pairs(n_pairs=None):
    """A float64 tiny GPT moved away from its reference, pairs of varied lengths, the reference's log-probs."""
    words = ["a b", "cd e", "f", "gh ij k", "l m", "nop", "q r s t", "uv"][:n_pairs]
    pairs = encoded_pairs([{"prompt": w, "chosen": " x" * (1 + i % 3), "rejected": " y" * (1 + i % 4)}
                           for i, w in enumerate(words)])
    policy = tiny_policy(dtype=torch.float64)
    reference = dpo.make_reference(policy)
    perturb(policy)
    return policy, pairs, dpo.pair_logps(reference, pairs)


def test_one_micro_batch_in_one_process_is_dpo_step_exactly():
    """With one process and no accumulation, train.py's step is dpo.dpo_step: the same gradient,
    the same clipping and the same AdamW update, to the last bit; the same metrics to float
    rounding (a mean of means weighted by the pairs, against one mean)."""
    results = []
    for step in ("dpo_step", "train_step"):
        policy, pairs, reference_logps = moved_policy_and_pairs()
        optimizer = dpo.make_optimizer(policy, lr=1e-2)
        batch = dpo.make_batch(pairs, reference_logps, "cpu")
        loss = dpo.LossConfig(beta=0.5)
        for _ in range(2):  # the second step runs with AdamW's state from the first
            if step == "dpo_step":
                metrics = dpo.dpo_step(policy, optimizer, batch, loss, max_grad_norm=0.1)
            else:
                metrics = train.train_step(policy, optimizer, [{**batch, "weight": 1.0}], len(pairs), loss,
                                           torch.autocast("cpu", enabled=False), max_grad_norm=0.1)
        results.append((metrics, [p.grad for p in policy.parameters()], [p.detach() for p in policy.parameters()]))
    (metrics_a, grads_a, weights_a), (metrics_b, grads_b, weights_b) = results
    assert metrics_b == pytest.approx(metrics_a, rel=1e-12) and metrics_a["grad_norm"] > 0.1  # clipping acted
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))


def test_micro_batches_of_different_sizes_give_the_gradient_of_one_pass():
    """Gradient accumulation: micro-batches of 3 and 5 pairs, each adding sum(losses) / 8,
    give the gradient of the mean loss over all 8 pairs in one pass, to float64 rounding,
    and the same metrics. The negative control is the common mistake, each micro-batch's
    mean divided by the number of micro-batches (Hugging Face's Trainer until 2024): it
    weighs the 3 pairs' losses by 1/6 each and the 5 pairs' by 1/10, and gives another gradient."""
    policy, pairs, reference_logps = moved_policy_and_pairs()
    one_pass, one_pass_metrics = step_gradient(policy, pairs, reference_logps, [list(range(8))])
    accumulated, metrics = step_gradient(policy, pairs, reference_logps, [[0, 1, 2], [3, 4, 5, 6, 7]])
    for g, expected in zip(accumulated, one_pass):
        assert torch.allclose(g, expected, rtol=0, atol=1e-12 * expected.abs().max().item())
    assert metrics == pytest.approx(one_pass_metrics, rel=1e-12)

    mean_over_n = [torch.zeros_like(g) for g in one_pass]
    for part in ([0, 1, 2], [3, 4, 5, 6, 7]):
        losses = dpo.dpo_loss(*plain_logps(policy, dpo.collate([pairs[i] for i in part])),
                              *[x[part] for x in reference_logps], beta=0.5)[0]
        for total, g in zip(mean_over_n, torch.autograd.grad(losses.mean() / 2, list(policy.parameters()))):
            total += g
    assert max((g - e).abs().max().item() / e.abs().max().item() for g, e in zip(mean_over_n, one_pass)) > 1e-3


def test_a_step_is_shared_out_among_processes_and_micro_batches_every_pair_once(monkeypatch):
    """micro_batches_of_this_process, as process r of `count` sees it (process_rank_and_count
    replaced here): over all processes every pair of the step comes exactly once, with weight
    1; a process that a short step leaves without pairs gets a pair with weight 0, so that it
    still joins the gradient sync."""
    def shares(indices, count, grad_accum):
        result = []
        for rank in range(count):
            monkeypatch.setattr(train, "process_rank_and_count", lambda rank=rank: (rank, count))
            result.append(train.micro_batches_of_this_process(indices, grad_accum))
        return result

    for n_pairs, count, grad_accum in [(8, 2, 2), (7, 2, 2), (3, 2, 2), (5, 1, 3), (8, 4, 1)]:
        indices = list(range(10, 10 + n_pairs))
        counted = [i for share in shares(indices, count, grad_accum) for part, w in share if w == 1.0 for i in part]
        assert sorted(counted) == indices, (n_pairs, count, grad_accum)
        assert all(1 <= len(share) <= grad_accum for share in shares(indices, count, grad_accum))
    assert shares([10], 2, 1) == [[([10], 0.0)], [([10], 1.0)]]  # one pair, two processes
    assert shares([10, 11, 12], 2, 2) == [[([10], 1.0)], [([11], 1.0), ([12], 1.0)]]


def test_passes_without_a_gradient_take_batches_of_a_micro_batch_s_size_shared_out_among_processes(monkeypatch):
    """batches_of_this_process, as process r of `count` sees it (process_rank_and_count replaced
    here): batches of at most --batch-size / (--grad-accum x processes) pairs, what a micro-batch
    of a step holds (so that a pass without a gradient needs no more memory than training), and
    at least 1; over all processes every pair in exactly one batch."""
    pairs = train.Pairs([{}] * 11, [([1] * (1 + i % 5), [2], [3]) for i in range(11)], "pairs.jsonl")
    for count, grad_accum, size in [(1, 1, 8), (1, 2, 4), (2, 2, 2), (4, 2, 1)]:
        shares = []
        for rank in range(count):
            monkeypatch.setattr(train, "process_rank_and_count", lambda rank=rank: (rank, count))
            shares.append(train.batches_of_this_process(argparse.Namespace(batch_size=8, grad_accum=grad_accum), pairs))
        assert max(len(batch) for share in shares for batch in share) == size, (count, grad_accum)
        assert sorted(i for share in shares for batch in share for i in batch) == list(range(11)), (count, grad_accum)


def test_a_micro_batch_of_weight_0_changes_neither_the_gradient_nor_the_metrics():
    """The placeholder a process without pairs runs (weight 0) adds exactly nothing."""
    policy, pairs, reference_logps = moved_policy_and_pairs()
    alone = step_gradient(policy, pairs[:2], [x[:2] for x in reference_logps], [[0, 1]])
    with_placeholder = step_gradient(policy, pairs[:2], [x[:2] for x in reference_logps], [[0, 1], [1]], [1.0, 0.0])
    assert alone[1] == with_placeholder[1]
    assert all(torch.equal(a, b) for a, b in zip(alone[0], with_placeholder[0]))


def test_a_step_with_an_inf_or_nan_gradient_leaves_the_weights_and_the_optimizer_as_they_were():
    """As dpo.dpo_step: a gradient that is not finite (here every gradient of ln_f's weight
    times inf) is not applied, or AdamW would turn every weight nan; the step reports its
    norm, which check_finite then stops the run on. Compared with the weights before, to the bit."""
    policy, pairs, reference_logps = moved_policy_and_pairs()
    policy.transformer.ln_f.weight.register_hook(lambda grad: grad * float("inf"))
    before = [p.detach().clone() for p in policy.parameters()]
    optimizer = dpo.make_optimizer(policy, lr=1e-2)
    batch = {**dpo.make_batch(pairs, reference_logps, "cpu"), "weight": 1.0}
    metrics = train.train_step(policy, optimizer, [batch], len(pairs), dpo.LossConfig(beta=0.5),
                               torch.autocast("cpu", enabled=False))
    assert math.isfinite(metrics["loss"]) and not math.isfinite(metrics["grad_norm"])
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert optimizer.state_dict()["state"] == {}  # AdamW never stepped


@pytest.mark.parametrize("decay", ["none", "linear"])
def test_learning_rate_warms_up_linearly_then_stays_or_decays_linearly(decay):
    """learning_rate(step), steps 1..100, lr 1e-3, 10 warmup steps: lr * step / 10 up to step 10;
    then lr ("none") or lr * (100 - step + 1) / 90 ("linear": lr at step 11, lr / 90 at step 100)."""
    lr, warmup, total = 1e-3, 10, 100
    at = [train.learning_rate(step, lr, warmup, decay, total) for step in range(1, total + 1)]
    assert at[0] == pytest.approx(1e-4) and at[4] == pytest.approx(5e-4) and at[9] == pytest.approx(1e-3)
    if decay == "none":
        assert at[10:] == [lr] * 90
    else:
        assert at[10] == pytest.approx(lr) and at[54] == pytest.approx(lr * 46 / 90)
        assert at[99] == pytest.approx(lr / 90) and all(a > b for a, b in zip(at[10:], at[11:]))
    assert [train.learning_rate(s, lr) for s in (1, 50)] == [lr, lr]  # no warmup, no decay: constant


def test_count_training_steps_is_the_number_of_steps_training_steps_takes():
    """The count the trainer prints and schedules with, against the steps themselves, for runs
    of pairs below, at and across the 50-batch chunks epoch_batches shuffles within."""
    for n_pairs, batch_size in [(1, 1), (7, 3), (8, 8), (9, 8), (399, 8), (400, 8), (401, 8), (1234, 3), (151, 1)]:
        pairs = [([1] * (1 + i % 13), [2], [3]) for i in range(n_pairs)]
        steps = dpo.training_steps(pairs, batch_size, epochs=2, seed=0)
        assert train.count_training_steps(n_pairs, batch_size, epochs=2) == len(steps), (n_pairs, batch_size)


def test_each_step_records_its_learning_rate(tmp_path, data, capsys, monkeypatch):
    """Each step's learning rate is the one the optimizer held for its update (read here inside
    the step), printed in its line and kept in its metrics.jsonl row; the line before training
    says the warmup and the decay."""
    seen, real = [], train.train_step

    def recording(model, optimizer, *args, **kwargs):
        seen.append(optimizer.param_groups[0]["lr"])
        return real(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", recording)
    run_train(tmp_path / "out", "--data", str(data), "--batch-size", "4", "--epochs", "2", "--lr", "0.004",
              "--warmup-steps", "2", "--lr-decay", "linear")
    steps = [r for r in read_metrics(tmp_path / "out") if r.get("phase") == "dpo"]
    assert [r["lr"] for r in steps] == seen == pytest.approx([0.002, 0.004, 0.004, 0.002])
    printed = capsys.readouterr().out
    assert "lr 0.004, warmup 2 steps, then linear decay to 0" in printed
    assert re.search(r"step   1/4 \(epoch 1\) \| lr 2\.00e-03 \| loss", printed)


# =============================================================================
# 2. Data: the shapes and formats pairs come in, pairs left out, malformed records
# =============================================================================

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
    ("\n\nHuman: Hi?\n\nAssistant:", "\n\nHuman: Hi?\n\nAssistant: Hello.", ("\n\nHuman: Hi?\n\nAssistant:", "",
                                                                              " Hello.")),  # left out: empty
])
def test_split_dialogues_cuts_hh_dialogues_at_the_last_shared_assistant_turn_or_whitespace(chosen, rejected,
                                                                                           expected):
    """train.split_dialogues, against prompts and completions written out by hand. The
    completions start with the whitespace before their first word, as GPT-2's tokens do, so
    that no word is cut in two between prompt and completion."""
    prompt, chosen_completion, rejected_completion = train.split_dialogues(chosen, rejected)
    assert (prompt, chosen_completion, rejected_completion) == expected
    assert prompt + chosen_completion == chosen and prompt + rejected_completion == rejected


@pytest.mark.parametrize("chosen, rejected", [("Apples", "Pears"), ("Sunshine", "Sunset")])  # no whitespace to cut at
def test_dialogues_that_share_no_beginning_are_refused(chosen, rejected):
    with pytest.raises(ValueError, match="share no beginning to take as the prompt; give a \"prompt\" field"):
        train.split_dialogues(chosen, rejected)


SYSTEM = {"role": "system", "content": "Be brief."}
ASK = {"role": "user", "content": "Is the sea salty?"}
YES = {"role": "assistant", "content": "Yes."}
WHY = {"role": "user", "content": "Why?"}
RIVERS, FISH = ({"role": "assistant", "content": text} for text in ("Rivers carry salt into it.", "Because of the fish."))
SHAPES = {  # one pair in each shape data sets use
    "standard": {"prompt": HH_CHOSEN[:-len(" Rivers carry salt into it.")], "chosen": " Rivers carry salt into it.",
                 "rejected": " Because of the fish."},
    "HH-RLHF": {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
    "conversational": {"prompt": [ASK, YES, WHY], "chosen": [RIVERS], "rejected": [FISH]},
    "conversational, implicit prompt": {"chosen": [ASK, YES, WHY, RIVERS], "rejected": [ASK, YES, WHY, FISH]},
}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_of_pair_reads_as_the_same_texts(shape):
    """TRL's conversational pairs are written out as HH-RLHF writes its dialogues, so each shape
    gives the same three texts, checked against the HH text written by hand above."""
    assert train.pair_texts(SHAPES[shape]) == (HH_CHOSEN[:-len(" Rivers carry salt into it.")],
                                                " Rivers carry salt into it.", " Because of the fish.")


def test_a_system_message_comes_first_as_plain_text_and_an_empty_content_as_a_bare_turn():
    """The system message, which HH-RLHF has no turn for, is its text before the first turn;
    a message with an empty content is its turn alone, with no space after it."""
    pair = {"prompt": [SYSTEM, ASK, {"role": "assistant", "content": ""}, WHY], "chosen": [RIVERS], "rejected": [FISH]}
    assert train.pair_texts(pair)[0] == "Be brief.\n\nHuman: Is the sea salty?\n\nAssistant:\n\nHuman: Why?\n\nAssistant:"


@pytest.mark.parametrize("record, message", [
    ({"prompt": "x", "chosen": "a"}, "no 'rejected' field"),
    ({"rejected": "b"}, "no 'chosen' field"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, "must all be text, or all lists of messages; got prompt str, "
                                                    "chosen int, rejected str"),
    ({"prompt": "x", "chosen": [RIVERS], "rejected": [FISH]}, "must all be text, or all lists"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "the prompt is empty"),
    ({"prompt": [ASK], "chosen": [{"role": "robot", "content": "hi"}], "rejected": [FISH]}, "message 1 is not"),
    ({"prompt": [ASK], "chosen": [{"role": "user"}], "rejected": [FISH]}, "message 1 is not"),
    ({"prompt": [ASK, SYSTEM], "chosen": [RIVERS], "rejected": [FISH]}, "message 2 is not"),  # system, not first
    ({"prompt": [ASK], "chosen": [WHY], "rejected": [FISH]}, "the chosen messages must start with the assistant's"),
])
def test_a_record_that_is_no_pair_says_what_is_wrong(record, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train.pair_texts(record)


def test_an_implicit_prompt_stops_one_message_short_where_one_conversation_begins_the_other_as_trl_does():
    """As TRL's extract_prompt splits an implicit prompt: its loop `for idx in range(min(len(chosen),
    len(rejected)))` ends without a break when the shorter conversation is all shared, leaving
    idx = min - 1, so the last shared message starts both completions. Here the shared part is
    [ASK, YES]: the prompt is [ASK], and the pair trains (taking [ASK, YES] as the prompt would
    leave the rejected conversation starting with the human's turn, not an answer)."""
    assert train.pair_texts({"chosen": [ASK, YES], "rejected": [ASK, YES, WHY, FISH]}) == (
        "\n\nHuman: Is the sea salty?\n\nAssistant:", " Yes.", " Yes.\n\nHuman: Why?\n\nAssistant: Because of the fish.")


def hh_lines(n):
    """n pairs as HH-RLHF's two whole dialogues, and the same pairs with their prompt given."""
    dialogues = [{"chosen": f"\n\nHuman: Question {i}?\n\nAssistant: A kind answer {i}, café.",
                  "rejected": f"\n\nHuman: Question {i}?\n\nAssistant: Go away."} for i in range(n)]
    return dialogues, [{"prompt": f"\n\nHuman: Question {i}?\n\nAssistant:", "chosen": f" A kind answer {i}, café.",
                        "rejected": " Go away."} for i in range(n)]


def conversational(prompted, implicit):
    """The standard pairs as TRL's conversational ones: the prompt given, or implicit."""
    result = []
    for pair in prompted:
        question = {"role": "user", "content": pair["prompt"].split("Human: ")[1].split("\n")[0]}
        chosen, rejected = ({"role": "assistant", "content": pair[k][1:]} for k in ("chosen", "rejected"))
        result.append({"chosen": [question, chosen], "rejected": [question, rejected]} if implicit else
                      {"prompt": [question], "chosen": [chosen], "rejected": [rejected]})
    return result


def test_the_same_pairs_in_every_shape_and_format_train_to_the_same_numbers(tmp_path):
    """Six pairs (non-ASCII text among them) as HH dialogues in JSON Lines, as standard pairs
    in a JSON array, as TRL's conversational pairs with and without a prompt, gzipped JSON
    Lines: every run trains to the same weights, to the byte, and the same metrics."""
    dialogues, prompted = hh_lines(6)
    files = {"hh.jsonl": write_pairs(tmp_path / "hh.jsonl", dialogues)}
    (tmp_path / "pairs.json").write_text(json.dumps(prompted, ensure_ascii=False, indent=1), encoding="utf-8")
    files["pairs.json"] = tmp_path / "pairs.json"
    files["trl.jsonl"] = write_pairs(tmp_path / "trl.jsonl", conversational(prompted, implicit=False))
    files["trl-implicit.jsonl"] = write_pairs(tmp_path / "trl-implicit.jsonl", conversational(prompted, implicit=True))
    (tmp_path / "hh.jsonl.gz").write_bytes(gzip.compress(files["hh.jsonl"].read_bytes()))
    files["hh.jsonl.gz"] = tmp_path / "hh.jsonl.gz"
    runs = {}
    for name, path in files.items():
        summary = run_train(tmp_path / f"out-{name}", "--data", str(path), "--epochs", "1", "--batch-size", "3",
                            "--eval-fraction", "0.34")
        assert summary["n_pairs"] == 4 and summary["n_eval_pairs"] == 2
        runs[name] = (without_times(read_metrics(tmp_path / f"out-{name}"), ("data", "out")),
                      (tmp_path / f"out-{name}" / "model.safetensors").read_bytes())
    first = runs.pop("hh.jsonl")
    assert all(run == first for run in runs.values()), [name for name, run in runs.items() if run != first]


def test_pairs_that_cannot_be_trained_on_are_left_out_counted_and_named(tmp_path, capsys):
    """Chosen equal to rejected (an HH line among them), an empty completion (TRL's empty
    content, and an HH answer that is not there) and a row longer than --max-length are left
    out: the run says how many of each, with the first three lines, writes the counts to
    metrics.jsonl, and trains on the rest."""
    good = numbered_pairs(4)
    same = {"prompt": "x", "chosen": " b", "rejected": " b"}
    lines = [good[0], same, {"chosen": "Same", "rejected": "Same"}, good[1], same, same,
             {"prompt": [ASK], "chosen": [{"role": "assistant", "content": ""}], "rejected": [FISH]},
             {"chosen": "\n\nHuman: Hi?\n\nAssistant:", "rejected": "\n\nHuman: Hi?\n\nAssistant: Hello."},
             good[2], {"prompt": "x", "chosen": " a" * 40, "rejected": " b"}, good[3]]
    data = write_pairs(tmp_path / "pairs.jsonl", lines)
    summary = run_train(tmp_path / "out", "--data", str(data), "--max-length", "20", "--epochs", "1")
    printed = capsys.readouterr().out
    assert (f"left out 7 of 11 pairs of {data}: 4 with chosen and rejected the same text (line 2, line 3, line 5, "
            "...), 2 with an empty completion (line 7, line 8), 1 with a row longer than --max-length (line 10)"
            ) in printed
    assert summary["n_pairs"] == 4
    data_record = read_metrics(tmp_path / "out")[0]
    assert data_record == {"phase": "data", "pairs": 4, "held_out": 0, "eval_left_out": {},
                           "left_out": {"same_text": 4, "empty_completion": 2, "too_long": 1}}


def test_pairs_of_exactly_the_context_or_max_length_are_kept_and_one_token_more_is_not(tmp_path):
    """A pair's longer row, prompt + completion + <|endoftext|>, must fit the context (here
    1024): a pair of exactly 1024 tokens is kept, one of 1025 is an error naming its line and
    the way through; --max-length N keeps rows of exactly N tokens and leaves out N + 1."""
    enc = gpt2_tokenizer()

    def pairs_of(*n_tokens):  # " a" is one token: prompt "x" (1) + n - 2 times " a" + eot
        return write_pairs(tmp_path / "long.jsonl", [{"prompt": "x", "chosen": " a" * (n - 2), "rejected": " b"}
                                                     for n in n_tokens])

    read = train.read_pairs(pairs_of(1024, 12), enc)
    assert [dpo.longest_row(t) for t in read.tokens] == [1024, 12]
    train.check_context(read, 1024)
    with pytest.raises(ValueError, match="long.jsonl line 2: .* 1025 tokens, longer than the model.s context of 1024 "
                                         r"\(2 of 4 pairs are\); .* --max-length 1024"):
        train.check_context(train.read_pairs(pairs_of(12, 1025, 30, 1030), enc), 1024)  # the first is named
    kept = train.read_pairs(pairs_of(12, 1025, 30, 31), enc, max_length=30)
    assert [p["where"] for p in kept.texts] == ["line 1", "line 3"] and kept.left_out == {"too_long": ["line 2",
                                                                                                       "line 4"]}
    with pytest.raises(ValueError, match=r"no pair to train on \(2 with a row longer than --max-length"):
        train.read_pairs(pairs_of(12, 30), enc, max_length=11)


def test_max_length_longer_than_the_context_and_warmup_longer_than_the_run_are_refused(tmp_path, data):
    with pytest.raises(SystemExit, match="--max-length 2000 is longer than the model's context of 1024"):
        run_train(tmp_path / "out", "--data", str(data), "--max-length", "2000")
    with pytest.raises(SystemExit, match="--warmup-steps 13 is longer than the run's 12 steps"):
        run_train(tmp_path / "out", "--data", str(data), "--warmup-steps", "13")
    assert not (tmp_path / "out").exists()


def test_held_out_pairs_longer_than_the_context_are_an_error_naming_their_file(tmp_path, data):
    """The held-out pairs must fit the context as the training pairs must."""
    held_out = write_pairs(tmp_path / "eval.jsonl", [{"prompt": "x", "chosen": " a" * 1100, "rejected": " b"}])
    with pytest.raises(SystemExit, match=f"{re.escape(str(held_out))} line 1: prompt \\+ completion is 1102 tokens"):
        run_train(tmp_path / "out", "--data", str(data), "--eval-data", str(held_out))


def test_eval_fraction_holds_out_a_seeded_disjoint_part_of_the_data():
    """split_off_eval: round(fraction * N) pairs held out, the rest trained on, no pair in both,
    none lost, each part in the file's order, texts and tokens together; the same seed gives
    the same split."""
    texts = numbered_pairs(50)
    pairs = train.Pairs(texts, [(i,) for i in range(50)], "pairs.jsonl")
    training, held_out = train.split_off_eval(pairs, 0.2, seed=0)
    assert len(held_out.texts) == 10 and len(training.texts) == 40
    for part in (training, held_out):
        assert [texts.index(t) for t in part.texts] == [i for (i,) in part.tokens]  # in order, together
    assert sorted(training.tokens + held_out.tokens) == pairs.tokens
    assert train.split_off_eval(pairs, 0.2, seed=0) == (training, held_out)
    assert train.split_off_eval(pairs, 0.2, seed=1)[1] != held_out
    with pytest.raises(ValueError, match="at least one pair for training and one for evaluation"):
        train.split_off_eval(train.Pairs(texts[:3], [0, 1, 2], "x"), 0.1, seed=0)


@pytest.mark.parametrize("n_pairs, fraction, n_held_out", [(9, 0.3, 3), (7, 0.1, 1), (10, 0.14, 1), (50, 0.2, 10)])
def test_eval_fraction_holds_out_the_nearest_whole_number_of_pairs(n_pairs, fraction, n_held_out):
    """round(fraction * N), worked out by hand: 9 x 0.3 = 2.7 holds out 3 (not 2, as cutting
    off the fraction would), 7 x 0.1 = 0.7 holds out 1 (not 0, which would be refused), 10 x
    0.14 = 1.4 holds out 1."""
    pairs = train.Pairs(numbered_pairs(n_pairs), [(i,) for i in range(n_pairs)], "pairs.jsonl")
    training, held_out = train.split_off_eval(pairs, fraction, seed=0)
    assert (len(training.tokens), len(held_out.tokens)) == (n_pairs - n_held_out, n_held_out)


def test_pairs_left_out_of_a_file_are_counted_with_its_training_part_not_again_with_the_held_out_part():
    """--eval-fraction splits the pairs of --data that were kept: the pairs left out of that file
    are counted once, with the training part (the line the run prints, metrics.jsonl's
    "left_out"); the held-out part has none of its own ("eval_left_out" counts --eval-data's)."""
    left_out = {"same_text": ["line 2", "line 5"], "too_long": ["line 9"]}
    pairs = train.Pairs(numbered_pairs(8), [(i,) for i in range(8)], "pairs.jsonl", left_out)
    training, held_out = train.split_off_eval(pairs, 0.25, seed=0)
    assert training.left_out == {"same_text": ["line 2", "line 5"], "too_long": ["line 9"]}
    assert held_out.left_out == {}


def test_left_out_pairs_are_described_by_their_first_three_places_and_dots_only_when_there_are_more():
    """describe_left_out, against the lines written out by hand: three places are all shown,
    without "..."; of four, the first three and "..."."""
    assert train.describe_left_out({"same_text": ["line 1", "line 2", "line 3"]}) == (
        "3 with chosen and rejected the same text (line 1, line 2, line 3)")
    assert train.describe_left_out({"too_long": ["item 1", "item 2", "item 3", "item 4"],
                                    "empty_completion": ["item 9"]}) == (
        "4 with a row longer than --max-length (item 1, item 2, item 3, ...), 1 with an empty completion (item 9)")


def test_data_run_trains_on_the_training_part_only_and_pads_little(tmp_path):
    """--data with --eval-fraction: the held-out pairs are evaluated, never trained on (the
    steps' real tokens add up to the training pairs alone), and batches of similar lengths
    keep padding well under a third of the positions the policy processes. A file saved with
    a UTF-8 byte-order mark, as Windows editors write them, reads like any other."""
    pairs = numbered_pairs(40)
    data = write_pairs(tmp_path / "pairs.jsonl", pairs, prefix=b"\xef\xbb\xbf")
    summary = run_train(tmp_path / "out", "--data", str(data), "--eval-fraction", "0.25", "--epochs", "1",
                        "--batch-size", "4")
    assert summary["n_pairs"] == 30 and summary["n_eval_pairs"] == 10
    enc = gpt2_tokenizer()  # the split itself is test_eval_fraction_holds_out_a_seeded_disjoint_part_of_the_data's
    training, _ = train.split_off_eval(train.Pairs(pairs, dpo.encode_pairs(enc, pairs), "x"), 0.25, seed=0)
    assert summary["train_tokens"] == sum(2 * len(p) + len(c) + len(r) for p, c, r in training.tokens)
    assert 1 - summary["train_tokens"] / summary["train_positions"] < 1 / 3
    assert [r["step"] for r in read_metrics(tmp_path / "out") if r.get("phase") == "eval"] == [0, 8]


def test_average_logps_run_averages_the_policy_s_log_probs_as_it_averaged_the_reference_s(tmp_path, data):
    """--average-logps reaches every place pairs are scored: the reference's cached log-probs,
    the held-out evaluation and each training step. At step 1 and at the evaluation before it the
    policy is still the reference, so the loss is log 2 (Eq. 7 at h = 0) only if the policy's
    log-probs are averaged too: a mean against a sum gives another loss. run.json records it."""
    run_train(tmp_path / "out", "--data", str(data), "--average-logps", "--epochs", "1", "--eval-fraction", "0.25",
              "--dtype", "float32")
    records = read_metrics(tmp_path / "out")
    first_step = next(r for r in records if r.get("phase") == "dpo")
    first_eval = next(r for r in records if r.get("phase") == "eval")
    assert first_step["loss"] == pytest.approx(math.log(2), abs=1e-6) and first_eval["step"] == 0
    assert first_eval["loss"] == pytest.approx(math.log(2), abs=1e-6) and first_eval["margin"] == 0.0
    assert json.loads((tmp_path / "out" / "run.json").read_text())["loss"]["average_logps"] is True


def test_eval_data_and_eval_every(tmp_path):
    """--eval-data PATH: those pairs are the held-out ones; --eval-every N adds evaluations."""
    data = write_pairs(tmp_path / "train.jsonl", numbered_pairs(6))
    held_out = write_pairs(tmp_path / "eval.jsonl", numbered_pairs(9)[6:])
    summary = run_train(tmp_path / "out", "--data", str(data), "--eval-data", str(held_out), "--epochs", "2",
                        "--eval-every", "2")
    assert summary["n_pairs"] == 6 and summary["n_eval_pairs"] == 3
    assert [r["step"] for r in read_metrics(tmp_path / "out") if r.get("phase") == "eval"] == [0, 2, 4, 6]


@pytest.mark.parametrize("content, message", [
    (b"", "no pair to train on (the file is empty)"),
    (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n', "line 2: no 'rejected'"),
    (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\nnot json\n', "line 2: not valid JSON"),
    (b'["a", "b", "c"]\n', "item 1: expected a JSON object"),
    (b'{"prompt": "", "chosen": "b", "rejected": "c"}\n', "line 1: the prompt is empty"),
    (b'\n{"prompt": "x <|endoftext|>", "chosen": " b", "rejected": " c"}\n', "line 2: the text holds a special token"),
    (b'{"prompt": "a", "chosen": "b", "rejected": "\xff"}\n', "line 1: not UTF-8 text"),
    (b'{"chosen": "Same", "rejected": "Same"}\n', "no pair to train on (1 with chosen and rejected the same text "
                                                  "(line 1))"),
    (b'{"chosen": "Apples", "rejected": "Pears"}\n', "line 1: chosen and rejected share no beginning"),
    (b"prompt,chosen,rejected\n", "CSV is not read here"),
    (None, "no such file"),
    ("folder", "a folder, not a file"),
])
def test_bad_data_file_is_refused_before_any_model_is_built(content, message, tmp_path, monkeypatch):
    """A --data file that is missing, of a format that is not read, or holds a malformed record
    stops the run with the file, the line number and the problem, before any model is built
    (building one fails here), and nothing is written: not even the folders above --out."""
    data = tmp_path / ("pairs.csv" if isinstance(content, bytes) and content.startswith(b"prompt,") else "pairs.jsonl")
    if content == "folder":
        data.mkdir()
    elif content is not None:
        data.write_bytes(content)
    monkeypatch.setattr(train, "GPT", None)  # building a model now would be a TypeError, not this message
    with pytest.raises(SystemExit) as stop:
        run_train(tmp_path / "runs" / "out", "--data", str(data))
    assert message in str(stop.value) and str(data) in str(stop.value)
    assert str(stop.value).startswith("error: ") and "\n" not in str(stop.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([data.name] if content is not None else [])


# =============================================================================
# 3. --out: what it holds, what it refuses, and what survives a failure at any moment
# =============================================================================


@pytest.fixture(scope="module")
def a_run(tmp_path_factory):
    """A finished run of train.py, to copy as an earlier --out: (its folder, its summary)."""
    tmp = tmp_path_factory.mktemp("run")
    data = write_pairs(tmp / "pairs.jsonl", numbered_pairs(8))
    return tmp / "out", run_train(tmp / "out", "--data", str(data), "--epochs", "1", "--eval-fraction", "0.25")


@pytest.fixture
def earlier_out(a_run, tmp_path):
    """An --out that an earlier run filled, in a folder of its own: (path, its bytes)."""
    out = tmp_path / "runs" / "dpo"
    shutil.copytree(a_run[0], out)
    return out, folder_bytes(out)


def assert_left_as_it_was(earlier_out):
    """The earlier --out byte for byte, and nothing beside it: no temporary or old folder."""
    out, before = earlier_out
    assert folder_bytes(out) == before
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_a_run_folder_holds_the_policy_its_tokenizer_the_reference_and_what_the_run_was(a_run):
    """--model tiny: run.json (the program, every option, the loss, where the reference is),
    the policy in Hugging Face's layout with GPT-2's tokenizer files, metrics.jsonl, and the
    reference's weights, which no GPT-2 name would load: they are the policy's before training."""
    out, summary = a_run
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "merges.txt", "metrics.jsonl", "model.safetensors",
                                                     "reference.safetensors", "run.json", "tokenizer_config.json",
                                                     "vocab.json"]
    run = json.loads((out / "run.json").read_text())
    assert run["program"] == "train.py" and run["reference"] == "reference.safetensors"
    assert run["options"]["model"] == "tiny" and run["options"]["lr"] == summary["lr"] == 1e-3
    assert run["loss"] == {"loss_type": "dpo", "beta": 0.1, "label_smoothing": 0.0, "average_logps": False}
    torch.manual_seed(0)  # the seed the run built the tiny model with
    initial = train.load_policy("tiny", None, "pretrained", "cpu").state_dict()
    reference = GPT.from_pretrained(out / "reference.safetensors").state_dict()
    assert all(torch.equal(initial[k], reference[k]) for k in initial)


@pytest.mark.parametrize("content", [
    {"thesis.txt": b"two years of work"},
    {"config.json": b"{}", "model.safetensors": b"a model of someone else's"},  # ours by name, not by origin
    {"config.json": b"{}", "metrics.jsonl": b'{"step": 1, "loss": 0.5}\n'},  # another tool's run, the same names
    {"run.json": b'{"program": "their_trainer.py", "options": {}}', "metrics.jsonl": b"{}\n"},
    {"run.json": b"not json", "metrics.jsonl": b"{}\n"},
    {"metrics.jsonl": b"{}\n", "notes": b"mine"},
])
def test_out_holding_files_this_project_did_not_write_is_refused_and_left_alone(content, tmp_path, monkeypatch):
    """--out pointed at a folder of the user's, or of another tool that writes files of the same
    names: refused before anything loads (loading the tokenizer would fail here), naming what
    is there; every file is still there, byte for byte. A folder is this project's only if
    its run.json says so."""
    out = tmp_path / "mydocs"
    out.mkdir()
    for name, data in content.items():
        (out / name).write_bytes(data)
    monkeypatch.setattr(checkpoint, "load_gpt2_encoding", None)  # loading anything would be a TypeError instead
    with pytest.raises(SystemExit) as stop:
        run_train(out, "--data", "pairs.jsonl")
    assert f"--out {out} holds " in str(stop.value) and "give a new or empty folder" in str(stop.value)
    assert folder_bytes(out) == content and sorted(p.name for p in tmp_path.iterdir()) == ["mydocs"]


def test_out_that_is_the_current_folder_or_holds_it_is_refused(tmp_path, monkeypatch, capsys):
    """`--out .` (or a folder above this one) would be replaced as a whole: refused at once."""
    (tmp_path / "mine.txt").write_text("keep me")
    (tmp_path / "sub").mkdir()
    for cwd, out in ((tmp_path, "."), (tmp_path / "sub", ".."), (tmp_path / "sub", str(tmp_path))):
        monkeypatch.chdir(cwd)
        with pytest.raises(SystemExit) as stop:
            train.main(["--data", "x.jsonl", "--out", out])
        assert stop.value.code == 2 and "is the folder you are in, or holds it" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == [
        "mine.txt", "sub"]


def test_an_earlier_runs_out_is_replaced_by_the_new_run(earlier_out, data):
    """A previous run's --out (only files this project writes) is replaced, as one unit, by the
    new run's files; nothing is left beside it."""
    out, before = earlier_out
    summary = run_train(out, "--data", str(data), "--epochs", "1")
    assert folder_bytes(out) != before and read_metrics(out)[-1] == json.loads(json.dumps(summary))
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_a_folder_in_which_a_run_left_answers_a_checkpoint_and_the_reference_is_ours_to_replace(tmp_path, data):
    """Every file a run writes is one that --out may hold: a folder in which a run left
    answers.jsonl, resume.pt and reference.safetensors is taken by the next run (check_out, what
    a run asks of --out before anything loads), with or without --resume, not refused as
    holding files this project did not write."""
    out = tmp_path / "out"
    run_train(out, "--data", str(data), "--epochs", "1", "--eval-fraction", "0.25", "--answers", "1",
              "--save-every", "100")
    assert {"answers.jsonl", "resume.pt", "reference.safetensors"} <= {p.name for p in out.iterdir()}
    assert train.check_out(str(out)) == train.check_out(str(out), resume=True) == []  # no folder made for it


def test_a_diverging_run_stops_names_the_step_and_keeps_the_earlier_out(earlier_out, data):
    """--lr 1e30: the loss stops being finite at step 2; the run exits with a one-line error
    naming the step and a smaller learning rate, and the earlier --out is left as it was."""
    with pytest.raises(SystemExit) as stop:
        run_train(earlier_out[0], "--data", str(data), "--lr", "1e30")
    assert "diverged at step 2" in str(stop.value) and "learning rate" in str(stop.value)
    assert_left_as_it_was(earlier_out)


def test_a_run_whose_gradient_is_not_finite_stops_at_that_step_and_keeps_the_earlier_out(earlier_out, data,
                                                                                          monkeypatch):
    """A finite loss with a gradient that is not (every gradient of ln_f's weight times inf),
    in float32, where no gradient scaler skips such steps: the step is not applied, and the run
    stops there, naming the step and the norm, rather than go on skipping every step; the
    earlier --out is left as it was."""
    real = train.load_policy

    def with_an_inf_gradient(*args):
        policy = real(*args)
        policy.transformer.ln_f.weight.register_hook(lambda grad: grad * float("inf"))
        return policy

    monkeypatch.setattr(train, "load_policy", with_an_inf_gradient)
    with pytest.raises(SystemExit) as stop:
        run_train(earlier_out[0], "--data", str(data), "--dtype", "float32")
    assert re.match(r"error: training diverged at step 1: loss 0\.69\d*, gradient norm (inf|nan); ", str(stop.value))
    assert_left_as_it_was(earlier_out)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("a bug")])
def test_a_failure_while_saving_leaves_the_earlier_out_and_nothing_beside_it(failure, earlier_out, data, monkeypatch):
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
        run_train(earlier_out[0], "--data", str(data), "--epochs", "1")
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
    monkeypatch.setattr(checkpoint, "load_gpt2_encoding", None)  # loading anything would be a TypeError instead
    with pytest.raises(SystemExit) as stop:
        run_train(tmp_path / "runs" / "out", "--data", "pairs.jsonl")
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


def test_ctrl_c_once_the_new_files_are_in_place_says_they_are(tmp_path, data, monkeypatch):
    """A stop while the old folder is being emptied, after the new files took its place: the
    message names the new save (which --out does hold), and the next run removes the old
    folder left beside it."""
    out = tmp_path / "out"
    run_train(out, "--data", str(data), "--epochs", "1", "--batch-size", "4")
    real = interrupt_while_emptying_the_old_folder(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        run_train(out, "--data", str(data), "--epochs", "2", "--batch-size", "4", "--save-every", "1")
    assert str(stop.value).startswith(f"stopped after step 1 (Ctrl-C or SIGTERM); {out} holds the save of step 1")
    assert torch.load(out / "resume.pt", weights_only=True)["step"] == 1
    assert len(list(tmp_path.glob(".out.*.old"))) == 1
    monkeypatch.setattr(checkpoint, "remove_ours", real)
    with pytest.raises(SystemExit):  # the next run: cleans up, then refuses --epochs 3
        train.main(["--out", str(out), "--epochs", "3", "--resume"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pairs.jsonl"]


def test_ctrl_c_after_the_last_save_says_the_run_finished_not_to_resume(tmp_path, data, monkeypatch):
    """A stop after the final save is in place (here while the old folder is emptied): --out
    holds the finished run, which --resume would refuse, so the message must not offer it."""
    out = tmp_path / "out"
    run_train(out, "--data", str(data), "--epochs", "1", "--batch-size", "4")
    interrupt_while_emptying_the_old_folder(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        run_train(out, "--data", str(data), "--epochs", "1", "--batch-size", "4", "--save-every", "100")
    assert str(stop.value) == f"stopped after step 2 (Ctrl-C or SIGTERM); {out} holds the finished run"
    assert read_metrics(out)[-1]["summary"] is True


def test_leftovers_of_a_save_killed_half_way_are_cleaned_up_by_the_next_run(earlier_out):
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
        train.main(["--out", str(out), "--resume"])
    assert_left_as_it_was((out, before))


def ctrl_c():
    raise KeyboardInterrupt


def interrupt_at_step(monkeypatch, n, interrupt=ctrl_c):
    """The n-th call of train.train_step calls interrupt() first: a Ctrl-C, or a kill."""
    real, calls = train.train_step, []

    def counting(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            interrupt()
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", counting)


def signal_run(out, *options):
    """train.py in a new process that prints "saving" once the first file of its save is
    written, and then waits for the test's signal."""
    script = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
import checkpoint, train
real = checkpoint.save_safetensors

def paused(*args, **kwargs):
    real(*args, **kwargs)
    print("saving", flush=True)
    time.sleep(120)

checkpoint.save_safetensors = paused
train.main(["--model", "tiny", "--out", {str(out)!r}, *{list(options)!r}])
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}  # beside this process on two cores
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env)


def test_ctrl_c_and_kill_during_training_and_saving_leave_the_earlier_out(a_run, tmp_path, data, monkeypatch):
    """Real signals: SIGTERM (kill, a cluster scheduler's stop) sent from outside to a process
    while it saves, and Ctrl-C (SIGINT) during training, which this process sends to itself
    meanwhile, its handler set first (a test run in the background starts with SIGINT
    ignored). Each ends with exit code 1 and one line on stderr that says where the run
    stopped and that nothing was saved, no traceback, and the earlier --out byte for byte with
    nothing beside it. (What SIGKILL or a power cut leaves is tested above, as the files it leaves.)"""
    killed = tmp_path / "killed" / "dpo"
    shutil.copytree(a_run[0], killed)
    process = signal_run(killed, "--data", str(data), "--epochs", "1", "--batch-size", "4")
    before = folder_bytes(a_run[0])

    out = tmp_path / "in-process" / "dpo"  # meanwhile, in this process
    shutil.copytree(a_run[0], out)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # not ignored, as in a background job
    try:
        interrupt_at_step(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
        with pytest.raises(SystemExit) as stop:
            run_train(out, "--data", str(data), "--epochs", "1", "--batch-size", "4")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stop.value.code == f"stopped after step 1 (Ctrl-C or SIGTERM); nothing was saved and {out} is as it was"
    assert folder_bytes(out) == before and [p.name for p in out.parent.iterdir()] == ["dpo"]
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
    assert folder_bytes(killed) == before and [p.name for p in killed.parent.iterdir()] == ["dpo"]


def test_ctrl_c_after_a_checkpoint_says_which_step_was_kept(tmp_path, data, monkeypatch):
    """Stopped at step 5 with --save-every 2: the message names the checkpoint of step 4 that
    --out holds and --resume continues from, and that is what --out holds."""
    interrupt_at_step(monkeypatch, 5)
    with pytest.raises(SystemExit) as stop:
        run_train(tmp_path / "out", "--data", str(data), "--save-every", "2")
    assert str(stop.value) == (f"stopped after step 4 (Ctrl-C or SIGTERM); {tmp_path / 'out'} holds the save of step "
                               "4; --resume continues from it")
    assert torch.load(tmp_path / "out" / "resume.pt", weights_only=True)["step"] == 4
    assert [r["step"] for r in read_metrics(tmp_path / "out") if r.get("phase") == "dpo"] == [1, 2, 3, 4]


# =============================================================================
# 4. Resume, torchrun, and the options
# =============================================================================


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, data, monkeypatch):
    """--save-every 1, stopped by Ctrl-C during step 3, then `--resume --out` alone: the same
    policy, optimizer state, gradient scaler, reference log-probs and metrics (but the
    timings) as a run never stopped, compared with torch.equal. In float16, so that the scaler
    must be saved and restored (its growth tracker counts the steps), with a warmup of 2 steps
    and a linear decay, so that the schedule must resume too (from its start, step 3 would be
    warmup's lr / 2, not lr), and held-out evaluations before and after the cut."""
    options = ["--data", str(data), "--epochs", "1", "--batch-size", "2", "--save-every", "1", "--eval-fraction",
               "0.25", "--eval-every", "2", "--warmup-steps", "2", "--lr-decay", "linear", "--dtype", "float16"]
    run_train(tmp_path / "whole", *options)
    real = train.train_step
    interrupt_at_step(monkeypatch, 3)
    with pytest.raises(SystemExit, match="holds the save of step 2"):
        run_train(tmp_path / "cut", *options)
    monkeypatch.setattr(train, "train_step", real)
    train.main(["--resume", "--out", str(tmp_path / "cut")])
    whole, cut = (torch.load(tmp_path / name / "resume.pt", weights_only=True) for name in ("whole", "cut"))
    assert whole["step"] == cut["step"] == 3 and whole["scaler"] == cut["scaler"]
    assert whole["scaler"]["_growth_tracker"] == 3  # a fresh scaler after resuming would count 1
    whole_weights, cut_weights = (load_safetensors(tmp_path / name / "model.safetensors") for name in ("whole", "cut"))
    assert whole_weights.keys() == cut_weights.keys()
    assert all(torch.equal(whole_weights[k], cut_weights[k]) for k in whole_weights)
    state_a, state_b = whole["optimizer"]["state"], cut["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and all(
        torch.equal(state_a[i][k], state_b[i][k]) for i in state_a for k in state_a[i])
    assert all(torch.equal(a, b) for a, b in zip(whole["reference_logps"], cut["reference_logps"]))
    steps = [r for r in read_metrics(tmp_path / "whole") if r.get("phase") == "dpo"]
    assert max(r["grad_norm"] for r in steps) < 100  # unscaled before clipping (scaled, they would be ~65536x)
    # the summary's token counts are of the steps each process took: 3, and 1 after resuming
    leave_out = ("train_tokens", "train_positions", "out", "resume")
    assert without_times(read_metrics(tmp_path / "cut"), leave_out) == without_times(
        read_metrics(tmp_path / "whole"), leave_out)
    start = load_safetensors(tmp_path / "whole" / "reference.safetensors")
    assert not all(torch.equal(start[k], whole_weights[k]) for k in start)  # it did train


def test_resume_takes_the_run_s_options_and_refuses_options_or_pairs_that_would_change_the_numbers(tmp_path, data,
                                                                                                    monkeypatch):
    """--resume with any option that changes the numbers, given otherwise than the run had it,
    is refused in one line naming what changed, and so are other pairs, a finished run and a
    resume.pt that cannot be read or is not ours; the checkpoint in --out is left as it was.
    The options that do not change the numbers may change, and an option given as the run
    had it is no change: the run then continues."""
    out = tmp_path / "out"
    real = train.train_step
    interrupt_at_step(monkeypatch, 3)
    with pytest.raises(SystemExit, match="holds the save of step 2"):
        run_train(out, "--data", str(data), "--epochs", "1", "--save-every", "1")
    monkeypatch.setattr(train, "train_step", real)
    before = folder_bytes(out)
    other_pairs = write_pairs(tmp_path / "other.jsonl", numbered_pairs(9))
    cases = [(["--model", "gpt2", "--weights", str(out)], f"--model tiny -> gpt2, --weights None -> {out}."),
             (["--loss", "ipo"], "--loss dpo -> ipo."), (["--beta", "0.2"], "--beta 0.1 -> 0.2."),
             (["--label-smoothing", "0.1"], "--label-smoothing 0.0 -> 0.1."),
             (["--average-logps"], "--average-logps False -> True."), (["--lr", "0.002"], "--lr 0.001 -> 0.002."),
             (["--epochs", "2"], "--epochs 1 -> 2."), (["--batch-size", "4"], "--batch-size 2 -> 4."),
             (["--seed", "1"], "--seed 0 -> 1."), (["--dtype", "bfloat16"], "--dtype float32 -> bfloat16."),
             (["--warmup-steps", "1"], "--warmup-steps 0 -> 1."),
             (["--lr-decay", "linear"], "--lr-decay none -> linear."),
             (["--max-length", "100"], "--max-length None -> 100."),
             (["--eval-fraction", "0.5"], "--eval-fraction None -> 0.5."),
             (["--data", str(other_pairs)], "these are not the pairs of the run")]
    for change, message in cases:
        with pytest.raises(SystemExit) as stop:
            train.main(["--out", str(out), "--resume", *change])
        assert str(stop.value).startswith("error: --resume: ") and message in str(stop.value), change
        assert "\n" not in str(stop.value)
    assert folder_bytes(out) == before
    train.main(["--out", str(out), "--resume", "--lr", "0.001", "--epochs", "1", "--save-every", "2", "--grad-accum",
                "2", "--device", "cpu"])
    assert [r["step"] for r in read_metrics(out) if r.get("phase") == "dpo"] == [1, 2, 3, 4]
    with pytest.raises(SystemExit, match=f"the run in {out} has finished"):
        train.main(["--out", str(out), "--resume"])
    (out / "resume.pt").write_bytes(before["resume.pt"][:1000])  # cut short, as a disk can leave a copy
    with pytest.raises(SystemExit, match="resume.pt cannot be read"):
        train.main(["--out", str(out), "--resume"])
    torch.save({"step": 1}, out / "resume.pt")  # tensors and plain values, but not this project's
    with pytest.raises(SystemExit, match="resume.pt is not a checkpoint that this project saved$"):
        train.main(["--out", str(out), "--resume"])


@pytest.mark.parametrize("missing", ["resume.pt", "reference.safetensors", "model.safetensors"])
def test_resume_names_the_file_missing_from_the_run_folder_before_anything_loads(tmp_path, monkeypatch, missing):
    """--resume needs the policy, the reference and resume.pt: a run folder of this project's
    (its run.json) without one of them is refused naming it, before anything is read (the
    other files here hold no model at all, and loading the tokenizer would fail)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"program": "train.py", "options": train.DEFAULTS}))
    for name in {"resume.pt", "reference.safetensors", "model.safetensors"} - {missing}:
        (out / name).write_bytes(b"not read")
    monkeypatch.setattr(checkpoint, "load_gpt2_encoding", None)  # loading anything would be a TypeError instead
    with pytest.raises(SystemExit) as stop:
        train.main(["--out", str(out), "--resume"])
    assert str(stop.value) == (f"error: --resume: {out} holds no {missing}, so there is nothing to resume "
                               "(--save-every N saves what --resume needs)")


def test_resume_names_every_option_that_differs_in_one_line(tmp_path, data):
    out = tmp_path / "out"
    run_train(out, "--data", str(data), "--epochs", "1", "--save-every", "2")
    with pytest.raises(SystemExit) as stop:
        train.main(["--out", str(out), "--resume", "--lr", "0.5", "--seed", "3", "--grad-accum", "2"])
    assert str(stop.value) == (f"error: --resume: these options differ from the run in {out}: --lr 0.001 -> 0.5, "
                               "--seed 0 -> 3. Leave them out to take the run's, or start a new run in another --out")


def test_resume_may_move_the_folder_and_change_the_device_evaluations_saves_answers_and_micro_batches(tmp_path):
    """What --resume may change (train.RESUME_MAY_CHANGE), against a run.json written here: a
    run made in runs/old on another device, resumed from the folder it was moved to on this
    machine's device, with other --eval-every, --save-every, --answers and --grad-accum, takes
    those and the run's other options. A change that a new run's checks would refuse
    (--grad-accum 4 for steps of 2 pairs) is refused when resuming too."""
    other_device = "cuda" if train.default_device() != "cuda" else "cpu"
    options = {**train.DEFAULTS, "model": "tiny", "data": "pairs.jsonl", "eval_fraction": 0.25, "eval_every": 2,
               "save_every": 1, "lr": 1e-3, "dtype": "float32", "device": other_device, "out": "runs/old"}
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "run.json").write_text(json.dumps({"program": "train.py", "options": options}))
    args = train.parse_args(["--resume", "--out", str(moved), "--eval-every", "3", "--save-every", "5", "--answers",
                             "1", "--grad-accum", "2"])
    train.resume_options(args)
    assert (args.out, args.device, args.eval_every, args.save_every, args.answers, args.grad_accum) == (
        str(moved), train.default_device(), 3, 5, 1, 2)
    assert (args.model, args.data, args.eval_fraction, args.lr, args.batch_size, args.seed, args.resume) == (
        "tiny", "pairs.jsonl", 0.25, 1e-3, 2, 0, True)
    args = train.parse_args(["--resume", "--out", str(moved), "--grad-accum", "4"])
    with pytest.raises(ValueError, match=re.escape("--grad-accum 4 x 1 process(es) is more micro-batches than the "
                                                   "--batch-size 2 pairs")):
        train.resume_options(args)


TORCHRUN_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
import train
real = train.train
def train_and_keep(args, model, *rest):
    speed = real(args, model, *rest)
    torch.save(model.module.state_dict(), {out!r} + f"/rank{{torch.distributed.get_rank()}}.pt")
    return speed
train.train = train_and_keep
train.main(sys.argv[1:])
"""


def test_torchrun_with_two_processes_trains_what_one_process_trains(tmp_path, data, monkeypatch):
    """`torchrun --standalone --nproc_per_node=2` on the CPU (gloo), batches of 3 pairs, against
    one process (this one) with the same 2 parts of each step as micro-batches: both processes
    end with identical parameters, equal to the one process's to float rounding (far below how
    far training moved them), with the same step numbers and held-out evaluations. The last
    step of each epoch holds a single pair, so one process has none of it and must still join
    the gradient sync."""
    script = tmp_path / "keep_weights.py"
    script.write_text(TORCHRUN_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    data = write_pairs(tmp_path / "seven.jsonl", numbered_pairs(7))
    common = ["--model", "tiny", "--data", str(data), "--eval-data", str(data), "--epochs", "2", "--batch-size", "3",
              "--eval-every", "2", "--lr", "0.01"]
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(script), *common, "--out", str(tmp_path / "two")],
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
    real = train.train

    def train_and_keep(args, model, *rest):
        speed = real(args, model, *rest)
        kept.update({k: v.clone() for k, v in model.state_dict().items()})
        return speed

    monkeypatch.setattr(train, "train", train_and_keep)
    train.main([*common, "--grad-accum", "2", "--out", str(tmp_path / "one")])
    start = GPT.from_pretrained(tmp_path / "one" / "reference.safetensors").state_dict()  # where DPO began
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    difference = max((ranks[0][k] - kept[k]).abs().max().item() for k in kept)
    moved = max((kept[k] - start[k]).abs().max().item() for k in kept)
    assert difference < 1e-4 and moved > 100 * difference, (difference, moved)
    records = {name: read_metrics(tmp_path / name) for name in ("one", "two")}
    assert [r["processes"] for r in (records["one"][-1], records["two"][-1])] == [1, 2]
    steps, evals = ([[r for r in rs if r.get("phase") == phase] for rs in records.values()] for phase in ("dpo", "eval"))
    assert [r["step"] for r in steps[0]] == [r["step"] for r in steps[1]] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals[0]] == [r["step"] for r in evals[1]] == [0, 2, 4, 6]
    for a, b in [*zip(*steps), *zip(*evals)]:
        assert a.keys() == b.keys() and all(a[k] == (b[k] if isinstance(b[k], str) else
                                                     pytest.approx(b[k], rel=1e-4, abs=1e-6)) for k in a)


@pytest.mark.parametrize("options, message", [
    (["--epochs", "0"], "argument --epochs: must be a finite number > 0"),
    (["--batch-size", "0"], "argument --batch-size: must be a finite number > 0"),
    (["--beta", "-0.1"], "argument --beta: must be a finite number > 0"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0"),
    (["--eval-fraction", "1.5"], "argument --eval-fraction: must be between 0 and 1"),
    (["--eval-fraction", "0.1", "--eval-data", "x.jsonl"], "not allowed with argument"),
    (["--eval-every", "2"], "--eval-every evaluates held-out pairs"),
    (["--label-smoothing", "0.7"], "--label-smoothing must be in [0, 0.5), got 0.7"),
    (["--loss", "ipo", "--label-smoothing", "0.1"], "--label-smoothing is for --loss dpo"),
    (["--init", "random"], "--model tiny is always built here"),
    (["--warmup-steps", "-1"], "--warmup-steps must be 0 or more"),
    (["--grad-accum", "4"], "--grad-accum 4 x 1 process(es) is more micro-batches than the --batch-size 2 pairs"),
    (["--out", __file__], "is a file; --out must be a folder"),
    (["--out", __file__ + "/sub"], "is a file; --out must be a folder"),
    pytest.param(["--device", "cuda"], "this torch sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_options_are_refused_with_a_message(options, message, tmp_path, capsys):
    """Nonsensical options stop the script at once (argparse's exit code 2) with what was wrong."""
    with pytest.raises(SystemExit) as stop:
        train.main(["--model", "tiny", "--data", "x.jsonl", "--out", str(tmp_path / "out"), *options])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_data_is_required_and_resume_needs_a_run_of_this_project(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(["--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and "--data is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        train.main(["--out", str(tmp_path / "out"), "--resume"])
    assert str(stop.value) == f"error: --resume: {tmp_path / 'out'} holds no resume.pt, so there is nothing to " \
                              "resume (--save-every N saves what --resume needs)"
    assert not (tmp_path / "out").exists()


def test_resume_of_a_folder_that_is_not_there_leaves_no_folder_it_made(tmp_path):
    """main's promise: "A run that fails leaves --out as it was, and no folder it made for it".
    --resume --out runs/may/out, a path that is not there (a typo): prepare_run_folder makes runs/
    and runs/may/, then check_out refuses (no resume.pt) before run() has stored the folders it
    made in status["created"], so main's finally cannot remove them."""
    with pytest.raises(SystemExit, match="holds no resume.pt"):
        train.main(["--out", str(tmp_path / "runs" / "may" / "out"), "--resume"])
    assert list(tmp_path.iterdir()) == []
