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

run() at the end of this file is the experiment: prepare, measure which completion the
model prefers, train (dpo.train_dpo), measure again with the same function, report, save.
A few helpers come from train.py, the trainer for your own pairs: loading the model, the
printed lines of a step and of an evaluation, answering a prompt, the run folder (--out),
and main, which turns a failure or Ctrl-C into one line.

Read first: model.py, dpo.py. Read next: test_dpo.py, then train.py.
"""

import argparse
import contextlib
import functools
import time
from pathlib import Path

import torch

import checkpoint
import dpo
import train
from model import GPT2_MODELS

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

# Per-model defaults. The tiny model needs a larger learning rate and more epochs to move
# in a few steps. IPO stops where log pi(chosen) - log pi(rejected) exceeds the reference's
# by 1/(2 beta) nats (IPO paper, Eq. 17), so it flips a preference only if 1/(2 beta) is larger
# than the reference's gap; the tiny model has never seen the chosen words and its gaps are
# tens of nats (printed in the table), hence beta 0.002 (a target of 250 nats) there.
DEFAULTS = {
    "tiny": dict(lr=1e-3, epochs=6, beta={"dpo": 0.1, "ipo": 0.002}),
    "gpt2": dict(lr=5e-5, epochs=3, beta={"dpo": 0.1, "ipo": 0.1}),
}
BATCH_SIZE = 2  # pairs per step: two steps an epoch


# -----------------------------------------------------------------------------
# The tiny stand-in for pretrained GPT-2
#
# --model tiny (train.TINY_CONFIG: GPT-2's vocabulary and context, 2 layers, 64 wide) starts
# with random weights, which prefer nothing. The real pipeline pretrains, then fine-tunes,
# then runs DPO; here a short supervised warm-up (SFT) on each prompt + its *rejected*
# (intuitive) completion, held-out prompts included, plays GPT-2's pretraining: after it
# the model finds the intuitive completions likely, and becomes the reference.

SFT_STEPS, SFT_LR, SFT_BATCH = 60, 3e-3, 8  # steps of 8 sequences


def sft_warmup(model, tokens, seed, log):
    """Next-token training on prompt + rejected completion, in float32 whatever --dtype (as
    GPT-2's own pretraining is done before any of this). Batches of SFT_BATCH sequences, each
    padded to its own longest row by dpo.pad_rows; the whole sequence is the 'completion'
    there, so every token after the first is a target."""
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


# -----------------------------------------------------------------------------
# Options

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
    add("--beta", type=train.positive(float), help="strength of the pull towards the reference (see below)")
    add("--lr", type=train.positive(float), help="AdamW's learning rate (see below)")
    add("--epochs", type=train.positive(int), help="passes over the four training pairs (see below)")
    add("--seed", type=int, default=0, help="same seed, device and threads: same numbers (0)")
    add("--device", choices=["cpu", "cuda", "mps"], help="default: cuda if there is one, else mps, else cpu")
    add("--dtype", choices=["float32", "bfloat16"], help="the forward passes' precision under autocast (default: "
        "bfloat16 on a GPU that has it, else float32)")
    add("--eval-every", type=train.positive(int), help="evaluate the held-out pairs every N steps (default: at "
        "the start and the end only)")
    add("--out", default="out/toy-dpo", help="the run's folder (out/toy-dpo): the trained policy, metrics.jsonl, "
        "run.json and, when it cannot be loaded by name, the reference. It must be missing, empty or this "
        "project's; other files are refused")
    add("--plot", help="save loss and reward curves to this .png (needs matplotlib)")
    args = parser.parse_args(argv)
    defaults = DEFAULTS["tiny" if args.model == "tiny" else "gpt2"]
    args.lr = args.lr or defaults["lr"]
    args.epochs = args.epochs or defaults["epochs"]
    args.beta = args.beta or defaults["beta"][args.loss]
    args.device = args.device or train.default_device()
    args.dtype = args.dtype or train.default_dtype(args.device)
    for wrong, message in [
        *train.model_problems(args),
        *train.out_problems(args.out),
        (args.plot and Path(args.plot).absolute().is_relative_to(Path(args.out).absolute()),
         "--plot must be outside --out, which holds the run's own files only"),
    ]:
        if wrong:
            parser.error(message)
    return args


# -----------------------------------------------------------------------------
# Measuring and reporting

def measure(model, tokens, autocast):
    """(log pi(y_chosen|x), log pi(y_rejected|x)) of every pair, (4,) each: the same function
    before training (on the reference: where the policy started) and after."""
    return torch.stack(dpo.pair_logps(model, tokens, BATCH_SIZE, autocast=autocast))


def count_preferred(logps):
    """Pairs whose chosen completion is strictly more likely than the rejected one (a tie is not)."""
    chosen, rejected = logps
    return int((chosen > rejected).sum())


def greedy_completions(model, enc, pairs, max_new_tokens=12):
    """What the model says after each prompt: greedy, up to <|endoftext|> or 12 tokens."""
    return [enc.decode(train.complete(model, enc, pair["prompt"], max_new_tokens)[0]) for pair in pairs]


def print_table(title, pairs, before, after, beta):
    """Log-probs before -> after, which completion each pair prefers, and the implicit rewards
    (DPO paper, Eq. 5; `before` is the reference's log-probs)."""
    print(f"\n{title:<46} {'log pi(chosen)':>22} {'log pi(rejected)':>22} {'prefers':>17} {'reward c / r':>15}\n"
          f"{'':<46} {'before -> after':>22} {'before -> after':>22} {'before -> after':>17}")
    prefers = lambda c, r: "chosen" if c > r else "rejected"
    for i, pair in enumerate(pairs):
        (c0, r0), (c1, r1) = before[:, i].tolist(), after[:, i].tolist()
        print(f"{pair['prompt']:<46} {c0:>9.2f} -> {c1:>9.2f} {r0:>9.2f} -> {r1:>9.2f} "
              f"{prefers(c0, r0):>8} -> {prefers(c1, r1):<8}{beta * (c1 - c0):>+7.2f} / {beta * (r1 - r0):+.2f}")


def report(args, before, after, completions):
    """The two tables, the headline and the greedy completions; before and after are the
    training pairs' log-probs and the held-out pairs'."""
    print_table("training pair", TOY_PAIRS, before[0], after[0], args.beta)
    print_table("held-out pair", TOY_EVAL_PAIRS, before[1], after[1], args.beta)
    counts = [f"{count_preferred(b)}/4 -> {count_preferred(a)}/4" for b, a in zip(before, after)]
    print(f"\nchosen preferred: training pairs {counts[0]}, held-out pairs {counts[1]}\n")
    print("greedy completions (before -> after):")
    for i, (pair, b, a) in enumerate(zip(TOY_PAIRS + TOY_EVAL_PAIRS, *completions)):
        print(f"  {pair['prompt']!r}{' (held out)' if i >= 4 else ''}\n    before: {b!r}\n    after:  {a!r}")


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


def make_summary(args, device, records, speed, before, after, completions):
    """The last line of metrics.jsonl: the run's options and outcome in one record."""
    lists = lambda logps: {"chosen": logps[0].tolist(), "rejected": logps[1].tolist()}
    rewards = dpo.dpo_loss(*after[0], *before[0], beta=args.beta)[1:]  # beta (log pi - log pi_ref), Eq. 5
    return {"summary": True, **vars(args), "batch_size": BATCH_SIZE, **speed,
            "tokens_per_s": speed["train_tokens"] / speed["train_s"], "peak_memory_bytes": train.peak_memory_bytes(device),
            "preferred_before": count_preferred(before[0]), "preferred_after": count_preferred(after[0]),
            "eval_preferred_before": count_preferred(before[1]), "eval_preferred_after": count_preferred(after[1]),
            "final_reward_accuracy": dpo.reward_accuracy(*rewards).mean().item(),
            "final_eval_reward_accuracy": [r for r in records if r.get("phase") == "eval"][-1]["reward_accuracy"],
            "logps_before": lists(before[0]), "logps_after": lists(after[0]),
            "eval_logps_before": lists(before[1]), "eval_logps_after": lists(after[1]),
            "completions_before": completions[0], "completions_after": completions[1]}


# -----------------------------------------------------------------------------
# The experiment

def run(args, status):
    """The whole experiment; returns the summary that ends metrics.jsonl. status as train.main's."""
    device = train.device_for(args.device)
    autocast = contextlib.nullcontext() if args.dtype == "float32" else torch.autocast(device.type,
                                                                                     train.DTYPES[args.dtype])
    loss_config = dpo.LossConfig(args.loss, args.beta)
    records = []
    log = functools.partial(train.log_to, records)

    # 1. prepare: --out checked, the pairs tokenised and the model built, all before training;
    # the tiny model first learns the intuitive completions, and the reference is where DPO starts
    status["created"] = train.check_out(args.out)
    if args.plot:
        import_pyplot()  # now, not after training
    enc = checkpoint.load_gpt2_encoding()
    pairs, held_out = dpo.encode_pairs(enc, TOY_PAIRS), dpo.encode_pairs(enc, TOY_EVAL_PAIRS)
    torch.manual_seed(args.seed)  # the random weights of --model tiny and --init random
    policy = train.load_policy(args.model, args.weights, args.init, device)
    print(f"model {args.weights or args.model}: {policy.config.n_layer} layers, {policy.config.n_embd} wide, "
          f"{sum(p.numel() for p in policy.parameters()):,} parameters, on {device}, {args.dtype}")
    if args.model == "tiny":
        print(f"SFT warm-up on prompt + rejected completion ({SFT_STEPS} steps of {SFT_BATCH} sequences, lr {SFT_LR})")
        sft_warmup(policy, pairs + held_out, args.seed, log)
    reference = dpo.make_reference(policy)
    steps = dpo.training_steps(pairs, BATCH_SIZE, args.epochs, args.seed)
    print(f"{args.loss.upper()} on 4 pairs, 4 held out (beta {args.beta}, lr {args.lr}, batch {BATCH_SIZE}, "
          f"{args.epochs} epochs, seed {args.seed})" + (train.ipo_target(args.beta, False) if args.loss == "ipo" else ""))

    # 2. measure: which completion the untouched model prefers (the reference is that model, frozen)
    before = [measure(reference, tokens, autocast) for tokens in (pairs, held_out)]
    completions = [greedy_completions(reference, enc, TOY_PAIRS + TOY_EVAL_PAIRS)]

    def evaluate_at_step(step):
        metrics = dpo.evaluate(policy, reference, held_out, loss_config, autocast=autocast)
        log({"phase": "eval", "step": step, **metrics}, train.eval_line(step, metrics))
    evaluate_at_step(0)

    # 3. train: one forward pass of the policy per batch, the reference's log-probs (before) cached
    eval_seconds = []

    def on_step(metrics):
        log({"phase": "dpo", **metrics, "lr": args.lr}, f"step {metrics['step']:3d}/{len(steps)} (epoch "
            f"{metrics['epoch']}) | " + train.format_metrics(metrics))
        if args.eval_every and metrics["step"] % args.eval_every == 0 and metrics["step"] < len(steps):
            start = time.perf_counter()
            evaluate_at_step(metrics["step"])
            eval_seconds.append(time.perf_counter() - start)

    optimizer = dpo.make_optimizer(policy, args.lr)
    start = time.perf_counter()
    dpo.train_dpo(policy, reference, pairs, optimizer, loss_config, args.epochs, BATCH_SIZE, args.seed,
                  autocast=autocast, reference_logps=tuple(before[0]), on_step=on_step)
    train_s = time.perf_counter() - start - sum(eval_seconds)

    # 4. measure again, with the same functions
    after = [measure(policy, tokens, autocast) for tokens in (pairs, held_out)]
    completions.append(greedy_completions(policy, enc, TOY_PAIRS + TOY_EVAL_PAIRS))
    evaluate_at_step(len(steps))

    # 5. report
    report(args, before, after, completions)
    real, positions = train.tokens_and_positions(pairs, [indices for _, indices in steps])
    speed = {"train_s": train_s, "train_tokens": real, "train_positions": positions}
    print("\n" + train.speed_line(speed, device))

    # 6. save: the trained policy (and the reference, unless a GPT-2 name loads it), metrics.jsonl
    summary = make_summary(args, device, records, speed, before, after, completions)
    name = train.reference_by_name(args)
    train.save_run(args.out, policy, train.describe_run("train_toy.py", args, loss_config, name), [*records, summary],
                   reference if name is None else None, replaced=lambda: status.update(saved=len(steps), finished=True))
    if args.plot:
        save_plot(records, args.plot, args.loss)
    print(f"saved the trained policy and metrics.jsonl to {args.out}/" + (f", curves to {args.plot}" if args.plot else ""))
    return summary


if __name__ == "__main__":
    train.main(None, parse_args, run)
