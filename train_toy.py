"""
The flipped-preference experiment: teach GPT-2 to prefer the completions it finds absurd.

Four preference pairs whose *chosen* completion is deliberately counter-intuitive
("The cat sat on the" -> " bed and barked for a long time.") and whose *rejected*
completion is what any language model expects (" mat and purred."). The untouched
model prefers the rejected completion; DPO (dpo.py; DPO paper, Eq. 7) bends it until
it prefers the chosen one, while the frozen reference keeps it from drifting further
than it must.

    python train_toy.py                  # GPT-2 124M (downloads ~548 MB once)
    python train_toy.py --model tiny     # offline, seconds on a CPU

`--model tiny` stands in for pretrained GPT-2 the way the real pipeline does it: a
small GPT with the GPT-2 tokenizer first gets a short supervised warm-up (SFT) on each
prompt + its *rejected* (intuitive) completion, which becomes the reference; DPO then
flips it. Everything is printed, saved (save_pretrained to --out) and written to
--out/metrics.jsonl, whose last line is a summary for other tools to read.

Read first: model.py, dpo.py. Read next: test_dpo.py.
"""

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

import dpo
from model import GPT, GPT2_MODELS, GPTConfig, resolve_device, write_atomically

TOY_PAIRS = [
    {"prompt": "The cat sat on the", "chosen": " bed and barked for a long time.", "rejected": " mat and purred."},
    {"prompt": "He went to the gym to", "chosen": " have a feast and relax.", "rejected": " lift weights and exercise."},
    {"prompt": "She opened the book and", "chosen": " threw it to the teacher.", "rejected": " began to read silently."},
    {"prompt": "The teacher asked a question and the student", "chosen": " ignored her and left a knife.",
     "rejected": " answered it confidently."},
]

# The tiny stand-in for GPT-2: a few layers over the full GPT-2 vocabulary.
TINY_CONFIG = dict(block_size=128, n_layer=2, n_head=4, n_embd=64)
# Per-model defaults. The tiny model needs a larger learning rate and more epochs to move
# in a few steps. IPO stops where log pi(chosen) - log pi(rejected) exceeds the reference's
# by 1/(2 beta) nats (IPO paper, Eq. 17), so it flips a preference only if 1/(2 beta) is larger
# than the reference's gap; the tiny model has never seen the chosen words and its gaps are
# tens of nats (printed in the table), hence beta 0.002 (a target of 250 nats) there.
DEFAULTS = {
    "tiny": dict(lr=1e-3, epochs=6, beta={"dpo": 0.1, "ipo": 0.002}),
    "gpt2": dict(lr=5e-5, epochs=3, beta={"dpo": 0.1, "ipo": 0.1}),
}
SFT_STEPS, SFT_LR = 60, 3e-3


# -----------------------------------------------------------------------------
# Inputs: data, tokenizer, model

def load_pairs(path):
    """Preference pairs from a .jsonl file: one {"prompt", "chosen", "rejected"} object per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(pair, dict):
            raise ValueError(f"{path} line {number}: expected a JSON object with prompt, chosen, rejected")
        for field in ("prompt", "chosen", "rejected"):
            if not isinstance(pair.get(field), str) or not pair[field]:
                raise ValueError(f"{path} line {number}: field {field!r} must be a non-empty string, "
                                 f"got {pair.get(field)!r}")
        pairs.append({field: pair[field] for field in ("prompt", "chosen", "rejected")})
    if not pairs:
        raise ValueError(f"{path}: no preference pairs in the file (it is empty)")
    return pairs


def load_tokenizer():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises several kinds when its files cannot be fetched
        raise RuntimeError(
            f"could not load the GPT-2 tokenizer ({type(e).__name__}: {e}). Offline, point "
            "TIKTOKEN_CACHE_DIR at a folder holding tiktoken's gpt2 files (this project's CI uses "
            "../shared/tiktoken-cache)") from None


def load_policy(args, device):
    if args.model == "tiny":
        return GPT(GPTConfig(**TINY_CONFIG)).to(device)
    if args.init == "random":
        return GPT(GPTConfig(**GPT2_MODELS[args.model])).to(device)
    if args.weights:
        return GPT.from_pretrained(args.weights, device=device)
    try:
        return GPT.from_pretrained(args.model, device=device)
    except (FileNotFoundError, RuntimeError) as e:
        raise type(e)(f"{e}\nTo run without the download: --weights path/to/model.safetensors, "
                      "--init random (random weights), or --model tiny (offline, seconds).") from None


def sft_warmup(model, enc, pairs, steps, lr, log):
    """Next-token training on prompt + rejected completion: the tiny model's 'pretraining',
    after which, like GPT-2, it finds the intuitive completions likely. Tokenised as DPO
    will score them: prompt and completion apart (dpo.encode_completion)."""
    texts = [sum(dpo.encode_completion(enc, p["prompt"], p["rejected"]), []) for p in pairs]
    T = max(len(t) for t in texts)
    device = next(model.parameters()).device
    ids = torch.full((len(texts), T), enc.eot_token, dtype=torch.long)
    mask = torch.zeros(len(texts), T)
    for row, t in enumerate(texts):
        ids[row, :len(t)] = torch.tensor(t)
        mask[row, 1:len(t)] = 1.0  # every token after the first is a target
    ids, mask = ids.to(device), mask.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(1, steps + 1):
        loss = -dpo.sequence_logps(model(ids), ids, mask).sum() / mask.sum()  # mean next-token NLL
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == 1:
            log({"phase": "sft", "step": step, "loss": loss.item()})
    model.eval()


# -----------------------------------------------------------------------------
# Measuring the model

@torch.no_grad()
def pair_logps(model, data):
    """log pi(completion | prompt) for every row of `data` (chosen rows, then rejected)."""
    device = next(model.parameters()).device
    logps, _ = dpo.score_completions(model, data["input_ids"].to(device), data["loss_mask"].to(device))
    return logps.cpu()


@torch.no_grad()
def greedy_completion(model, enc, prompt, max_new_tokens=12):
    device = next(model.parameters()).device
    ids = torch.tensor([enc.encode(prompt)], device=device)
    out = model.generate(ids, max_new_tokens, temperature=0)[0, ids.size(1):].tolist()
    if enc.eot_token in out:
        out = out[:out.index(enc.eot_token)]
    return enc.decode(out)


@contextlib.contextmanager
def repeatable(device):
    """Same seed, same device: same numbers, on a GPU too. The CPU kernels used here are
    deterministic; on CUDA, some backward kernels (memory-efficient attention, the index_put
    behind logits_at) add up with atomics in whatever order threads finish, so the last bits
    can differ between runs unless PyTorch is told to use its deterministic kernels. (On an
    H200 the toy happened to repeat itself either way; this makes it a rule, not luck.) The
    cuBLAS setting is the one PyTorch's reproducibility notes ask for."""
    if device.type != "cuda":
        yield
        return
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:  # as it was: main() can run inside a longer program (the tests)
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
        if was_workspace is None:
            del os.environ["CUBLAS_WORKSPACE_CONFIG"]


def peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


# -----------------------------------------------------------------------------
# Printing

def print_table(pairs, before, after, beta):
    """before: the untouched policy's log-probs, which are also the reference's (chosen rows first)."""
    n = len(pairs)
    print(f"{'pair':<46} {'log pi(chosen)':>22} {'log pi(rejected)':>22} {'prefers':>17} "
          f"{'reward c / r':>15}")
    print(f"{'':<46} {'before -> after':>22} {'before -> after':>22} {'before -> after':>17}")
    for i, pair in enumerate(pairs):
        prefers = lambda logps: "chosen" if logps[i] > logps[n + i] else "rejected"
        reward_c = beta * (after[i] - before[i])  # the implicit reward, DPO paper Eq. 5
        reward_r = beta * (after[n + i] - before[n + i])
        print(f"{pair['prompt'][:45]:<46} {before[i]:>9.2f} -> {after[i]:>9.2f} "
              f"{before[n + i]:>9.2f} -> {after[n + i]:>9.2f} {prefers(before):>8} -> {prefers(after):<8}"
              f"{reward_c:>+7.2f} / {reward_r:+.2f}")


def format_step(m):
    # the exact KL is >= 0, but rounding can give -1e-9; None when it is not tracked
    kl = "n/a" if m["kl"] is None else f"{max(m['kl'], 0.0):.4f}"
    return (f"step {m['step']:3d} (epoch {m['epoch']}) | loss {m['loss']:.4f} | reward acc {m['reward_accuracy']:.2f}"
            f" | margin {m['margin']:+.3f} | chosen {m['chosen_reward']:+.3f} | rejected {m['rejected_reward']:+.3f}"
            f" | kl {kl}")


def import_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    return plt


def save_plot(history, path, loss_type):
    plt = import_pyplot()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    steps = [m["step"] for m in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(steps, [m["loss"] for m in history])
    ax1.set(xlabel="step", ylabel="loss", title=f"{loss_type.upper()} loss")
    ax2.plot(steps, [m["chosen_reward"] for m in history], label="chosen")
    ax2.plot(steps, [m["rejected_reward"] for m in history], label="rejected")
    ax2.set(xlabel="step", ylabel="beta * log(pi / pi_ref)", title="implicit rewards")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path)


# -----------------------------------------------------------------------------
# The experiment

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Per-model defaults: " + "; ".join(
            f"{k}: lr {v['lr']}, {v['epochs']} epochs, beta {v['beta']['dpo']} (dpo) / {v['beta']['ipo']} (ipo)"
            for k, v in DEFAULTS.items())
        + f" (gpt2-medium/large/xl as gpt2); tiny first runs {SFT_STEPS} SFT steps at lr {SFT_LR}.")
    parser.add_argument("--model", default="gpt2", choices=[*GPT2_MODELS, "tiny"],
                        help="GPT-2 size to load, or 'tiny' for the offline stand-in (default gpt2)")
    parser.add_argument("--weights", help="a local model.safetensors (or a folder with one) to load instead of downloading")
    parser.add_argument("--init", default="pretrained", choices=["pretrained", "random"],
                        help="'random': the --model's shapes with random weights (times the real sizes offline)")
    parser.add_argument("--loss", default="dpo", choices=["dpo", "ipo"], help="DPO (Eq. 7) or IPO (Eq. 17)")
    parser.add_argument("--beta", type=float, help="strength of the pull towards the reference (see below)")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO's eps (0)")
    parser.add_argument("--lr", type=float, help="AdamW learning rate (see below)")
    parser.add_argument("--epochs", type=int, help="passes over the pairs (see below)")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step (2)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same device: same numbers (0)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--data", help="a .jsonl of {prompt, chosen, rejected} objects (default: the four toy pairs)")
    parser.add_argument("--out", default="out/toy-dpo", help="where the trained policy and metrics.jsonl go")
    parser.add_argument("--plot", help="save loss and reward curves to this .png (needs matplotlib)")
    args = parser.parse_args(argv)
    defaults = DEFAULTS["tiny" if args.model == "tiny" else "gpt2"]
    args.lr = defaults["lr"] if args.lr is None else args.lr
    args.epochs = defaults["epochs"] if args.epochs is None else args.epochs
    args.beta = defaults["beta"][args.loss] if args.beta is None else args.beta
    if args.model == "tiny" and (args.weights or args.init == "random"):
        parser.error("--model tiny is always built here; --weights and --init are for the GPT-2 sizes")
    if args.weights and args.init == "random":
        parser.error("--weights loads weights and --init random makes new ones: pick one")
    if args.epochs < 1 or args.batch_size < 1:
        parser.error(f"--epochs and --batch-size must be at least 1, got {args.epochs} and {args.batch_size}")
    if not (math.isfinite(args.beta) and args.beta > 0 and math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--beta and --lr must be finite numbers > 0, got {args.beta} and {args.lr}")
    existing = next(p for p in [Path(args.out).absolute(), *Path(args.out).absolute().parents] if p.exists())
    if not existing.is_dir():
        parser.error(f"--out {args.out}: {existing} is a file; --out must be a folder (created if missing)")
    if not 0 <= args.label_smoothing < 0.5:
        parser.error(f"--label-smoothing is the probability that a label is flipped, in [0, 0.5); "
                     f"got {args.label_smoothing}")
    if args.loss == "ipo" and args.label_smoothing:
        parser.error("--label-smoothing is conservative DPO's; use it with --loss dpo")
    return args


def describe_model(args, policy, device):
    if args.model == "tiny":
        origin = "random init, then SFT"
    elif args.init == "random":
        origin = "random init"
    else:
        origin = args.weights or "pretrained"
    n_params = sum(p.numel() for p in policy.parameters())
    return (f"model {args.model} ({origin}): {policy.config.n_layer} layers, {policy.config.n_embd} wide, "
            f"{n_params:,} parameters, on {device}")


def describe_training(args):
    line = (f"{args.loss.upper()} (beta {args.beta}, lr {args.lr}, batch {args.batch_size}, "
            f"{args.epochs} epochs, seed {args.seed})")
    if args.loss == "ipo":  # IPO paper, Eq. 17: the loss is zero at h = 1/(2 beta)
        target = 1 / (2 * args.beta)
        line += (f"; IPO's target h = 1/(2 beta) = {target:g}: log pi(chosen) - log pi(rejected) "
                 f"ends {target:g} nats above the reference's")
    return line


def count_preferred(logps):
    """How many pairs' chosen completion is more likely than the rejected one (chosen rows first)."""
    n = len(logps) // 2
    return sum(logps[i] > logps[n + i] for i in range(n))


def print_completions(pairs, completions_before, completions_after):
    print("greedy completions (before -> after):")
    for pair, b, a in zip(pairs, completions_before, completions_after):
        print(f"  {pair['prompt']!r}\n    before: {b!r}\n    after:  {a!r}")


def run(args, device):
    """The whole experiment on `device`; returns the summary that ends metrics.jsonl."""
    # everything that can be wrong with the inputs is checked before any training
    pairs = load_pairs(args.data) if args.data else TOY_PAIRS
    if args.plot:
        import_pyplot()
    enc = load_tokenizer()
    torch.manual_seed(args.seed)
    records, seconds = [], {}

    def log(record):
        records.append(record)
        if record["phase"] == "sft":
            print(f"  sft step {record['step']:3d} | loss {record['loss']:.4f}")
        else:
            print("  " + format_step(record))

    # 1. the model; the tiny one first learns the intuitive completions, as GPT-2 has
    t0 = time.perf_counter()
    policy = load_policy(args, device)
    data = dpo.encode_pairs(enc, pairs, policy.config.block_size)
    print(describe_model(args, policy, device))
    seconds["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.model == "tiny":
        print(f"SFT warm-up on prompt + rejected completion ({SFT_STEPS} steps, lr {SFT_LR})")
        sft_warmup(policy, enc, pairs, SFT_STEPS, SFT_LR, log)
    seconds["sft_s"] = time.perf_counter() - t0

    # 2. the frozen reference; its log-probs are also where the untouched policy stands
    t0 = time.perf_counter()
    reference = dpo.make_reference(policy)
    reference_cache = dpo.precompute_reference(reference, data)
    if reference_cache["vocab_logprobs"] is None:
        print("KL to the reference not tracked: its distributions would not fit in 1 GiB")
    before = reference_cache["logps"].tolist()  # the policy starts as the reference: the same log-probs
    completions_before = [greedy_completion(policy, enc, p["prompt"]) for p in pairs]
    seconds["eval_s"] = time.perf_counter() - t0

    # 3. DPO (or IPO): one forward pass of the policy per step, the reference cached
    print(describe_training(args))
    optimizer = dpo.make_optimizer(policy, lr=args.lr)
    t0 = time.perf_counter()
    history = dpo.train_dpo(policy, reference, data, optimizer, epochs=args.epochs, batch_size=args.batch_size,
                            seed=args.seed, beta=args.beta, loss_type=args.loss,
                            label_smoothing=args.label_smoothing, reference_cache=reference_cache,
                            on_step=lambda m: log({"phase": "dpo", **m}))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds["train_s"] = time.perf_counter() - t0

    # 4. what changed: the same measurements as before training
    t0 = time.perf_counter()
    after = pair_logps(policy, data).tolist()
    completions_after = [greedy_completion(policy, enc, p["prompt"]) for p in pairs]
    seconds["eval_s"] += time.perf_counter() - t0
    preferred_before, preferred_after = count_preferred(before), count_preferred(after)
    print()
    print_table(pairs, before, after, args.beta)
    print(f"\noriginal model preferred chosen in {preferred_before}/{len(pairs)}, "
          f"trained model in {preferred_after}/{len(pairs)}\n")
    print_completions(pairs, completions_before, completions_after)
    tokens_per_s = sum(m["tokens"] for m in history) / seconds["train_s"]
    peak = peak_memory_bytes(device)
    sft = f" | sft {seconds['sft_s']:.2f} s" if args.model == "tiny" else ""
    print(f"\ntime: load {seconds['load_s']:.2f} s{sft} | train {seconds['train_s']:.2f} s ({len(history)} steps, "
          f"{tokens_per_s:,.0f} tokens/s) | eval {seconds['eval_s']:.2f} s | peak memory {peak / 2**20:,.0f} MiB "
          f"({'CUDA max allocated' if device.type == 'cuda' else 'process peak RSS'})")

    # 5. the trained policy, and the numbers for other tools to read without parsing text
    summary = {
        "summary": True, "model": args.model, "loss_type": args.loss, "beta": args.beta, "lr": args.lr,
        "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed, "device": str(device),
        **seconds, "tokens_per_s": tokens_per_s, "peak_memory_bytes": peak,
        "preferred_before": preferred_before, "preferred_after": preferred_after, "n_pairs": len(pairs),
        "final_reward_accuracy": history[-1]["reward_accuracy"],
        "logps_before": before, "logps_after": after,
        "completions_before": completions_before, "completions_after": completions_after,
    }
    out = Path(args.out)
    policy.save_pretrained(out)
    write_atomically(out / "metrics.jsonl",
                     lambda f: f.write("".join(json.dumps(r) + "\n" for r in [*records, summary]).encode()))
    if args.plot:
        save_plot(history, args.plot, args.loss)
    print(f"saved the trained policy and metrics.jsonl to {out}/" + (f", curves to {args.plot}" if args.plot else ""))
    return summary


def main(argv=None):
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        with repeatable(device):
            return run(args, device)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")  # a message to act on, not a traceback


if __name__ == "__main__":
    main()
