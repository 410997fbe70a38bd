"""
Talking to a trained model, proven: GPT.generate's key/value cache (model.py), train.py's
answers and DPO's verdict on them, and sample.py, as a user runs it.

    python -m pytest test_sample.py

Index: claim -> the test that proves it.
- With the cache, the logits of a prompt and of each token after it are the full forward
  pass's, and the numpy GPT-2's -> test_cached_logits_equal_the_full_forward_and_numpy_at_every_step
- Greedy tokens are those of a plain loop of full forward passes and argmax, also once the
  window slides past block_size, and transformers' (when installed)
    -> test_greedy_tokens_with_the_cache_equal_a_loop_of_full_forwards_and_argmax,
       test_greedy_tokens_equal_transformers_generate_on_the_same_weights
- The same seed gives the same text; generation stops at <|endoftext|> and before a stop string
    -> test_the_same_generator_seed_gives_the_same_tokens_..., test_complete_stops_at_endoftext_...
- An answer's reward is beta (log pi(y|x) - log pi_ref(y|x)) of the answer as a completion
    -> test_compare_rewards_are_beta_times_the_log_ratio_of_each_answer_from_full_logits
- Every run folder rebuilds its reference: by name (a GPT-2 size) or from reference.safetensors
    -> test_every_kind_of_run_folder_rebuilds_the_reference_it_trained_against
- A saved folder opens in transformers, tokenizer included, and says what sample.py says
    -> test_transformers_loads_a_run_folder_and_generates_sample_py_s_greedy_text
- Bad input is one line, a non-zero exit and no traceback -> test_sample_py_refuses_bad_input_in_one_line

The tiny GPT-2 and the numpy GPT-2 are test_dpo.py's (section 3): random weights in the
hub's layout, put into GPT by the test's own reading of the layout. Tests of greedy tokens use
lively_gpt instead, whose greedy continuations do not settle on one token.
"""

import json
import shutil

import numpy as np
import pytest
import torch

import dpo
import sample
import train
from model import GPT, GPTConfig
from test_dpo import gpt2_tokenizer, gpt_holding, numpy_logits, random_tokens, tiny  # noqa: F401 (tiny: a fixture)
from test_train import numbered_pairs, write_pairs


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
# Answers: train.complete and train.compare.

class Scripted(GPT):
    """A GPT that says `script` (token ids) after any prompt, one token per step, whatever it
    is shown: its logits put 0 on the scripted token and -10 elsewhere. It counts its forward
    passes, so that a test sees when generation stopped."""

    def __init__(self, script):
        super().__init__(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=1, n_embd=4))
        self.script, self.calls = script, 0

    def forward(self, idx, logits_at=None, cache=None):
        logits = torch.full((idx.size(0), self.config.vocab_size), -10.0)
        logits[:, self.script[min(self.calls, len(self.script) - 1)]] = 0.0
        self.calls += 1
        return logits


def test_complete_stops_at_endoftext_and_before_a_stop_string_and_no_later():
    """complete's answer is the tokens before <|endoftext|>, or, after a prompt that ends at
    HH-RLHF's assistant turn, the tokens before the one a "\n\nHuman:" begins in; generation
    ends at the token that completes it (the model is asked for no more)."""
    enc = gpt2_tokenizer()
    words = enc.encode(" It is salty.\n\nHuman: Why?")
    model = Scripted(words + [enc.eot_token] + enc.encode(" More"))
    assert train.complete(model, enc, "Hi", max_new_tokens=30) == [words]
    assert model.calls == len(words) + 1  # up to <|endoftext|>, then no further
    model.calls = 0
    (stopped,) = train.complete(model, enc, "\n\nHuman: Hi\n\nAssistant:", max_new_tokens=30)  # an HH prompt
    assert enc.decode(stopped) == " It is salty." and stopped == enc.encode(" It is salty.")
    assert model.calls == len(enc.encode(" It is salty.\n\nHuman:"))  # the token that completed the stop string
    model.calls = 0
    assert train.complete(model, enc, "Hi", max_new_tokens=3) == [words[:3]] and model.calls == 3


def test_only_a_prompt_that_ends_at_the_assistant_s_turn_stops_before_the_human_s_next_one():
    """A prompt with an assistant's turn inside it that does not end at one (here the start of
    the assistant's answer, to be continued) is no HH-RLHF prompt waiting for an answer: its
    answer runs on through "\n\nHuman:" to <|endoftext|>, as after any text."""
    enc = gpt2_tokenizer()
    words = enc.encode(" It is salty.\n\nHuman: Why?")
    model = Scripted(words + [enc.eot_token])
    assert train.complete(model, enc, "\n\nHuman: Is the sea salty?\n\nAssistant: Yes.", max_new_tokens=30) == [
        words]


@pytest.fixture(scope="module")
def a_run(tmp_path_factory):
    """A train.py run of the tiny model with held-out pairs: (its folder, the data file)."""
    gpt2_tokenizer()
    tmp = tmp_path_factory.mktemp("run")
    data = write_pairs(tmp / "pairs.jsonl", numbered_pairs(12))
    train.main(["--model", "tiny", "--data", str(data), "--eval-fraction", "0.25", "--epochs", "2", "--lr", "0.01",
                "--answers", "2", "--out", str(tmp / "out")])
    return tmp / "out", data


def test_compare_rewards_are_beta_times_the_log_ratio_of_each_answer_from_full_logits(a_run):
    """train.compare's rewards, against an independent computation: for each answer, the prompt's
    and the answer's tokens and <|endoftext|> through each model's full forward pass, the log-probs
    of the answer's tokens and of <|endoftext|> summed by dpo.sequence_logps, then beta times the
    policy's minus the reference's (DPO paper, Eq. 5). Also with --average-logps' mean."""
    out, _ = a_run
    enc = gpt2_tokenizer()
    policy, reference, loss = sample.load(str(out), torch.device("cpu"), compare=True)
    for loss in (loss, dpo.LossConfig(beta=0.3, average_logps=True)):
        (record,) = train.compare(policy, reference, enc, "Item 3: red green", loss, max_new_tokens=8)
        for who in ("policy", "reference"):
            prompt_ids, answer_ids = enc.encode("Item 3: red green"), enc.encode(record[who]) + [enc.eot_token]
            assert enc.decode(answer_ids[:-1]) == record[who]  # these short answers re-encode to the same tokens
            ids = torch.tensor([prompt_ids + answer_ids])
            mask = torch.tensor([[0.0] * len(prompt_ids) + [1.0] * len(answer_ids)])
            with torch.no_grad():
                logps = [dpo.sequence_logps(model(ids), ids, mask, loss.average_logps).item()
                         for model in (policy, reference)]
            assert record[who + "_reward"] == pytest.approx(loss.beta * (logps[0] - logps[1]), rel=1e-5, abs=1e-6)
        assert record["policy_reward"] != 0.0  # the policy did move


def test_compare_scores_the_tokens_generated_not_their_text_encoded_again(a_run, monkeypatch):
    """Answers whose tokens do not come back from their text (" " then "a", which encodes
    as the one token " a"; "c" then "at", which is "cat"): each reward is beta (log pi - log
    pi_ref) of exactly the tokens generated and <|endoftext|>, by each model's full forward
    pass, as training scores a completion; the text encoded again would be another sequence."""
    out, _ = a_run
    enc = gpt2_tokenizer()
    policy, reference, loss = sample.load(str(out), torch.device("cpu"), compare=True)
    generated = {policy: [enc.encode(" ")[0], enc.encode("a")[0]], reference: enc.encode("c") + enc.encode("at")}
    assert all(enc.encode(enc.decode(tokens)) != tokens for tokens in generated.values())
    monkeypatch.setattr(train, "complete", lambda model, enc, prompt, **sampling: [generated[model]])
    (record,) = train.compare(policy, reference, enc, "Item 3: red green", loss, max_new_tokens=8)
    assert (record["policy"], record["reference"]) == (" a", "cat")
    prompt_ids = enc.encode("Item 3: red green")
    for who, model in (("policy", policy), ("reference", reference)):
        answer_ids = generated[model] + [enc.eot_token]
        ids = torch.tensor([prompt_ids + answer_ids])
        mask = torch.tensor([[0.0] * len(prompt_ids) + [1.0] * len(answer_ids)])
        with torch.no_grad():
            logps = [dpo.sequence_logps(m(ids), ids, mask).item() for m in (policy, reference)]
        assert record[who + "_reward"] == pytest.approx(loss.beta * (logps[0] - logps[1]), rel=1e-5, abs=1e-6)


def test_answers_at_the_end_are_to_the_first_distinct_held_out_prompts_each_as_long_as_the_context_allows(
        monkeypatch):
    """answer_held_out with --answers 3, a GPT of block_size 80 and GPT-2's tokenizer: the first
    three distinct held-out prompts, not training prompts; each asked for min(64, 80 - prompt - 1)
    new tokens, so that the answer and its <|endoftext|> fit the context to be scored (a prompt
    of 4 tokens gets 64, one of 76 gets 3), and a prompt that leaves no room (79 tokens) is skipped."""
    enc = gpt2_tokenizer()
    torch.manual_seed(0)
    policy = GPT(GPTConfig(block_size=80, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)).eval()
    reference = dpo.make_reference(policy)
    long, too_long = "Item 6:" + " a" * 73, "Item 7:" + " a" * 76  # " a" is one token, "Item 6:" three
    assert [len(enc.encode(p)) for p in ("Item 5: red", long, too_long)] == [4, 76, 79]
    held_out = train.Pairs([{"prompt": p} for p in ("Item 5: red", "Item 5: red", too_long, long, "Item 8")], [],
                           "eval.jsonl")
    training = train.Pairs([{"prompt": "Item 0: red"}], [], "pairs.jsonl")
    args = train.complete_options({"model": "tiny", "answers": 3}, train.DEFAULTS)
    asked, real = [], train.compare

    def compare(policy, reference, enc, prompt, loss_config, **sampling):
        asked.append((prompt, sampling["max_new_tokens"]))
        return real(policy, reference, enc, prompt, loss_config, **sampling)

    monkeypatch.setattr(train, "compare", compare)
    records = train.answer_held_out(args, policy, reference, enc, training, held_out)
    assert asked == [("Item 5: red", 64), (long, 3)]
    assert [r["prompt"] for r in records] == ["Item 5: red", long]


def test_a_run_answers_held_out_prompts_and_keeps_the_answers(a_run, capsys):
    """At the end of a run, the first --answers held-out prompts answered greedily by both models,
    with their rewards: printed, and in answers.jsonl exactly what compare gives again."""
    out, _ = a_run
    records = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(records) == 2 and set(records[0]) == {"prompt", "policy", "reference", "policy_reward",
                                                     "reference_reward"}
    held_out = {r["prompt"] for r in records}
    assert held_out <= {p["prompt"] for p in numbered_pairs(12)}
    policy, reference, loss = sample.load(str(out), torch.device("cpu"), compare=True)
    again = train.compare(policy, reference, gpt2_tokenizer(), records[0]["prompt"], loss)
    assert again == records[:1]


# ---------------------------------------------------------------------------
# The reference, in every kind of run folder.

def gpt2_in_the_hub_cache(cache_dir):
    """A 'gpt2' in a Hugging Face cache, as from_pretrained finds it offline: GPT-2's vocabulary,
    tiny sizes (config.json says them), random weights."""
    torch.manual_seed(7)
    model = GPT(GPTConfig(block_size=1024, n_layer=1, n_head=2, n_embd=16))
    snapshot = cache_dir / "models--openai-community--gpt2" / "snapshots" / "abc123"
    model.save_pretrained(snapshot)
    (cache_dir / "models--openai-community--gpt2" / "refs").mkdir()
    (cache_dir / "models--openai-community--gpt2" / "refs" / "main").write_text("abc123")
    return model


def test_every_kind_of_run_folder_rebuilds_the_reference_it_trained_against(tmp_path, monkeypatch):
    """run.json says where the reference is, and sample.py's load rebuilds it: by name for a
    pretrained GPT-2 size (here 'gpt2' from an offline Hugging Face cache), from
    reference.safetensors for the tiny model, --weights, and any run with --save-every (the
    toy's SFT'd model: test_dpo.py's test_toy_metrics_file_has_every_step_and_a_summary).
    Each time it equals the policy before training, weight for weight. (--init random, GPT-2's
    shapes with random weights, takes the tiny model's path:
    test_only_a_pretrained_gpt2_size_is_a_reference_by_name.)"""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gpt2 = gpt2_in_the_hub_cache(tmp_path / "hub")
    data = write_pairs(tmp_path / "pairs.jsonl", numbered_pairs(6))
    common = ["--data", str(data), "--epochs", "1", "--lr", "0.01", "--answers", "0"]
    runs = {"gpt2 by name": (["--model", "gpt2"], "gpt2", gpt2.state_dict()),
            "gpt2, --save-every": (["--model", "gpt2", "--save-every", "100"], "reference.safetensors",
                                   gpt2.state_dict()),
            "--weights": (["--model", "gpt2", "--weights", str(tmp_path / "hub" / "models--openai-community--gpt2" /
                                                           "snapshots" / "abc123")],
                          "reference.safetensors", gpt2.state_dict()),
            "tiny": (["--model", "tiny"], "reference.safetensors", None)}
    for name, (options, where, expected) in runs.items():
        out = tmp_path / name.replace(" ", "_")
        train.main([*common, *options, "--out", str(out)])
        assert json.loads((out / "run.json").read_text())["reference"] == where, name
        assert (out / "reference.safetensors").exists() == (where == "reference.safetensors"), name
        _, reference, loss = sample.load(str(out), torch.device("cpu"), compare=True)
        if expected is None:  # random weights: the run's seed made them
            torch.manual_seed(0)
            expected = train.load_policy("tiny", None, "pretrained", "cpu").state_dict()
        assert all(torch.equal(reference.state_dict()[k], expected[k]) for k in expected), name
        assert loss == dpo.LossConfig()


@pytest.mark.parametrize("model, weights, init, name", [
    ("gpt2", None, "pretrained", "gpt2"), ("gpt2-xl", None, "pretrained", "gpt2-xl"),
    ("gpt2", "my/model.safetensors", "pretrained", None), ("gpt2", None, "random", None),
    ("tiny", None, "pretrained", None)])
def test_only_a_pretrained_gpt2_size_is_a_reference_by_name(model, weights, init, name):
    """Any other reference is weights that no name loads again: they are kept in the folder."""
    args = train.complete_options({"model": model, "weights": weights, "init": init}, train.DEFAULTS)
    assert train.reference_by_name(args) == name


# ---------------------------------------------------------------------------
# sample.py, as a user runs it.

def run_sample(capsys, *argv):
    """sample.py's main in this process; what it printed."""
    sample.main([str(a) for a in argv])
    return capsys.readouterr().out


def test_sample_py_answers_prompts_from_the_command_line_and_from_a_data_file(a_run, capsys):
    """--prompt and --prompts (a --data file: each distinct prompt once, in order) answered by
    the policy, greedy by default; --json gives one {prompt, completion} object per answer, the
    same answers; --chat wraps a prompt in HH-RLHF's turns."""
    out, data = a_run
    printed = run_sample(capsys, out, "--prompt", "Item 1: red", "--max-new-tokens", "6")
    (line,) = printed.splitlines()
    assert line.startswith("'Item 1: red' -> ")
    records = [json.loads(x) for x in run_sample(capsys, out, "--prompts", data, "--max-new-tokens", "6",
                                                  "--json").splitlines()]
    assert [r["prompt"] for r in records] == [p["prompt"] for p in numbered_pairs(12)]
    enc = gpt2_tokenizer()
    policy = GPT.from_pretrained(out)
    assert records[1]["completion"] == enc.decode(train.complete(policy, enc, "Item 1: red", max_new_tokens=6)[0])
    assert line == f"'Item 1: red' -> {records[1]['completion']!r}"
    (chat,) = [json.loads(x) for x in run_sample(capsys, out, "--prompt", "Hi", "--chat", "--json",
                                                 "--max-new-tokens", "4").splitlines()]
    assert chat["prompt"] == "\n\nHuman: Hi\n\nAssistant:"


def test_prompts_of_a_file_are_each_distinct_prompt_once_whatever_the_shape_of_its_record(tmp_path):
    """read_prompts, against the prompts written out by hand: a pair's prompt and a bare
    "prompt" are the same prompt, and so are TRL's messages and the HH dialogues that begin
    with them (which end at the assistant's turn, "\n\nAssistant:"); each comes once, in the
    order of its first line."""
    ask = {"role": "user", "content": "Is the sea salty?"}
    hh = "\n\nHuman: Is the sea salty?\n\nAssistant:"
    path = write_pairs(tmp_path / "prompts.jsonl", [
        {"prompt": "Hello", "chosen": " a", "rejected": " b"}, {"prompt": "Hello"}, {"prompt": [ask]},
        {"chosen": hh + " Yes.", "rejected": hh + " No."}, {"prompt": [ask], "chosen": [{"role": "assistant",
                                                                                       "content": "Yes."}],
                                                             "rejected": [{"role": "assistant", "content": "No."}]},
        {"prompt": "Bye"}])
    assert sample.read_prompts(path) == ["Hello", hh, "Bye"]


def test_sample_py_refuses_a_prompt_and_answer_one_token_longer_than_the_context(a_run, capsys, monkeypatch):
    """A prompt of 100 tokens (" a" is one) in a context of 1024: an answer of up to 923 tokens
    and its <|endoftext|>, which --compare scores with it, fit exactly; 924 do not, and are
    refused before anything is generated (generation is replaced here: it is not what is tested)."""
    out, _ = a_run
    monkeypatch.setattr(train, "complete", lambda model, enc, prompt, **sampling: [[]])
    assert run_sample(capsys, out, "--prompt", " a" * 100, "--max-new-tokens", "923") == f"{' a' * 100!r} -> ''\n"
    with pytest.raises(SystemExit) as stop:
        run_sample(capsys, out, "--prompt", " a" * 100, "--max-new-tokens", "924")
    assert str(stop.value).startswith("error: a prompt of 100 tokens and --max-new-tokens 924 do not fit the model's "
                                      "context of 1024 tokens")


def test_sample_py_json_keeps_text_that_is_not_ascii_as_it_is(a_run, capsys):
    """--json writes UTF-8 as it is, readable in a terminal ("café", not "caf\\u00e9"), and
    json.loads gives the same text back."""
    out, _ = a_run
    (line,) = run_sample(capsys, out, "--prompt", "Un café", "--max-new-tokens", "2", "--json").splitlines()
    assert '"prompt": "Un café"' in line and json.loads(line)["prompt"] == "Un café"


def test_sample_py_sampling_repeats_with_its_seed(a_run, capsys):
    """--temperature 1 --num-samples 3: three answers; the same --seed prints the same text, another seed other text."""
    out, _ = a_run
    argv = [out, "--prompt", "Item 2:", "--temperature", "1", "--top-k", "50", "--num-samples", "3", "--json"]
    first = run_sample(capsys, *argv, "--seed", "1")
    assert len(first.splitlines()) == 3
    assert run_sample(capsys, *argv, "--seed", "1") == first
    assert run_sample(capsys, *argv, "--seed", "2") != first


def test_sample_py_compare_prints_both_answers_and_their_rewards(a_run, capsys):
    """--compare --json: {prompt, policy, reference, policy_reward, reference_reward}, as compare gives them."""
    out, _ = a_run
    (record,) = [json.loads(x) for x in run_sample(capsys, out, "--prompt", "Item 5:", "--compare", "--json",
                                                   "--max-new-tokens", "8").splitlines()]
    policy, reference, loss = sample.load(str(out), torch.device("cpu"), compare=True)
    assert [record] == train.compare(policy, reference, gpt2_tokenizer(), "Item 5:", loss, max_new_tokens=8)
    printed = run_sample(capsys, out, "--prompt", "Item 5:", "--compare", "--max-new-tokens", "8")
    assert printed == (f"  'Item 5:'\n    reference  reward {record['reference_reward']:+8.3f}  {record['reference']!r}\n"
                       f"    policy     reward {record['policy_reward']:+8.3f}  {record['policy']!r}\n")


@pytest.mark.parametrize("argv, message", [
    (["missing-run", "--prompt", "x"], "missing-run: no such file or folder, and not a GPT-2 size (gpt2, gpt2-medium"),
    (["EMPTY", "--prompt", "x"], "holds no model.safetensors"),
    (["RUN", "--prompt", ""], "--prompt is empty"),
    (["RUN"], "nothing to answer: give --prompt TEXT or --prompts FILE"),
    (["RUN", "--prompt", " a" * 1000], "a prompt of 1000 tokens and --max-new-tokens 64 do not fit the model's context"),
    (["RUN", "--prompt", "x <|endoftext|>"], "holds a special token such as '<|endoftext|>'"),
    (["RUN", "--prompt", "x", "--top-k", "0"], "argument --top-k: must be a finite number > 0, got 0"),
    (["RUN", "--prompt", "x", "--temperature", "-1"], "--temperature must be 0 (greedy) or more, got -1.0"),
    (["MODEL_ONLY", "--prompt", "x", "--compare"], "is not a run folder of this project's, so there is no reference"),
    (["EARLIER", "--prompt", "x", "--compare"], "was saved by an earlier version of this project, which did not keep"),
    (["RUN", "--prompts", "NOT_PAIRS"], "line 1: no \"prompt\" text"),
])
def test_sample_py_refuses_bad_input_in_one_line(a_run, tmp_path, capsys, argv, message):
    """Each bad input: a non-zero exit and one line naming the problem and what to do, no traceback."""
    out, _ = a_run
    (tmp_path / "empty").mkdir()
    only_model = tmp_path / "model_only"
    for name in ("config.json", "model.safetensors"):
        (only_model / name).parent.mkdir(exist_ok=True)
        shutil.copy(out / name, only_model / name)
    earlier = tmp_path / "earlier"  # what an earlier version saved: no run.json, no reference
    shutil.copytree(only_model, earlier)
    shutil.copy(out / "metrics.jsonl", earlier / "metrics.jsonl")
    (tmp_path / "not_pairs.jsonl").write_text('{"question": "x"}\n')
    places = {"RUN": out, "EMPTY": tmp_path / "empty", "MODEL_ONLY": only_model, "EARLIER": earlier,
              "NOT_PAIRS": tmp_path / "not_pairs.jsonl"}
    with pytest.raises(SystemExit) as stop:
        sample.main([str(places.get(a, a)) for a in argv])
    text = str(stop.value) if isinstance(stop.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code != 0 and message in text and "\n" not in text and "Traceback" not in text


# ---------------------------------------------------------------------------
# transformers opens what a run saves, tokenizer included.

def test_transformers_loads_a_run_folder_and_generates_sample_py_s_greedy_text(a_run):
    """AutoTokenizer and AutoModelForCausalLM on the run folder alone: the tokenizer encodes the
    prompt as tiktoken does, and greedy generate gives sample.py's text."""
    transformers = pytest.importorskip("transformers", reason="cross-check needs the transformers package")
    out, _ = a_run
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = "Item 7: red green blue cold"
    assert tokenizer(prompt)["input_ids"] == gpt2_tokenizer().encode(prompt)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    generated = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id)[0, ids.size(1):].tolist()
    theirs = tokenizer.decode(generated[:generated.index(50256)] if 50256 in generated else generated)
    ours = train.complete(GPT.from_pretrained(out), gpt2_tokenizer(), prompt, max_new_tokens=12)[0]
    assert theirs == gpt2_tokenizer().decode(ours)
