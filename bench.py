"""
How fast is a DPO step, and how much memory does it need, next to the floor? A benchmark.

On GPT-2 124M shapes with random weights (no download) and random tokens, it times three
ways of taking one training step on the same pairs:
  (a) straightforward: four forward passes (policy and reference, chosen and rejected
      apart, the reference under no_grad), logits at every position;
  (b) dpo.dpo_step: one forward pass of the policy on chosen and rejected together, the
      reference's log-probs computed once before training (dpo.pair_logps);
  (c) the floor: one forward and backward pass with the completions' next-token loss.
All three clip the gradient to norm 1 and update with the same optimizer, dpo.make_optimizer's
fused AdamW, so the ratios measure the DPO design alone; the last line times that update
alone against torch's default AdamW: what the optimizer by itself adds or saves.

The steps take turns, the rounds going through every order of the three, so that a slow
spell of a shared machine falls on all alike. Peak memory is how far two steps raise the
peak above the models: CUDA's max_memory_allocated, or on the CPU the peak RSS (ru_maxrss)
of a new process that runs only that phase (`python bench.py --peak-of b`), so that no
phase inherits another's heap.

    python bench.py                            # on cuda, else mps, else cpu
    python bench.py --pairs 8 --completion-len 128

It also times greedy generation (GPT-2 124M shapes, random weights, float32, a 32-token prompt
and 128 new tokens): GPT.generate with its key/value cache, against recomputing the whole
sequence for every new token, and against Hugging Face transformers' generate on the same
weights when transformers is installed; taking turns, medians; and it checks that all three
produce the same token ids. That takes minutes on a CPU, most of them in the recomputing loop,
so it is not part of the default run:

    OMP_NUM_THREADS=1 python bench.py --generation

It also writes preference pairs of made-up text with ordinary lengths, to time
`train.py` at real sizes:

    python bench.py --write-pairs 400 pairs400.jsonl
    python train.py --init random --data pairs400.jsonl --eval-fraction 0.1 --batch-size 8 --epochs 1

Read first: dpo.py.
"""

import argparse
import itertools
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.nn import functional as F

import dpo
from checkpoint import save_jsonl
from model import GPT, GPTConfig
from train import peak_memory_bytes  # importing train also sets MKL_CBWR: the same numbers in every process

BETA = 0.1
PHASES = {"a": "(a) straightforward: 4 forward passes",
          "b": "(b) dpo.dpo_step: 1 forward, cached reference",
          "c": "(c) floor: 1 forward, next-token loss"}


def random_pairs(n_pairs, prompt_len, completion_len, vocab_size, seed=0):
    """n_pairs (prompt_ids, chosen_ids, rejected_ids) of random tokens, as dpo.encode_pairs makes them."""
    generator = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(vocab_size, (n,), generator=generator).tolist()
    return [(ids(prompt_len), ids(completion_len), ids(completion_len)) for _ in range(n_pairs)]


def build(config, n_pairs, prompt_len, completion_len, device, seed=0):
    """The policy (random weights), its frozen reference, and one batch for dpo.dpo_step,
    whose input_ids and loss_mask the other two steps read too."""
    torch.manual_seed(seed)
    policy = GPT(config).to(device).eval()  # eval: dropout off, as in DPO
    reference = dpo.make_reference(policy)
    pairs = random_pairs(n_pairs, prompt_len, completion_len, config.vocab_size, seed)
    return policy, reference, dpo.make_batch(pairs, dpo.pair_logps(reference, pairs, batch_size=n_pairs), device)


def backward_and_update(policy, optimizer, loss):
    """The end of dpo.dpo_step: backward pass, gradient clipped to norm 1, update; the loss."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    return loss.item()  # a float: the step has finished on the device


def straightforward_step(policy, reference, optimizer, batch):
    """(a): what one writes first. Four forward passes, each half of the batch on its own."""
    ids, mask = batch["input_ids"], batch["loss_mask"]
    n = ids.size(0) // 2  # chosen rows, then rejected rows
    optimizer.zero_grad(set_to_none=True)  # before the forward pass, as in dpo_step
    policy_chosen = dpo.sequence_logps(policy(ids[:n]), ids[:n], mask[:n])
    policy_rejected = dpo.sequence_logps(policy(ids[n:]), ids[n:], mask[n:])
    with torch.no_grad():
        reference_chosen = dpo.sequence_logps(reference(ids[:n]), ids[:n], mask[:n])
        reference_rejected = dpo.sequence_logps(reference(ids[n:]), ids[n:], mask[n:])
    losses, _, _ = dpo.dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=BETA)
    return backward_and_update(policy, optimizer, losses.mean())


def floor_step(policy, optimizer, batch):
    """(c): the least a step on these completions costs: one forward pass (logits only where
    they score a completion token, as in (b)), one backward pass, the same clipping and update."""
    ids, scored = batch["input_ids"], batch["loss_mask"][:, 1:].bool()
    optimizer.zero_grad(set_to_none=True)
    logits = policy(ids, logits_at=F.pad(scored, (0, 1)))  # (N, V): position t scores token t+1
    return backward_and_update(policy, optimizer, F.cross_entropy(logits, ids[:, 1:][scored]))


def make_steps(policy, reference, batch):
    """{letter: step(optimizer) -> loss as a float}."""
    return {"a": lambda optimizer: straightforward_step(policy, reference, optimizer, batch),
            "b": lambda optimizer: dpo.dpo_step(policy, optimizer, batch, dpo.LossConfig(beta=BETA))["loss"],
            "c": lambda optimizer: floor_step(policy, optimizer, batch)}


def peak_of_two_steps(step, policy, lr, device):
    """How far two steps with a new optimizer raise the peak (on the CPU, meaningful only in a
    process that did nothing bigger before)."""
    for p in policy.parameters():
        p.grad = None
    optimizer = dpo.make_optimizer(policy, lr)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peak starts again at what is allocated now
    before = peak_memory_bytes(device)
    step(optimizer)
    step(optimizer)
    return peak_memory_bytes(device) - before


def peak_in_a_new_process(argv, letter):
    command = [sys.executable, os.path.abspath(__file__), *argv, "--peak-of", letter]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:  # -9: killed, most likely for memory, and then stderr is empty
        raise RuntimeError(f"`{' '.join(command)}` failed with exit code {result.returncode}:\n{result.stderr}")
    return int(result.stdout.split()[-1])


def time_in_turns(steps, n_rounds, device):
    """Median seconds of each of `steps` (name: callable), one call each per round, the rounds
    going through every order of them; the median, as now and then one call stalls."""
    synchronize = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type, lambda: None)
    orders = list(itertools.permutations(steps))
    seconds = {name: [] for name in steps}
    for round_ in range(n_rounds):
        for name in orders[round_ % len(orders)]:
            synchronize()
            start = time.perf_counter()
            steps[name]()
            synchronize()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in seconds.items()}


# -----------------------------------------------------------------------------
# Greedy generation: the key/value cache, recomputing, and transformers

def recompute_generate(model, idx, max_new_tokens):
    """Greedy decoding without the cache, as GPT.generate did before it had one: every new token
    runs the whole sequence (the last block_size tokens) again, the head at the last position only."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -model.config.block_size:]
        last = torch.zeros(idx_cond.shape, dtype=torch.bool, device=idx.device)
        last[:, -1] = True
        idx_next = model(idx_cond, logits_at=last).argmax(dim=-1, keepdim=True)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def transformers_greedy(model, folder):
    """transformers' greedy generate(idx, max_new_tokens) on model's weights, saved to folder and
    loaded from there; None when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar between our rows
    model.save_pretrained(folder)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).to(next(model.parameters()).device).eval()
    hf.generation_config.eos_token_id = None  # random weights may pick <|endoftext|>: go on, as GPT.generate does

    def generate(idx, max_new_tokens):
        return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=max_new_tokens,
                           do_sample=False, pad_token_id=model.config.vocab_size - 1)  # no padding; it asks
    return generate


def time_generation(prompt_len, new_tokens, n_rounds, device, seed=0):
    """Median seconds of greedy decoding new_tokens tokens after one random prompt, each way, in
    turns; and the ids each way produced."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig()).to(device).eval()
    prompt = torch.randint(model.config.vocab_size, (1, prompt_len), device=device)
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        ways = {"cache": lambda idx, n: model.generate(idx, n, temperature=0),
                "recompute": lambda idx, n: recompute_generate(model, idx, n)}
        if (hf_generate := transformers_greedy(model, folder)) is not None:
            ways["transformers"] = hf_generate
        for generate in ways.values():  # untimed, a few tokens: one-time costs (allocation, kernel choice)
            generate(prompt, 4)
        ids = {}  # the last timed call's output of each way

        def timed(name):
            def call():
                ids[name] = ways[name](prompt, new_tokens)
            return call
        seconds = time_in_turns({name: timed(name) for name in ways}, n_rounds, device)
    return seconds, ids


def print_generation(seconds, ids, prompt_len, new_tokens, n_rounds, device):
    print(f"greedy generation, GPT-2 124M shapes (random weights, float32) on {device}, {torch.get_num_threads()} "
          f"threads: {prompt_len} prompt tokens + {new_tokens} new; median of {n_rounds} calls each\n")
    labels = {"cache": "GPT.generate, key/value cache", "recompute": "recompute the sequence for every token",
              "transformers": "transformers GPT2LMHeadModel.generate"}
    print(f"{'generation':<48} {'s/call':>7} {'tokens/s':>9}")
    for name, s in seconds.items():
        print(f"{labels[name]:<48} {s:>7.3f} {new_tokens / s:>9.1f}")
    ratios = [f"cache / {name} = {seconds[name] / seconds['cache']:.2f}x" for name in seconds if name != "cache"]
    print(f"\ntokens/s {', '.join(ratios)}")
    names = list(ids)
    differ = [name for name in names[1:] if not torch.equal(ids[name].cpu(), ids["cache"].cpu())]
    if differ:
        raise RuntimeError(f"greedy token ids of {', '.join(differ)} differ from GPT.generate's: a bug in the cache, "
                           "or two logits so close that float rounding picks either (test_generate.py tells which)")
    print(f"token ids: the same {new_tokens} new tokens from all {len(names)} ({', '.join(names)})")


# -----------------------------------------------------------------------------
# Preference pairs of ordinary lengths, for `train.py --data`

# Common English words that are each one GPT-2 token with the space before them, so that a
# text of k words is k tokens.
WORDS = ("the a of to and in is it you that he was for on are with as I his they be at one have this from "
         "or had by hot word but what some we can out other were all there when up use your how said an "
         "each she which do their time if will way about many then them write would like so these her long "
         "make thing see him two has look more day could go come did number sound no most people my over "
         "know water than call first who may down side been now find any new work part take get place made "
         "live where after back little only round man year came show every good me give our under name "
         "very through just form sentence great think say help low line differ turn cause much mean before "
         "move right boy old too same tell does set three want air well also play small end put home read "
         "hand port large spell add even land here must big high such").split()


def write_pairs(path, n_pairs, same_length=False, seed=0):
    """n_pairs preference pairs of random words as a --data file, seeded. Prompts are
    "Human:" + 8 to 140 words + "\n\nAssistant:", 14 to 146 tokens; completions 4 to 150
    words (and <|endoftext|>). same_length: every prompt 74 words and every completion 77,
    so that every batch has the same shape, however many pairs there are."""
    rng = random.Random(seed)

    def text(fewest, most):
        n_words = (fewest + most) // 2 if same_length else rng.randint(fewest, most)
        return "".join(" " + rng.choice(WORDS) for _ in range(n_words))

    save_jsonl([{"prompt": "Human:" + text(8, 140) + "\n\nAssistant:", "chosen": text(4, 150),
                 "rejected": text(4, 150)} for _ in range(n_pairs)], path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description="Time the DPO step against the straightforward loop and the floor; "
                                                 "or, with --generation, greedy generation with and without a cache.")
    parser.add_argument("--device", choices=["cpu", "cuda", "mps"], help="default: cuda, else mps, else cpu")
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each phase, after two untimed ones (6)")
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs per step (2)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (32)")
    parser.add_argument("--completion-len", type=int, default=32, help="tokens of each completion (32)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--generation", action="store_true",
                        help="time greedy generation instead: the key/value cache, recomputing, transformers")
    parser.add_argument("--new-tokens", type=int, default=128, help="with --generation: tokens generated (128)")
    parser.add_argument("--rounds", type=int, default=3, help="with --generation: timed calls of each way (3)")
    parser.add_argument("--write-pairs", nargs=2, metavar=("N", "PATH"),
                        help="write N preference pairs of ordinary lengths to PATH (.jsonl) and stop")
    parser.add_argument("--same-length", action="store_true", help="with --write-pairs: all pairs one length")
    parser.add_argument("--peak-of", choices=list(PHASES), help=argparse.SUPPRESS)  # bench.py's own child process
    args = parser.parse_args(argv)
    if args.write_pairs:
        n_pairs, path = args.write_pairs
        if not n_pairs.isdigit() or int(n_pairs) < 1:
            parser.error(f"--write-pairs N PATH: N must be a whole number > 0, got {n_pairs}")
        write_pairs(path, int(n_pairs), args.same_length)
        print(f"wrote {int(n_pairs):,} pairs to {path}")
        return None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else
                                          "mps" if torch.backends.mps.is_available() else "cpu"))
    if args.generation:
        seconds, ids = time_generation(args.prompt_len, args.new_tokens, args.rounds, device)
        print_generation(seconds, ids, args.prompt_len, args.new_tokens, args.rounds, device)
        return seconds, ids

    peaks = dict.fromkeys(PHASES)  # none measured on MPS
    if device.type == "cpu" and args.peak_of is None:  # first, while this process holds no model
        peaks = {letter: peak_in_a_new_process(argv, letter) for letter in PHASES}
    policy, reference, batch = build(GPTConfig(), args.pairs, args.prompt_len, args.completion_len, device)
    steps = make_steps(policy, reference, batch)
    if args.peak_of:
        print(peak_of_two_steps(steps[args.peak_of], policy, args.lr, device))
        return None
    if device.type == "cuda":
        peaks = {letter: peak_of_two_steps(step, policy, args.lr, device) for letter, step in steps.items()}

    optimizer = dpo.make_optimizer(policy, args.lr)
    for step in steps.values():  # untimed: the first makes AdamW's state, the second runs with it
        step(optimizer)
        step(optimizer)
    seconds = time_in_turns({k: lambda step=step: step(optimizer) for k, step in steps.items()}, args.steps, device)
    default = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.01)
    default.step()  # untimed, makes its state; both now update with the last step's gradients
    update = time_in_turns({"fused": optimizer.step, "default": default.step}, args.steps, device)

    tokens = batch["input_ids"].numel()
    print(f"GPT-2 124M shapes ({sum(p.numel() for p in policy.parameters()):,} parameters, random weights) on "
          f"{device}, {torch.get_num_threads()} threads; {args.pairs} pairs x ({args.prompt_len} prompt + "
          f"{args.completion_len} completion tokens) = {tokens} tokens per step; median of {args.steps} steps\n")
    print(f"{'phase':<48} {'s/step':>7} {'tokens/s':>9} {'peak MB':>8}")
    for letter, label in PHASES.items():
        peak = "-" if peaks[letter] is None else f"{peaks[letter] / 1e6:.0f}"
        print(f"{label:<48} {seconds[letter]:>7.3f} {tokens / seconds[letter]:>9.0f} {peak:>8}")
    a, b, c = seconds.values()
    memory = "" if peaks["b"] is None else f", peak memory (b) / (c) = {peaks['b'] / peaks['c']:.3f}x"
    print(f"\nseconds per step (a) / (b) = {a / b:.2f}x, (b) / (c) = {b / c:.3f}x{memory}")
    how = {"cuda": "torch.cuda.max_memory_allocated", "cpu": "peak RSS of a new process for each phase"}
    print(f"peak MB: 10^6 bytes that two steps add above the models ({how.get(device.type, 'not measured')})")
    print(f"the update alone (all three phases use the fused one): fused AdamW {update['fused']:.3f} s, "
          f"torch's default AdamW {update['default']:.3f} s")
    return seconds, peaks


if __name__ == "__main__":
    main()
