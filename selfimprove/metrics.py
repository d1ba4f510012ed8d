"""Evaluation statistics: accuracy, unbiased pass@k, maj@k, and percentile-bootstrap confidence intervals.

All statistics are per-problem means, so intervals resample problems (not samples): the k samples of one
problem are not independent evidence.
"""

from __future__ import annotations

import random
from collections import Counter
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), for n samples of which c are correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(answers: list[str | None], correct: list[bool]) -> bool:
    """maj@k for one problem: is the most common extracted answer a correct one?

    Samples without an answer do not vote. Ties go to the answer seen first, so the outcome is deterministic.
    """
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    best = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == best)
    return any(ok for a, ok in zip(answers, correct) if a == winner)


def bootstrap_ci(values: list[float], seed: int, resamples: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return (lo, hi)


def summarize(name: str, per_problem: list[float], seed: int, resamples: int) -> dict:
    """`{name}`, `{name}_ci_low`, `{name}_ci_high` for the mean of per-problem values."""
    mean = sum(per_problem) / len(per_problem) if per_problem else float("nan")
    lo, hi = bootstrap_ci(per_problem, seed=seed, resamples=resamples)
    return {name: mean, f"{name}_ci_low": lo, f"{name}_ci_high": hi}
