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
average=True it is their mean instead (the "length-normalised" choice): DPO's implicit
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

In reading order: log-probabilities of completions, pairs to tensors, the losses, the frozen
reference, the training step and loop, evaluation; `python dpo.py` runs the bandit.
Read first: model.py. Read next: train_toy.py, which runs all of this.
"""

import copy
import math

import torch
from torch.nn import functional as F


# -----------------------------------------------------------------------------
# Log-probabilities of completions

def at_least_float32(x):
    """float16 / bfloat16 logits are summed in float32; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def sequence_logps(logits, labels, loss_mask, average=False):
    """log pi(y|x) = sum over completion tokens of log pi(y_t | x, y_<t), one number per row.

    logits (B, T, V) from the model; labels (B, T) are the input ids themselves;
    loss_mask (B, T) is 1 on completion tokens, 0 on prompt tokens and padding, which
    therefore contribute nothing. A causal LM's logits at position t score the token at
    t+1, hence the shift: the last position scores a token beyond the sequence, and the
    first token is scored by no position. average=True divides by the number of
    completion tokens. Computed in at least float32 whatever the model's dtype, because
    the sums run over many tokens."""
    logprobs = at_least_float32(logits[:, :-1, :]).log_softmax(dim=-1)  # (B, T-1, V): log pi(. | x, y_<t)
    token_logps = logprobs.gather(2, labels[:, 1:].unsqueeze(2)).squeeze(2)  # (B, T-1): log pi(y_t)
    mask = loss_mask[:, 1:]
    logps = (token_logps * mask).sum(dim=-1)  # (B,)
    return logps / mask.sum(dim=-1) if average else logps


# The same numbers, computed where they are cheap. Only the positions that score a
# completion token need logits: the output head (a third of GPT-2 small's compute) and the
# log-softmax then skip the prompt and the padding.

def next_token_logprobs(model, input_ids, loss_mask):
    """log pi(. | x, y_<t) over the vocabulary at the N positions that score a completion
    token, (N, V), in row-major order."""
    scored = loss_mask[:, 1:].bool()  # (B, T-1): which next tokens are completion tokens
    scoring_positions = F.pad(scored, (0, 1))  # (B, T): position t scores token t+1
    return at_least_float32(model(input_ids, logits_at=scoring_positions)).log_softmax(dim=-1)


def logps_of_scored(vocab_logprobs, input_ids, loss_mask, average=False):
    """sequence_logps from next_token_logprobs' (N, V) rows: pick each completion token's
    log-prob and sum them per row, (B,)."""
    scored = loss_mask[:, 1:].bool()
    targets = input_ids[:, 1:][scored]  # (N,), the same row-major order
    token_logps = vocab_logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)  # (N,)
    # back to (B, T-1), then sum each row (not index_add_, whose CUDA sums are not deterministic)
    per_position = torch.zeros(scored.shape, dtype=token_logps.dtype, device=token_logps.device)
    logps = per_position.masked_scatter(scored, token_logps).sum(dim=-1)  # (B,)
    return logps / scored.sum(dim=-1) if average else logps


def completion_logps(model, input_ids, loss_mask, average=False):
    """sequence_logps(model(input_ids), input_ids, loss_mask, average), computed cheaply."""
    return logps_of_scored(next_token_logprobs(model, input_ids, loss_mask), input_ids, loss_mask, average)


# -----------------------------------------------------------------------------
# Pairs to tensors

def encode_completion(enc, prompt, completion):
    """Token ids of prompt and completion, tokenised *separately*.

    Tokenising prompt + completion as one string could merge the last prompt
    characters with the first completion characters into one BPE token, and then
    the completion would no longer be exactly the tokens being scored. Tokenised
    apart, the completion tokens are exactly enc.encode(completion) + <|endoftext|>,
    which marks where the completion ends (and is scored with it)."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"the prompt must be a non-empty string, got {prompt!r}: a pair needs a prompt to condition on")
    if not isinstance(completion, str) or not completion:
        raise ValueError(f"the completion must be a non-empty string, got {completion!r} (prompt {prompt!r}): "
                         "there would be no token to score")
    try:
        prompt_ids, completion_ids = enc.encode(prompt), enc.encode(completion)
    except ValueError as e:  # tiktoken refuses text such as "<|endoftext|>" inside the data
        raise ValueError(f"cannot tokenise prompt {prompt!r} / completion {completion!r}: {e}") from None
    return prompt_ids, completion_ids + [enc.eot_token]


def encode_pairs(enc, pairs):
    """Tokenise preference pairs: a list of dicts with string fields "prompt", "chosen",
    "rejected" becomes a list of (prompt_ids, chosen_ids, rejected_ids)."""
    if len(pairs) == 0:
        raise ValueError("no preference pairs: need at least one {prompt, chosen, rejected}")
    encoded = []
    for pair in pairs:
        prompt_ids, chosen_ids = encode_completion(enc, pair["prompt"], pair["chosen"])
        _, rejected_ids = encode_completion(enc, pair["prompt"], pair["rejected"])
        encoded.append((prompt_ids, chosen_ids, rejected_ids))
    return encoded


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
        policy_chosen_logps: (N,) log pi(y_chosen | x), summed (or averaged) over the
            completion's tokens.
        policy_rejected_logps: (N,) log pi(y_rejected | x).
        reference_chosen_logps: (N,) log pi_ref(y_chosen | x).
        reference_rejected_logps: (N,) log pi_ref(y_rejected | x).
        beta: strength of the KL penalty towards the reference (> 0). Small beta lets the
            policy move far; IPO's target is h = 1/(2 beta), in the units of the log-probs
            (nats per completion when summed, per token when averaged).
        loss_type: "dpo" (DPO paper, Eq. 7) or "ipo" (IPO paper, Eq. 17).
        label_smoothing: eps in [0, 0.5), the assumed probability that a preference label
            is flipped (conservative DPO); "dpo" only.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (N,), not averaged. The rewards
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


def batches_by_length(pairs, batch_size, indices=None):
    """The indices of `pairs` (all of them, or those given) sorted by length and cut into
    batches of batch_size, so that each batch, padded to its own longest row, holds little
    padding. The passes without a gradient, where the order does not matter, take all pairs
    this way (in_order then undoes the sorting); training sorts within shuffled chunks."""
    indices = range(len(pairs)) if indices is None else indices
    by_length = sorted(indices, key=lambda i: longest_row(pairs[i]))
    return [by_length[start:start + batch_size] for start in range(0, len(by_length), batch_size)]


def in_order(rows, batches):
    """Per-row values of collate's 2B rows, (2B,) for each batch of batches_by_length, as
    (chosen (N,), rejected (N,)) in the pairs' order."""
    computed = torch.tensor([i for index in batches for i in index])  # pair index of each value
    chosen, rejected = (torch.cat(half) for half in zip(*(chosen_and_rejected(x) for x in rows)))
    undo = computed.argsort()
    return chosen[undo], rejected[undo]


@torch.no_grad()
def pair_logps(model, pairs, batch_size=8, average=False, progress=None):
    """log pi(y_chosen|x) and log pi(y_rejected|x) of every encoded pair, (N,) each, on the
    CPU, batch_size pairs at a time (batches_by_length). No graph is kept, whatever the
    model's requires_grad. progress(pairs done, total), if given, is called after each batch.

    Run on the reference before training, this is everything DPO needs from it: the
    reference is frozen and the data do not change, so log pi_ref(y|x) is the same number
    at every step. Computed once, it takes the reference's forward pass out of every step,
    which is then one forward and one backward of the policy."""
    device = next(model.parameters()).device
    batches = batches_by_length(pairs, batch_size)
    rows, done = [], 0
    for index in batches:
        batch = collate([pairs[i] for i in index])
        rows.append(completion_logps(model, batch["input_ids"].to(device), batch["loss_mask"].to(device), average).cpu())
        done += len(index)
        if progress is not None:
            progress(done, len(pairs))
    return in_order(rows, batches)


# -----------------------------------------------------------------------------
# The training step and loop

def make_optimizer(policy, lr, weight_decay=0.01):
    """AdamW (Loshchilov & Hutter 2019) over the policy's parameters, never the reference's.

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


STEP_NUMBERS = ("loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward")


def step_numbers(losses, chosen_rewards, rejected_rewards):
    """dpo_loss's per-pair outputs as the means STEP_NUMBERS names, one (5,) tensor: the loss,
    the reward accuracy (the fraction of margins, chosen reward - rejected reward, that are
    > 0), the margin and the two rewards. The same numbers for a training step and for
    evaluation."""
    margins = chosen_rewards - rejected_rewards
    return torch.stack([losses.detach().mean(), (margins > 0).float().mean(), margins.mean(),
                        chosen_rewards.mean(), rejected_rewards.mean()])


def dpo_step(policy, optimizer, batch, beta=0.1, loss_type="dpo", label_smoothing=0.0, max_grad_norm=1.0,
             average_logps=False):
    """One DPO update on a batch from make_batch; returns this step's numbers as floats.

    The policy runs once, on chosen and rejected together. The gradient is clipped to
    max_grad_norm before the update; grad_norm is its norm before clipping."""
    # last step's gradients go before the forward pass, not after it: they are
    # a model's worth of memory that would otherwise sit beside the activations
    optimizer.zero_grad(set_to_none=True)
    logps = completion_logps(policy, batch["input_ids"], batch["loss_mask"], average_logps)  # (2B,)
    chosen_logps, rejected_logps = chosen_and_rejected(logps)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen_logps, rejected_logps, batch["reference_chosen_logps"], batch["reference_rejected_logps"],
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    loss = losses.mean()
    loss.backward()
    # clipping: Pascanu et al. 2013, "On the difficulty of training recurrent neural networks"
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    optimizer.step()

    numbers = torch.cat([step_numbers(losses, chosen_rewards, rejected_rewards), grad_norm.to(loss.device)[None]])
    return dict(zip(STEP_NUMBERS + ("grad_norm",), numbers.tolist()))  # one device-to-host copy per step


def epoch_batches(pairs, batch_size, generator, chunk_batches=50):
    """One epoch's batches of pair indices: shuffled, with pairs of similar length together.

    Each batch is padded to its own longest row, so a batch mixing short and long pairs is
    mostly padding. The pairs are shuffled, cut into chunks of chunk_batches batches, sorted
    by length within each chunk and cut into batches, and then the batches are shuffled:
    the grouping of Hugging Face's LengthGroupedSampler. A new order every epoch, as the
    generator moves on. With fewer than chunk_batches batches (every toy run) all pairs are
    one chunk, so the batches are cut from the same sorted order every epoch and mostly
    only their order changes."""
    order = torch.randperm(len(pairs), generator=generator).tolist()
    chunk = batch_size * chunk_batches
    batches = []
    for start in range(0, len(order), chunk):
        batches += batches_by_length(pairs, batch_size, order[start:start + chunk])
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def train_dpo(policy, reference, pairs, optimizer, epochs=3, batch_size=2, seed=0, beta=0.1, loss_type="dpo",
              label_smoothing=0.0, max_grad_norm=1.0, average_logps=False, reference_logps=None, on_step=None):
    """DPO over encoded `pairs` (from encode_pairs) for some epochs of shuffled batches.

    reference_logps: pair_logps(reference, pairs, average=average_logps), if the caller has
    it already. Returns the list of per-step metric dicts; on_step(metrics) is called after
    each step. A loss or gradient norm that is not finite stops training with a RuntimeError
    (the policy then holds the weights that step left)."""
    # Dropout off in both models: with it, log pi would be noisy, the policy and the
    # reference would disagree at step 0 although they are the same network, and the
    # first loss would not be log 2. Eval mode turns dropout off without touching gradients.
    policy.eval()
    reference.eval()
    device = next(policy.parameters()).device
    if reference_logps is None:
        reference_logps = pair_logps(reference, pairs, average=average_logps)
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same order on every device
    history = []
    for epoch in range(epochs):
        for index in epoch_batches(pairs, batch_size, generator):
            batch_pairs = [pairs[i] for i in index]
            batch = make_batch(batch_pairs, [logps[index] for logps in reference_logps], device)
            metrics = dpo_step(policy, optimizer, batch, beta=beta, loss_type=loss_type,
                               label_smoothing=label_smoothing, max_grad_norm=max_grad_norm,
                               average_logps=average_logps)
            metrics.update(step=len(history) + 1, epoch=epoch + 1,
                           tokens=sum(2 * len(p) + len(c) + len(r) for p, c, r in batch_pairs),
                           positions=batch["input_ids"].numel())  # tokens plus padding
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                raise RuntimeError(
                    f"training diverged at step {metrics['step']}: loss {metrics['loss']}, gradient norm "
                    f"{metrics['grad_norm']}; stopped there. Try a smaller learning rate")
            history.append(metrics)
            if on_step is not None:
                on_step(metrics)
    return history


# -----------------------------------------------------------------------------
# Evaluation on pairs that are not trained on

def logps_and_kl(policy, reference, batch, average_logps=False):
    """One collated batch through both models: log pi(y|x) and log pi_ref(y|x) of its 2B rows,
    (2B,) each on the CPU, the sum of KL(pi || pi_ref) over its N completion positions, and N.
    A function of its own so that its two (N, V) tensors are freed when it returns, before
    the next batch's forward pass: a loop would hold on to them until it rebinds the names."""
    device = next(policy.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["loss_mask"].to(device)
    policy_logprobs = next_token_logprobs(policy, ids, mask)  # (N, V): log pi(. | x, y_<t)
    reference_logprobs = (policy_logprobs if reference is policy  # (N, V): log pi_ref(. | x, y_<t)
                          else next_token_logprobs(reference, ids, mask))
    kl_sum = 0.0  # a few hundred positions at a time: the temporaries stay small beside the two (N, V)
    for p, q in zip(policy_logprobs.split(256), reference_logprobs.split(256)):
        kl_sum += (p.exp() * (p - q)).sum().item()
    return (logps_of_scored(policy_logprobs, ids, mask, average_logps).cpu(),
            logps_of_scored(reference_logprobs, ids, mask, average_logps).cpu(), kl_sum, policy_logprobs.size(0))


@torch.no_grad()
def evaluate(policy, reference, pairs, batch_size=8, beta=0.1, loss_type="dpo", label_smoothing=0.0,
             average_logps=False, progress=None):
    """The training step's numbers on encoded `pairs`, without a gradient, and the exact KL.

    Returns (numbers, (log pi(y_c|x), log pi(y_r|x))): a dict of means over the pairs, and
    the policy's log-probs of every pair in the pairs' order, as pair_logps gives them.
    kl is the mean over the completion positions of both rows of every pair of
    KL(pi || pi_ref) = sum over the vocabulary v of pi(v) log(pi(v) / pi_ref(v)), the exact
    divergence at that position (not a one-sample estimate). Both models run on the same
    batches (batches_by_length), so where they are equal every margin is exactly 0; and
    where the policy *is* the reference (at step 0, pass the reference twice) one forward
    pass serves both. progress as in pair_logps."""
    batches = batches_by_length(pairs, batch_size)
    policy_rows, reference_rows, kl_sum, n_positions, done = [], [], 0.0, 0, 0
    for index in batches:
        policy_logps, reference_logps, batch_kl, n = logps_and_kl(policy, reference, collate([pairs[i] for i in index]),
                                                                 average_logps)
        policy_rows.append(policy_logps)
        reference_rows.append(reference_logps)
        kl_sum, n_positions, done = kl_sum + batch_kl, n_positions + n, done + len(index)
        if progress is not None:
            progress(done, len(pairs))
    policy_logps = in_order(policy_rows, batches)  # (chosen, rejected), in the pairs' order
    losses_and_rewards = dpo_loss(*policy_logps, *in_order(reference_rows, batches), beta=beta,
                                  loss_type=loss_type, label_smoothing=label_smoothing)
    numbers = dict(zip(STEP_NUMBERS, step_numbers(*losses_and_rewards).tolist()))
    numbers["kl"] = kl_sum / n_positions
    return numbers, policy_logps


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
