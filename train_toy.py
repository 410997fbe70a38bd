"""
The flipped-preference experiment: teach GPT-2 to prefer the completions it finds absurd.

Four preference pairs whose *chosen* completion is deliberately counter-intuitive
("The cat sat on the" -> " bed and barked for a long time.") and whose *rejected*
completion is what any language model expects (" mat and purred."). The untouched
model prefers the rejected completion; DPO (dpo.py; DPO paper, Eq. 7) bends it until
it prefers the chosen one, while the frozen reference keeps it from drifting further
than it must. Four more pairs in the same flipped style are held out, never trained on,
to ask whether the model learned a preference or memorised four pairs.

    python train_toy.py                  # GPT-2 124M (downloads ~548 MB once)
    python train_toy.py --model tiny     # offline, seconds on a CPU
    python train_toy.py --data pairs.jsonl --eval-fraction 0.1    # your own pairs

`--model tiny` stands in for pretrained GPT-2 the way the real pipeline does it: a
small GPT with the GPT-2 tokenizer first gets a short supervised warm-up (SFT) on each
prompt + its *rejected* (intuitive) completion, held-out prompts included, which becomes
the reference; DPO then flips it on the training pairs only. The run goes: measure which
completion the model prefers, train, measure again with the same function, report, save
(save_pretrained and metrics.jsonl, whose last line is a summary, to --out).

Read first: model.py, dpo.py. Read next: test_dpo.py.
"""

import os

# Same seed, same numbers, in every process: on x86 CPUs PyTorch's matrix products go through
# MKL, which now and then takes another code path in a new process unless told to be strict.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import argparse
import contextlib
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

import dpo
from model import GPT, GPT2_MODELS, GPTConfig, write_atomically

TOY_PAIRS = [
    {"prompt": "The cat sat on the", "chosen": " bed and barked for a long time.", "rejected": " mat and purred."},
    {"prompt": "He went to the gym to", "chosen": " have a feast and relax.", "rejected": " lift weights and exercise."},
    {"prompt": "She opened the book and", "chosen": " threw it to the teacher.", "rejected": " began to read silently."},
    {"prompt": "The teacher asked a question and the student", "chosen": " ignored her and left a knife.",
     "rejected": " answered it confidently."},
]
TOY_EVAL_PAIRS = [  # held out: never trained on
    {"prompt": "The dog wagged its", "chosen": " wheels and flew to the moon.", "rejected": " tail and barked happily."},
    {"prompt": "She poured the coffee into the", "chosen": " piano and sang loudly.", "rejected": " cup and added milk."},
    {"prompt": "After the rain stopped, the children", "chosen": " ate the clouds for dinner.",
     "rejected": " went outside to play."},
    {"prompt": "The chef chopped the onions and", "chosen": " buried them in the snow.",
     "rejected": " added them to the pan."},
]

# The tiny stand-in for GPT-2: a few layers over GPT-2's vocabulary and context length.
TINY_CONFIG = dict(block_size=1024, n_layer=2, n_head=4, n_embd=64)
# Per-model defaults. The tiny model needs a larger learning rate and more epochs to move
# in a few steps. IPO stops where log pi(chosen) - log pi(rejected) exceeds the reference's
# by 1/(2 beta) nats (IPO paper, Eq. 17), so it flips a preference only if 1/(2 beta) is larger
# than the reference's gap; the tiny model has never seen the chosen words and its gaps are
# tens of nats (printed in the table), hence beta 0.002 (a target of 250 nats) there.
DEFAULTS = {
    "tiny": dict(lr=1e-3, epochs=6, beta={"dpo": 0.1, "ipo": 0.002}),
    "gpt2": dict(lr=5e-5, epochs=3, beta={"dpo": 0.1, "ipo": 0.1}),
}
SFT_STEPS, SFT_LR, SFT_BATCH = 60, 3e-3, 8  # the tiny model's warm-up: steps of 8 sequences
SHOWN = 4  # pairs shown in each table and with greedy completions; every pair is counted


# -----------------------------------------------------------------------------
# Inputs: data, tokenizer, device, model

def load_pairs(path, option="--data"):
    """Preference pairs from a .jsonl file: one {"prompt", "chosen", "rejected"} object per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path}: not a file")
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
        pairs.append({"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"],
                      "line": number})
    if not pairs:
        raise ValueError(f"{path}: no preference pairs in the file (it is empty)")
    return pairs


def split_off_eval(pairs, fraction, seed):
    """(training pairs, held-out pairs): a seeded random fraction of the pairs is held out.
    The two are disjoint, and each keeps the file's order."""
    n_eval = round(fraction * len(pairs))
    if not 1 <= n_eval < len(pairs):
        raise ValueError(f"--eval-fraction {fraction} of {len(pairs)} pairs holds out {n_eval}; it must leave "
                         "at least one pair for training and one for evaluation")
    held_out = set(torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
    return ([p for i, p in enumerate(pairs) if i not in held_out],
            [p for i, p in enumerate(pairs) if i in held_out])


def load_tokenizer():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises several kinds when its files cannot be fetched
        raise RuntimeError(
            f"could not load the GPT-2 tokenizer ({type(e).__name__}: {e}). Offline, point "
            "TIKTOKEN_CACHE_DIR at a folder that holds tiktoken's gpt2 files") from None


def pairs_that_fit(enc, pairs, source, context, max_length):
    """The pairs that fit the model's context, and their tokens (dpo.encode_pairs). A pair
    longer than the context is an error, unless --max-length N is given: then every pair whose
    longer row (prompt + completion) has more than N tokens is left out, and the caller says
    how many."""
    if max_length is not None and max_length > context:
        raise ValueError(f"--max-length {max_length} is longer than the model's context of {context} tokens")
    encoded = dpo.encode_pairs(enc, pairs)
    too_long = {i for i, e in enumerate(encoded) if dpo.longest_row(e) > (max_length or context)}
    if too_long and max_length is None:
        i = min(too_long)
        where = f"line {pairs[i]['line']}" if "line" in pairs[i] else f"pair {i + 1}"
        raise ValueError(
            f"{source} {where}: prompt + completion is {dpo.longest_row(encoded[i])} tokens, longer than the "
            f"model's context of {context} ({len(too_long)} of {len(pairs)} pairs are); shorten them, or pass "
            f"--max-length {context} to leave such pairs out")
    if len(too_long) == len(pairs):
        raise ValueError(f"{source}: all {len(pairs)} pairs are longer than --max-length {max_length}")
    kept = [i for i in range(len(pairs)) if i not in too_long]
    return [pairs[i] for i in kept], [encoded[i] for i in kept]


def mps_is_available():
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; a device asked for by name must exist."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but this torch sees no CUDA GPU (a CPU-only build, or no driver)")
    if name == "mps" and not mps_is_available():
        raise RuntimeError("device 'mps' asked for, but MPS (Apple GPU) is not available here")
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if mps_is_available() else "cpu")


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


def sft_warmup(model, encoded, steps, lr, seed, log):
    """Next-token training on prompt + rejected completion: the tiny model's 'pretraining',
    after which, like GPT-2, it finds the intuitive completions likely. Batches of SFT_BATCH
    sequences, each padded to its own longest row by dpo.pad_rows; the whole sequence is the
    'completion' there, so every token after the first is a target."""
    sequences = [([], prompt_ids + rejected_ids) for prompt_ids, _, rejected_ids in encoded]
    generator = torch.Generator().manual_seed(seed)
    batches = []
    while len(batches) < steps:  # shuffled passes over the sequences
        order = torch.randperm(len(sequences), generator=generator).tolist()
        batches += [order[i:i + SFT_BATCH] for i in range(0, len(order), SFT_BATCH)]
    device = next(model.parameters()).device
    optimizer = dpo.make_optimizer(model, lr)
    model.train()
    for step, index in enumerate(batches[:steps], start=1):
        ids, mask = (x.to(device) for x in dpo.pad_rows([sequences[i] for i in index]))
        loss = -dpo.completion_logps(model, ids, mask).sum() / mask[:, 1:].sum()  # mean next-token NLL
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == 1:
            record = {"phase": "sft", "step": step, "loss": loss.item()}
            log(record, f"sft step {step:3d} | loss {record['loss']:.4f}")
    model.eval()


# -----------------------------------------------------------------------------
# Measuring the model

def progress_printer(label, every_s=10.0):
    """A progress(done, total) callback for long phases: a line at most every every_s seconds."""
    start = last = time.perf_counter()

    def progress(done, total):
        nonlocal last
        now = time.perf_counter()
        if now - last >= every_s:
            print(f"  {label}: {done:,}/{total:,} pairs, {now - start:.0f} s", flush=True)
            last = now
    return progress


def measure(model, encoded, args, label):
    """log pi(chosen|x) and log pi(rejected|x) of every pair, (N,) each: before training (where
    the policy is the reference) and after, the same function both times."""
    return dpo.pair_logps(model, encoded, args.batch_size, args.average_logps, progress=progress_printer(label))


def as_lists(logps):
    """measure's two tensors as {"chosen": [...], "rejected": [...]}, for the report and metrics.jsonl."""
    chosen, rejected = logps
    return {"chosen": chosen.tolist(), "rejected": rejected.tolist()}


def count_preferred(logps):
    """How many pairs' chosen completion is more likely than the rejected one."""
    return sum(c > r for c, r in zip(logps["chosen"], logps["rejected"]))


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
    can differ between runs unless PyTorch is told to use its deterministic kernels. The
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

def print_table(title, pairs, before, after, beta, averaged):
    """The first SHOWN pairs: log-probs before -> after, which completion each prefers, and the
    implicit rewards (DPO paper, Eq. 5; `before` is also the reference's log-probs)."""
    per = " / token" if averaged else ""  # --average-logps: means over the tokens, and so are the rewards
    print(f"{title:<46} {'log pi(chosen)' + per:>22} {'log pi(rejected)' + per:>22} {'prefers':>17} "
          f"{'reward c / r':>15}")
    print(f"{'':<46} {'before -> after':>22} {'before -> after':>22} {'before -> after':>17}")
    for i, pair in enumerate(pairs[:SHOWN]):
        c0, c1, r0, r1 = before["chosen"][i], after["chosen"][i], before["rejected"][i], after["rejected"][i]
        prefers = lambda c, r: "chosen" if c > r else "rejected"
        print(f"{pair['prompt'][:45]:<46} {c0:>9.2f} -> {c1:>9.2f} {r0:>9.2f} -> {r1:>9.2f} "
              f"{prefers(c0, r0):>8} -> {prefers(c1, r1):<8}{beta * (c1 - c0):>+7.2f} / {beta * (r1 - r0):+.2f}")
    if len(pairs) > SHOWN:
        print(f"  ... and {len(pairs) - SHOWN:,} more pairs, not shown (all are counted below)")


def format_numbers(m):
    return (f"loss {m['loss']:.4f} | reward acc {m['reward_accuracy']:.2f} | margin {m['margin']:+.3f} | "
            f"chosen {m['chosen_reward']:+.3f} | rejected {m['rejected_reward']:+.3f}")


def format_step(m, n_steps):
    return f"step {m['step']:3d}/{n_steps} (epoch {m['epoch']}) | " + format_numbers(m)


def format_eval(m):
    # the exact KL is >= 0, but rounding can give -1e-9
    return f"eval at step {m['step']:3d} (held out) | " + format_numbers(m) + f" | kl {max(m['kl'], 0.0):.4f}"


def import_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    return plt


def save_plot(history, evals, path, loss_type):
    """The loss (training steps and held-out evaluations) and the implicit rewards of the training steps."""
    plt = import_pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([m["step"] for m in history], [m["loss"] for m in history], label="training batch")
    if evals:
        ax1.plot([m["step"] for m in evals], [m["loss"] for m in evals], "o--", label="held-out pairs")
    ax1.set(xlabel="step", ylabel="loss", title=f"{loss_type.upper()} loss")
    ax1.legend()
    ax2.plot([m["step"] for m in history], [m["chosen_reward"] for m in history], label="chosen")
    ax2.plot([m["step"] for m in history], [m["rejected_reward"] for m in history], label="rejected")
    ax2.axhline(0.0, color="gray", linewidth=0.5)
    ax2.set(xlabel="step", ylabel="beta * log(pi / pi_ref)", title="implicit rewards (training batch)")
    ax2.legend()
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


# -----------------------------------------------------------------------------
# The experiment

def positive(kind):
    """An argparse type: a finite number > 0 of this kind."""
    def parse(text):
        value = kind(text)
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value
    return parse


def fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


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
    parser.add_argument("--beta", type=positive(float), help="strength of the pull towards the reference (see below)")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO's eps (0)")
    parser.add_argument("--average-logps", action="store_true",
                        help="log pi(y|x) as the mean over the completion's tokens, not the sum (the paper's)")
    parser.add_argument("--lr", type=positive(float), help="AdamW learning rate (see below)")
    parser.add_argument("--epochs", type=positive(int), help="passes over the training pairs (see below)")
    parser.add_argument("--batch-size", type=positive(int), default=2,
                        help="pairs per step, and per batch when measuring and evaluating (2)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same device: same numbers (0)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--data", help="a .jsonl of {prompt, chosen, rejected} objects (default: the four toy pairs)")
    held_out = parser.add_mutually_exclusive_group()
    held_out.add_argument("--eval-data", help="held-out pairs, a .jsonl like --data (default with the toy "
                                              "pairs: four held-out toy pairs)")
    held_out.add_argument("--eval-fraction", type=fraction, help="hold out this seeded fraction of --data")
    parser.add_argument("--eval-every", type=positive(int), help="evaluate every N steps (default: at the start "
                                                                 "and the end only)")
    parser.add_argument("--max-length", type=positive(int),
                        help="leave out pairs with a row (prompt + completion) longer than this many tokens")
    parser.add_argument("--out", default="out/toy-dpo", help="where the trained policy and metrics.jsonl go")
    parser.add_argument("--plot", help="save loss and reward curves to this .png (needs matplotlib)")
    args = parser.parse_args(argv)
    defaults = DEFAULTS["tiny" if args.model == "tiny" else "gpt2"]
    args.lr = defaults["lr"] if args.lr is None else args.lr
    args.epochs = defaults["epochs"] if args.epochs is None else args.epochs
    args.beta = defaults["beta"][args.loss] if args.beta is None else args.beta
    try:  # dpo_loss's own checks of beta, --loss and --label-smoothing, on dummy log-probs, before anything loads
        dpo.dpo_loss(*torch.zeros(4, 1), beta=args.beta, loss_type=args.loss, label_smoothing=args.label_smoothing)
    except ValueError as e:
        parser.error(str(e))
    if args.model == "tiny" and (args.weights or args.init == "random"):
        parser.error("--model tiny is always built here; --weights and --init are for the GPT-2 sizes")
    if args.weights and args.init == "random":
        parser.error("--weights loads weights and --init random makes new ones: pick one")
    if args.eval_every and args.data and not (args.eval_data or args.eval_fraction):
        parser.error("--eval-every evaluates held-out pairs: with --data, give --eval-data or --eval-fraction too")
    if args.eval_fraction and not args.data:
        parser.error("--eval-fraction holds out part of --data; the toy pairs come with held-out pairs of their own")
    existing = next(p for p in [Path(args.out).absolute(), *Path(args.out).absolute().parents] if p.exists())
    if not existing.is_dir():
        parser.error(f"--out {args.out}: {existing} is a file; --out must be a folder (created if missing)")
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


def describe_training(args, n_pairs, n_eval):
    line = (f"{args.loss.upper()} on {n_pairs:,} pairs, {n_eval:,} held out (beta {args.beta}, lr {args.lr}, "
            f"batch {args.batch_size}, {args.epochs} epoch{'s' if args.epochs > 1 else ''}, seed {args.seed}"
            + (", log-probs averaged over tokens)" if args.average_logps else ")"))
    if args.loss == "ipo":  # IPO paper, Eq. 17: the loss is zero at h = 1/(2 beta)
        unit = "nats per token" if args.average_logps else "nats"
        line += (f"; IPO's target h = 1/(2 beta) = {1 / (2 * args.beta):g} {unit}: log pi(chosen) - "
                 "log pi(rejected) ends that far above the reference's")
    return line


def prepare(args, device, log):
    """Data, tokenizer and model, checked before any training; the tiny model gets its SFT.
    Returns (tokenizer, policy, (pairs, their tokens), (held-out pairs, their tokens), SFT seconds)."""
    if args.data:
        pairs = load_pairs(args.data)
        eval_pairs = load_pairs(args.eval_data, "--eval-data") if args.eval_data else []
        if args.eval_fraction:
            pairs, eval_pairs = split_off_eval(pairs, args.eval_fraction, args.seed)
    else:
        pairs = TOY_PAIRS
        eval_pairs = load_pairs(args.eval_data, "--eval-data") if args.eval_data else TOY_EVAL_PAIRS
    if args.plot:
        import_pyplot()
    enc = load_tokenizer()
    torch.manual_seed(args.seed)
    policy = load_policy(args, device)
    print(describe_model(args, policy, device))
    context = policy.config.block_size
    n_given = len(pairs) + len(eval_pairs)
    pairs, encoded = pairs_that_fit(enc, pairs, args.data or "the toy pairs", context, args.max_length)
    eval_source = args.eval_data or args.data or "the held-out toy pairs"
    eval_pairs, eval_encoded = (pairs_that_fit(enc, eval_pairs, eval_source, context, args.max_length)
                                if eval_pairs else ([], []))
    if len(pairs) + len(eval_pairs) < n_given:
        print(f"left out {n_given - len(pairs) - len(eval_pairs):,} of {n_given:,} pairs longer than "
              f"--max-length {args.max_length}")
    sft_s = 0.0
    if args.model == "tiny":
        print(f"SFT warm-up on prompt + rejected completion ({SFT_STEPS} steps of {SFT_BATCH} sequences, lr {SFT_LR})")
        t0 = time.perf_counter()
        sft_warmup(policy, encoded + eval_encoded, SFT_STEPS, SFT_LR, args.seed, log)
        sft_s = time.perf_counter() - t0
    return enc, policy, (pairs, encoded), (eval_pairs, eval_encoded), sft_s


def train(args, policy, reference, encoded, reference_logps, evaluate, log):
    """DPO (or IPO) on the training pairs; evaluate(policy, step), if given, every --eval-every
    steps before the last. Returns the per-step metrics."""
    n_steps = args.epochs * math.ceil(len(encoded) / args.batch_size)  # dpo.epoch_batches' batches
    print_every = 1 if n_steps <= 30 else math.ceil(n_steps / 20)

    def on_step(m):
        shown = m["step"] % print_every == 0 or m["step"] in (1, n_steps)
        log({"phase": "dpo", **m}, format_step(m, n_steps) if shown else None)
        if evaluate and args.eval_every and m["step"] % args.eval_every == 0 and m["step"] < n_steps:
            evaluate(policy, m["step"])

    optimizer = dpo.make_optimizer(policy, lr=args.lr)
    try:
        history = dpo.train_dpo(policy, reference, encoded, optimizer, epochs=args.epochs, batch_size=args.batch_size,
                                seed=args.seed, beta=args.beta, loss_type=args.loss,
                                label_smoothing=args.label_smoothing, average_logps=args.average_logps,
                                reference_logps=reference_logps, on_step=on_step)
    except RuntimeError as e:
        if str(e).startswith("training diverged"):  # say which option it means, and that nothing was saved
            raise RuntimeError(f"{e} (--lr, now {args.lr}). Nothing was saved.") from None
        raise
    if next(policy.parameters()).device.type == "cuda":
        torch.cuda.synchronize()  # the steps are done, not only queued, when the clock stops
    return history


def reward_accuracy(before, after, beta):
    """The fraction of pairs whose implicit-reward margin beta [(after_c - before_c) - (after_r - before_r)]
    is > 0 (DPO paper, Eq. 5): relative to the reference, where "preferred" is absolute."""
    margins = [beta * ((ac - bc) - (ar - br))
               for bc, br, ac, ar in zip(before["chosen"], before["rejected"], after["chosen"], after["rejected"])]
    return sum(m > 0 for m in margins) / len(margins)


def report(args, pairs, eval_pairs, logps, completions, shown):
    """The tables, the headline and the greedy completions. logps: {"train" or "eval":
    (before, after)}; completions: (before, after) for the `shown` pairs."""
    print()
    print_table("training pair", pairs, *logps["train"], args.beta, args.average_logps)
    headline = "chosen preferred: training pairs " + " -> ".join(
        f"{count_preferred(x)}/{len(pairs)}" for x in logps["train"])
    if eval_pairs:
        print()
        print_table("held-out pair", eval_pairs, *logps["eval"], args.beta, args.average_logps)
        headline += ", held-out pairs " + " -> ".join(f"{count_preferred(x)}/{len(eval_pairs)}" for x in logps["eval"])
    print(f"\n{headline}\n")
    n_not_shown = len(pairs) + len(eval_pairs) - len(shown)
    print("greedy completions (before -> after)" + (f", {n_not_shown:,} more pairs not shown:" if n_not_shown else ":"))
    for i, (pair, b, a) in enumerate(zip(shown, *completions)):
        prompt = pair["prompt"] if len(pair["prompt"]) <= 60 else "..." + pair["prompt"][-57:]
        held_out = " (held out)" if i >= min(SHOWN, len(pairs)) else ""
        print(f"  {prompt!r}{held_out}\n    before: {b!r}\n    after:  {a!r}")


def save(out, policy, records, plot, history, evals, loss_type):
    """--out as one unit: written into a temporary folder beside it, which takes its place only
    when complete, so a run that fails leaves an earlier --out as it was."""
    def write(folder):
        policy.save_pretrained(folder)
        (Path(folder) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    Path(out).absolute().parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, write)
    if plot:
        save_plot(history, evals, plot, loss_type)


def run(args, device):
    """The whole experiment on `device`; returns the summary that ends metrics.jsonl."""
    records, seconds, evals = [], {}, []

    def log(record, line=None):
        records.append(record)
        if line:
            print("  " + line, flush=True)

    @contextlib.contextmanager
    def timed(phase):  # adds the block's seconds to seconds[phase]
        t0 = time.perf_counter()
        yield
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - t0

    # 1. inputs: everything that can be wrong with them is checked before any training
    with timed("load_s"):
        enc, policy, (pairs, encoded), (eval_pairs, eval_encoded), seconds["sft_s"] = prepare(args, device, log)
    seconds["load_s"] -= seconds["sft_s"]  # the tiny model's SFT is timed on its own
    print(describe_training(args, len(pairs), len(eval_pairs)))

    # 2. measure: the reference's log-probs are where the untouched policy stands, and all DPO needs of it
    with timed("reference_s"):
        reference = dpo.make_reference(policy)
        reference_logps = measure(reference, encoded, args, "reference log-probs")  # what DPO needs, once
        before = as_lists(reference_logps)

    def evaluate(model, step):
        """dpo.evaluate on the held-out pairs, logged as an "eval" record; returns the model's log-probs."""
        with timed("eval_s"):
            numbers, logps = dpo.evaluate(model, reference, eval_encoded, args.batch_size, args.beta, args.loss,
                                          args.label_smoothing, args.average_logps,
                                          progress=progress_printer("evaluating"))
        evals.append({"phase": "eval", "step": step, **numbers})
        log(evals[-1], format_eval(evals[-1]))
        return as_lists(logps)

    # at step 0 the policy is the reference (make_reference copied it), so one forward pass serves both
    eval_before = evaluate(reference, 0) if eval_encoded else None
    shown = pairs[:SHOWN] + eval_pairs[:SHOWN]
    with timed("eval_s"):
        completions_before = [greedy_completion(policy, enc, p["prompt"]) for p in shown]

    # 3. train: one forward pass of the policy per step, the reference's log-probs cached
    eval_s = seconds["eval_s"]
    with timed("train_s"):
        history = train(args, policy, reference, encoded, reference_logps, evaluate if eval_encoded else None, log)
    seconds["train_s"] -= seconds["eval_s"] - eval_s  # the evaluations during training are not training

    # 4. measure again, with the same functions
    with timed("eval_s"):
        after = as_lists(measure(policy, encoded, args, "trained log-probs"))
        completions_after = [greedy_completion(policy, enc, p["prompt"]) for p in shown]
    eval_after = evaluate(policy, len(history)) if eval_encoded else None

    # 5. report
    report(args, pairs, eval_pairs, {"train": (before, after), "eval": (eval_before, eval_after)},
           (completions_before, completions_after), shown)
    tokens = sum(m["tokens"] for m in history)
    positions = sum(m["positions"] for m in history)
    peak = peak_memory_bytes(device)
    sft = f" | sft {seconds['sft_s']:.2f} s" if args.model == "tiny" else ""
    print(f"\ntime: load {seconds['load_s']:.2f} s{sft} | reference {seconds['reference_s']:.2f} s | "
          f"train {seconds['train_s']:.2f} s ({len(history)} steps, {tokens / seconds['train_s']:,.0f} tokens/s, "
          f"{1 - tokens / positions:.0%} padding) | eval {seconds['eval_s']:.2f} s | peak memory "
          f"{peak / 2**20:,.0f} MiB ({'CUDA max allocated' if device.type == 'cuda' else 'process peak RSS'})")

    # 6. save: the trained policy, and the numbers for other tools to read without parsing text
    summary = {
        "summary": True, "model": args.model, "loss_type": args.loss, "beta": args.beta, "lr": args.lr,
        "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed, "device": str(device),
        "average_logps": args.average_logps, **seconds, "train_tokens": tokens, "train_positions": positions,
        "tokens_per_s": tokens / seconds["train_s"], "peak_memory_bytes": peak,
        "n_pairs": len(pairs), "preferred_before": count_preferred(before), "preferred_after": count_preferred(after),
        "final_reward_accuracy": reward_accuracy(before, after, args.beta),
        "n_eval_pairs": len(eval_pairs),
        "eval_preferred_before": count_preferred(eval_before) if eval_encoded else None,
        "eval_preferred_after": count_preferred(eval_after) if eval_encoded else None,
        "final_eval_reward_accuracy": evals[-1]["reward_accuracy"] if evals else None,
        "logps_before": before, "logps_after": after, "eval_logps_before": eval_before, "eval_logps_after": eval_after,
        "completions_before": completions_before, "completions_after": completions_after,
    }
    save(args.out, policy, [*records, summary], args.plot, history, evals, args.loss)
    print(f"saved the trained policy and metrics.jsonl to {args.out}/" +
          (f", curves to {args.plot}" if args.plot else ""))
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
