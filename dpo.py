"""
Direct Preference Optimization (DPO) and Identity Preference Optimization (IPO), in one file.

Given pairs (x, y_chosen, y_rejected), DPO trains a policy pi_theta against a frozen
reference pi_ref with no reward model and no sampling (Rafailov et al. 2023,
"Direct Preference Optimization: Your Language Model is Secretly a Reward Model"):

    h      = [log pi(y_c|x) - log pi_ref(y_c|x)] - [log pi(y_r|x) - log pi_ref(y_r|x)]
           = chosen logratio - rejected logratio
    L_DPO  = -log sigmoid(beta * h)                                   (DPO paper, Eq. 7)
    reward = beta * log(pi(y|x) / pi_ref(y|x))            (the implicit reward, Eq. 5)
    margin = chosen reward - rejected reward = beta * h
    grad L = -beta * sigmoid(-beta * h) * [grad log pi(y_c|x) - grad log pi(y_r|x)]
                                                  (DPO paper, Section 4, "What does the DPO update do?")

Its optimum, for Bradley-Terry preferences with rewards r, is pi_ref(y|x) exp(r(x,y)/beta) / Z(x)
(DPO paper, Eq. 4). Two variants:
- conservative DPO (label smoothing eps, for preferences flipped with probability eps;
  Mitchell 2023, "A note on DPO with noisy preferences"):
      L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
- IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", Eq. 17): L = (h - 1/(2 beta))^2, which stops at h = 1/(2 beta) even when the
  preferences are deterministic, where DPO pushes pi(y_r) all the way to 0.

In reading order: log-probabilities of completions, pairs to tensors, the losses, the frozen
reference, the training step and loop. Read next: train_toy.py, which runs all of this.
"""

import copy
import math

import torch


# -----------------------------------------------------------------------------
# Log-probabilities of completions

def at_least_float32(x):
    """float16 / bfloat16 logits are summed in float32; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def sequence_logps(logits, labels, loss_mask):
    """log pi(y|x) = sum over completion tokens of log pi(y_t | x, y_<t), one number per row.

    logits (B, T, V) from the model; labels (B, T) are the input ids themselves;
    loss_mask (B, T) is 1 on completion tokens, 0 on prompt tokens and padding, which
    therefore contribute nothing. A causal LM's logits at position t score the token at
    t+1, hence the shift: the last position scores a token beyond the sequence, and the
    first token is scored by no position. Computed in at least float32 whatever the
    model's dtype, because the sums run over many tokens."""
    logprobs = at_least_float32(logits[:, :-1, :]).log_softmax(dim=-1)  # (B, T-1, V): log pi(. | x, y_<t)
    token_logps = logprobs.gather(2, labels[:, 1:].unsqueeze(2)).squeeze(2)  # (B, T-1): log pi(y_t)
    return (token_logps * loss_mask[:, 1:]).sum(dim=-1)  # (B,)


def score_completions(model, input_ids, loss_mask):
    """sequence_logps(model(input_ids), input_ids, loss_mask), computed where it is cheap.

    The model is asked for logits only at the N positions that score a completion token,
    so the output head and log-softmax skip the prompt and the padding. Returns
    (logps (B,), vocab_logprobs (N, V)): the latter is the log-distribution over the
    vocabulary at each scored position, which the KL report needs."""
    scored = loss_mask[:, 1:].bool()  # (B, T-1): which next tokens are completion tokens
    scoring_positions = torch.nn.functional.pad(scored, (0, 1))  # (B, T): position t scores token t+1
    vocab_logprobs = at_least_float32(model(input_ids, logits_at=scoring_positions)).log_softmax(dim=-1)  # (N, V)
    targets = input_ids[:, 1:][scored]  # (N,), the same row-major order
    token_logps = vocab_logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)  # (N,)
    # back to (B, T-1) and sum each row (not index_add, whose CUDA sums are not deterministic)
    logps = torch.zeros(scored.shape, dtype=token_logps.dtype, device=token_logps.device)
    return logps.masked_scatter(scored, token_logps).sum(dim=-1), vocab_logprobs


def mean_token_kl(policy_logprobs, reference_logprobs, rows_at_once=64):
    """Mean over completion positions of the exact KL(pi || pi_ref) = sum_v pi(v) log(pi(v)/pi_ref(v)).
    Both (N, V): log-probabilities over the vocabulary at the N completion positions
    (vocab_logprobs of score_completions).

    Taken rows_at_once positions at a time, so that its temporaries are (rows_at_once, V)
    floats (13 MB for GPT-2 at the default 64), not (N, V) ones, which for long
    completions would be the largest tensors of a step."""
    per_position = [(p.exp() * (p - r)).sum(dim=-1)  # (rows,)
                    for p, r in zip(policy_logprobs.split(rows_at_once), reference_logprobs.split(rows_at_once))]
    return torch.cat(per_position).mean()


# -----------------------------------------------------------------------------
# Pairs to tensors

def encode_completion(enc, prompt, completion, add_eos=True):
    """Token ids of prompt and completion, tokenised *separately*.

    Tokenising prompt + completion as one string could merge the last prompt
    characters with the first completion characters into one BPE token, and then
    the completion would no longer be exactly the tokens being scored. Tokenised
    apart, the completion tokens are exactly enc.encode(completion) (+ <|endoftext|>,
    which marks where the completion ends)."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"the prompt must be a non-empty string, got {prompt!r}: a pair needs a prompt to condition on")
    if not isinstance(completion, str) or not completion:
        raise ValueError(f"the completion must be a non-empty string, got {completion!r} (prompt {prompt!r}): "
                         "there would be no token to score")
    try:
        prompt_ids, completion_ids = enc.encode(prompt), enc.encode(completion)
    except ValueError as e:  # tiktoken refuses text such as "<|endoftext|>" inside the data
        raise ValueError(f"cannot tokenise prompt {prompt!r} / completion {completion!r}: {e}") from None
    return prompt_ids, completion_ids + ([enc.eot_token] if add_eos else [])


def encode_pairs(enc, pairs, block_size, add_eos=True):
    """Tokenise preference pairs into one right-padded batch.

    pairs: a list of dicts with string fields "prompt", "chosen", "rejected".
    Returns {"input_ids", "loss_mask"}, both (2N, T): rows 0..N-1 are the chosen
    completions and rows N..2N-1 the rejected ones, in the same order, so that the
    policy scores both halves of every pair in one forward pass.
    A pair longer than block_size is an error (rather than silently truncated)."""
    if len(pairs) == 0:
        raise ValueError("no preference pairs: need at least one {prompt, chosen, rejected}")
    rows = []
    for side in ("chosen", "rejected"):
        for i, pair in enumerate(pairs):
            prompt_ids, completion_ids = encode_completion(enc, pair["prompt"], pair[side], add_eos)
            length = len(prompt_ids) + len(completion_ids)
            if length > block_size:
                raise ValueError(
                    f"pair {i + 1} of {len(pairs)} (prompt {pair['prompt'][:40]!r}): prompt ({len(prompt_ids)} "
                    f"tokens) + {side} ({len(completion_ids)} tokens) is {length} tokens, longer than the "
                    f"model's context of {block_size}; shorten it")
            rows.append((prompt_ids, completion_ids))
    T = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), T), enc.eot_token, dtype=torch.long)  # padding: masked out below
    loss_mask = torch.zeros((len(rows), T), dtype=torch.float32)
    for row, (prompt_ids, completion_ids) in enumerate(rows):
        ids = prompt_ids + completion_ids
        input_ids[row, :len(ids)] = torch.tensor(ids)
        loss_mask[row, len(prompt_ids):len(ids)] = 1.0
    return {"input_ids": input_ids, "loss_mask": loss_mask}


# -----------------------------------------------------------------------------
# The losses

def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta=0.1, loss_type="dpo", label_smoothing=0.0):
    """The per-pair DPO / conservative DPO / IPO loss, from four tensors of log-probs.

    Args:
        policy_chosen_logps: (N,) log pi(y_chosen | x), summed over the completion's tokens.
        policy_rejected_logps: (N,) log pi(y_rejected | x).
        reference_chosen_logps: (N,) log pi_ref(y_chosen | x).
        reference_rejected_logps: (N,) log pi_ref(y_rejected | x).
        beta: strength of the KL penalty towards the reference (> 0). Small beta lets the
            policy move far; IPO's target is h = 1/(2 beta).
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
        losses = (-(1 - label_smoothing) * torch.nn.functional.logsigmoid(beta * h)
                  - label_smoothing * torch.nn.functional.logsigmoid(-beta * h))
    elif loss_type == "ipo":
        if label_smoothing != 0.0:
            raise ValueError("label_smoothing is for loss_type='dpo'; IPO is already robust to noisy labels")
        losses = (h - 1 / (2 * beta)) ** 2  # IPO paper, Eq. 17, on summed log-probs
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


@torch.no_grad()
def precompute_reference(reference, data, batch_size=8, max_kl_bytes=2**30):
    """Everything DPO needs from the reference, computed once before training.

    The reference is frozen and the data do not change, so log pi_ref(y|x) is the same
    number at every step: computing it once takes the reference's forward pass out of
    every step, which is then one forward and one backward of the policy (chosen and
    rejected together) instead of two forwards and a backward. For the KL report the
    reference's whole next-token distribution at each completion position is kept too,
    (tokens, vocab) floats per completion: cheap for small data, and skipped (the KL
    is then reported as None) when it would take more than max_kl_bytes.

    batch_size: rows per forward pass.
    Returns {"logps": (2N,), "vocab_logprobs": list of 2N tensors (n_i, V) or None}."""
    n_rows = data["input_ids"].size(0)
    device = next(reference.parameters()).device
    n_scored = int(data["loss_mask"][:, 1:].sum())
    itemsize = max(4, next(reference.parameters()).element_size())  # kept in at least float32
    keep_kl = n_scored * reference.config.vocab_size * itemsize <= max_kl_bytes
    logps, vocab_logprobs = [], []
    for start in range(0, n_rows, batch_size):
        input_ids = data["input_ids"][start:start + batch_size].to(device)
        loss_mask = data["loss_mask"][start:start + batch_size].to(device)
        batch_logps, batch_vocab_logprobs = score_completions(reference, input_ids, loss_mask)
        logps.append(batch_logps.cpu())
        if keep_kl:  # split the (N, V) rows back into one tensor per completion
            vocab_logprobs += list(batch_vocab_logprobs.split(loss_mask[:, 1:].sum(dim=1).long().tolist()))
    return {"logps": torch.cat(logps), "vocab_logprobs": vocab_logprobs if keep_kl else None}


# -----------------------------------------------------------------------------
# The training step and loop

def make_optimizer(policy, lr, weight_decay=0.01):
    """AdamW (Loshchilov & Hutter 2019) over the policy's parameters, never the reference's.

    The fused kernel updates each parameter in one pass over memory instead of a dozen
    element-wise passes; on a 124M model that is most of an optimizer step. Older torch
    builds without it get the ordinary implementation."""
    try:
        return torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)


def clip_grad_norm(parameters, max_norm):
    """Scale the gradients down so that their global L2 norm is at most max_norm, and return
    the norm they had (gradient clipping: Pascanu et al. 2013, "On the difficulty of training
    recurrent neural networks", Algorithm 1).

    The same numbers as torch.nn.utils.clip_grad_norm_ for a finite max_norm, except that
    gradients already short enough are left alone, where clip_grad_norm_ multiplies them by
    1.0: on GPT-2 small that is a pass over half a gigabyte of memory for nothing, 25 ms of
    every step on a 2-core CPU. Deciding costs one number's copy from a GPU to the host: the
    host waits for the backward pass to finish before it queues the optimizer's step (about
    0.1 ms a step on an H200; README.md, Speed and memory)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # the norm of the per-tensor norms, as clip_grad_norm_ takes it. On a GPU _foreach_norm
    # is a few kernel launches for all ~150 tensors, where a Python loop is ~150: 1-2 ms of
    # a 20 ms DPO step of GPT-2 small on an H200 (README.md, Speed and memory)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if not norm <= max_norm:  # not "norm > max_norm": a NaN norm must spread, as in clip_grad_norm_
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))  # clip_grad_norm_'s 1e-6, for its numbers
    return norm


def dpo_step(policy, optimizer, batch, beta=0.1, loss_type="dpo", label_smoothing=0.0, max_grad_norm=1.0):
    """One DPO update on a batch of pairs; returns this step's numbers as floats.

    batch: input_ids and loss_mask (2B, T), chosen rows first then rejected, on the
    policy's device; reference_logps (2B,); reference_vocab_logprobs (N, V) or None.
    max_grad_norm: the gradient is clipped to this norm before the update (clip_grad_norm).
    The policy runs once, on chosen and rejected together."""
    # last step's gradients go before the forward pass, not after it: they are
    # a model's worth of memory that would otherwise sit beside the activations
    optimizer.zero_grad(set_to_none=True)
    # the only forward pass of the step: chosen and rejected rows together
    logps, vocab_logprobs = score_completions(policy, batch["input_ids"], batch["loss_mask"])  # (2B,), (N, V)
    n = logps.size(0) // 2
    reference_logps = batch["reference_logps"]
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        logps[:n], logps[n:], reference_logps[:n], reference_logps[n:],
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    loss = losses.mean()
    with torch.no_grad():
        # the report's numbers before the backward pass, while no gradient exists yet: the
        # KL's temporaries then never sit beside a model's worth of gradients
        track_kl = batch.get("reference_vocab_logprobs") is not None
        kl = (mean_token_kl(vocab_logprobs, batch["reference_vocab_logprobs"]) if track_kl
              else torch.zeros((), device=loss.device))
        margins = chosen_rewards - rejected_rewards
        numbers = [loss.detach(), (margins > 0).float().mean(), margins.mean(),
                   chosen_rewards.mean(), rejected_rewards.mean(), kl]
    del vocab_logprobs  # autograd keeps what its backward needs, and frees it there
    loss.backward()
    grad_norm = clip_grad_norm(policy.parameters(), max_grad_norm)
    optimizer.step()

    numbers = torch.stack(numbers + [grad_norm.to(loss.device)])
    names = ("loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward", "kl", "grad_norm")
    metrics = dict(zip(names, numbers.tolist()))  # one device-to-host copy per step
    if not track_kl:
        metrics["kl"] = None  # not tracked: see precompute_reference
    return metrics


def make_batch(data, reference_cache, pair_index, device):
    """The tensors dpo_step needs for pairs `pair_index`, on `device`.

    Rows keep the data set's full padded length rather than being trimmed to the batch's
    longest: with the same sequence length as when the reference was computed, the CPU
    kernels add up in the same order, so at step 0 the policy's log-probs equal the cached
    reference's to the last bit and the first loss is exactly log 2 (trimmed, they differ
    by ~1e-6). GPU kernels can still differ in the last bits between batch shapes: there the
    first step's margins are rounding noise, and its reward accuracy, which counts margins
    > 0, can read anything from 0 to 1."""
    n_pairs = data["input_ids"].size(0) // 2
    rows = torch.cat([pair_index, pair_index + n_pairs])  # the chosen rows, then their rejected partners
    batch = {"input_ids": data["input_ids"][rows].to(device),
             "loss_mask": data["loss_mask"][rows].to(device),
             "reference_logps": reference_cache["logps"][rows].to(device)}
    if reference_cache["vocab_logprobs"] is not None:
        batch["reference_vocab_logprobs"] = torch.cat([reference_cache["vocab_logprobs"][r] for r in rows.tolist()])
    return batch


def train_dpo(policy, reference, data, optimizer, epochs=3, batch_size=2, seed=0, beta=0.1, loss_type="dpo",
              label_smoothing=0.0, max_grad_norm=1.0, reference_cache=None, on_step=None):
    """DPO over `data` (from encode_pairs) for some epochs of shuffled batches.

    reference_cache: precompute_reference(reference, data), if the caller has it already.
    Returns the list of per-step metric dicts; on_step(metrics) is called after each step."""
    # Dropout off in both models: with it, log pi would be noisy, the policy and the
    # reference would disagree at step 0 although they are the same network, and the
    # first loss would not be log 2. Eval mode turns dropout off without touching gradients.
    policy.eval()
    reference.eval()
    device = next(policy.parameters()).device
    if reference_cache is None:
        reference_cache = precompute_reference(reference, data)
    n_pairs = data["input_ids"].size(0) // 2
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same order on every device
    history = []
    for epoch in range(epochs):
        order = torch.randperm(n_pairs, generator=generator)
        for start in range(0, n_pairs, batch_size):
            batch = make_batch(data, reference_cache, order[start:start + batch_size], device)
            metrics = dpo_step(policy, optimizer, batch, beta=beta, loss_type=loss_type,
                               label_smoothing=label_smoothing, max_grad_norm=max_grad_norm)
            metrics.update(step=len(history) + 1, epoch=epoch + 1, tokens=batch["input_ids"].numel())
            history.append(metrics)
            if on_step is not None:
                on_step(metrics)
    return history
