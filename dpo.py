"""
Direct Preference Optimization (DPO) and Identity Preference Optimization (IPO), in one file.

A preference pair is a prompt x with two completions: y_c (chosen) and y_r (rejected).
DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model") trains a policy pi on such pairs directly, with no reward model
and no sampling. The derivation, in four steps:

1. RLHF maximises  E[r(x, y)] - beta KL(pi || pi_ref),  a reward r kept in check by a
   KL penalty towards a frozen reference pi_ref (DPO paper, Eq. 3).
2. Its optimum is  pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x),  where
   Z(x) = sum over every completion y of pi_ref(y|x) exp(r(x, y) / beta)   (Eq. 4).
   Solved for the reward:  r(x, y) = beta log(pi*(y|x) / pi_ref(y|x)) + beta log Z(x)   (Eq. 5).
3. Bradley-Terry says  P(y_c preferred to y_r | x) = sigmoid(r(x, y_c) - r(x, y_r))   (Eq. 1).
   Only the *difference* of two rewards enters, and both completions answer the same
   prompt x, so beta log Z(x) cancels. This is the step that makes DPO possible: Z(x), a
   sum over all possible completions, never has to be computed.
4. Maximum likelihood of the preferences under that model, with pi in place of pi*:

       h      = [log pi(y_c|x) - log pi_ref(y_c|x)] - [log pi(y_r|x) - log pi_ref(y_r|x)]
              = chosen logratio - rejected logratio
       L_DPO  = -log sigmoid(beta h)                                        (Eq. 7)
       reward = beta log(pi(y|x) / pi_ref(y|x))      (the implicit reward; Eq. 5 without Z)
       margin = chosen reward - rejected reward = beta h
       grad L = -beta sigmoid(-beta h) [grad log pi(y_c|x) - grad log pi(y_r|x)]   (Section 4)

Variants:
- conservative DPO, for labels flipped with probability eps (Mitchell 2023, "A note on
  DPO with noisy preferences"):  L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
- IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", Eq. 17):  L = (h - 1/(2 beta))^2.  Its minimum is at h = 1/(2 beta), also
  when a preference is deterministic, where DPO pushes pi(y_r) all the way to 0
  (`python dpo.py` shows both on a bandit).

log pi(y|x) is the *sum* of the completion's token log-probs, as in the paper. With
average_logps=True it is their mean instead (the "length-normalised" choice): DPO's implicit
reward is then per token, and IPO's target 1/(2 beta) is nats per token instead of nats
per completion (the mean is what TRL's IPO uses).

One batch of B pairs is 2B rows, the chosen rows first, then the rejected rows in the same
order, each padded on the right to the batch's longest row:

    row 0      [ prompt 0 | chosen 0   <eot> | pad ]      loss_mask  0 0 0 | 1 1 1 1 1 | 0
    ...
    row B-1    [ prompt B-1 | chosen B-1 <eot> ]
    row B      [ prompt 0 | rejected 0 <eot> | pad pad ]  loss_mask  0 0 0 | 1 1 1 1 | 0 0
    ...
    row 2B-1   [ prompt B-1 | rejected B-1 <eot> | pad ]

One forward pass of the policy over all 2B rows gives log pi(y|x) for each row (prompt and
padding masked out); the first half is log pi(y_c|x), the second log pi(y_r|x). From each,
the reference's log-probs of the same rows, computed once before training, are subtracted.

In reading order: log-probabilities of completions, pairs to tensors, batches of similar
length, the losses, sharing work between processes, the frozen reference, the training step
(micro-batches, a learning-rate schedule) and loop, evaluation; `python dpo.py` runs the bandit.
Read first: model.py. Read next: train_toy.py, which runs all of this.
"""

import contextlib
import copy
import math
import os
import re

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel


# -----------------------------------------------------------------------------
# Log-probabilities of completions

def at_least_float32(x):
    """float16 / bfloat16 logits are taken to float32 before log_softmax and the sums over
    tokens, where half precision would lose a tenth of a nat; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def sequence_logps(logits, input_ids, loss_mask, average_logps=False):
    """log pi(y|x) = sum over completion tokens of log pi(y_t | x, y_<t), one number per row.

    logits (B, T, V) from the model on input_ids (B, T); loss_mask (B, T) is 1 on completion
    tokens, 0 on prompt tokens and padding, which therefore contribute nothing. A causal
    LM's logits at position t score the token at t+1, hence the shift: the last position
    scores a token beyond the sequence, and the first token is scored by no position.
    average_logps=True divides by the number of completion tokens. This is the definition;
    training computes the same numbers with completion_logps below, which runs the output
    head only where it scores a completion token
    (test_completion_logps_equals_sequence_logps_of_the_full_logits)."""
    logprobs = at_least_float32(logits[:, :-1, :]).log_softmax(dim=-1)  # (B, T-1, V): log pi(. | x, y_<t)
    token_logps = logprobs.gather(2, input_ids[:, 1:].unsqueeze(2)).squeeze(2)  # (B, T-1): log pi(y_t)
    mask = loss_mask[:, 1:]
    logps = (token_logps * mask).sum(dim=-1)  # (B,)
    return logps / mask.sum(dim=-1) if average_logps else logps


# The same numbers, computed where they are cheap. Only the positions that score a
# completion token need logits: the output head and the log-softmax then skip the prompt
# and the padding.

def vocab_logprobs(model, input_ids, loss_mask):
    """log pi(. | x, y_<t) over the vocabulary at the N positions that score a completion
    token, (N, V), in row-major order."""
    scored = loss_mask[:, 1:].bool()  # (B, T-1): which next tokens are completion tokens
    scoring_positions = F.pad(scored, (0, 1))  # (B, T): position t scores token t+1
    return at_least_float32(model(input_ids, logits_at=scoring_positions)).log_softmax(dim=-1)


def logps_from_vocab_logprobs(vocab_logprobs, input_ids, loss_mask, average_logps=False):
    """sequence_logps from vocab_logprobs' (N, V) rows: each completion token's log-prob,
    summed per row, (B,)."""
    scored = loss_mask[:, 1:].bool()
    targets = input_ids[:, 1:][scored]  # (N,), the same row-major order
    token_logps = vocab_logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)  # (N,)
    # back to (B, T-1), then sum each row (not index_add_, whose CUDA sums are not deterministic)
    per_position = torch.zeros(scored.shape, dtype=token_logps.dtype, device=token_logps.device)
    logps = per_position.masked_scatter(scored, token_logps).sum(dim=-1)  # (B,)
    return logps / scored.sum(dim=-1) if average_logps else logps


def completion_logps(model, input_ids, loss_mask, average_logps=False):
    """sequence_logps(model(input_ids), input_ids, loss_mask, average_logps), computed cheaply."""
    return logps_from_vocab_logprobs(vocab_logprobs(model, input_ids, loss_mask), input_ids, loss_mask,
                                     average_logps)


# -----------------------------------------------------------------------------
# Pairs to tensors

ASSISTANT = "\n\nAssistant:"  # where HH-RLHF's last answer begins


def check_different(chosen, rejected):
    """Equal completions make every margin 0 and the gradient 0: a data error, not a pair."""
    if chosen == rejected:
        raise ValueError("chosen and rejected are the same text, so there is no preference to learn")


def split_prompt(chosen, rejected):
    """(prompt, chosen completion, rejected completion) from two whole dialogues that share
    their beginning, as Anthropic's HH-RLHF gives them ({"chosen", "rejected"}, no prompt).

    The prompt is the shared beginning up to and including the last "\n\nAssistant:" in it,
    as the DPO authors split HH. Without one, it ends at the last whitespace the two share,
    which then starts both completions (" mat" / " bed"): GPT-2's tokens carry the space
    before a word, and a prompt cut inside a word would leave its second half to be
    tokenised as a word of its own, which the model would never see in running text."""
    check_different(chosen, rejected)
    shared = os.path.commonprefix([chosen, rejected])  # character by character
    end = shared.rfind(ASSISTANT)
    if end >= 0:
        end += len(ASSISTANT)
    else:
        last_whitespace = re.search(r"\s\S*\Z", shared)
        end = last_whitespace.start() if last_whitespace else 0
    if end == 0:
        raise ValueError("chosen and rejected share no beginning to take as the prompt; give a \"prompt\" field")
    for name, dialogue in (("chosen", chosen), ("rejected", rejected)):
        if len(dialogue) == end:
            raise ValueError(f"the {name} dialogue ends where the prompt does: it has no answer to score")
    return shared[:end], chosen[end:], rejected[end:]


def text_field(pair, field):
    """pair[field], which must be a non-empty string."""
    text = pair.get(field)
    if not isinstance(text, str) or not text:
        raise ValueError(f"field {field!r} must be a non-empty string, got {text!r}")
    return text


def encode_pair(enc, pair):
    """{"prompt", "chosen", "rejected"} -> (prompt_ids, chosen_ids, rejected_ids), each text
    tokenised *separately*.

    Tokenising prompt + completion as one string could merge the last prompt characters
    with the first completion characters into one BPE token, and then the completion would
    no longer be exactly the tokens being scored. Tokenised apart, a completion's tokens are
    exactly enc.encode(completion) + <|endoftext|>, which marks where the completion ends
    (and is scored with it)."""
    texts = [text_field(pair, field) for field in ("prompt", "chosen", "rejected")]
    check_different(*texts[1:])
    try:
        prompt_ids, chosen_ids, rejected_ids = (enc.encode(text) for text in texts)
    except ValueError:  # tiktoken refuses special-token text such as "<|endoftext|>" inside the data
        raise ValueError("the text holds a special token such as '<|endoftext|>', which the tokenizer will not "
                         "encode as text; remove it") from None
    return prompt_ids, chosen_ids + [enc.eot_token], rejected_ids + [enc.eot_token]


def encode_pairs(enc, pairs):
    """encode_pair for each of a list of pairs."""
    if len(pairs) == 0:
        raise ValueError("no preference pairs: need at least one {prompt, chosen, rejected}")
    return [encode_pair(enc, pair) for pair in pairs]


def longest_row(pair):
    """Tokens in the longer of a pair's two rows, prompt + completion: what must fit the context."""
    prompt_ids, chosen_ids, rejected_ids = pair
    return len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))


def pad_rows(rows):
    """(prompt_ids, completion_ids) rows -> input_ids and loss_mask (R, T), right-padded to
    the longest row. loss_mask is 1 on exactly the completion tokens. The padding id is 0:
    any token would do, because every padding position is masked out and, being on the
    right, is never attended to by a real token (attention is causal)."""
    T = max(len(prompt_ids) + len(completion_ids) for prompt_ids, completion_ids in rows)
    input_ids = torch.zeros((len(rows), T), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), T))
    for row, (prompt_ids, completion_ids) in enumerate(rows):
        ids = prompt_ids + completion_ids
        input_ids[row, :len(ids)] = torch.tensor(ids)
        loss_mask[row, len(prompt_ids):len(ids)] = 1.0
    return input_ids, loss_mask


def collate(pairs):
    """Encoded pairs -> {"input_ids", "loss_mask"}, (2B, T): the chosen rows, then the
    rejected rows in the same order (the layout in the module docstring), so that the
    policy scores both completions of every pair in one forward pass."""
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    input_ids, loss_mask = pad_rows(rows)
    return {"input_ids": input_ids, "loss_mask": loss_mask}


def chosen_and_rejected(rows):
    """Split what collate's 2B rows gave, (2B, ...), into the chosen half and the rejected half."""
    return rows.chunk(2)


# -----------------------------------------------------------------------------
# Batches of similar length
#
# Each batch is padded to its own longest row, so a batch that mixes short and long pairs
# is mostly padding. Pairs of similar length are put together instead.

def batches_by_length(pairs, batch_size, indices=None):
    """The indices of `pairs` (all of them, or those given) sorted by length and cut into
    batches of batch_size. The passes without a gradient, where the order does not matter,
    take all pairs this way; training sorts within shuffled chunks (epoch_batches)."""
    indices = range(len(pairs)) if indices is None else indices
    by_length = sorted(indices, key=lambda i: longest_row(pairs[i]))
    return [by_length[start:start + batch_size] for start in range(0, len(by_length), batch_size)]


def epoch_batches(pairs, batch_size, generator, chunk_batches=50):
    """One epoch's batches of pair indices: shuffled, with pairs of similar length together.

    The pairs are shuffled, cut into chunks of chunk_batches batches, sorted by length within
    each chunk and cut into batches, and then the batches are shuffled: the grouping of
    Hugging Face's LengthGroupedSampler. A new order every epoch, as the generator moves on.
    With fewer than chunk_batches batches (every toy run) all pairs are one chunk, so the
    batches are cut from the same sorted order every epoch and mostly only their order changes."""
    order = torch.randperm(len(pairs), generator=generator).tolist()
    chunk = batch_size * chunk_batches
    batches = []
    for start in range(0, len(order), chunk):
        batches += batches_by_length(pairs, batch_size, order[start:start + chunk])
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def training_steps(pairs, batch_size, epochs, seed):
    """Every step of a run as (epoch, pair indices), from the seed alone: a resumed run, and
    every process under torchrun, takes exactly these steps."""
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same order on every device
    return [(epoch, indices) for epoch in range(1, epochs + 1)
            for indices in epoch_batches(pairs, batch_size, generator)]


def count_training_steps(n_pairs, batch_size, epochs):
    """len(training_steps(...)), without building them: every chunk of epoch_batches holds a
    whole number of batches, so an epoch is ceil(n_pairs / batch_size) batches."""
    return epochs * math.ceil(n_pairs / batch_size)


# -----------------------------------------------------------------------------
# The losses

def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta=0.1, loss_type="dpo", label_smoothing=0.0):
    """The per-pair DPO / conservative DPO / IPO loss, from four tensors of log-probs.

    Args:
        policy_chosen_logps: (B,) log pi(y_chosen | x), summed (or averaged) over the
            completion's tokens.
        policy_rejected_logps: (B,) log pi(y_rejected | x).
        reference_chosen_logps: (B,) log pi_ref(y_chosen | x).
        reference_rejected_logps: (B,) log pi_ref(y_rejected | x).
        beta: strength of the KL penalty towards the reference (> 0). Small beta lets the
            policy move far; IPO's target is h = 1/(2 beta), in the units of the log-probs
            (nats per completion when summed, per token when averaged).
        loss_type: "dpo" (DPO paper, Eq. 7) or "ipo" (IPO paper, Eq. 17).
        label_smoothing: eps in [0, 0.5), the assumed probability that a preference label
            is flipped (conservative DPO); "dpo" only.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,), not averaged. The rewards
        are DPO's implicit rewards beta * (log pi - log pi_ref) (DPO paper, Eq. 5),
        detached: they are for reporting, not for the gradient.
    """
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0 (it scales the KL penalty), got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    h = chosen_logratios - rejected_logratios  # margin = beta * h
    if loss_type == "dpo":
        # logsigmoid, not log(sigmoid(.)): stays finite for h = +-1e4
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if label_smoothing != 0.0:
            raise ValueError("label_smoothing is for loss_type='dpo'; IPO is already robust to noisy labels")
        losses = (h - 1 / (2 * beta)) ** 2  # IPO paper, Eq. 17
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: use 'dpo' or 'ipo'")
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def reward_accuracy(chosen_rewards, rejected_rewards):
    """Per pair: 1 where the implicit rewards rank chosen above rejected, 0 where below, and
    1/2 at a tie, as a coin toss would score, so a policy still equal to its reference reads 0.5."""
    margins = chosen_rewards - rejected_rewards
    return (margins > 0).to(margins.dtype) + 0.5 * (margins == 0).to(margins.dtype)


NUMBERS = ("loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward")


def summed_numbers(losses, chosen_rewards, rejected_rewards):
    """dpo_loss's per-pair outputs summed into the NUMBERS a step reports, and the number of
    pairs last, (6,): sums, so that micro-batches and processes can add theirs up first."""
    margins = chosen_rewards - rejected_rewards
    return torch.stack([losses.detach().sum(), reward_accuracy(chosen_rewards, rejected_rewards).sum(),
                        margins.sum(), chosen_rewards.sum(), rejected_rewards.sum(), margins.new_tensor(len(margins))])


def means(sums):
    """summed_numbers, added up, -> {name: mean over the pairs}."""
    return dict(zip(NUMBERS, (sums[:-1] / sums[-1]).tolist()))


# -----------------------------------------------------------------------------
# Sharing work between processes
#
# Under torchrun every process runs this same code on its own device. The passes without a
# gradient give each process a share of the batches; every process then needs every
# result, so each fills its share into a tensor of zeros and the tensors are added up
# (all_reduce): adding zeros is exact, so the numbers are the ones one process would get.

def process_rank_and_count():
    """(this process's rank, the number of processes): (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def my_share(batches):
    """This process's batches: every count-th, from its rank on."""
    rank, count = process_rank_and_count()
    return batches[rank::count]


def sum_over_processes(x):
    """x added up over the processes, in place (x itself without torchrun)."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


# -----------------------------------------------------------------------------
# The frozen reference

def make_reference(policy):
    """A frozen copy of the policy: pi_ref in every formula above.

    It is a separate object (not the policy with gradients switched off), in eval
    mode so that dropout never changes its outputs, with requires_grad False on
    every parameter, and it is never handed to the optimizer."""
    reference = copy.deepcopy(policy).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


@torch.no_grad()
def pair_logps(model, pairs, batch_size=8, average_logps=False, autocast=contextlib.nullcontext(), progress=None):
    """log pi(y_chosen|x) and log pi(y_rejected|x) of every encoded pair, (len(pairs),) each on the
    CPU, batch_size pairs at a time (batches_by_length), under `autocast` (the training
    step's). No graph is kept, whatever the model's requires_grad. progress(pairs done,
    pairs to do), if given, is called after each batch.

    Run on the reference before training, this is everything DPO needs from it: the
    reference is frozen and the data do not change, so log pi_ref(y|x) is the same number
    at every step. Computed once, it takes the reference's forward pass out of every step,
    which is then one forward and one backward of the policy."""
    device = next(model.parameters()).device
    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    logps = torch.zeros(2, len(pairs), dtype=dtype, device=device)  # chosen, rejected
    batches, done = my_share(batches_by_length(pairs, batch_size)), 0
    total = sum(map(len, batches))
    for indices in batches:
        batch = collate([pairs[i] for i in indices])
        with autocast:
            rows = completion_logps(model, batch["input_ids"].to(device), batch["loss_mask"].to(device),
                                    average_logps)
        logps[:, indices] = rows.view(2, -1)  # collate's chosen rows, then its rejected rows
        done += len(indices)
        if progress is not None:
            progress(done, total)
    chosen, rejected = sum_over_processes(logps).cpu()
    return chosen, rejected


# -----------------------------------------------------------------------------
# The training step

def make_optimizer(policy, lr, weight_decay=0.01):
    """AdamW (Loshchilov & Hutter 2019) over the policy's parameters, never the reference's.

    The fused kernel updates each parameter in one pass over memory instead of a dozen
    element-wise passes. Torch builds without it get the ordinary implementation."""
    try:
        return torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)


def learning_rate(step, lr, warmup_steps=0, decay="none", total_steps=None):
    """The learning rate of step 1, 2, ...: a linear warmup, lr * step / warmup_steps, up to lr
    at step warmup_steps; then lr ("none"; the DPO authors warm up for 150 steps and stay
    there), or a linear decay that would reach 0 one step after total_steps ("linear", as TRL)."""
    if step <= warmup_steps:
        return lr * step / warmup_steps
    if decay == "linear":
        return lr * (total_steps - step + 1) / (total_steps - warmup_steps)
    return lr


def make_batch(pairs, reference_logps, device, weight=1.0):
    """What dpo_step needs for some encoded pairs: collate's rows on `device`, the reference's
    log-probs of the same pairs, reference_logps = (chosen (B,), rejected (B,)), and the
    weight of the pairs' losses in the step (0: computed, but not counted)."""
    batch = {key: value.to(device) for key, value in collate(pairs).items()}
    batch["reference_chosen_logps"], batch["reference_rejected_logps"] = (x.to(device) for x in reference_logps)
    batch["weight"] = weight
    return batch


def split_step(indices, n_parts):
    """One step's pair indices (sorted by length, so that neighbours pad alike) cut into n_parts
    contiguous parts of nearly equal size, some empty when the step holds fewer pairs."""
    return [indices[k * len(indices) // n_parts:(k + 1) * len(indices) // n_parts] for k in range(n_parts)]


def my_micro_batches(indices, grad_accum):
    """This process's share of one step's pairs, as (pair indices, weight) micro-batches: of
    split_step's processes x grad_accum parts, process r takes parts r * grad_accum, ..., and
    drops the empty ones. A process left with none (a step of fewer pairs than processes)
    gets the step's first pair with weight 0: it must still take part in the gradient sync,
    or the other processes would wait for it for ever."""
    rank, count = process_rank_and_count()
    parts = split_step(indices, count * grad_accum)[rank * grad_accum:(rank + 1) * grad_accum]
    return [(part, 1.0) for part in parts if part] or [(indices[:1], 0.0)]


def dpo_step(policy, optimizer, micro_batches, n_pairs, beta=0.1, loss_type="dpo", label_smoothing=0.0,
             max_grad_norm=1.0, average_logps=False, autocast=contextlib.nullcontext(), scaler=None):
    """One optimizer step on a batch of n_pairs pairs, of which this process holds
    micro_batches (make_batch's); returns the step's numbers (NUMBERS, grad_norm) as floats.

    Each micro-batch adds the gradient of sum(its per-pair losses) / n_pairs, so that in the
    end the gradient is that of the mean loss over all n_pairs pairs, however they were split.
    (Dividing each micro-batch's mean by the number of micro-batches instead would weigh the
    pairs of a short micro-batch more.) Under torchrun the policy is wrapped in
    DistributedDataParallel, which averages the processes' gradients: each process's loss is
    multiplied by their number to turn that average into the sum, and the gradients are
    synced once, at the last micro-batch (no_sync before it).

    The policy runs once per micro-batch, on chosen and rejected together, its forward pass
    under `autocast`. With float16, `scaler` (torch.amp.GradScaler) scales the loss up so that
    small gradients do not round to 0, and back down before clipping. The gradient is clipped
    to max_grad_norm before the update; grad_norm is its norm before clipping."""
    # last step's gradients go before the forward pass, not after it: they are
    # a model's worth of memory that would otherwise sit beside the activations
    optimizer.zero_grad(set_to_none=True)
    _, processes = process_rank_and_count()
    sums = 0
    for i, batch in enumerate(micro_batches):
        syncs = i == len(micro_batches) - 1 or not isinstance(policy, DistributedDataParallel)
        with contextlib.nullcontext() if syncs else policy.no_sync():
            with autocast:
                logps = completion_logps(policy, batch["input_ids"], batch["loss_mask"], average_logps)  # (2B,)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                *chosen_and_rejected(logps), batch["reference_chosen_logps"], batch["reference_rejected_logps"],
                beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
            loss = batch["weight"] * losses.sum() * processes / n_pairs
            (loss if scaler is None else scaler.scale(loss)).backward()
        sums = sums + batch["weight"] * summed_numbers(losses, chosen_rewards, rejected_rewards)
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
    # clipping: Pascanu et al. 2013, "On the difficulty of training recurrent neural networks"
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # skipped where the scaled gradient overflowed
        scaler.update()
    return {**means(sum_over_processes(sums)), "grad_norm": grad_norm.item()}


# -----------------------------------------------------------------------------
# The training loop

def train_dpo(policy, reference, pairs, optimizer, epochs=3, batch_size=2, seed=0, beta=0.1, loss_type="dpo",
              label_smoothing=0.0, max_grad_norm=1.0, average_logps=False, reference_logps=None, grad_accum=1,
              lr_at=None, start_step=0, autocast=contextlib.nullcontext(), scaler=None, on_step=None):
    """DPO over encoded `pairs` (from encode_pairs): the steps of training_steps, each a batch
    of batch_size pairs in grad_accum micro-batches (per process).

    reference_logps: pair_logps(reference, pairs, average_logps=average_logps, autocast=autocast),
    if the caller has it already (then reference may be None). lr_at(step), if given, sets
    the learning rate of each step (learning_rate). start_step: the steps taken before, by a
    run that is being resumed. Returns the per-step numbers; on_step(numbers, pair indices)
    is called after each step. A loss that is not finite (or, without a scaler, a gradient
    norm) stops training with FloatingPointError; the policy then holds that step's weights."""
    # Dropout off in both models: with it, log pi would be noisy, the policy and the
    # reference would disagree at step 0 although they are the same network, and the
    # first loss would not be log 2. Eval mode turns dropout off without touching gradients.
    policy.eval()
    device = next(policy.parameters()).device
    if reference_logps is None:
        reference_logps = pair_logps(reference.eval(), pairs, average_logps=average_logps, autocast=autocast)
    history = []
    for step, (epoch, indices) in enumerate(training_steps(pairs, batch_size, epochs, seed)[start_step:],
                                            start=start_step + 1):
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
        micro_batches = [make_batch([pairs[i] for i in part], [x[part] for x in reference_logps], device, weight)
                         for part, weight in my_micro_batches(indices, grad_accum)]
        numbers = dpo_step(policy, optimizer, micro_batches, len(indices), beta=beta, loss_type=loss_type,
                           label_smoothing=label_smoothing, max_grad_norm=max_grad_norm,
                           average_logps=average_logps, autocast=autocast, scaler=scaler)
        numbers.update(step=step, epoch=epoch)
        if not (math.isfinite(numbers["loss"]) and (scaler is not None or math.isfinite(numbers["grad_norm"]))):
            raise FloatingPointError(f"training diverged at step {step}: loss {numbers['loss']}, gradient norm "
                                     f"{numbers['grad_norm']}; stopped there. Try a smaller learning rate")
        history.append(numbers)
        if on_step is not None:
            on_step(numbers, indices)
    return history


# -----------------------------------------------------------------------------
# Evaluation on pairs that are not trained on

def logps_and_kl(policy, reference, batch, average_logps=False):
    """One collated batch through both models: (policy chosen, policy rejected, reference
    chosen, reference rejected) log-probs, (4, B), the sum of KL(pi || pi_ref) over its N
    completion positions, and N. A function of its own so that its two (N, V) tensors are
    freed when it returns, before the next batch's forward pass: a loop would hold on to
    them until it rebinds the names."""
    device = next(policy.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["loss_mask"].to(device)
    policy_logprobs = vocab_logprobs(policy, ids, mask)  # (N, V): log pi(. | x, y_<t)
    reference_logprobs = vocab_logprobs(reference, ids, mask)  # (N, V): log pi_ref(. | x, y_<t)
    kl_sum = 0.0  # a few hundred positions at a time: the temporaries stay small beside the two (N, V)
    for p, q in zip(policy_logprobs.split(256), reference_logprobs.split(256)):
        kl_sum = kl_sum + (p.exp() * (p - q)).sum()
    logps = [logps_from_vocab_logprobs(x, ids, mask, average_logps).view(2, -1)
             for x in (policy_logprobs, reference_logprobs)]
    return torch.cat(logps), kl_sum, policy_logprobs.size(0)


@torch.no_grad()
def evaluate(policy, reference, pairs, batch_size=8, beta=0.1, loss_type="dpo", label_smoothing=0.0,
             average_logps=False, autocast=contextlib.nullcontext(), progress=None):
    """The training step's numbers on encoded `pairs`, without a gradient, and the exact KL.

    Returns a dict: NUMBERS, means over the pairs, and kl, the mean over the completion
    positions of both rows of every pair of KL(pi || pi_ref) = sum over the vocabulary v of
    pi(v) log(pi(v) / pi_ref(v)), the exact divergence at that position (not a one-sample
    estimate). Both models run on the same batches (batches_by_length), so where they are
    equal every margin is exactly 0. Under torchrun the processes share the batches as in
    pair_logps. progress as there."""
    device = next(policy.parameters()).device
    dtype = torch.promote_types(next(policy.parameters()).dtype, torch.float32)
    logps = torch.zeros(4, len(pairs), dtype=dtype, device=device)  # policy c, r; reference c, r
    kl = torch.zeros(2, dtype=torch.float64, device=device)  # [KL summed over positions, number of positions]
    batches, done = my_share(batches_by_length(pairs, batch_size)), 0
    total = sum(map(len, batches))
    for indices in batches:
        batch = collate([pairs[i] for i in indices])
        with autocast:
            logps[:, indices], kl_sum, n_positions = logps_and_kl(policy, reference, batch, average_logps)
        kl += torch.stack([kl_sum.double(), torch.tensor(n_positions, dtype=torch.float64, device=device)])
        done += len(indices)
        if progress is not None:
            progress(done, total)
    sum_over_processes(logps)
    sum_over_processes(kl)
    losses, chosen_rewards, rejected_rewards = dpo_loss(*logps, beta=beta, loss_type=loss_type,
                                                        label_smoothing=label_smoothing)
    numbers = means(summed_numbers(losses, chosen_rewards, rejected_rewards))
    numbers["kl"] = (kl[0] / kl[1]).item()
    return numbers


# -----------------------------------------------------------------------------
# `python dpo.py`: where DPO and IPO stop when a preference is deterministic

def bandit_experiment(betas=(0.1, 0.5, 2.0), checkpoints=(10, 100, 1_000), lr=0.1):
    """A bandit with two answers and one pair, answer 0 always chosen over answer 1, and a
    uniform reference. The policy is a softmax over two logits, trained with Adam on dpo_loss,
    for DPO and IPO at each beta. With only two answers,
    h = log(pi(y_c) / pi(y_r)) - 0, so IPO's minimum h = 1/(2 beta) (IPO paper, Eq. 17)
    is pi(y_r) = 1 / (1 + exp(1/(2 beta))); DPO's loss -log sigmoid(beta h) has no minimum,
    and pi(y_r) falls towards 0 for every beta (IPO paper, Section 4.2).
    Returns {(loss_type, beta): [pi(y_r) at each checkpoint]}."""
    reference_logps = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    results = {}
    for loss_type in ("dpo", "ipo"):
        for beta in betas:
            logits = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # the policy starts at the reference
            optimizer = torch.optim.Adam([logits], lr=lr)
            results[loss_type, beta] = []
            for step in range(1, max(checkpoints) + 1):
                logps = logits.log_softmax(dim=0)
                loss, _, _ = dpo_loss(logps[:1], logps[1:], reference_logps[:1], reference_logps[1:],
                                      beta=beta, loss_type=loss_type)
                optimizer.zero_grad()
                loss.sum().backward()
                optimizer.step()
                if step in checkpoints:
                    results[loss_type, beta].append(logits.detach().softmax(dim=0)[1].item())
    return results


if __name__ == "__main__":
    checkpoints = (10, 100, 1_000)
    results = bandit_experiment(checkpoints=checkpoints)
    print("One pair, answer 0 always chosen over answer 1, reference 50/50; Adam, lr 0.1.")
    print("pi(y_rejected) after each number of steps:\n")
    steps = "".join(f"{n:>10,}" for n in checkpoints)
    print(f"{'beta':>6} | {'DPO':^30} | {'IPO':^30} | IPO's minimum")
    print(f"{'':>6} | {steps} | {steps} | 1/(1+e^(1/(2 beta)))")
    for beta in sorted({beta for _, beta in results}):
        dpo_row = "".join(f"{p:>10.2e}" for p in results["dpo", beta])
        ipo_row = "".join(f"{p:>10.4f}" for p in results["ipo", beta])
        print(f"{beta:>6} | {dpo_row} | {ipo_row} | {1 / (1 + math.exp(1 / (2 * beta))):.4f}")
    print("\nDPO keeps pushing pi(y_rejected) towards 0 whatever beta is; IPO stops where its beta says.")
