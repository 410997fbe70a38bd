"""
The DPO trainer for your own preference pairs: dpo.py's algorithm at real sizes.

    python train.py --data pairs.jsonl --eval-fraction 0.1                     # GPT-2 124M
    python train.py --data pairs.jsonl --eval-fraction 0.1 --model tiny        # a small stand-in, seconds
    torchrun --standalone --nproc_per_node=8 train.py --data hh.jsonl.gz ...   # eight GPUs
    python train.py --resume --out out/dpo                                     # continue a stopped run

What it adds to dpo.py, a section each, in this order: the options; data files as
preference data sets come (JSON Lines or a JSON array, gzipped or not; the standard,
HH-RLHF and TRL's conversational shapes), with the pairs that cannot be trained on left out
and counted; the model (a GPT-2 size, a local file, random weights, or a tiny stand-in);
several processes under torchrun; printing; a step split into micro-batches (--grad-accum),
under bfloat16 or float16 autocast, with a learning-rate schedule; the passes without a
gradient, shared out among the processes; answers to held-out prompts, with DPO's verdict on
them; the run folder (--out), saved whole or not at all, and --resume, which ends
bit-identical to a run that was never stopped. run(), at the end, reads top to bottom:
prepare, measure, train, answer, save.

Read first: dpo.py, train_toy.py (which uses this file's model, printing and run folder).
Read next: sample.py, which talks to what a run saved.
"""

import os

# Same seed, same numbers, in every process: on x86 CPUs PyTorch's matrix products go through
# MKL, which now and then takes another code path in a new process unless told to be strict;
# on CUDA, cuBLAS needs a fixed workspace for deterministic products (device_for asks
# PyTorch for deterministic kernels there). Both are read when the libraries start, hence here.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import re
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

TINY_CONFIG = dict(block_size=1024, n_layer=2, n_head=4, n_embd=64)  # GPT-2's vocabulary and context, 2 layers
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULTS = dict(model="gpt2", weights=None, init="pretrained", loss="dpo", beta=0.1, label_smoothing=0.0,
                average_logps=False, lr=None, warmup_steps=0, lr_decay="none", epochs=3, batch_size=2, grad_accum=1,
                seed=0, device=None, dtype=None, data=None, eval_data=None, eval_fraction=None, eval_every=None,
                max_length=None, out="out/dpo", save_every=None, answers=4, resume=False)
# What --resume may change: nothing the numbers depend on (--data may have moved: the pairs are checked).
RESUME_MAY_CHANGE = ("grad_accum", "device", "eval_every", "save_every", "answers", "data", "eval_data", "out", "resume")
# What a run writes into --out, all at once (checkpoint.replace_folder). run.json says what the
# run was, and that the folder is this project's; the policy is config.json, model.safetensors
# and the tokenizer's files; reference.safetensors when the reference cannot be loaded by
# name (and for --resume), resume.pt with --save-every.
OUT_FILES = ("run.json", "config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
             "metrics.jsonl", "answers.jsonl", "reference.safetensors", "resume.pt")
PROGRAMS = ("train.py", "train_toy.py")  # run.json's "program" in a folder this project wrote


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


def make_parser():
    """Every option, none with a default here (argparse.SUPPRESS): parse_args tells the options
    given from those left out, which --resume takes from the run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data", help="the training pairs: .jsonl, .json or either gzipped; see README.md for the shapes read")
    held_out = parser.add_mutually_exclusive_group()
    held_out.add_argument("--eval-data", help="held-out pairs, a file like --data")
    held_out.add_argument("--eval-fraction", type=fraction, help="hold out this seeded fraction of --data")
    add("--eval-every", type=positive(int), help="evaluate the held-out pairs every N steps (and at the start and end)")
    add("--max-length", type=positive(int), help="leave out pairs with a row (prompt + completion) longer than this")
    add("--model", choices=[*GPT2_MODELS, "tiny"], help="GPT-2 size, or 'tiny', a small stand-in (gpt2)")
    add("--weights", help="a local model.safetensors (or the folder holding it) instead of the download")
    add("--init", choices=["pretrained", "random"], help="'random': the --model's shapes, random weights (pretrained)")
    add("--loss", choices=["dpo", "ipo"], help="DPO (Eq. 7) or IPO (Eq. 17) (dpo)")
    add("--beta", type=positive(float), help="strength of the pull towards the reference (0.1)")
    add("--label-smoothing", type=float, help="conservative DPO's eps, in [0, 0.5) (0)")
    add("--average-logps", action="store_true", help="log pi(y|x) as the mean over the completion's tokens")
    add("--lr", type=positive(float), help="AdamW's peak learning rate (5e-5; tiny: 1e-3)")
    add("--warmup-steps", type=int, help="steps of linear warmup from 0 to --lr (0)")
    add("--lr-decay", choices=["none", "linear"], help="after the warmup: constant, or linear to 0 (none)")
    add("--epochs", type=positive(int), help="passes over the training pairs (3)")
    add("--batch-size", type=positive(int), help="pairs per optimizer step, over all micro-batches and processes (2)")
    add("--grad-accum", type=positive(int), help="micro-batches per step and process (1)")
    add("--seed", type=int, help="same seed, device and threads: same numbers (0)")
    add("--device", choices=["cpu", "cuda", "mps"], help="default: cuda if there is one, else mps, else cpu")
    add("--dtype", choices=list(DTYPES), help="the forward passes' precision under autocast; weights, optimizer "
        "and log-prob sums stay float32 (bfloat16 on a GPU that has it, else float32)")
    add("--out", help="the run's folder (out/dpo); it must be missing, empty or this project's, whose files each "
        "save replaces all at once")
    add("--save-every", type=positive(int), help="save what --resume needs every N steps (and at the end)")
    add("--answers", type=int, help="held-out prompts answered greedily at the end by both models, up to 64 "
        "tokens each, with DPO's rewards (4)")
    add("--resume", action="store_true", help="continue the run saved in --out, with its options; --grad-accum, "
        "--device, --eval-every, --save-every, --answers, the number of processes and where --data and --eval-data "
        "are may change")
    return parser


def default_device():
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def default_dtype(device):
    return "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"


def complete_options(given, options):
    """The options given, and the rest from `options` (DEFAULTS, or a resumed run's)."""
    args = argparse.Namespace(**{**options, **given})
    args.lr = args.lr or (1e-3 if args.model == "tiny" else 5e-5)
    args.device = args.device or default_device()
    args.dtype = args.dtype or default_dtype(args.device)
    return args


def out_problems(out_option):
    """(wrong, message) for an --out that cannot be a run's folder, for parse_args' checks."""
    out = Path(out_option).absolute()
    existing = next(p for p in [out, *out.parents] if p.exists())
    return [(not existing.is_dir(), f"--out {out_option}: {existing} is a file; --out must be a folder (created if "
                                    "missing)"),
            (Path.cwd().resolve().is_relative_to(out.resolve()), f"--out {out_option} is the folder you are in, or "
                                                                 "holds it; give a folder of its own, such as out/run1")]


def model_problems(args):
    """(wrong, message) for the model options and the device, which train_toy.py shares."""
    return [(args.model == "tiny" and (args.weights or args.init == "random"),
             "--model tiny is always built here; --weights and --init are for the GPT-2 sizes"),
            (args.weights and args.init == "random", "--weights loads weights and --init random makes new ones: "
                                                     "pick one"),
            (args.device == "cuda" and not torch.cuda.is_available(),
             "--device cuda: this torch sees no CUDA GPU (a CPU-only build, or no driver)"),
            (args.device == "mps" and not torch.backends.mps.is_available(), "--device mps: MPS is not available here")]


def first_problem(args):
    """What is wrong with the options, in one line, or None."""
    processes = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's
    for wrong, message in [
        (not args.data, "--data is required: a file of preference pairs (python train_toy.py runs the toy pairs)"),
        *model_problems(args),
        (not 0 <= args.label_smoothing < 0.5, f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}"),
        (args.loss == "ipo" and args.label_smoothing, "--label-smoothing is for --loss dpo; IPO is already robust "
                                                      "to noisy labels"),
        (args.eval_every and not (args.eval_data or args.eval_fraction),
         "--eval-every evaluates held-out pairs: give --eval-data or --eval-fraction too"),
        (args.warmup_steps < 0, "--warmup-steps must be 0 or more"),
        (args.answers < 0, "--answers must be 0 or more"),
        (args.grad_accum * processes > args.batch_size,
         f"--grad-accum {args.grad_accum} x {processes} process(es) is more micro-batches than the --batch-size "
         f"{args.batch_size} pairs of a step: some would be empty; lower --grad-accum or raise --batch-size"),
        *out_problems(args.out),
    ]:
        if wrong:
            return message
    return None


def parse_args(argv=None):
    """The options given, completed with the defaults and checked; with --resume, only those
    given (and the device): the rest is the run's, which resume_options reads from --out."""
    parser = make_parser()
    given = vars(parser.parse_args(argv))
    if given.get("resume"):
        args = argparse.Namespace(**{"out": DEFAULTS["out"], "device": None, **given})
        args.device = args.device or default_device()
        problem = next((message for wrong, message in out_problems(args.out) if wrong), None)
    else:
        args = complete_options(given, DEFAULTS)
        problem = first_problem(args)
    if problem:
        parser.error(problem)
    return args


# -----------------------------------------------------------------------------
# Data: preference pairs as data sets come
#
# A data file holds JSON objects (checkpoint.read_records), each a pair in one of four shapes:
#   {"prompt": text, "chosen": text, "rejected": text}                 the standard one
#   {"chosen": text, "rejected": text}                                 HH-RLHF's: two whole dialogues
#   {"prompt": messages, "chosen": messages, "rejected": messages}     TRL's conversational one
#   {"chosen": messages, "rejected": messages}                         the same, the prompt implicit
# where messages are a list of {"role": "system" | "user" | "assistant", "content": text}. GPT-2
# has no chat template, so messages are written out as HH-RLHF writes its dialogues. A pair
# that cannot be trained on (chosen = rejected, an empty completion, a row longer than
# --max-length) is left out and counted; a record that is no pair at all is an error.

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"  # HH-RLHF's turns
LEFT_OUT = {"same_text": "chosen and rejected the same text", "empty_completion": "an empty completion",
            "too_long": "a row longer than --max-length"}


@dataclass
class Pairs:
    """Preference pairs as read ({"prompt", "chosen", "rejected", "where"}) and as token ids, in
    one order, and the pairs left out of them ({why: [where, ...]})."""
    texts: list
    tokens: list
    source: str  # where they come from, for messages
    left_out: dict = dataclasses.field(default_factory=dict)


def split_dialogues(chosen, rejected):
    """(prompt, chosen completion, rejected completion) from two whole dialogues that share
    their beginning, as HH-RLHF gives them.

    The prompt is the shared beginning up to and including the last "\n\nAssistant:" in it,
    as the DPO authors split HH. Without one, it ends at the last whitespace the two share,
    which then starts both completions (" mat" / " bed"): GPT-2's tokens carry the space
    before a word, and a prompt cut inside a word would leave its second half to be
    tokenised as a word of its own, which the model would never see in running text."""
    shared = os.path.commonprefix([chosen, rejected])  # character by character
    end = shared.rfind(ASSISTANT)
    if end >= 0:
        end += len(ASSISTANT)
    else:
        last_whitespace = re.search(r"\s\S*\Z", shared)
        end = last_whitespace.start() if last_whitespace else 0
    if end == 0 and chosen != rejected:
        raise ValueError("chosen and rejected share no beginning to take as the prompt; give a \"prompt\" field")
    return shared[:end], chosen[end:], rejected[end:]


def dialogue(messages):
    """TRL's messages as HH-RLHF text: a turn "\n\nHuman: ..." or "\n\nAssistant: ..." each. A
    system message, first only, is its text before the first turn (HH-RLHF has none)."""
    text = ""
    for i, message in enumerate(messages):
        role, content = (message.get("role"), message.get("content")) if isinstance(message, dict) else (None, None)
        if role not in ("system", "user", "assistant") or not isinstance(content, str) or (role == "system" and i):
            raise ValueError(f"message {i + 1} is not {{\"role\": \"user\" or \"assistant\" (or \"system\", first), "
                             f"\"content\": text}}: {json.dumps(message)[:80]}")
        turn = HUMAN if role == "user" else ASSISTANT
        text += content if role == "system" else turn + (" " + content if content else "")
    return text


def conversation(prompt, chosen, rejected):
    """TRL's conversational pair as texts: the prompt's dialogue and then "\n\nAssistant:", each
    completion what the assistant says after it. An implicit prompt is the messages chosen and
    rejected share at their start, as TRL's extract_prompt splits them: where one conversation
    is all shared, its last message is its answer, not part of the prompt."""
    if prompt is None:
        shortest, n = min(len(chosen), len(rejected)), 0
        while n < shortest and chosen[n] == rejected[n]:
            n += 1
        n = max(n - 1, 0) if n == shortest else n
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    texts = [dialogue(messages) for messages in (prompt, chosen, rejected)]
    for name, text in zip(("chosen", "rejected"), texts[1:]):
        if text and not text.startswith(ASSISTANT):
            raise ValueError(f"the {name} messages must start with the assistant's answer to the prompt")
    return texts[0] + ASSISTANT, texts[1].removeprefix(ASSISTANT), texts[2].removeprefix(ASSISTANT)


def pair_texts(record):
    """(prompt, chosen, rejected) texts of a record in any of the four shapes."""
    missing = [name for name in ("chosen", "rejected") if name not in record]
    if missing:
        raise ValueError(f"no {missing[0]!r} field: a pair needs \"chosen\" and \"rejected\", and \"prompt\" unless "
                         "they are whole dialogues")
    values = [record[name] for name in ("prompt", "chosen", "rejected") if name in record]
    if all(isinstance(value, list) for value in values):
        return conversation(record.get("prompt"), record["chosen"], record["rejected"])
    if not all(isinstance(value, str) for value in values):
        kinds = ", ".join(f"{name} {type(record[name]).__name__}" for name in ("prompt", "chosen", "rejected")
                          if name in record)
        raise ValueError(f"prompt, chosen and rejected must all be text, or all lists of messages; got {kinds}")
    if "prompt" not in record:
        return split_dialogues(record["chosen"], record["rejected"])
    if not record["prompt"]:
        raise ValueError("the prompt is empty: a completion is scored given the prompt before it")
    return record["prompt"], record["chosen"], record["rejected"]


def read_pairs(path, enc, max_length=None, option="--data"):
    """The pairs of a data file, tokenised (dpo.encode_pair), those that cannot be trained on
    left out and counted. An error names the file and the line."""
    left_out = {}

    def parse(record, where):
        prompt, chosen, rejected = pair_texts(record)
        why = "same_text" if chosen == rejected else "empty_completion" if not (chosen and rejected) else None
        if why is None:
            tokens = dpo.encode_pair(enc, {"prompt": prompt, "chosen": chosen, "rejected": rejected})
            why = "too_long" if max_length and dpo.longest_row(tokens) > max_length else None
        if why is not None:
            left_out.setdefault(why, []).append(where)
            return None
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "where": where}, tokens

    pairs = [pair for pair in checkpoint.read_records(path, parse, option) if pair is not None]
    if not pairs:
        raise ValueError(f"{path}: no pair to train on" + (f" ({describe_left_out(left_out)})" if left_out else
                                                           " (the file is empty)"))
    return Pairs([texts for texts, _ in pairs], [tokens for _, tokens in pairs], str(path), left_out)


def describe_left_out(left_out, shown=3):
    """'2 with an empty completion (line 4, line 9), ...'"""
    return ", ".join(f"{len(wheres):,} with {LEFT_OUT[why]} ({', '.join(wheres[:shown])}"
                     f"{', ...' if len(wheres) > shown else ''})" for why, wheres in left_out.items())


def select(pairs, keep):
    """The pairs where keep (a list of bools) is True, in their order."""
    return Pairs(*([x for x, k in zip(column, keep) if k] for column in (pairs.texts, pairs.tokens)), pairs.source,
                 pairs.left_out)


def split_off_eval(pairs, fraction, seed):
    """(training pairs, held-out pairs): a seeded random fraction held out. The two parts are
    disjoint, and each keeps the file's order."""
    n_eval = round(fraction * len(pairs.texts))
    if not 1 <= n_eval < len(pairs.texts):
        raise ValueError(f"--eval-fraction {fraction} of {len(pairs.texts)} pairs holds out {n_eval}; it must "
                         "leave at least one pair for training and one for evaluation")
    held_out = set(torch.randperm(len(pairs.texts), generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
    is_held_out = [i in held_out for i in range(len(pairs.texts))]
    return select(pairs, [not h for h in is_held_out]), dataclasses.replace(select(pairs, is_held_out), left_out={})


def read_data(args, enc):
    """(training pairs, held-out pairs) from --data and --eval-data or --eval-fraction."""
    train = read_pairs(args.data, enc, args.max_length)
    if args.eval_fraction:
        return split_off_eval(train, args.eval_fraction, args.seed)
    if args.eval_data:
        return train, read_pairs(args.eval_data, enc, args.max_length, "--eval-data")
    return train, Pairs([], [], "no held-out pairs")


def check_context(pairs, context):
    """A pair longer than the model's context cannot be scored: an error naming it."""
    too_long = [i for i, tokens in enumerate(pairs.tokens) if dpo.longest_row(tokens) > context]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"{pairs.source} {pairs.texts[i].get('where', 'a pair')}: prompt + completion is "
            f"{dpo.longest_row(pairs.tokens[i])} tokens, longer than the model's context of {context} "
            f"({len(too_long)} of {len(pairs.tokens)} pairs are); shorten them, or pass --max-length {context} to "
            "leave such pairs out")


# -----------------------------------------------------------------------------
# The model

def load_policy(model, weights, init, device):
    """The model to train: a GPT-2 size (downloaded once, or --weights), its shapes with random
    weights, or the tiny stand-in (random weights)."""
    if model == "tiny":
        return GPT(GPTConfig(**TINY_CONFIG)).to(device)
    if init == "random":
        return GPT(GPTConfig(**GPT2_MODELS[model])).to(device)
    try:
        return GPT.from_pretrained(weights or model, device=device)
    except OSError as e:
        raise type(e)(f"{e}\nTo run without the download: --weights path/to/model.safetensors, "
                      "--init random (random weights), or --model tiny.") from None


def reference_by_name(args):
    """The name that loads the reference again (a GPT-2 size, pretrained), or None: then its
    weights are saved beside the policy, as reference.safetensors."""
    return args.model if args.model in GPT2_MODELS and args.init == "pretrained" and not args.weights else None


# -----------------------------------------------------------------------------
# Devices and processes
#
# Under torchrun every process runs this same file on its own device. Each takes its share
# of every step (the micro-batches below) and of the passes without a gradient; every
# process then needs every result, so each fills its share into a tensor of zeros and the
# tensors are added up (all_reduce): adding zeros is exact, so the numbers are the ones one
# process would get.

def device_for(name, index=None):
    """The device; on CUDA, with deterministic kernels: same seed, same numbers (some CUDA
    kernels add up in any order otherwise)."""
    device = torch.device(name, index)
    if device.type == "cuda":
        torch.use_deterministic_algorithms(True)
        if index is not None:
            torch.cuda.set_device(device)
    return device


def start_processes(device_name):
    """The device, and under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE) this
    process's place among the others: nccl between GPUs, one GPU a process; gloo between
    CPUs. Only process 0 prints: the others' stdout goes to os.devnull."""
    if "RANK" not in os.environ:
        return device_for(device_name)
    dist.init_process_group("nccl" if device_name == "cuda" else "gloo")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return device_for(device_name, int(os.environ["LOCAL_RANK"]) if device_name == "cuda" else None)


def process_rank_and_count():
    """(this process's rank, the number of processes): (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_first_process():
    return process_rank_and_count()[0] == 0


def sum_over_processes(x):
    """x added up over the processes, in place (x itself without torchrun)."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


# -----------------------------------------------------------------------------
# Printing and timing

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


def format_metrics(m):
    return (f"loss {m['loss']:.4f} | reward acc {m['reward_accuracy']:.2f} | margin {m['margin']:+.3f} | "
            f"chosen {m['chosen_reward']:+.3f} | rejected {m['rejected_reward']:+.3f}")


def peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def speed_line(speed, device):
    memory = "CUDA" if device.type == "cuda" else "process RSS"
    return (f"training: {speed['train_s']:.2f} s, {speed['train_tokens'] / speed['train_s']:,.0f} tokens/s, "
            f"{1 - speed['train_tokens'] / speed['train_positions']:.0%} padding; peak memory "
            f"{peak_memory_bytes(device) / 2**20:,.0f} MiB ({memory})")


def eval_line(step, metrics):
    return (f"eval at step {step:3d} (held out) | " + format_metrics(metrics)
            + f" | kl {max(metrics['kl'], 0.0):.4f}")  # >= 0, but rounding can give -1e-9


def ipo_target(beta, average_logps):
    """What IPO's beta means (IPO paper, Eq. 17: the loss is zero at h = 1/(2 beta))."""
    unit = "nats per token" if average_logps else "nats"
    return (f"; IPO's target h = 1/(2 beta) = {1 / (2 * beta):g} {unit}: the loss is 0 where log pi(chosen) - "
            "log pi(rejected) is that far above the reference's")


def describe_training(args, n_train, n_eval, n_steps):
    """The line that says what is about to be trained, and how."""
    processes = process_rank_and_count()[1]
    schedule = (f", warmup {args.warmup_steps} steps" if args.warmup_steps else "") + (
        ", then linear decay to 0" if args.lr_decay == "linear" else "")
    line = (f"{args.loss.upper()} on {n_train:,} pairs, {n_eval:,} held out (beta {args.beta}, lr {args.lr}{schedule}, "
            f"batch {args.batch_size}, {args.epochs} epoch{'s' if args.epochs > 1 else ''} = {n_steps:,} steps, "
            f"seed {args.seed}" + (", log-probs averaged over tokens" if args.average_logps else "")
            + (f", {args.grad_accum} micro-batches" if args.grad_accum > 1 else "")
            + (f", {processes} processes" if processes > 1 else "") + ")")
    return line + (ipo_target(args.beta, args.average_logps) if args.loss == "ipo" else "")


# -----------------------------------------------------------------------------
# The step: micro-batches, processes, precision and the schedule

def learning_rate(step, lr, warmup_steps=0, decay="none", total_steps=None):
    """The learning rate of step 1, 2, ...: a linear warmup, lr * step / warmup_steps, up to lr
    at step warmup_steps; then lr ("none"; the DPO authors warm up for 150 steps and stay
    there), or a linear decay that would reach 0 one step after total_steps ("linear", as TRL)."""
    if step <= warmup_steps:
        return lr * step / warmup_steps
    if decay == "linear":
        return lr * (total_steps - step + 1) / (total_steps - warmup_steps)
    return lr


def split_step(indices, n_parts):
    """One step's pair indices (sorted by length, so that neighbours pad alike) cut into n_parts
    contiguous parts of nearly equal size, some empty when the step holds fewer pairs."""
    return [indices[k * len(indices) // n_parts:(k + 1) * len(indices) // n_parts] for k in range(n_parts)]


def micro_batches_of_this_process(indices, grad_accum):
    """This process's share of one step's pairs, as (pair indices, weight) micro-batches: of
    split_step's processes x grad_accum parts, process r takes parts r * grad_accum, ..., and
    drops the empty ones. A process left with none (the last step of an epoch may hold fewer
    pairs than there are processes) gets the step's first pair with weight 0: it must still
    take part in the gradient sync, or the other processes would wait for it for ever."""
    rank, count = process_rank_and_count()
    parts = split_step(indices, count * grad_accum)[rank * grad_accum:(rank + 1) * grad_accum]
    return [(part, 1.0) for part in parts if part] or [(indices[:1], 0.0)]


def loss_config_of(args):
    return dpo.LossConfig(args.loss, args.beta, args.label_smoothing, args.average_logps)


def train_step(model, optimizer, micro_batches, n_pairs, loss_config, autocast, scaler=None, max_grad_norm=1.0):
    """dpo.dpo_step for a step of n_pairs pairs, of which this process holds micro_batches
    (dpo.make_batch's, each with a "weight"); returns the step's metrics over all n_pairs.

    Each micro-batch adds the gradient of sum(its per-pair losses) / n_pairs, so that in the
    end the gradient is that of the mean loss over all n_pairs pairs, however they were split.
    (Dividing each micro-batch's mean by the number of micro-batches instead would weigh the
    pairs of a short micro-batch more.) Under torchrun the policy is wrapped in
    DistributedDataParallel, which averages the processes' gradients: each process's loss is
    multiplied by their number to turn that average into the sum, and the gradients are
    synced once, at the last micro-batch (no_sync before it). With float16, `scaler`
    (torch.amp.GradScaler) scales the loss up so that small gradients do not round to 0, and
    back down before clipping; it skips a step whose scaled gradient overflowed (loss scaling:
    Micikevicius et al. 2018, "Mixed Precision Training")."""
    optimizer.zero_grad(set_to_none=True)
    _, processes = process_rank_and_count()
    sums = 0
    for i, batch in enumerate(micro_batches):
        syncs = i == len(micro_batches) - 1 or processes == 1
        with contextlib.nullcontext() if syncs else model.no_sync():
            losses, chosen_rewards, rejected_rewards = dpo.batch_losses(model, batch, loss_config, autocast)
            step_loss = batch["weight"] * losses.sum() * processes / n_pairs
            (step_loss if scaler is None else scaler.scale(step_loss)).backward()
        n = batch["weight"] * len(losses)
        metrics = dpo.batch_metrics(losses, chosen_rewards, rejected_rewards)
        sums = sums + torch.stack([n * value for value in metrics.values()] + [losses.new_tensor(n)])
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if scaler is None:
        if torch.isfinite(grad_norm):  # as in dpo.dpo_step: no step with an inf or nan gradient
            optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    sums = sum_over_processes(sums)
    return {**dict(zip(metrics, (sums[:-1] / sums[-1]).tolist())), "grad_norm": grad_norm.item()}


def tokens_and_positions(tokens, parts):
    """(real tokens, positions the policy runs on) of micro-batches `parts` (lists of pair
    indices), each padded to its own longest row: the padding is what separates the two."""
    real = sum(2 * len(p) + len(c) + len(r) for part in parts for p, c, r in (tokens[i] for i in part))
    return real, sum(2 * len(part) * max(dpo.longest_row(tokens[i]) for i in part) for part in parts)


def count_training_steps(n_pairs, batch_size, epochs):
    """len(dpo.training_steps(...)), without building them: every chunk of dpo.epoch_batches
    holds a whole number of batches, so an epoch is ceil(n_pairs / batch_size) batches."""
    return epochs * math.ceil(n_pairs / batch_size)


def train(args, model, optimizer, scaler, pairs, reference_logps, start_step, autocast, log, between_steps):
    """DPO (or IPO) on the training pairs, from the step after start_step, in the steps of
    dpo.training_steps. between_steps(step) runs after each step (held-out evaluations,
    checkpoints) and is not timed as training. Returns the training seconds, and the tokens
    and the positions (tokens + padding) it ran on."""
    steps = dpo.training_steps(pairs.tokens, args.batch_size, args.epochs, args.seed)
    print_every = 1 if len(steps) <= 30 else math.ceil(len(steps) / 20)
    _, processes = process_rank_and_count()
    device = next(model.parameters()).device
    speed = {"train_tokens": 0, "train_positions": 0, "train_s": 0.0}
    for step, (epoch, indices) in enumerate(steps[start_step:], start=start_step + 1):
        start = time.perf_counter()
        lr = learning_rate(step, args.lr, args.warmup_steps, args.lr_decay, len(steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = [{**dpo.make_batch([pairs.tokens[i] for i in part], [x[part] for x in reference_logps],
                                           device), "weight": weight}
                         for part, weight in micro_batches_of_this_process(indices, args.grad_accum)]
        metrics = {"step": step, "epoch": epoch, "lr": lr,
                   **train_step(model, optimizer, micro_batches, len(indices), loss_config_of(args), autocast, scaler)}
        dpo.check_finite(metrics, ("loss",) if scaler else ("loss", "grad_norm"))  # the scaler skips inf gradients
        if device.type == "cuda":
            torch.cuda.synchronize()  # the step is done, not only queued, when the clock stops
        speed["train_s"] += time.perf_counter() - start
        real, positions = tokens_and_positions(pairs.tokens, [part for part in split_step(
            indices, processes * args.grad_accum) if part])
        speed["train_tokens"] += real
        speed["train_positions"] += positions
        line = f"step {step:3d}/{len(steps)} (epoch {epoch}) | lr {lr:.2e} | " + format_metrics(metrics)
        log({"phase": "dpo", **metrics}, line if step % print_every == 0 or step in (1, len(steps)) else None)
        between_steps(step)
    return speed


# -----------------------------------------------------------------------------
# The passes without a gradient, shared out among the processes
#
# Each process takes every count-th batch, of as many pairs as a micro-batch holds (so that
# their memory is a training step's), and the processes add up what they computed.

def batches_of_this_process(args, pairs):
    """This process's share of the batches of a pass without a gradient over the pairs."""
    rank, count = process_rank_and_count()
    per_batch = max(1, args.batch_size // (args.grad_accum * count))
    return dpo.batches_by_length(pairs.tokens, per_batch)[rank::count]


def reference_logps_of(reference, pairs, args, autocast):
    """The reference's (log pi_ref(y_chosen|x), log pi_ref(y_rejected|x)) of every pair, (len(pairs),)
    each, on the CPU: what every training step subtracts."""
    chosen, rejected = dpo.pair_logps(reference, pairs.tokens, average_logps=args.average_logps, autocast=autocast,
                                      batches=batches_of_this_process(args, pairs),
                                      progress=progress_printer("log-probs"))
    device = next(reference.parameters()).device  # nccl adds up tensors on the GPU
    both = sum_over_processes(torch.stack([chosen, rejected]).to(device)).cpu()
    return both[0], both[1]


def evaluate_held_out(args, policy, reference, pairs, autocast, log, step):
    """dpo.evaluate on the held-out pairs, if there are any, logged as an "eval" record."""
    if pairs.texts:
        numbers = dpo.evaluation_numbers(policy, reference, pairs.tokens, batches_of_this_process(args, pairs),
                                         args.average_logps, autocast, progress_printer("evaluating"))
        metrics = dpo.evaluation_metrics(sum_over_processes(numbers), loss_config_of(args))
        log({"phase": "eval", "step": step, **metrics}, eval_line(step, metrics))


# -----------------------------------------------------------------------------
# Answers: what the policy and its reference say, and which DPO prefers

def stop_strings_for(prompt):
    """An HH-RLHF prompt ends at the assistant's turn: its answer ends where the human's next one begins."""
    return (HUMAN,) if prompt.endswith(ASSISTANT) else ()


@torch.no_grad()
def complete(model, enc, prompt, max_new_tokens=64, temperature=0.0, top_k=None, num_samples=1, seed=0):
    """num_samples answers to the text prompt (model.generate; temperature 0 is greedy), as
    token ids: each up to <|endoftext|>, the start of a stop string (stop_strings_for), or
    max_new_tokens tokens. The same seed samples the same answers."""
    device = next(model.parameters()).device
    ids = torch.tensor([enc.encode(prompt)] * num_samples, device=device)
    generator = torch.Generator(device).manual_seed(seed)
    stop_strings = stop_strings_for(prompt)

    def cut(row):  # the tokens before <|endoftext|>, and before the token a stop string begins in
        row = row[:row.index(enc.eot_token)] if enc.eot_token in row else row
        text = enc.decode(row)
        end = min((text.index(s) for s in stop_strings if s in text), default=len(text))
        while len(enc.decode(row)) > end:
            row = row[:-1]
        return row

    def ended(new):  # every row has ended: generation can stop
        return all(len(cut(row)) < len(row) for row in new.tolist())

    new = model.generate(ids, max_new_tokens, temperature, top_k, stop=ended, generator=generator)[:, ids.size(1):]
    return [cut(row) for row in new.tolist()]


def compare(policy, reference, enc, prompt, loss_config, **sampling):
    """The policy's and the reference's answers to the prompt (complete's sampling options), one
    record per sample, each with DPO's verdict: the two answers scored as a pair, the policy's
    chosen and the reference's rejected, whose rewards dpo_loss gives, beta (log pi(y|x) -
    log pi_ref(y|x)) (DPO paper, Eq. 5) with the run's beta and sum or mean, by the trained
    policy against its reference. Each answer is scored as the tokens generated, ended by
    <|endoftext|>, as a completion in training is."""
    answers = [complete(model, enc, prompt, **sampling) for model in (policy, reference)]
    pairs = [(enc.encode(prompt), p + [enc.eot_token], r + [enc.eot_token]) for p, r in zip(*answers)]
    logps = [dpo.pair_logps(model, pairs, average_logps=loss_config.average_logps) for model in (policy, reference)]
    _, policy_rewards, reference_rewards = dpo.dpo_loss(*logps[0], *logps[1], beta=loss_config.beta)
    return [{"prompt": prompt, "policy": enc.decode(p), "reference": enc.decode(r), "policy_reward": pr,
             "reference_reward": rr} for p, r, pr, rr in zip(*answers, policy_rewards.tolist(), reference_rewards.tolist())]


def print_comparison(record):
    print(f"  {record['prompt']!r}")
    for who in ("reference", "policy"):
        print(f"    {who:<9}  reward {record[who + '_reward']:+8.3f}  {record[who]!r}")


def answer_held_out(args, policy, reference, enc, train_pairs, eval_pairs, max_new_tokens=64):
    """Greedy answers of both models to the first --answers held-out prompts (or training
    prompts, without held-out pairs), printed and returned for answers.jsonl. An answer is
    as long as the model's context leaves room for, with its <|endoftext|>."""
    source, pairs = ("held-out", eval_pairs) if eval_pairs.texts else ("training", train_pairs)
    prompts = list(dict.fromkeys(pair["prompt"] for pair in pairs.texts))[:args.answers]
    if not prompts or not is_first_process():
        return []
    print(f"answers to the first {len(prompts)} {source} prompts (greedy; reward = beta (log pi - log pi_ref) of "
          "the answer, DPO paper, Eq. 5):")
    records = []
    for prompt in prompts:
        room = policy.config.block_size - len(enc.encode(prompt)) - 1
        if room > 0:
            records += compare(policy, reference, enc, prompt, loss_config_of(args), max_new_tokens=min(max_new_tokens,
                                                                                                      room))
            print_comparison(records[-1])
    return records


# -----------------------------------------------------------------------------
# The run folder: --out, and --resume from it

def run_record(out):
    """run.json of the run folder out, if this project wrote it; else an error saying why not."""
    path = Path(out) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out} holds no run.json, so it is no run of this project's (or one of an earlier "
                                "version, which --resume cannot continue)")
    record = checkpoint.load_json(path)
    if not (isinstance(record, dict) and record.get("program") in PROGRAMS and isinstance(record.get("options"), dict)):
        raise ValueError(f"{path} was not written by this project")
    return record


def resume_options(args):
    """--resume: args completed, in place, with the options of the run in --out. An option
    given that the numbers depend on must be the run's; the others may change."""
    options = run_record(args.out)["options"]
    changed = [f"--{k.replace('_', '-')} {options.get(k)} -> {v}" for k, v in vars(args).items()
               if k not in RESUME_MAY_CHANGE and options.get(k) != v]
    if changed:
        raise ValueError(f"--resume: these options differ from the run in {args.out}: {', '.join(changed)}. Leave "
                         "them out to take the run's, or start a new run in another --out")
    vars(args).update(vars(complete_options({**vars(args), "resume": True}, options)))
    if problem := first_problem(args):
        raise ValueError(problem)


def is_run_folder(out):
    try:
        return run_record(out) is not None
    except (OSError, ValueError):
        return False


def check_out(out, resume=False):
    """Before anything loads: --out is put in order and tried (process 0), then refused if it
    holds files this project did not write, or holds nothing to resume with --resume. Returns
    the folders made for it (checkpoint.prepare_run_folder)."""
    option = f"--out {out}"
    created = checkpoint.prepare_run_folder(out, OUT_FILES, option) if is_first_process() else []
    if dist.is_initialized():
        dist.barrier()  # the others look at --out once process 0 has put it in order
    names = checkpoint.refuse_others(out, OUT_FILES, is_run_folder, option)
    missing = [name for name in ("resume.pt", "reference.safetensors", "model.safetensors") if name not in names]
    if resume and missing:
        checkpoint.remove_empty_folders(created)  # --out was not there: a typo, say; leave no trace of it
        raise FileNotFoundError(f"--resume: {out} holds no {missing[0]}, so there is nothing to resume "
                                "(--save-every N saves what --resume needs)")
    return created


def describe_run(program, args, loss_config, reference_name):
    """run.json: which program wrote the folder, with which options, the loss (sample.py's
    rewards) and where its reference is: a GPT-2 name, or reference.safetensors."""
    return {"program": program, "options": vars(args), "loss": dataclasses.asdict(loss_config),
            "reference": reference_name or "reference.safetensors"}


def save_run(out, policy, run, records, reference=None, resume=None, answers=None, replaced=lambda: None):
    """--out replaced, as one unit, by run.json, the policy (with the tokenizer's files),
    metrics.jsonl, the answers if any, the reference's weights if given, and resume.pt if
    given (tensors and plain values only). replaced() is called once the new files are in place."""
    def write(folder):
        checkpoint.save_json(run, folder / "run.json")
        policy.save_pretrained(folder)
        checkpoint.save_jsonl(records, folder / "metrics.jsonl")
        if answers:
            checkpoint.save_jsonl(answers, folder / "answers.jsonl")
        if reference is not None:
            checkpoint.save_safetensors(hf_state_dict(reference), folder / "reference.safetensors",
                                        metadata={"format": "pt"})
        if resume is not None:
            checkpoint.save_state(resume, folder / "resume.pt")

    if is_first_process():
        checkpoint.save_folder(out, write, OUT_FILES, replaced)


def fingerprint(*pairs):
    """sha256 of the pairs' texts, for --resume to check that it trains on the same pairs."""
    texts = [[[p["prompt"], p["chosen"], p["rejected"]] for p in part.texts] for part in pairs]
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()


def resume_from(out, device):
    """The run saved in --out: its state (resume.pt), policy, reference and records."""
    out = Path(out)
    state = checkpoint.load_state(out / "resume.pt", "--resume")
    if not isinstance(state, dict) or not {"step", "optimizer", "reference_logps", "pairs"} <= state.keys():
        raise ValueError(f"--resume: {out / 'resume.pt'} is not a checkpoint that this project saved")
    state["records"] = checkpoint.read_records(out / "metrics.jsonl", lambda record, where: record, "--resume")
    state["policy"] = GPT.from_pretrained(out, device=device)
    state["reference"] = dpo.make_reference(GPT.from_pretrained(out / "reference.safetensors", device=device))
    return state


# -----------------------------------------------------------------------------
# The run

def prepare(args, device, log):
    """Every input read and checked before any model is built (the pairs' lengths against its
    context once it is there), then the policy and its frozen reference, or both from --out
    with --resume. Returns (tokenizer, training pairs, held-out pairs, policy, reference,
    resumed state or None)."""
    enc = checkpoint.load_gpt2_encoding()
    train_pairs, eval_pairs = read_data(args, enc)
    n_steps = count_training_steps(len(train_pairs.tokens), args.batch_size, args.epochs)
    if args.warmup_steps > n_steps:
        raise ValueError(f"--warmup-steps {args.warmup_steps} is longer than the run's {n_steps} steps, which would "
                         "never reach --lr; lower it")
    for pairs in (train_pairs, eval_pairs):
        if pairs.left_out:
            n = sum(map(len, pairs.left_out.values()))
            print(f"left out {n:,} of {n + len(pairs.tokens):,} pairs of {pairs.source}: "
                  + describe_left_out(pairs.left_out))
    if not args.resume:  # a resumed run has this record already
        log({"phase": "data", "pairs": len(train_pairs.tokens), "held_out": len(eval_pairs.tokens),
             "left_out": {why: len(wheres) for why, wheres in train_pairs.left_out.items()},
             "eval_left_out": {why: len(wheres) for why, wheres in eval_pairs.left_out.items()}})
    torch.manual_seed(args.seed)  # the random weights of --model tiny and --init random
    resumed = resume_from(args.out, device) if args.resume else None
    policy = resumed["policy"] if resumed else load_policy(args.model, args.weights, args.init, device)
    print(f"model {args.weights or args.model}: {policy.config.n_layer} layers, {policy.config.n_embd} wide, "
          f"{sum(p.numel() for p in policy.parameters()):,} parameters, on {device}, {args.dtype}")
    if args.max_length is not None and args.max_length > policy.config.block_size:
        raise ValueError(f"--max-length {args.max_length} is longer than the model's context of "
                         f"{policy.config.block_size} tokens")
    for pairs in (train_pairs, eval_pairs):
        check_context(pairs, policy.config.block_size)
    if resumed:
        if resumed["pairs"] != fingerprint(train_pairs, eval_pairs):
            raise ValueError(f"--resume: these are not the pairs of the run in {args.out} (the files of --data or "
                             "--eval-data changed)")
        if resumed["step"] == n_steps:
            raise ValueError(f"--resume: the run in {args.out} has finished (step {resumed['step']}); there is "
                             "nothing to continue")
        print(f"resuming the run in {args.out} after step {resumed['step']}")
    print(describe_training(args, len(train_pairs.tokens), len(eval_pairs.tokens), n_steps))
    reference = resumed["reference"] if resumed else dpo.make_reference(policy)  # frozen where DPO starts
    return enc, train_pairs, eval_pairs, policy, reference, resumed


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


def run(args, status):
    """The whole run; returns the summary that ends metrics.jsonl. status says how far it got
    ("step", "saved", "finished"), and which folders it made for --out, for main."""
    device = start_processes(args.device)
    status["created"] = check_out(args.out, args.resume)
    if args.resume:
        resume_options(args)  # the run's options, now that --out is in order
    autocast = contextlib.nullcontext() if args.dtype == "float32" else torch.autocast(device.type, DTYPES[args.dtype])
    records = []
    log = functools.partial(log_to, records)

    # 1. prepare: every input is checked before any model is built
    enc, train_pairs, eval_pairs, policy, reference, resumed = prepare(args, device, log)
    records[:0] = resumed["records"] if resumed else []
    evaluate_at_step = functools.partial(evaluate_held_out, args, policy, reference, eval_pairs, autocast, log)

    # 2. measure: the reference's log-probs of the training pairs, which every step subtracts
    reference_logps = (resumed["reference_logps"] if resumed else
                       reference_logps_of(reference, train_pairs, args, autocast))
    if not resumed:
        evaluate_at_step(0)

    # 3. train: one forward pass of the policy per micro-batch, the reference's log-probs cached
    optimizer, scaler = optimizer_and_scaler(args, policy, resumed)
    model = policy if process_rank_and_count()[1] == 1 else DistributedDataParallel(
        policy, device_ids=[device.index] if device.type == "cuda" else None)
    n_steps = count_training_steps(len(train_pairs.tokens), args.batch_size, args.epochs)
    keeps_reference = args.save_every or not reference_by_name(args)  # --resume needs it, or no name loads it
    run_json = describe_run("train.py", args, loss_config_of(args), None if keeps_reference else reference_by_name(args))
    pairs_fingerprint = fingerprint(train_pairs, eval_pairs) if args.save_every else None  # once, not every save

    def save(step, records, answers=None, finished=False):
        resume = {"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler and scaler.state_dict(),
                  "reference_logps": reference_logps, "pairs": pairs_fingerprint} if args.save_every else None
        save_run(args.out, policy, run_json, records, reference if keeps_reference else None, resume, answers,
                 replaced=lambda: status.update(saved=step, finished=finished))

    def between_steps(step):  # not timed as training
        status["step"] = step
        if step < n_steps and args.eval_every and step % args.eval_every == 0:
            evaluate_at_step(step)
        if step < n_steps and args.save_every and step % args.save_every == 0:
            save(step, records)

    speed = train(args, model, optimizer, scaler, train_pairs, reference_logps, resumed["step"] if resumed else 0,
                  autocast, log, between_steps)
    evaluate_at_step(status["step"])

    # 4. answer: the first held-out prompts, greedily, by the reference and by the policy
    answers = answer_held_out(args, policy, reference, enc, train_pairs, eval_pairs)

    # 5. save: run.json, the trained policy, metrics.jsonl and the answers
    print(speed_line(speed, device))
    summary = {"summary": True, **vars(args), "processes": process_rank_and_count()[1],
               "n_pairs": len(train_pairs.tokens), "n_eval_pairs": len(eval_pairs.tokens), **speed,
               "tokens_per_s": speed["train_tokens"] / speed["train_s"], "peak_memory_bytes": peak_memory_bytes(device)}
    save(status["step"], [*records, summary], answers, finished=True)
    print(f"saved the run to {args.out}/: the trained policy, metrics.jsonl" + (", answers.jsonl" if answers else ""))
    return summary


def main(argv=None, parse_args=parse_args, run=run):
    """Run, and turn what stops a run into one line: Ctrl-C or SIGTERM, bad input, the disk,
    the network, divergence, GPU memory. A run that fails leaves --out as it was, and no
    folder it made for it. train_toy.py's run goes through here too."""
    args = parse_args(argv)
    # kill, or a cluster scheduler's stop: the same clean stop as Ctrl-C
    previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
    status = {"step": 0, "saved": None, "finished": False, "created": []}
    try:
        return run(args, status)
    except KeyboardInterrupt:
        where = f"after step {status['step']}" if status["step"] else "before training"
        kept = (f"{args.out} holds the finished run" if status["finished"] else
                f"{args.out} holds the save of step {status['saved']}" if status["saved"] else
                f"nothing was saved and {args.out} is as it was")
        can_resume = getattr(args, "save_every", None) and status["saved"] and not status["finished"]
        resumable = "; --resume continues from it" if can_resume else ""
        sys.exit(f"stopped {where} (Ctrl-C or SIGTERM); {kept}{resumable}" if is_first_process() else 1)
    except (OSError, ValueError, FloatingPointError) as e:  # bad input, disk, network: a message to act on
        sys.exit(f"error: {e}" if is_first_process() else 1)
    except torch.cuda.OutOfMemoryError:
        sys.exit("error: out of GPU memory; try a larger --grad-accum (smaller micro-batches)"
                 if is_first_process() else 1)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if status["saved"] is None:
            checkpoint.remove_empty_folders(status["created"])
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
