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
    python train_toy.py --model tiny     # a small stand-in, seconds on a CPU
    python train_toy.py --data pairs.jsonl --eval-fraction 0.1    # your own pairs
    torchrun --standalone --nproc_per_node=4 train_toy.py --data pairs.jsonl ...   # 4 GPUs

`--model tiny` stands in for pretrained GPT-2 the way the real pipeline does it: a
small GPT with the GPT-2 tokenizer first gets a short supervised warm-up (SFT) on each
prompt + its *rejected* (intuitive) completion, held-out prompts included, which becomes
the reference; DPO then flips it on the training pairs only. run() at the end of this
file is the experiment: prepare, measure which completion the model prefers, train,
measure again with the same function, report, save.

Read first: model.py, dpo.py. Read next: test_dpo.py.
"""

import os

# Same seed, same numbers, in every process: on x86 CPUs PyTorch's matrix products go through
# MKL, which now and then takes another code path in a new process unless told to be strict;
# on CUDA, cuBLAS needs a fixed workspace for deterministic products (start_processes asks
# PyTorch for deterministic kernels there). Both are read when the libraries start, hence here.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse
import contextlib
import functools
import hashlib
import json
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import checkpoint
import dpo
from model import GPT, GPT2_MODELS, GPTConfig, hf_state_dict

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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# What a run writes into --out. A save writes them all at once (checkpoint.replace_folder);
# the last two only with --save-every, so that --resume can continue from there.
OUT_FILES = ("config.json", "model.safetensors", "metrics.jsonl", "reference.safetensors", "resume.pt")
# What --resume refuses to change: the numbers a run computes depend on them.
RESUME_MUST_MATCH = ("model", "loss", "beta", "label_smoothing", "average_logps", "lr", "epochs", "batch_size",
                     "seed", "dtype", "warmup_steps", "lr_decay")


# -----------------------------------------------------------------------------
# Options

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
    add = parser.add_argument
    add("--model", default="gpt2", choices=[*GPT2_MODELS, "tiny"],
        help="GPT-2 size to load, or 'tiny' for the small stand-in (default gpt2)")
    add("--weights", help="a local model.safetensors (or a folder with one) to load instead of downloading")
    add("--init", default="pretrained", choices=["pretrained", "random"],
        help="'random': the --model's shapes with random weights (times the real sizes offline)")
    add("--loss", default="dpo", choices=["dpo", "ipo"], help="DPO (Eq. 7) or IPO (Eq. 17)")
    add("--beta", type=positive(float), help="strength of the pull towards the reference (see below)")
    add("--label-smoothing", type=float, default=0.0, help="conservative DPO's eps, in [0, 0.5) (0)")
    add("--average-logps", action="store_true",
        help="log pi(y|x) as the mean over the completion's tokens, not the sum (the paper's)")
    add("--lr", type=positive(float), help="AdamW's peak learning rate (see below)")
    add("--warmup-steps", type=int, default=0, help="steps of linear warmup from 0 to --lr (0)")
    add("--lr-decay", default="none", choices=["none", "linear"], help="after the warmup: constant, or linear to 0")
    add("--epochs", type=positive(int), help="passes over the training pairs (see below)")
    add("--batch-size", type=positive(int), default=2,
        help="pairs per optimizer step, over all micro-batches and processes; per batch when measuring (2)")
    add("--grad-accum", type=positive(int), default=1, help="micro-batches per step and process (1)")
    add("--seed", type=int, default=0, help="same seed, device and threads: same numbers (0)")
    add("--device", choices=["cpu", "cuda", "mps"], help="default: cuda if there is one, else mps, else cpu")
    add("--dtype", choices=list(DTYPES), help="the forward passes' precision under autocast; weights, optimizer "
        "and log-prob sums stay float32 (default: bfloat16 on a GPU that has it, else float32)")
    add("--data", help="a .jsonl of {prompt, chosen, rejected} objects, or HH-RLHF's {chosen, rejected} "
        "dialogues (default: the four toy pairs)")
    held_out = parser.add_mutually_exclusive_group()
    held_out.add_argument("--eval-data", help="held-out pairs, a .jsonl like --data (default with the toy "
                          "pairs: four held-out toy pairs)")
    held_out.add_argument("--eval-fraction", type=fraction, help="hold out this seeded fraction of --data")
    add("--eval-every", type=positive(int), help="evaluate every N steps (default: at the start and the end only)")
    add("--max-length", type=positive(int),
        help="leave out pairs with a row (prompt + completion) longer than this many tokens")
    add("--out", default="out/toy-dpo", help="the run's folder (out/toy-dpo): the policy (config.json, "
        "model.safetensors), metrics.jsonl, and with --save-every reference.safetensors and resume.pt. It must be "
        "missing, empty or an earlier run's, whose files each save replaces all at once; other files are refused")
    add("--save-every", type=positive(int), help="save what --resume needs every N steps (and at the end)")
    add("--resume", action="store_true", help="continue the run saved in --out, with its options (--grad-accum, "
        "--device and the processes may change; the numbers stay the same only if they do not)")
    add("--plot", help="save loss and reward curves to this .png (needs matplotlib)")
    args = parser.parse_args(argv)

    defaults = DEFAULTS["tiny" if args.model == "tiny" else "gpt2"]
    args.lr = defaults["lr"] if args.lr is None else args.lr
    args.epochs = defaults["epochs"] if args.epochs is None else args.epochs
    args.beta = defaults["beta"][args.loss] if args.beta is None else args.beta
    args.device = args.device or ("cuda" if torch.cuda.is_available() else
                                  "mps" if torch.backends.mps.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" and torch.cuda.is_bf16_supported() else "float32")
    out = Path(args.out).absolute()
    existing = next(p for p in [out, *out.parents] if p.exists())
    for wrong, message in [
        (args.model == "tiny" and (args.weights or args.init == "random"),
         "--model tiny is always built here; --weights and --init are for the GPT-2 sizes"),
        (args.weights and args.init == "random", "--weights loads weights and --init random makes new ones: pick one"),
        (not 0 <= args.label_smoothing < 0.5, f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}"),
        (args.loss == "ipo" and args.label_smoothing, "--label-smoothing is for --loss dpo; IPO is already robust "
                                                      "to noisy labels"),
        (args.eval_every and args.data and not (args.eval_data or args.eval_fraction),
         "--eval-every evaluates held-out pairs: with --data, give --eval-data or --eval-fraction too"),
        (args.eval_fraction and not args.data,
         "--eval-fraction holds out part of --data; the toy pairs come with held-out pairs of their own"),
        (args.warmup_steps < 0, "--warmup-steps must be 0 or more"),
        (args.device == "cuda" and not torch.cuda.is_available(),
         "--device cuda: this torch sees no CUDA GPU (a CPU-only build, or no driver)"),
        (args.device == "mps" and not torch.backends.mps.is_available(), "--device mps: MPS is not available here"),
        (not existing.is_dir(), f"--out {args.out}: {existing} is a file; --out must be a folder (created if missing)"),
        (Path.cwd().resolve().is_relative_to(out.resolve()), f"--out {args.out} is the folder you are in, or holds "
                                                             "it; give a folder of its own, such as out/run1"),
        (args.plot and Path(args.plot).absolute().is_relative_to(out), "--plot must be outside --out, "
                                                                      "which holds the run's own files only"),
    ]:
        if wrong:
            parser.error(message)
    return args


# -----------------------------------------------------------------------------
# Data: every line checked, tokenised included, before any model is built

@dataclass
class Pairs:
    """Preference pairs as read (dicts holding the texts) and as token ids, in one order."""
    texts: list
    tokens: list
    source: str  # where they come from, for messages


def load_tokenizer():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises several kinds when its files cannot be fetched
        raise OSError(f"could not load GPT-2's tokenizer ({type(e).__name__}): tiktoken fetches its two files "
                      "(vocab.bpe and encoder.json, about 1.5 MB) once, from the network.\n"
                      "Offline, copy them into a folder and set TIKTOKEN_CACHE_DIR to it (README.md, Offline).") \
            from None


def read_pairs(path, enc, option="--data"):
    """Pairs from a .jsonl file of {"prompt", "chosen", "rejected"} objects, or of HH-RLHF's
    {"chosen", "rejected"}: two whole dialogues whose shared beginning is the prompt
    (dpo.split_prompt). An error names the file and the line."""
    def parse(pair, line):
        if "prompt" not in pair:
            pair = dict(zip(("prompt", "chosen", "rejected"), dpo.split_prompt(
                dpo.text_field(pair, "chosen"), dpo.text_field(pair, "rejected"))))
        tokens = dpo.encode_pair(enc, pair)
        return {"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"], "line": line}, tokens

    pairs = checkpoint.read_jsonl(path, parse, option)
    if not pairs:
        raise ValueError(f"{path}: no preference pairs in the file (it is empty)")
    return Pairs([texts for texts, _ in pairs], [tokens for _, tokens in pairs], str(path))


def select(pairs, keep):
    """The pairs where keep (a list of bools) is True, in their order."""
    return Pairs(*([x for x, k in zip(column, keep) if k] for column in (pairs.texts, pairs.tokens)), pairs.source)


def split_off_eval(pairs, fraction, seed):
    """(training pairs, held-out pairs): a seeded random fraction held out. The two parts are
    disjoint, and each keeps the file's order."""
    n_eval = round(fraction * len(pairs.texts))
    if not 1 <= n_eval < len(pairs.texts):
        raise ValueError(f"--eval-fraction {fraction} of {len(pairs.texts)} pairs holds out {n_eval}; it must "
                         "leave at least one pair for training and one for evaluation")
    held_out = set(torch.randperm(len(pairs.texts), generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
    is_held_out = [i in held_out for i in range(len(pairs.texts))]
    return select(pairs, [not h for h in is_held_out]), select(pairs, is_held_out)


def read_data(args, enc):
    """(training pairs, held-out pairs) from --data, --eval-data, --eval-fraction, or the toy pairs."""
    if args.data:
        train = read_pairs(args.data, enc)
        if args.eval_fraction:
            return split_off_eval(train, args.eval_fraction, args.seed)
    else:
        train = Pairs(TOY_PAIRS, dpo.encode_pairs(enc, TOY_PAIRS), "the toy pairs")
    if args.eval_data:
        return train, read_pairs(args.eval_data, enc, "--eval-data")
    if args.data:
        return train, Pairs([], [], "no held-out pairs")
    return train, Pairs(TOY_EVAL_PAIRS, dpo.encode_pairs(enc, TOY_EVAL_PAIRS), "the held-out toy pairs")


def pairs_that_fit(pairs, args, context):
    """The pairs that fit the model's context. A longer pair is an error, unless --max-length N
    is given: then every pair whose longer row has more than N tokens is left out."""
    if args.max_length is not None and args.max_length > context:
        raise ValueError(f"--max-length {args.max_length} is longer than the model's context of {context} tokens")
    fits = [dpo.longest_row(t) <= (args.max_length or context) for t in pairs.tokens]
    if not all(fits) and args.max_length is None:
        i = fits.index(False)
        where = f"line {pairs.texts[i]['line']}" if "line" in pairs.texts[i] else "a pair"
        raise ValueError(
            f"{pairs.source} {where}: prompt + completion is {dpo.longest_row(pairs.tokens[i])} tokens, longer than "
            f"the model's context of {context} ({fits.count(False)} of {len(fits)} pairs are); shorten them, or pass "
            f"--max-length {context} to leave such pairs out")
    if fits and not any(fits):
        raise ValueError(f"{pairs.source}: all {len(fits)} pairs are longer than --max-length {args.max_length}")
    return select(pairs, fits)


# -----------------------------------------------------------------------------
# The model, the device and the processes

def load_policy(args, device):
    if args.model == "tiny":
        return GPT(GPTConfig(**TINY_CONFIG)).to(device)
    if args.init == "random":
        return GPT(GPTConfig(**GPT2_MODELS[args.model])).to(device)
    try:
        return GPT.from_pretrained(args.weights or args.model, device=device)
    except OSError as e:
        raise type(e)(f"{e}\nTo run without the download: --weights path/to/model.safetensors, "
                      "--init random (random weights), or --model tiny.") from None


def sft_warmup(model, tokens, seed, log):
    """Next-token training on prompt + rejected completion: the tiny model's 'pretraining',
    after which, like GPT-2, it finds the intuitive completions likely; in float32 whatever
    --dtype, as GPT-2's own pretraining is done before any of this. Batches of SFT_BATCH
    sequences, each padded to its own longest row by dpo.pad_rows; the whole sequence is the
    'completion' there, so every token after the first is a target."""
    sequences = [([], prompt_ids + rejected_ids) for prompt_ids, _, rejected_ids in tokens]
    generator = torch.Generator().manual_seed(seed)
    batches = []
    while len(batches) < SFT_STEPS:  # shuffled passes over the sequences
        order = torch.randperm(len(sequences), generator=generator).tolist()
        batches += [order[i:i + SFT_BATCH] for i in range(0, len(order), SFT_BATCH)]
    device = next(model.parameters()).device
    optimizer = dpo.make_optimizer(model, SFT_LR)
    model.train()
    for step, indices in enumerate(batches[:SFT_STEPS], start=1):
        ids, mask = (x.to(device) for x in dpo.pad_rows([sequences[i] for i in indices]))
        loss = -dpo.completion_logps(model, ids, mask).sum() / mask[:, 1:].sum()  # mean next-token NLL
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == 1:
            log({"phase": "sft", "step": step, "loss": loss.item()}, f"sft step {step:3d} | loss {loss.item():.4f}")
    model.eval()


def start_processes(args):
    """The device, and under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE) this
    process's place among the others: nccl between GPUs, one GPU a process; gloo between
    CPUs. Only process 0 prints: the others' stdout goes to os.devnull."""
    device = torch.device(args.device)
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        if dist.get_rank() != 0:
            sys.stdout = open(os.devnull, "w")
    if device.type == "cuda":  # same seed, same numbers: some CUDA kernels add up in any order otherwise
        torch.use_deterministic_algorithms(True)
    return device


def is_first_process():
    return dpo.process_rank_and_count()[0] == 0


# -----------------------------------------------------------------------------
# --out: the run's files, saved as one unit (checkpoint.replace_folder), and read back by --resume

def check_out(args):
    """Before anything loads: --out is put in order and tried (process 0), then refused if it
    holds files this script did not write, or holds nothing to resume with --resume."""
    option = f"--out {args.out}"
    if is_first_process():
        checkpoint.prepare_run_folder(args.out, OUT_FILES, option)
    if dist.is_initialized():
        dist.barrier()  # the others look at --out once process 0 has put it in order
    names = checkpoint.refuse_others(args.out, OUT_FILES, "metrics.jsonl", option)
    missing = [name for name in ("resume.pt", "reference.safetensors", "model.safetensors") if name not in names]
    if args.resume and missing:
        raise FileNotFoundError(f"--resume: {args.out} holds no {missing[0]}, so there is nothing to resume "
                                "(--save-every N saves what --resume needs)")


def save_run(args, policy, records, resume=None, reference=None, replaced=lambda: None):
    """--out replaced by the policy and the records, and, with --save-every, by what --resume
    needs besides: the reference and the rest of the run's state (resume: tensors and plain
    values only). replaced() is called once the new files are in place."""
    def write(folder):
        policy.save_pretrained(folder)
        checkpoint.save_jsonl(records, folder / "metrics.jsonl")
        if resume is not None:
            checkpoint.save_safetensors(hf_state_dict(reference), folder / "reference.safetensors")
            checkpoint.save_state(resume, folder / "resume.pt")

    if is_first_process():
        checkpoint.save_folder(args.out, write, OUT_FILES, replaced)


def fingerprint(*pairs):
    """sha256 of the pairs' texts, for --resume to check that it trains on the same pairs."""
    texts = [[[p["prompt"], p["chosen"], p["rejected"]] for p in part.texts] for part in pairs]
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()


def resume_from(args, device):
    """The run saved in --out: its state (resume_state, below), policy, reference and records."""
    out = Path(args.out)
    state = checkpoint.load_state(out / "resume.pt", "--resume")
    if not isinstance(state, dict) or not {"step", "optimizer", "reference_logps", "options", "pairs"} <= state.keys():
        raise ValueError(f"--resume: {out / 'resume.pt'} is not a checkpoint that this script saved")
    changed = [f"--{k.replace('_', '-')} {state['options'][k]} -> {getattr(args, k)}"
               for k in RESUME_MUST_MATCH if state["options"][k] != getattr(args, k)]
    if changed:
        raise ValueError(f"--resume: these options differ from the run in {args.out}: {', '.join(changed)}. "
                         "Resume with that run's options, or start a new run in another --out")
    state["records"] = checkpoint.read_jsonl(out / "metrics.jsonl", lambda record, line: record, "--resume")
    state["policy"] = GPT.from_pretrained(out, device=device)
    state["reference"] = dpo.make_reference(GPT.from_pretrained(out / "reference.safetensors", device=device))
    return state


# -----------------------------------------------------------------------------
# Measuring and printing

def log_to(records, record, line=None):
    """Keep record for metrics.jsonl; print line, if any."""
    records.append(record)
    if line:
        print("  " + line, flush=True)


def progress_printer(label, every_s=10.0):
    """A progress(done, total) callback for long phases: a line at most every every_s seconds."""
    start = last = time.perf_counter()

    def progress(done, total):
        nonlocal last
        if time.perf_counter() - last >= every_s:
            last = time.perf_counter()
            print(f"  {label}: {done:,}/{total:,} pairs, {last - start:.0f} s", flush=True)
    return progress


def measure(model, pairs, args, autocast):
    """(log pi(y_chosen|x), log pi(y_rejected|x)) of every pair, (len(pairs),) each, by the same
    function before training (on the reference: where the policy started) and after."""
    return dpo.pair_logps(model, pairs.tokens, args.batch_size, args.average_logps, autocast,
                          progress_printer("log-probs"))


def count_preferred(logps):
    """Pairs whose chosen completion is strictly more likely than the rejected one (a tie is not)."""
    chosen, rejected = logps
    return int((chosen > rejected).sum())


@torch.no_grad()
def greedy_completions(model, enc, pairs, max_new_tokens=12):
    completions = []
    for pair in pairs:
        ids = torch.tensor([enc.encode(pair["prompt"])], device=next(model.parameters()).device)
        out = model.generate(ids, max_new_tokens, temperature=0)[0, ids.size(1):].tolist()
        completions.append(enc.decode(out[:out.index(enc.eot_token)] if enc.eot_token in out else out))
    return completions


def shown_pairs(train_pairs, eval_pairs):
    """The pairs shown with greedy completions: the first SHOWN of each part."""
    return train_pairs.texts[:SHOWN] + eval_pairs.texts[:SHOWN]


def format_numbers(m):
    return (f"loss {m['loss']:.4f} | reward acc {m['reward_accuracy']:.2f} | margin {m['margin']:+.3f} | "
            f"chosen {m['chosen_reward']:+.3f} | rejected {m['rejected_reward']:+.3f}")


def print_table(title, pairs, before, after, beta, averaged):
    """The first SHOWN pairs: log-probs before -> after, which completion each prefers, and the
    implicit rewards (DPO paper, Eq. 5; `before` is the reference's log-probs)."""
    per = "/token" if averaged else ""  # --average-logps: means over the tokens, and so are the rewards
    print(f"\n{title:<46} {'log pi(chosen)' + per:>22} {'log pi(rejected)' + per:>22} {'prefers':>17} "
          f"{'reward c / r':>15}\n{'':<46} {'before -> after':>22} {'before -> after':>22} {'before -> after':>17}")
    prefers = lambda c, r: "chosen" if c > r else "rejected"
    for i, pair in enumerate(pairs.texts[:SHOWN]):
        (c0, r0), (c1, r1) = before[:, i].tolist(), after[:, i].tolist()
        prompt = " ".join(pair["prompt"].split())  # a dialogue's lines on one line, its end if long
        prompt = prompt if len(prompt) <= 45 else "..." + prompt[-42:]
        print(f"{prompt:<46} {c0:>9.2f} -> {c1:>9.2f} {r0:>9.2f} -> {r1:>9.2f} "
              f"{prefers(c0, r0):>8} -> {prefers(c1, r1):<8}{beta * (c1 - c0):>+7.2f} / {beta * (r1 - r0):+.2f}")
    if len(pairs.texts) > SHOWN:
        print(f"  ... and {len(pairs.texts) - SHOWN:,} more pairs, not shown (all are counted below)")


def report(args, train_pairs, eval_pairs, before, after, completions, summary):
    """The tables, the headline, the greedy completions and the training speed."""
    headline = []
    for title, kind, pairs in (("training pair", "train", train_pairs), ("held-out pair", "eval", eval_pairs)):
        if pairs.texts:
            print_table(title, pairs, torch.stack(before[kind]), torch.stack(after[kind]), args.beta,
                        args.average_logps)
            counts = " -> ".join(f"{count_preferred(x[kind])}/{len(pairs.texts)}" for x in (before, after))
            headline.append(f"{title.replace('pair', 'pairs')} {counts}")
    print(f"\nchosen preferred: {', '.join(headline)}\n")
    shown = shown_pairs(train_pairs, eval_pairs)
    n_not_shown = len(train_pairs.texts) + len(eval_pairs.texts) - len(shown)
    print("greedy completions (before -> after)" + (f", {n_not_shown:,} more pairs not shown:" if n_not_shown else ":"))
    for i, (pair, b, a) in enumerate(zip(shown, *completions)):
        prompt = pair["prompt"] if len(pair["prompt"]) <= 60 else "..." + pair["prompt"][-57:]
        held_out = " (held out)" if i >= min(SHOWN, len(train_pairs.texts)) else ""
        print(f"  {prompt!r}{held_out}\n    before: {b!r}\n    after:  {a!r}")
    memory = "CUDA" if "cuda" in summary["device"] else "process RSS"
    print(f"\ntraining: {summary['train_s']:.2f} s, {summary['tokens_per_s']:,.0f} tokens/s, "
          f"{1 - summary['train_tokens'] / summary['train_positions']:.0%} padding; peak memory "
          f"{summary['peak_memory_bytes'] / 2**20:,.0f} MiB ({memory})")


def import_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    return plt


def save_plot(records, path, loss_type):
    """The loss (training steps and held-out evaluations) and the implicit rewards of the training steps."""
    plt = import_pyplot()
    steps, evals = ([r for r in records if r.get("phase") == phase] for phase in ("dpo", "eval"))
    curve = lambda rs, key: ([r["step"] for r in rs], [r[key] for r in rs])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(*curve(steps, "loss"), label="training batch")
    if evals:
        ax1.plot(*curve(evals, "loss"), "o--", label="held-out pairs")
    ax1.set(xlabel="step", ylabel="loss", title=f"{loss_type.upper()} loss")
    ax2.plot(*curve(steps, "chosen_reward"), label="chosen")
    ax2.plot(*curve(steps, "rejected_reward"), label="rejected")
    ax2.axhline(0.0, color="gray", linewidth=0.5)
    ax2.set(xlabel="step", ylabel="beta * log(pi / pi_ref)", title="implicit rewards (training batch)")
    for ax in (ax1, ax2):
        ax.legend()
    fig.tight_layout()
    Path(path).absolute().parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


# -----------------------------------------------------------------------------
# The experiment

def describe_training(args, n_train, n_eval):
    """The line that says what is about to be trained, and how."""
    processes = dpo.process_rank_and_count()[1]
    line = (f"{args.loss.upper()} on {n_train:,} pairs, {n_eval:,} held out (beta {args.beta}, lr {args.lr}, batch "
            f"{args.batch_size}, {args.epochs} epoch{'s' if args.epochs > 1 else ''}, seed {args.seed}"
            + (", log-probs averaged over tokens" if args.average_logps else "")
            + (f", {args.grad_accum} micro-batches" if args.grad_accum > 1 else "")
            + (f", {processes} processes" if processes > 1 else "") + ")")
    if args.loss == "ipo":  # IPO paper, Eq. 17: the loss is zero at h = 1/(2 beta)
        unit = "nats per token" if args.average_logps else "nats"
        line += (f"; IPO's target h = 1/(2 beta) = {1 / (2 * args.beta):g} {unit}: "
                 "the loss is 0 where log pi(chosen) - log pi(rejected) is that far above the reference's")
    return line


def prepare(args, device, log):
    """Every input read and checked before any model is built (the pairs' lengths against its
    context once it is there), then the models: the policy (the tiny one after its SFT) and its
    frozen reference, or both from --out with --resume. Returns
    (tokenizer, training pairs, held-out pairs, policy, reference, resumed state or None)."""
    check_out(args)
    if args.plot:
        import_pyplot()  # now, not after training
    enc = load_tokenizer()
    train_pairs, eval_pairs = read_data(args, enc)
    torch.manual_seed(args.seed)  # the random weights of --model tiny and --init random
    resumed = resume_from(args, device) if args.resume else None
    policy = resumed["policy"] if resumed else load_policy(args, device)
    print(f"model {args.weights or args.model}: {policy.config.n_layer} layers, {policy.config.n_embd} wide, "
          f"{sum(p.numel() for p in policy.parameters()):,} parameters, on {device}, {args.dtype}")
    n_given = len(train_pairs.texts) + len(eval_pairs.texts)
    train_pairs, eval_pairs = (pairs_that_fit(p, args, policy.config.block_size) for p in (train_pairs, eval_pairs))
    if len(train_pairs.texts) + len(eval_pairs.texts) < n_given:
        print(f"left out {n_given - len(train_pairs.texts) - len(eval_pairs.texts):,} of {n_given:,} pairs longer "
              f"than --max-length {args.max_length}")
    if resumed:
        if resumed["pairs"] != fingerprint(train_pairs, eval_pairs):
            raise ValueError(f"--resume: these are not the pairs of the run in {args.out} (--data, --eval-data, "
                             "--eval-fraction or --max-length differ, or the files changed)")
        if resumed["step"] == dpo.count_training_steps(len(train_pairs.tokens), args.batch_size, args.epochs):
            raise ValueError(f"--resume: the run in {args.out} has finished (step {resumed['step']}); there is "
                             "nothing to continue")
        print(f"resuming the run in {args.out} after step {resumed['step']}")
    elif args.model == "tiny":
        print(f"SFT warm-up on prompt + rejected completion ({SFT_STEPS} steps of {SFT_BATCH} sequences, lr {SFT_LR})")
        sft_warmup(policy, train_pairs.tokens + eval_pairs.tokens, args.seed, log)
    print(describe_training(args, len(train_pairs.texts), len(eval_pairs.texts)))
    reference = resumed["reference"] if resumed else dpo.make_reference(policy)  # frozen where DPO starts
    return enc, train_pairs, eval_pairs, policy, reference, resumed


def train(args, policy, optimizer, scaler, pairs, reference_logps, start_step, autocast, log, between_steps):
    """DPO (or IPO) on the training pairs. between_steps(step, n_steps) runs after each step
    (held-out evaluations, checkpoints) and is not timed as training. Returns the training
    seconds, and the tokens and the positions (tokens + padding) it ran on."""
    n_steps = dpo.count_training_steps(len(pairs.tokens), args.batch_size, args.epochs)
    print_every = 1 if n_steps <= 30 else math.ceil(n_steps / 20)
    _, processes = dpo.process_rank_and_count()
    model = policy if processes == 1 else DistributedDataParallel(
        policy, device_ids=[policy.lm_head.weight.device.index] if args.device == "cuda" else None)
    counts = {"train_tokens": 0, "train_positions": 0, "other_s": 0.0}

    def on_step(m, indices):
        counts["train_tokens"] += sum(2 * len(p) + len(c) + len(r) for p, c, r in (pairs.tokens[i] for i in indices))
        counts["train_positions"] += sum(2 * len(part) * max(dpo.longest_row(pairs.tokens[i]) for i in part)
                                         for part in dpo.split_step(indices, processes * args.grad_accum) if part)
        shown = m["step"] % print_every == 0 or m["step"] in (1, n_steps)
        log({"phase": "dpo", **m}, f"step {m['step']:3d}/{n_steps} (epoch {m['epoch']}) | " + format_numbers(m)
            if shown else None)
        t0 = time.perf_counter()
        between_steps(m["step"], n_steps)
        counts["other_s"] += time.perf_counter() - t0

    start = time.perf_counter()
    dpo.train_dpo(model, None, pairs.tokens, optimizer, epochs=args.epochs, batch_size=args.batch_size,
                  seed=args.seed, beta=args.beta, loss_type=args.loss, label_smoothing=args.label_smoothing,
                  average_logps=args.average_logps, reference_logps=reference_logps, grad_accum=args.grad_accum,
                  lr_at=lambda step: dpo.learning_rate(step, args.lr, args.warmup_steps, args.lr_decay, n_steps),
                  start_step=start_step, autocast=autocast, scaler=scaler, on_step=on_step)
    if args.device == "cuda":
        torch.cuda.synchronize()  # the steps are done, not only queued, when the clock stops
    counts["train_s"] = time.perf_counter() - start - counts.pop("other_s")
    return counts


def peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def make_summary(args, device, train_pairs, eval_pairs, before, after, records, speed, completions):
    """The last line of metrics.jsonl: the run's options and outcome in one record."""
    evals = [r for r in records if r.get("phase") == "eval"]
    rewards = dpo.dpo_loss(*after["train"], *before["train"], beta=args.beta)[1:]
    lists = lambda logps: {"chosen": logps[0].tolist(), "rejected": logps[1].tolist()} if len(logps[0]) else None
    preferred = lambda logps: count_preferred(logps) if len(logps[0]) else None
    return {
        "summary": True, "model": args.model, "weights": args.weights, "loss_type": args.loss, "beta": args.beta,
        "lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "processes": dpo.process_rank_and_count()[1], "seed": args.seed, "device": str(device), "dtype": args.dtype,
        "average_logps": args.average_logps, **speed, "tokens_per_s": speed["train_tokens"] / speed["train_s"],
        "peak_memory_bytes": peak_memory_bytes(device), "n_pairs": len(train_pairs.texts),
        "preferred_before": preferred(before["train"]), "preferred_after": preferred(after["train"]),
        "final_reward_accuracy": dpo.reward_accuracy(*rewards).mean().item(), "n_eval_pairs": len(eval_pairs.texts),
        "eval_preferred_before": preferred(before["eval"]), "eval_preferred_after": preferred(after["eval"]),
        "final_eval_reward_accuracy": evals[-1]["reward_accuracy"] if evals else None,
        "logps_before": lists(before["train"]), "logps_after": lists(after["train"]),
        "eval_logps_before": lists(before["eval"]), "eval_logps_after": lists(after["eval"]),
        "completions_before": completions[0], "completions_after": completions[1],
    }


def evaluate_held_out(args, policy, reference, pairs, autocast, log, step):
    """dpo.evaluate on the held-out pairs, if there are any, logged as an "eval" record."""
    if pairs.texts:
        m = dpo.evaluate(policy, reference, pairs.tokens, args.batch_size, args.beta, args.loss,
                         args.label_smoothing, args.average_logps, autocast, progress_printer("evaluating"))
        log({"phase": "eval", "step": step, **m}, f"eval at step {step:3d} (held out) | " + format_numbers(m)
            + f" | kl {max(m['kl'], 0.0):.4f}")  # >= 0, but rounding can give -1e-9


def optimizer_and_scaler(args, policy, resumed):
    """AdamW, and for float16 a gradient scaler (fp16's small gradients would round to zero);
    as they were, with --resume."""
    optimizer = dpo.make_optimizer(policy, args.lr)
    scaler = torch.amp.GradScaler(policy.lm_head.weight.device.type) if args.dtype == "float16" else None
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        if scaler is not None:
            scaler.load_state_dict(resumed["scaler"])
    return optimizer, scaler


def resume_state(args, step, optimizer, scaler, reference_logps, pairs_fingerprint):
    """Everything --resume needs besides the two models, with --save-every: tensors and plain
    values only, so that torch.load(weights_only=True) reads it back."""
    return {"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler and scaler.state_dict(),
            "reference_logps": reference_logps, "options": {k: getattr(args, k) for k in RESUME_MUST_MATCH},
            "pairs": pairs_fingerprint} if args.save_every else None


def run(args, status):
    """The whole experiment; returns the summary that ends metrics.jsonl. status["step"] and
    status["saved"] say how far it got, for main's message if it is stopped."""
    device = start_processes(args)
    autocast = contextlib.nullcontext() if args.dtype == "float32" else torch.autocast(device.type, DTYPES[args.dtype])
    records = []
    log = functools.partial(log_to, records)

    # 1. prepare: every input is checked before any model is built
    enc, train_pairs, eval_pairs, policy, reference, resumed = prepare(args, device, log)
    records[:0] = resumed["records"] if resumed else []
    evaluate_at_step = functools.partial(evaluate_held_out, args, policy, reference, eval_pairs, autocast, log)

    # 2. measure: where the untouched model stands (the reference is that model, frozen); on the
    # training pairs, these are also the reference's log-probs that every step subtracts
    reference_logps = resumed["reference_logps"] if resumed else measure(reference, train_pairs, args, autocast)
    before = {"train": reference_logps, "eval": measure(reference, eval_pairs, args, autocast)}
    completions = [greedy_completions(reference, enc, shown_pairs(train_pairs, eval_pairs))]
    if not resumed:
        evaluate_at_step(0)

    # 3. train: one forward pass of the policy per batch, the reference's log-probs cached
    optimizer, scaler = optimizer_and_scaler(args, policy, resumed)
    pairs_fingerprint = fingerprint(train_pairs, eval_pairs) if args.save_every else None  # once, not every save

    def save(step, records, finished=False):
        resume = resume_state(args, step, optimizer, scaler, reference_logps, pairs_fingerprint)
        save_run(args, policy, records, resume, reference,
                 replaced=lambda: status.update(saved=step, finished=finished))

    def between_steps(step, n_steps):  # not timed as training
        status["step"] = step
        if step < n_steps and args.eval_every and step % args.eval_every == 0:
            evaluate_at_step(step)
        if step < n_steps and args.save_every and step % args.save_every == 0:
            save(step, records)

    speed = train(args, policy, optimizer, scaler, train_pairs, reference_logps, resumed["step"] if resumed else 0,
                  autocast, log, between_steps)

    # 4. measure again, with the same functions
    after = {"train": measure(policy, train_pairs, args, autocast), "eval": measure(policy, eval_pairs, args, autocast)}
    completions.append(greedy_completions(policy, enc, shown_pairs(train_pairs, eval_pairs)))
    evaluate_at_step(status["step"])

    # 5. report, and the same numbers in one record for other tools to read
    summary = make_summary(args, device, train_pairs, eval_pairs, before, after, records, speed, completions)
    report(args, train_pairs, eval_pairs, before, after, completions, summary)

    # 6. save: the trained policy and metrics.jsonl
    save(status["step"], [*records, summary], finished=True)
    if args.plot and is_first_process():
        save_plot(records, args.plot, args.loss)
    curves = f", curves to {args.plot}" if args.plot else ""
    print(f"saved the trained policy and metrics.jsonl to {args.out}/{curves}")
    return summary


def main(argv=None):
    args = parse_args(argv)
    # kill, or a cluster scheduler's stop: the same clean stop as Ctrl-C
    previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
    status = {"step": 0, "saved": None, "finished": False}
    try:
        return run(args, status)
    except KeyboardInterrupt:
        where = f"after step {status['step']}" if status["step"] else "before training"
        kept = (f"{args.out} holds the finished run" if status["finished"] else
                f"{args.out} holds the save of step {status['saved']}" if status["saved"] else
                f"nothing was saved and {args.out} is as it was")
        can_resume = args.save_every and status["saved"] and not status["finished"]
        resumable = "; --resume continues from it" if can_resume else ""
        sys.exit(f"stopped {where} (Ctrl-C or SIGTERM); {kept}{resumable}" if is_first_process() else 1)
    except (OSError, ValueError, FloatingPointError) as e:  # bad input, disk, network: a message to act on
        sys.exit(f"error: {e}" if is_first_process() else 1)
    except torch.cuda.OutOfMemoryError:
        sys.exit("error: out of GPU memory; try a larger --grad-accum (smaller micro-batches)"
                 if is_first_process() else 1)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
