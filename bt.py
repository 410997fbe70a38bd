"""
Bradley-Terry: fit a score to each item from pairwise comparisons.

The model (Bradley & Terry 1952). Each item i has a score s_i (a log-strength)
and a comparison between i and j is won by i with probability

    P(i beats j) = sigmoid(s_i - s_j)

Only differences of scores matter, so we report scores with mean zero (they sum
to zero up to rounding). Given comparisons (winner, loser) we maximise

    log_likelihood(s) = sum over comparisons of log sigmoid(s_winner - s_loser)
    objective(s)      = log_likelihood(s) - (l2 / 2) * ||s||^2

The method. The log-likelihood is concave, so we use Newton's method: a few
steps, each one n_items x n_items linear solve. A backtracking line search
(Boyd & Vandenberghe 2004, Algorithm 9.2) keeps every step uphill when a full
Newton step would overshoot, and we stop once the Newton decrement is below
tol (their Algorithm 9.5). Hunter (2004) gives the classic alternative, an MM
algorithm whose steps are cheaper but converge only linearly. Standard errors
come from the inverse of the Hessian (the Fisher information) on mean-zero scores.

When the maximum exists (Ford 1957). If some group of items never beat anyone
outside the group, pushing the group's scores down only raises the likelihood,
so no finite maximum exists. The maximum exists iff for every split of the
items into two nonempty sets, some item in each set beat some item in the
other: the directed graph of "who beat whom" is strongly connected. An item
that never wins, never loses or is never compared breaks this. With l2 > 0 the
penalty always gives a finite maximum, like a Gaussian prior N(0, 1/l2), and
that maximum has mean zero by itself (the gradient's entries sum to -l2 * sum(s)).

The same loss as DPO. DPO (Rafailov et al. 2023) assumes this model for human
preferences between two completions of a prompt (Eq. 1), fits a reward model
by minimising -log sigmoid(r(x, y_chosen) - r(x, y_rejected)) (Eq. 2), and
then writes the reward through the policy, r(x, y) = beta * log(pi(y|x) /
pi_ref(y|x)), to get the DPO loss (Eq. 7). So the terms of -log_likelihood
above are DPO's terms: winner/loser is chosen/rejected, a score is a reward,
and s_winner - s_loser is the margin. Here every item has a free score; in
DPO the rewards of all completions are tied together through one policy. The
existence problem carries over too: a completion that always wins is pushed to
an infinite margin, which IPO (Azar et al. 2023) avoids by changing the loss
where this file adds l2.

`python bt.py` fits a small example and prints the scores with their standard errors.
Read next: dpo.py, which applies this loss to the margins of policy rewards, and the
Bradley-Terry section of test_dpo.py, which checks this file against closed forms.
"""

from dataclasses import dataclass

import numpy as np


def log_sigmoid(x):
    """log(1 / (1 + exp(-x))), written so large |x| neither overflows nor rounds to log(0)."""
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return np.exp(log_sigmoid(x))


def win_probability(scores, i, j):
    """P(item i beats item j) = sigmoid(s_i - s_j) under the Bradley-Terry model."""
    scores = np.asarray(scores, dtype=float)
    return sigmoid(scores[i] - scores[j])


def count_wins(comparisons, n_items=None):
    """Turn (winner, loser) pairs into wins[i, j] = number of times i beat j."""
    comparisons = np.asarray(comparisons)
    if comparisons.size == 0:
        raise ValueError("comparisons is empty: pass at least one (winner, loser) pair")
    if comparisons.ndim != 2 or comparisons.shape[1] != 2:
        raise ValueError(f"comparisons must be (winner, loser) pairs of shape (N, 2), got shape {comparisons.shape}")
    if not np.issubdtype(comparisons.dtype, np.integer):
        raise ValueError(f"comparisons must hold integer item indices, got dtype {comparisons.dtype}")
    if n_items is None:
        n_items = int(comparisons.max()) + 1
    for bad, problem in [
        ((comparisons < 0).any(axis=1), "has a negative item index; items are numbered 0, 1, 2, ..."),
        ((comparisons >= n_items).any(axis=1), f"names an item >= n_items={n_items}"),
        (comparisons[:, 0] == comparisons[:, 1], "compares an item with itself"),
    ]:
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"comparison {row} {comparisons[row].tolist()} {problem}")
    wins = np.zeros((n_items, n_items))
    np.add.at(wins, (comparisons[:, 0], comparisons[:, 1]), 1.0)
    return wins


def reachable(beats, start):
    """Boolean mask of the items reachable from `start` along edges i -> j where beats[i, j]."""
    seen = np.zeros(len(beats), dtype=bool)
    seen[start] = True
    frontier = [start]
    while frontier:
        new = beats[frontier.pop()] & ~seen
        seen |= new
        frontier.extend(np.flatnonzero(new).tolist())
    return seen


def check_mle_exists(wins):
    """Raise ValueError unless the "who beat whom" graph is strongly connected (Ford 1957)."""
    games = wins + wins.T
    hint = "Pass l2 > 0 to fit penalised scores anyway, or add comparisons that link these items."
    # The specific cases first, because their messages are easier to act on.
    for mask, problem in [
        (games.sum(axis=1) == 0, "appear in no comparison, so nothing determines their scores"),
        (wins.sum(axis=1) == 0, "never win, so their maximum-likelihood scores are -infinity"),
        (wins.sum(axis=0) == 0, "never lose, so their maximum-likelihood scores are +infinity"),
    ]:
        if mask.any():
            raise ValueError(f"items {np.flatnonzero(mask).tolist()} {problem}. {hint}")
    # Strongly connected iff item 0 reaches every item and every item reaches item 0.
    # If not, one set of items never beat the rest, and the gap between their scores
    # could grow without bound.
    beats = wins > 0
    beaten_by_0 = reachable(beats, 0)  # 0 beat them, or beat someone who beat them, ...
    beat_0 = reachable(beats.T, 0)
    for group in [beaten_by_0, ~beat_0]:  # each is a group that never beat anyone outside it
        if group.any() and not group.all():
            raise ValueError(
                f"the win graph is not strongly connected: no item in {np.flatnonzero(group).tolist()} "
                f"ever beat an item in {np.flatnonzero(~group).tolist()}, so the maximum-likelihood "
                f"scores do not exist. {hint}"
            )


def log_likelihood(wins, scores):
    margins = scores[:, None] - scores[None, :]  # (n, n): s_i - s_j
    return float((wins * log_sigmoid(margins)).sum())


def gradient(wins, scores, l2):
    """Gradient of the objective: each item's wins minus its expected wins, minus the penalty's pull."""
    games = wins + wins.T  # (n, n): comparisons between i and j
    expected_wins = (games * sigmoid(scores[:, None] - scores[None, :])).sum(axis=1)
    return wins.sum(axis=1) - expected_wins - l2 * scores


def hessian(wins, scores, l2):
    """Hessian of the *negative* objective (positive semi-definite).

    It depends on which pairs were compared but not on who won, so the observed
    and the expected Fisher information are the same matrix. For the
    log-likelihood it is a weighted graph Laplacian: every row sums to zero.
    """
    games = wins + wins.T
    p = sigmoid(scores[:, None] - scores[None, :])
    weights = games * p * (1 - p)  # (n, n): information each pair carries about s_i - s_j
    return np.diag(weights.sum(axis=1)) - weights + l2 * np.eye(len(scores))


def backtrack(objective, scores, step, slope, shrink=0.5, sufficient=0.25, max_halvings=60):
    """Largest step * shrink**k that raises the objective by at least sufficient * its slope (Armijo).

    Returns None when no such step exists, which only happens once round-off in
    the objective swamps the increase we are asking for.
    """
    f0, t = objective(scores), 1.0
    for _ in range(max_halvings):
        if objective(scores + t * step) >= f0 + sufficient * t * slope:
            return scores + t * step
        t *= shrink
    return None


@dataclass(frozen=True)
class BradleyTerryFit:
    scores: np.ndarray  # (n_items,) log-strengths with mean zero
    standard_errors: np.ndarray  # (n_items,) square roots of the covariance's diagonal
    covariance: np.ndarray  # (n_items, n_items) inverse Fisher information on the mean-zero scores
    log_likelihood: float  # at scores, without the penalty
    objective: float  # log_likelihood - (l2 / 2) * ||scores||^2, the quantity maximised
    n_iter: int  # Newton steps taken
    converged: bool


def fit_bradley_terry(comparisons, n_items=None, l2=0.0, tol=1e-10, max_iter=100):
    """Maximum-(penalised-)likelihood Bradley-Terry scores by Newton's method.

    comparisons: (N, 2) integer array or sequence of (winner, loser) item indices.
    n_items: number of items; defaults to the largest index + 1.
    l2: strength of the penalty (l2 / 2) * ||s||^2; needed when the maximum
        likelihood does not exist (see the module docstring).
    tol: stop when the Newton decrement lambda^2 / 2 = gradient . step / 2, the
        predicted gain of a full step, is below tol (in log-likelihood units).
    """
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    wins = count_wins(comparisons, n_items)
    if l2 == 0:
        check_mle_exists(wins)
    n = len(wins)
    objective = lambda s: log_likelihood(wins, s) - 0.5 * l2 * s @ s
    # Scores are only defined up to a shared shift, so the Hessian is singular along
    # the all-ones direction. Adding J/n (J = all-ones matrix) makes it invertible
    # without changing steps within the mean-zero subspace: while the scores have
    # mean zero the gradient sums to zero, and then so does the step solving
    # (H + J/n) step = gradient.
    ones_projection = np.full((n, n), 1.0 / n)
    scores, converged, n_iter = np.zeros(n), False, 0
    while n_iter < max_iter:
        grad = gradient(wins, scores, l2)
        step = np.linalg.solve(hessian(wins, scores, l2) + ones_projection, grad)
        n_iter += 1
        if grad @ step / 2 <= tol:
            # Close enough that a full step squares the remaining error; a line search
            # could not judge such a small gain through round-off in the objective.
            scores, converged = scores + step, True
            break
        uphill = backtrack(objective, scores, step, slope=grad @ step)
        if uphill is None:  # round-off floor reached before tol: report converged=False
            break
        scores = uphill
    scores = scores - scores.mean()  # remove round-off drift along the all-ones direction
    # Covariance: inverse of the penalised Hessian restricted to mean-zero scores, i.e.
    # the pseudo-inverse of the Laplacian when l2 = 0 (the inverse Fisher information of
    # the identified differences), and the Laplace approximation to the posterior under
    # the N(0, 1/l2) prior when l2 > 0, which stays finite when the data alone do not.
    centring = np.eye(n) - ones_projection
    covariance = centring @ np.linalg.inv(hessian(wins, scores, l2) + ones_projection) @ centring
    return BradleyTerryFit(
        scores=scores,
        standard_errors=np.sqrt(np.clip(np.diag(covariance), 0.0, None)),
        covariance=covariance,
        log_likelihood=log_likelihood(wins, scores),
        objective=float(objective(scores)),
        n_iter=n_iter,
        converged=converged,
    )


# -----------------------------------------------------------------------------
# `python bt.py`: a small example

def example_comparisons():
    """Five items of known scores (mean zero, as the fit reports them) and 400 comparisons
    of random pairs, each won as the model says; seeded."""
    true_scores = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    n, rng = 400, np.random.default_rng(0)
    i = rng.integers(0, len(true_scores), n)
    j = (i + rng.integers(1, len(true_scores), n)) % len(true_scores)  # any item but i
    i_wins = rng.random(n) < win_probability(true_scores, i, j)
    return true_scores, np.stack([np.where(i_wins, i, j), np.where(i_wins, j, i)], axis=1)  # (n, 2): winner, loser


if __name__ == "__main__":
    true_scores, comparisons = example_comparisons()
    fit = fit_bradley_terry(comparisons)
    wins = count_wins(comparisons)
    print(f"{len(comparisons)} comparisons among {len(true_scores)} items, simulated from known scores; "
          f"fitted in {fit.n_iter} Newton steps\n")
    print(f"{'item':>4} {'wins':>5} {'games':>6} {'true score':>11} {'fitted':>8} {'std. error':>11}")
    for item in range(len(true_scores)):
        games = wins[item].sum() + wins[:, item].sum()
        print(f"{item:>4} {wins[item].sum():>5.0f} {games:>6.0f} {true_scores[item]:>11.3f} "
              f"{fit.scores[item]:>8.3f} {fit.standard_errors[item]:>11.3f}")
    print(f"\nP(item 4 beats item 0) = {win_probability(fit.scores, 4, 0):.3f} "
          f"(true {win_probability(true_scores, 4, 0):.3f})")
