"""
Tests of GPT.generate's key/value cache (model.py) and of bench.py's generation rows.

    python -m pytest test_generate.py          (a few seconds; no network)

Index: claim -> the test that proves it.
- With the cache, the logits of a prompt and of each token after it are the full forward
  pass's, and the numpy GPT-2's -> test_cached_logits_equal_the_full_forward_and_numpy_at_every_step
- Greedy tokens are those of a plain loop of full forward passes and argmax, also once the
  window slides past block_size -> test_greedy_tokens_with_the_cache_equal_a_loop_of_full_forwards_and_argmax
- A cache takes a prompt, then one token at a time, within block_size
    -> test_a_cache_refuses_several_tokens_at_once_and_positions_past_block_size
- The same generator seed gives the same sample, whatever the global seed; another seed another
    -> test_the_same_generator_seed_gives_the_same_tokens_and_another_seed_other_tokens
- stop sees the new tokens after each step and ends generation at the first True
    -> test_stop_sees_the_new_tokens_after_each_step_and_ends_at_the_first_true
- The same greedy tokens as transformers' generate on the same weights (when installed)
    -> test_greedy_tokens_equal_transformers_generate_on_the_same_weights
- bench.py's recomputing loop and its three-way row agree with GPT.generate
    -> test_bench_recompute_loop_gives_the_tokens_of_cached_generate, test_bench_generation_rows_...

The tiny GPT-2 and the numpy GPT-2 are test_dpo.py's (section 3): random weights in the
hub's layout, put into GPT by the test's own reading of the layout. Tests of greedy tokens use
lively_gpt instead, whose greedy continuations do not settle on one token.
"""

import numpy as np
import pytest
import torch

import bench
from model import GPT, GPTConfig
from test_dpo import gpt_holding, numpy_logits, random_tokens, tiny  # noqa: F401 (tiny is a fixture)


def lively_gpt(block_size=32, vocab_size=61, std=1.0, seed=0):
    """A tiny GPT whose greedy continuation keeps changing: every weight drawn from N(0, std^2).
    At GPT-2's initialisation (and with test_dpo.py's tiny weights) greedy decoding soon repeats
    one token whatever it sees, and then a test of the context (a cache that lost a position, a
    window that slid wrongly) could not fail."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=16))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def n_distinct(tokens):
    """The fewest distinct tokens in any row of tokens (B, n)."""
    return min(len(set(row)) for row in tokens.tolist())


def full_forward_greedy(model, idx, n_new):
    """The definition of greedy decoding: the whole sequence (its last block_size tokens) through
    the model for every new token, and the argmax of the last position's logits."""
    for _ in range(n_new):
        with torch.no_grad():
            logits = model(idx[:, -model.config.block_size:])  # (B, T, V)
        idx = torch.cat((idx, logits[:, -1].argmax(dim=-1, keepdim=True)), dim=1)
    return idx


# ---------------------------------------------------------------------------
# The cache computes what the full forward pass computes.

def test_cached_logits_equal_the_full_forward_and_numpy_at_every_step(tiny):
    """A 5-token prompt into an empty cache, then 6 tokens one at a time (B=2): at every step the
    new position's logits are the full forward pass's on the whole sequence so far (to float32
    rounding) and the numpy GPT-2's (float64, to 1e-5 as in test_dpo.py). The prompt's logits
    match at every position, which the causal mask decides. After each step every layer's cache
    holds the keys and values of all positions so far: (B, n_head, T_seen, head size)."""
    config, params = tiny
    model = gpt_holding(params)
    seq = torch.as_tensor(random_tokens(B=2, T=11, seed=3))  # the prompt, then the tokens fed one by one
    cache = model.new_cache()
    with torch.no_grad():
        steps = [(model(seq[:, :5], cache=cache), 5)]  # (B, 5, V)
        for t in range(5, 11):
            steps.append((model(seq[:, t:t + 1], cache=cache), t + 1))  # (B, 1, V)
            assert all(layer["k"].shape == layer["v"].shape == (2, 2, t + 1, 8) for layer in cache)
        full = model(seq)  # (B, 11, V)
    expected = numpy_logits(params, config["n_head"], seq.numpy())  # (B, 11, V)
    for logits, seen in steps:
        new = slice(seen - logits.size(1), seen)  # the positions this step computed
        torch.testing.assert_close(logits, full[:, new], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logits.double().numpy(), expected[:, new], rtol=0, atol=1e-5)


def test_greedy_tokens_with_the_cache_equal_a_loop_of_full_forwards_and_argmax():
    """B=2, 20 new tokens after a 5-token prompt, and after a 22-token one: then the window slides
    past block_size 32 after 10 steps, and from there on generate starts a fresh cache at every
    step (positions are absolute). Each row's new tokens take at least 4 values, so that they
    follow the context."""
    model = lively_gpt()
    for prompt_len in (5, 22):
        prompt = torch.as_tensor(random_tokens(B=2, T=prompt_len, seed=prompt_len))
        out = model.generate(prompt, max_new_tokens=20, temperature=0)
        assert out.tolist() == full_forward_greedy(model, prompt, 20).tolist()
        assert n_distinct(out[:, prompt_len:]) >= 4


def test_a_cache_refuses_several_tokens_at_once_and_positions_past_block_size(tiny):
    """After the prompt, only a single new token may attend to the cache without a mask; and wpe
    has block_size rows, so the cache cannot grow past them (generate slides the window instead)."""
    _, params = tiny
    model = gpt_holding(params)
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, 30, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="one token at a time"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)  # position 31, the last there is
        with pytest.raises(ValueError, match="33.*block_size 32"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


# ---------------------------------------------------------------------------
# Sampling: the generator, and stopping early.

def test_the_same_generator_seed_gives_the_same_tokens_and_another_seed_other_tokens(tiny):
    """Sampling at temperature 1 draws from the generator it is given, not from torch's global
    one: the global seed changes between the calls and the same generator seed still gives the
    same 20 tokens in both rows; another generator seed gives other tokens."""
    _, params = tiny
    model = gpt_holding(params)
    prompt = torch.as_tensor(random_tokens(B=2, T=5))

    def sample(generator_seed, global_seed):
        torch.manual_seed(global_seed)
        return model.generate(prompt, 20, generator=torch.Generator().manual_seed(generator_seed)).tolist()
    with torch.random.fork_rng():
        assert sample(0, global_seed=1) == sample(0, global_seed=2)
        assert sample(0, global_seed=1) != sample(1, global_seed=1)


def test_stop_sees_the_new_tokens_after_each_step_and_ends_at_the_first_true():
    """stop gets the (B, n) tokens generated so far after each step, n = 1, 2, ...; a stop that says
    True once row 0's newest token is a given one (as a caller's would at <|endoftext|>) ends
    generation right after that token first appears. The token is the greedy loop's third new one
    in row 0. A stop that never says True changes nothing."""
    model = lively_gpt()
    prompt = torch.as_tensor(random_tokens(B=2, T=5, seed=9))
    expected = full_forward_greedy(model, prompt, 10)
    token = expected[0, 7].item()
    n_stop = expected[0, 5:].tolist().index(token) + 1  # 3, or earlier if the token came before
    seen = []

    def stop_at_token(new):
        seen.append(new.clone())
        return new[0, -1].item() == token
    out = model.generate(prompt, 10, temperature=0, stop=stop_at_token)
    assert out.tolist() == expected[:, :5 + n_stop].tolist()
    assert [s.tolist() for s in seen] == [expected[:, 5:5 + n].tolist() for n in range(1, n_stop + 1)]
    assert model.generate(prompt, 10, temperature=0, stop=lambda new: False).tolist() == expected.tolist()


# ---------------------------------------------------------------------------
# Against transformers' generate, on the same weights.

def test_greedy_tokens_equal_transformers_generate_on_the_same_weights(tmp_path):
    """GPT-2's vocabulary (50257, so that transformers' <|endoftext|> is a real token) with tiny
    sizes; weights drawn far from their initialisation, so that logits are spread and greedy's
    choice is no near-tie that float rounding could flip. save_pretrained's files, loaded by
    transformers' GPT2LMHeadModel: 24 greedy tokens after a 16-token prompt, B=2, the same ids."""
    transformers = pytest.importorskip("transformers", reason="cross-check needs the transformers package")
    model = lively_gpt(block_size=64, vocab_size=50257, std=0.3)
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    prompt = torch.as_tensor(random_tokens(B=2, T=16, V=50257))
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                         eos_token_id=None, pad_token_id=50256)
    ours = model.generate(prompt, 24, temperature=0)
    assert ours.tolist() == theirs.tolist()
    assert n_distinct(ours[:, 16:]) >= 2


# ---------------------------------------------------------------------------
# bench.py's generation rows.

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
