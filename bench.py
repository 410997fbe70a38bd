"""
How fast is one DPO step, and how close to the floor? A benchmark, not a test.

On GPT-2 124M shapes with random weights (no download needed), in one process, on the
same tokens, it times three ways of taking a training step:

  (a) straightforward: four forward passes per step (policy and reference, chosen and
      rejected, the reference under no_grad) and PyTorch's default AdamW;
  (b) this project's dpo.dpo_step: the policy runs once on chosen and rejected together,
      the reference log-probs were computed once before training (dpo.precompute_reference);
  (c) the floor: one forward + backward + optimizer step of the policy on the same tokens,
      with a plain next-token loss and no reference at all.

and prints seconds per step, tokens per second, the ratios, and the peak memory of each
phase above the `import torch` baseline, next to the unavoidable part: policy + reference
+ gradients + AdamW's two moments = 5 x the parameter bytes. Two peaks: the bytes that
tensors held at once (CUDA's own count; on the CPU, the count PyTorch's profiler records
with every allocation), and on the CPU also the process's resident memory, which holds
more than tensors (freed memory the C library keeps, MKL's buffers). That one is measured
in a new process for each phase, which runs nothing else: what a training run of that kind
needs, and not what glibc kept of the phases before it.

    python bench.py                 # CPU or CUDA, whichever --device auto finds
    python bench.py --toy           # two of the toy pairs: short sequences, the optimizer dominates

Read first: dpo.py.
"""

import argparse
import collections
import contextlib
import gc
import itertools
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import dpo
import train_toy
from model import GPT, GPTConfig, resolve_device

# -----------------------------------------------------------------------------
# Peak memory of one phase


def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_memory(device):
    """Start a new peak: CUDA's counter, or on Linux the process's high-water mark (VmHWM),
    which writing 5 to /proc/self/clear_refs resets."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False  # not Linux: only the whole run's peak (ru_maxrss) is known


def peak_memory_bytes(device):
    """The peak since reset_peak_memory: Linux's VmHWM on the CPU; elsewhere, and on CUDA,
    what train_toy.py reports (CUDA's counter, or the whole run's peak RSS)."""
    if device.type != "cuda":
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            pass
    return train_toy.peak_memory_bytes(device)


def baseline_memory_bytes(device):
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss_bytes()


def tensor_bytes(tensors):
    """Bytes held by these tensors, each storage counted once (the tied weight, views)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@contextlib.contextmanager
def stderr_silenced():
    """The profiler's C++ side prints two lines of its own when it starts and stops."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_tensor_peak_bytes(run):
    """Run run() on the CPU; return the most bytes that tensors allocated during it held at any
    one time. CUDA counts this itself (max_memory_allocated). On the CPU, PyTorch's profiler,
    asked to profile memory, records every allocation and release with its size; reading them
    back goes through the profiler's event tree, which is not public API, so this returns None
    where that is missing. Only memory allocated during run() counts: the profiler also
    records releases of memory allocated under an earlier profile (some of it garbage that
    the collector happens to free during run()), and those are matched by address and left
    out. A release and an allocation at the same nanosecond count the allocation first, so
    the count can only err upwards."""
    from torch.profiler import ProfilerActivity, profile
    with stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    try:
        allocation = torch._C._profiler._ExtraFields_Allocation
        events = list(prof.profiler.kineto_results.experimental_event_tree())
    except AttributeError:
        return None
    records = []  # (time, bytes, address): bytes > 0 for an allocation, < 0 for a release
    while events:
        event = events.pop()
        if isinstance(event.extra_fields, allocation):
            records.append((event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.ptr))
        events += event.children
    live = collections.Counter()  # address: allocations made during run() and not yet released
    net = peak = 0
    for _, size, address in sorted(records, key=lambda r: (r[0], -r[1])):
        if size > 0:
            live[address] += 1
        elif live[address] > 0:
            live[address] -= 1
        else:
            continue  # allocated before run()
        net += size
        peak = max(peak, net)
    return peak


# -----------------------------------------------------------------------------
# The three steps


def straightforward_step(policy, reference, optimizer, batch, beta):
    """(a): what one writes first. Four forward passes, each half of the batch on its own."""
    n = batch["input_ids"].size(0) // 2
    ids, mask = batch["input_ids"], batch["loss_mask"]
    policy_chosen = dpo.sequence_logps(policy(ids[:n]), ids[:n], mask[:n])
    policy_rejected = dpo.sequence_logps(policy(ids[n:]), ids[n:], mask[n:])
    with torch.no_grad():
        reference_chosen = dpo.sequence_logps(reference(ids[:n]), ids[:n], mask[:n])
        reference_rejected = dpo.sequence_logps(reference(ids[n:]), ids[n:], mask[n:])
    losses, _, _ = dpo.dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=beta)
    optimizer.zero_grad(set_to_none=True)
    losses.mean().backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()


def floor_step(policy, optimizer, batch):
    """(c): the least any training step on these completions costs: one forward, one backward,
    one update, with the completions' next-token loss (logits only where they score one)."""
    ids, scored = batch["input_ids"], batch["loss_mask"][:, 1:].bool()
    optimizer.zero_grad(set_to_none=True)  # before the forward pass, as in dpo_step
    logits = policy(ids, logits_at=torch.nn.functional.pad(scored, (0, 1)))  # (N, V)
    loss = torch.nn.functional.cross_entropy(logits, ids[:, 1:][scored])
    loss.backward()
    optimizer.step()


def random_batch(n_pairs, prompt_len, completion_len, vocab_size, generator):
    """n_pairs pairs sharing a prompt, chosen rows first: the layout dpo.encode_pairs makes."""
    T = prompt_len + completion_len
    prompts = torch.randint(vocab_size, (n_pairs, prompt_len), generator=generator)
    completions = torch.randint(vocab_size, (2 * n_pairs, completion_len), generator=generator)
    input_ids = torch.cat([prompts.repeat(2, 1), completions], dim=1)  # (2B, T)
    loss_mask = torch.zeros(2 * n_pairs, T)
    loss_mask[:, prompt_len:] = 1.0
    return {"input_ids": input_ids, "loss_mask": loss_mask}


def time_in_turns(steps, n_rounds, device):
    """Median seconds per step of each of `steps` (name: step), which take turns: one step
    each per round, the rounds going through every order of them. So a slow spell of a
    shared machine falls on all of them alike, and within a round each step comes right
    after each other one equally often (over 6 rounds, for three steps); the median,
    because now and then one step stalls for reasons of its own."""
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

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


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Time the DPO step against the straightforward loop and the floor.")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per phase, after two untimed ones (6)")
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs per step (2, as train_toy.py)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (32)")
    parser.add_argument("--completion-len", type=int, default=32, help="tokens of each completion (32)")
    parser.add_argument("--toy", action="store_true",
                        help="use the first --pairs of train_toy.py's pairs (GPT-2 tokenizer) instead of random tokens")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--process-peak-of", choices=["a", "b", "c"], help=argparse.SUPPRESS)  # bench.py's own use
    return parser.parse_args(argv)


def build(args, device):
    """The policy (GPT-2 124M shapes, random weights), its reference, and one step's tokens:
    `data` on the CPU, as train_toy.py holds a data set, and `batch`, the same on `device`."""
    torch.manual_seed(0)
    policy = GPT(GPTConfig()).to(device).eval()  # eval: dropout off, as in DPO
    reference = dpo.make_reference(policy)
    if args.toy:
        pairs = train_toy.TOY_PAIRS[:args.pairs]
        data = dpo.encode_pairs(train_toy.load_tokenizer(), pairs, policy.config.block_size)
        shape = f"the first {len(pairs)} toy pairs"
    else:
        data = random_batch(args.pairs, args.prompt_len, args.completion_len, policy.config.vocab_size,
                            torch.Generator().manual_seed(0))
        shape = f"{args.pairs} pairs x ({args.prompt_len} prompt + {args.completion_len} completion tokens)"
    batch = {key: value.to(device) for key, value in data.items()}
    return policy, reference, data, batch, shape


def make_phases(policy, reference, data, batch, device, lr):
    """{letter: (label, which optimizer, make the step from it)}, and the two optimizers."""
    def dpo_phase(opt):
        cache = dpo.precompute_reference(reference, data)  # once, before training, as train_dpo does
        full = dpo.make_batch(data, cache, torch.arange(data["input_ids"].size(0) // 2), device)
        return lambda: dpo.dpo_step(policy, opt, full, beta=0.1)

    optimizers = {"default AdamW": lambda: torch.optim.AdamW(policy.parameters(), lr=lr),
                  "dpo.make_optimizer": lambda: dpo.make_optimizer(policy, lr=lr)}
    phases = {
        "a": ("(a) straightforward: 4 forwards, default AdamW", "default AdamW",
              lambda opt: lambda: straightforward_step(policy, reference, opt, batch, beta=0.1)),
        "b": ("(b) dpo.dpo_step: 1 forward, cached reference", "dpo.make_optimizer", dpo_phase),
        "c": ("(c) floor: 1 forward + backward + step", "dpo.make_optimizer",
              lambda opt: lambda: floor_step(policy, opt, batch)),
    }
    return phases, optimizers


def first_two_steps(make_step, optimizer):
    """Untimed; the second step runs with AdamW's state and the last step's gradients."""
    step = make_step(optimizer)
    step()
    step()
    return step


def process_peak_in_a_fresh_process(argv, letter):
    """(peak, exact) of a new `python bench.py` process that builds the models and runs only
    phase `letter`'s first two steps: the resident memory a training run of that kind needs.
    Measured in this process, after other phases, it would also hold what glibc kept of their
    freed memory, and in the shape they left it (0.1 GB more for (b) on the 2-core CPU).
    The new process is made from the command line argv alone: what a caller of main()
    changed in this process (a patched model, say) does not reach it."""
    command = [sys.executable, os.path.abspath(__file__), *argv, "--process-peak-of", letter]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"measuring phase ({letter})'s memory in a new process took over 30 minutes: "
                           f"{' '.join(command)}") from None
    if result.returncode != 0:  # -9: killed, most likely for memory, and then stderr is empty
        raise RuntimeError(f"measuring phase ({letter})'s memory in a new process failed with exit code "
                           f"{result.returncode}: {' '.join(command)}\n{result.stderr}")
    peak, exact = result.stdout.split()[-2:]
    return int(peak), exact == "exact"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = resolve_device(args.device)
    results = {letter: {"tensors": None, "process": None, "exact": True} for letter in "abc"}
    if device.type != "cuda" and not args.process_peak_of:
        # each phase's process peak first, in a new process of its own (CUDA counts tensors
        # instead), while this one does not yet hold its own copy of the models
        for letter in results:
            results[letter]["process"], results[letter]["exact"] = process_peak_in_a_fresh_process(argv, letter)

    baseline = baseline_memory_bytes(device)
    policy, reference, data, batch, shape = build(args, device)
    phases, optimizers = make_phases(policy, reference, data, batch, device, args.lr)
    if args.process_peak_of:  # bench.py measuring one phase's process peak for itself
        exact = reset_peak_memory(device)
        _, kind, make_step = phases[args.process_peak_of]
        first_two_steps(make_step, optimizers[kind]())
        print(peak_memory_bytes(device) - baseline, "exact" if exact else "whole-run")
        return None

    param_bytes = 4 * sum(p.numel() for p in policy.parameters())
    tokens = batch["input_ids"].numel()
    print(f"GPT-2 124M shapes ({param_bytes // 4:,} parameters, random weights) on {device}, "
          f"{torch.get_num_threads()} threads; {shape} = {tokens} tokens per step; {args.steps} timed steps per phase")

    def forget_gradients():
        for p in policy.parameters():
            p.grad = None
        gc.collect()

    # Tensors' peaks, one phase at a time, so that each holds nothing of the other phases
    held = tensor_bytes([*policy.parameters(), *reference.parameters(), *data.values(), *batch.values()])
    for letter, (_, kind, make_step) in phases.items():
        if device.type == "cuda":  # CUDA counts tensors, and its counter resets exactly
            reset_peak_memory(device)
            first_two_steps(make_step, optimizers[kind]())
            results[letter]["tensors"] = peak_memory_bytes(device) - baseline
        elif device.type == "cpu":  # the profiler's count, on top of what is held already; none for MPS
            allocated = cpu_tensor_peak_bytes(lambda: first_two_steps(make_step, optimizers[kind]()))
            results[letter]["tensors"] = None if allocated is None else held + allocated
        forget_gradients()

    # Time, the three steps in turns; (b) and (c) share one optimizer to keep the memory down.
    shared = {kind: make() for kind, make in optimizers.items()}
    steps = {letter: first_two_steps(make_step, shared[kind]) for letter, (_, kind, make_step) in phases.items()}
    for letter, seconds in time_in_turns(steps, args.steps, device).items():
        results[letter]["seconds"] = seconds

    def gb(n):
        return "-" if n is None else f"{n / 1e9:.2f} GB"

    print(f"\n{'':<68} {'peak above baseline':>20}")
    print(f"{'phase':<48} {'s/step':>8} {'tokens/s':>9} {'tensors':>10} {'process':>10}")
    for letter, r in results.items():
        print(f"{phases[letter][0]:<48} {r['seconds']:>8.3f} {tokens / r['seconds']:>9.0f} {gb(r['tensors']):>10} "
              f"{gb(r['process']):>10}" + ("" if r["exact"] else " *"))
    a, b, c = (r["seconds"] for r in results.values())
    budget = 5 * param_bytes
    print(f"\n(a) / (b) = {a / b:.2f}x faster   (b) / (c) = {b / c:.2f}x the floor")
    print(f"peaks in units of policy + reference + gradients + AdamW state "
          f"(5 x {param_bytes / 1e9:.3f} GB = {budget / 1e9:.2f} GB):")
    # the floor holds the same five copies (the reference is loaded for all three phases) plus
    # what any forward and backward needs: the activations
    for label, r in (("(b)", results["b"]), ("(c) the floor", results["c"])):
        units = ["-" if r[kind] is None else f"{r[kind] / budget:.2f} x" for kind in ("tensors", "process")]
        print(f"  {label:<14} tensors {units[0]:>7}   process {units[1]:>7}")
    if device.type != "cuda":
        print("process: the peak of a new process that ran only that phase (bench.py starts one for each)")
    if not all(r["exact"] for r in results.values()):
        print("* that process's peak since it started: this system cannot reset the peak after building the models")
    return results


if __name__ == "__main__":
    main()
