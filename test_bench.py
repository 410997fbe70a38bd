"""
bench.py, proven: the three steps it times compute what they say (no timing is asserted),
and the pairs it writes for timing train.py are the lengths it says.

    python -m pytest test_bench.py

A tiny GPT in float64 instead of GPT-2 124M, so that two ways of computing the same numbers
agree to round-off and the tests take seconds.
"""

import copy
import sys

import pytest
import torch

import bench
import dpo
import train
from model import GPTConfig
from test_dpo import gpt2_tokenizer, random_tokens
from test_sample import lively_gpt, n_distinct

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
    """ru_maxrss is in KiB on Linux; train.peak_memory_bytes, which bench reports, is in bytes:
    the process's high-water mark, which /proc/self/status also gives as VmHWM (in kB), times 1024."""
    with open("/proc/self/status") as f:
        vm_hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    peak = train.peak_memory_bytes(torch.device("cpu"))
    assert abs(peak - 1024 * vm_hwm) < 4_000_000  # the kernel's two readings of it round a little apart


def test_written_pairs_load_as_data_with_the_token_counts_the_docstring_gives(tmp_path):
    """bench.py --write-pairs makes a --data file: train.read_pairs reads every pair; with
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
    encoded = train.read_pairs(tmp_path / "pairs.jsonl", enc).tokens
    assert len(encoded) == 300
    prompts = [len(p) for p, _, _ in encoded]
    completions = [len(c) for _, c, _ in encoded] + [len(r) for _, _, r in encoded]
    assert 14 <= min(prompts) < 30 and 130 < max(prompts) <= 146
    assert 5 <= min(completions) < 20 and 135 < max(completions) <= 151
    bench.main(["--write-pairs", "20", str(tmp_path / "same.jsonl"), "--same-length"])
    same = train.read_pairs(tmp_path / "same.jsonl", enc).tokens
    assert {(len(p), len(c), len(r)) for p, c, r in same} == {(80, 78, 78)}
    assert len({tuple(c) for _, c, _ in same}) == 20  # one length, not one text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.jsonl", "other.jsonl", "pairs.jsonl", "same.jsonl"]


# ---------------------------------------------------------------------------
# bench.py --generation: greedy tokens with the cache, recomputing, and transformers.

def test_bench_recompute_loop_gives_the_tokens_of_cached_generate():
    """The loop bench.py times against the cache computes the same greedy tokens, also past
    block_size (12 + 30 tokens > 32), so that it times the same work."""
    model = lively_gpt()
    prompt = torch.as_tensor(random_tokens(B=1, T=12, seed=5))
    with torch.no_grad():
        recomputed = bench.recompute_generate(model, prompt, 30)
    assert recomputed.tolist() == model.generate(prompt, 30, temperature=0).tolist()
    assert n_distinct(recomputed[:, 12:]) >= 5


def test_bench_generation_rows_time_every_way_and_check_their_ids(monkeypatch, capsys):
    """bench.py --generation on a tiny GPT (its sizes swapped in): one time per way (transformers'
    only where installed), each way's ids the same, and a printed row for each."""
    monkeypatch.setattr(bench, "GPTConfig", lambda: GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=16))
    seconds, ids = bench.main(["--generation", "--prompt-len", "8", "--new-tokens", "6", "--rounds", "1",
                               "--device", "cpu"])
    assert set(seconds) == set(ids) and {"cache", "recompute"} <= set(ids)
    assert all(t.shape == (1, 14) and torch.equal(t, ids["cache"]) for t in ids.values())
    assert "tokens/s cache / recompute" in capsys.readouterr().out
