"""
Direct Preference Optimization (DPO) and Identity Preference Optimization (IPO), on one device.

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

In reading order: log-probabilities of completions, pairs to tensors, the losses, batches of
similar length, the frozen reference, the training step and loop, evaluation on held-out
pairs; `python dpo.py` runs the bandit.
Read first: model.py. Read next: train_toy.py, the experiment that runs all of this; train.py
is the trainer for your own pairs (bfloat16, micro-batches, several processes, resume).
"""

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F


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


def sum_per_row(values, scored):
    """Numbers at the N scored positions, (N,) in row-major order, summed per row, (B,): put
    back in place in (B, T-1), then each row summed (not index_add_, whose CUDA sums are not
    deterministic)."""
    per_position = torch.zeros(scored.shape, dtype=values.dtype, device=values.device)
    return per_position.masked_scatter(scored, values).sum(dim=-1)


def logps_from_vocab_logprobs(vocab_logprobs, input_ids, loss_mask, average_logps=False):
    """sequence_logps from vocab_logprobs' (N, V) rows: each completion token's log-prob,
    summed per row, (B,)."""
    scored = loss_mask[:, 1:].bool()
    targets = input_ids[:, 1:][scored]  # (N,), the same row-major order
    token_logps = vocab_logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)  # (N,)
    logps = sum_per_row(token_logps, scored)  # (B,)
    return logps / scored.sum(dim=-1) if average_logps else logps


def completion_logps(model, input_ids, loss_mask, average_logps=False):
    """sequence_logps(model(input_ids), input_ids, loss_mask, average_logps), computed cheaply."""
    return logps_from_vocab_logprobs(vocab_logprobs(model, input_ids, loss_mask), input_ids, loss_mask,
                                     average_logps)


# -----------------------------------------------------------------------------
# Pairs to tensors

def encode_pair(enc, pair):
    """{"prompt", "chosen", "rejected"} -> (prompt_ids, chosen_ids, rejected_ids), each text
    tokenised *separately*.

    Tokenising prompt + completion as one string could merge the last prompt characters
    with the first completion characters into one BPE token, and then the completion would
    no longer be exactly the tokens being scored. Tokenised apart, a completion's tokens are
    exactly enc.encode(completion) + <|endoftext|>, which marks where the completion ends
    (and is scored with it)."""
    if pair["chosen"] == pair["rejected"]:  # every margin and every gradient would be 0
        raise ValueError("chosen and rejected are the same text, so there is no preference to learn")
    try:
        prompt_ids, chosen_ids, rejected_ids = (enc.encode(pair[k]) for k in ("prompt", "chosen", "rejected"))
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


def batch_metrics(losses, chosen_rewards, rejected_rewards):
    """What a step reports: dpo_loss's per-pair outputs as named means over the batch's pairs,
    0-d tensors (margin: chosen reward - rejected reward)."""
    return {"loss": losses.detach().mean(), "reward_accuracy": reward_accuracy(chosen_rewards, rejected_rewards).mean(),
            "margin": (chosen_rewards - rejected_rewards).mean(), "chosen_reward": chosen_rewards.mean(),
            "rejected_reward": rejected_rewards.mean()}


@dataclass(frozen=True)
class LossConfig:
    """Which loss, with which options: passed together wherever pairs are scored."""
    loss_type: str = "dpo"  # "dpo" (DPO paper, Eq. 7) or "ipo" (IPO paper, Eq. 17)
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO's eps
    average_logps: bool = False  # log pi(y|x) as the mean over the completion's tokens, not the sum


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
    """Every step of a run as (epoch, pair indices), from the seed alone: a run that is
    stopped and resumed takes exactly these steps again."""
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same order on every device
    return [(epoch, indices) for epoch in range(1, epochs + 1)
            for indices in epoch_batches(pairs, batch_size, generator)]


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
def over_batches(model, pairs, batches, compute, n_rows, progress=None):
    """The skeleton of every pass without a gradient: for each batch of pair indices in
    `batches`, compute(collated batch) gives (n_rows, B) numbers, written into those pairs'
    columns of an (n_rows, len(pairs)) tensor of zeros (in the model's precision, at least
    float32, on its device), which is returned. progress(pairs done, pairs to do), if given,
    is called after each batch."""
    p = next(model.parameters())
    columns = torch.zeros(n_rows, len(pairs), dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
    done, total = 0, sum(map(len, batches))
    for indices in batches:
        columns[:, indices] = compute(collate([pairs[i] for i in indices]))
        done += len(indices)
        if progress is not None:
            progress(done, total)
    return columns


def pair_logps(model, pairs, batch_size=8, average_logps=False, autocast=contextlib.nullcontext(), batches=None,
               progress=None):
    """log pi(y_chosen|x) and log pi(y_rejected|x) of every encoded pair, (len(pairs),) each, on
    the CPU, batch_size pairs at a time (batches_by_length; or only the pairs of `batches`,
    the others 0), under `autocast` (the training step's). No graph is kept, whatever the
    model's requires_grad.

    Run on the reference before training, this is everything DPO needs from it: the
    reference is frozen and the data do not change, so log pi_ref(y|x) is the same number
    at every step. Computed once, it takes the reference's forward pass out of every step,
    which is then one forward and one backward of the policy."""
    device = next(model.parameters()).device

    def compute(batch):
        with autocast:
            logps = completion_logps(model, batch["input_ids"].to(device), batch["loss_mask"].to(device),
                                     average_logps)
        return logps.view(2, -1)  # collate's chosen rows, then its rejected rows

    batches = batches_by_length(pairs, batch_size) if batches is None else batches
    chosen, rejected = over_batches(model, pairs, batches, compute, 2, progress).cpu()
    return chosen, rejected


# -----------------------------------------------------------------------------
# The training step

def make_optimizer(policy, lr, weight_decay=0.01):
    """AdamW (Loshchilov & Hutter 2019) over the policy's parameters, never the reference's,
    with torch's default weight decay, 0.01, decoupled from the gradient, on every parameter.

    The fused kernel updates each parameter in one pass over memory instead of a dozen
    element-wise passes. Torch builds without it get the ordinary implementation."""
    try:
        return torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)


def make_batch(pairs, reference_logps, device):
    """What dpo_step needs for some encoded pairs: collate's rows on `device`, and the
    reference's log-probs of the same pairs, reference_logps = (chosen (B,), rejected (B,))."""
    batch = {key: value.to(device) for key, value in collate(pairs).items()}
    batch["reference_chosen_logps"], batch["reference_rejected_logps"] = (x.to(device) for x in reference_logps)
    return batch


def batch_losses(policy, batch, loss_config=LossConfig(), autocast=contextlib.nullcontext()):
    """One forward pass of the policy over the batch's 2B rows, chosen and rejected together,
    and dpo_loss against the cached reference log-probs: (losses, chosen_rewards,
    rejected_rewards), (B,) each."""
    with autocast:
        logps = completion_logps(policy, batch["input_ids"], batch["loss_mask"], loss_config.average_logps)  # (2B,)
    policy_chosen_logps, policy_rejected_logps = chosen_and_rejected(logps)
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, batch["reference_chosen_logps"],
                    batch["reference_rejected_logps"], beta=loss_config.beta, loss_type=loss_config.loss_type,
                    label_smoothing=loss_config.label_smoothing)


def dpo_step(policy, optimizer, batch, loss_config=LossConfig(), max_grad_norm=1.0,
             autocast=contextlib.nullcontext()):
    """One optimizer step on one batch (make_batch's): the gradient of the mean loss over its
    pairs, clipped to max_grad_norm, then the update. Returns batch_metrics as floats, and
    grad_norm, the gradient's norm before clipping."""
    # last step's gradients go before the forward pass, not after it: they are
    # a model's worth of memory that would otherwise sit beside the activations
    optimizer.zero_grad(set_to_none=True)
    losses, chosen_rewards, rejected_rewards = batch_losses(policy, batch, loss_config, autocast)
    losses.mean().backward()
    # clipping: Pascanu et al. 2013, "On the difficulty of training recurrent neural networks"
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    if torch.isfinite(grad_norm):  # an inf or nan gradient would make every weight nan: no step (check_finite)
        optimizer.step()
    metrics = batch_metrics(losses, chosen_rewards, rejected_rewards)
    return {**{name: value.item() for name, value in metrics.items()}, "grad_norm": grad_norm.item()}


def check_finite(metrics, names=("loss", "grad_norm")):
    """A loss or gradient norm that is not finite stops training: every later step would be too."""
    if not all(math.isfinite(metrics[name]) for name in names):
        raise FloatingPointError(f"training diverged at step {metrics['step']}: loss {metrics['loss']}, gradient "
                                 f"norm {metrics['grad_norm']}; stopped there. Try a smaller learning rate")


# -----------------------------------------------------------------------------
# The training loop

def train_dpo(policy, reference, pairs, optimizer, loss_config=LossConfig(), epochs=3, batch_size=2, seed=0,
              max_grad_norm=1.0, autocast=contextlib.nullcontext(), reference_logps=None, on_step=None):
    """DPO over encoded `pairs` (from encode_pairs), in the steps of training_steps.

    reference_logps: pair_logps(reference, pairs, ...) if the caller has it already (then
    reference may be None). Returns each step's metrics (dpo_step's, with "step" and
    "epoch"); on_step(metrics) is called after each step. A loss or gradient norm that is
    not finite stops training with FloatingPointError; the policy keeps its weights from
    before that step."""
    # Dropout off in both models: with it, log pi would be noisy, the policy and the
    # reference would disagree at step 0 although they are the same network, and the
    # first loss would not be log 2. Eval mode turns dropout off without touching gradients.
    policy.eval()
    device = next(policy.parameters()).device
    if reference_logps is None:
        reference_logps = pair_logps(reference.eval(), pairs, batch_size, loss_config.average_logps, autocast)
    history = []
    for step, (epoch, indices) in enumerate(training_steps(pairs, batch_size, epochs, seed), start=1):
        batch = make_batch([pairs[i] for i in indices], [x[indices] for x in reference_logps], device)
        metrics = {"step": step, "epoch": epoch,
                   **dpo_step(policy, optimizer, batch, loss_config, max_grad_norm, autocast)}
        check_finite(metrics)
        history.append(metrics)
        if on_step is not None:
            on_step(metrics)
    return history


# -----------------------------------------------------------------------------
# Evaluation on pairs that are not trained on

def logps_and_kl(policy, reference, batch, average_logps=False):
    """One collated batch through both models, (6, B): the policy's chosen and rejected
    log-probs, the reference's, and per pair the sum of KL(pi || pi_ref) over the completion
    positions of both its rows, and their number. A function of its own so that its two
    (N, V) tensors are freed when it returns, before the next batch's forward pass: a loop
    would hold on to them until it rebinds the names."""
    device = next(policy.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["loss_mask"].to(device)
    policy_logprobs = vocab_logprobs(policy, ids, mask)  # (N, V): log pi(. | x, y_<t)
    reference_logprobs = vocab_logprobs(reference, ids, mask)  # (N, V): log pi_ref(. | x, y_<t)
    # a few hundred positions at a time: the temporaries stay small beside the two (N, V)
    kl = torch.cat([(p.exp() * (p - q)).sum(dim=-1) for p, q in zip(policy_logprobs.split(256),
                                                                     reference_logprobs.split(256))])  # (N,)
    scored = mask[:, 1:].bool()
    policy_logps, reference_logps = (logps_from_vocab_logprobs(x, ids, mask, average_logps)
                                     for x in (policy_logprobs, reference_logprobs))  # (2B,) each
    kl_per_row, positions_per_row = sum_per_row(kl, scored), scored.sum(dim=-1).to(kl.dtype)
    return torch.stack([*chosen_and_rejected(policy_logps), *chosen_and_rejected(reference_logps),
                        sum(chosen_and_rejected(kl_per_row)), sum(chosen_and_rejected(positions_per_row))])


def evaluation_numbers(policy, reference, pairs, batches, average_logps=False, autocast=contextlib.nullcontext(),
                       progress=None):
    """logps_and_kl of every pair in `batches` (lists of pair indices), (6, len(pairs)); 0 for
    pairs in no batch. Both models run on the same batches, so where they are equal every
    margin is exactly 0."""
    def compute(batch):
        with autocast:
            return logps_and_kl(policy, reference, batch, average_logps)

    return over_batches(policy, pairs, batches, compute, 6, progress)


def evaluation_metrics(numbers, loss_config=LossConfig()):
    """The training step's numbers (batch_metrics, as floats) over all pairs of
    evaluation_numbers' (6, len(pairs)), and kl, the mean over the completion positions of both
    rows of every pair of KL(pi || pi_ref) = sum over the vocabulary v of
    pi(v) log(pi(v) / pi_ref(v)), the exact divergence at that position (not a one-sample estimate)."""
    losses, chosen_rewards, rejected_rewards = dpo_loss(*numbers[:4], beta=loss_config.beta,
                                                        loss_type=loss_config.loss_type,
                                                        label_smoothing=loss_config.label_smoothing)
    kl_sum, positions = numbers[4:].sum(dim=1)
    metrics = batch_metrics(losses, chosen_rewards, rejected_rewards)
    return {**{name: value.item() for name, value in metrics.items()}, "kl": (kl_sum / positions).item()}


def evaluate(policy, reference, pairs, loss_config=LossConfig(), batch_size=8, autocast=contextlib.nullcontext()):
    """The training step's numbers on encoded `pairs`, without a gradient, and the exact KL
    (evaluation_metrics), batch_size pairs at a time (batches_by_length)."""
    numbers = evaluation_numbers(policy, reference, pairs, batches_by_length(pairs, batch_size),
                                 loss_config.average_logps, autocast)
    return evaluation_metrics(numbers, loss_config)


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
