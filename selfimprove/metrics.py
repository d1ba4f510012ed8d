"""Evaluation statistics: accuracy, unbiased pass@k, maj@k, their intervals, paired tests, AUROC.

All statistics are per-problem means, so intervals treat problems (not samples) as the units: the k samples of
one problem are not independent evidence.

Intervals (95%):
- a proportion of problems (every per-problem value 0 or 1: accuracy, maj@k, pass@n over all n samples) gets the
  Wilson score interval (Wilson 1927), which stays inside [0, 1] and does not collapse at 0% or 100% (the
  percentile bootstrap gives [0, 0] at 0/150);
- any other per-problem mean (pass@k for k < n, a difference of two attempts) gets the percentile bootstrap over
  problems;
- a paired difference of two proportions on the same problems (a run against its base, or another run) gets
  Newcombe's square-and-add interval with the continuity-corrected correlation (Newcombe 1998, method 10), and
  its test is the exact McNemar test (two-sided binomial test on the discordant problems);
- AUROC gets DeLong's interval (DeLong, DeLong & Clarke-Pearson 1988): normal, with the variance from the
  structural components (placement values), clipped to [0, 1].
"""

from __future__ import annotations

import random
from bisect import bisect_left, bisect_right
from collections import Counter
from dataclasses import dataclass
from math import comb, sqrt
from statistics import NormalDist


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), for n samples of which c are correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    return 1.0 - comb(n - c, k) / comb(n, k)  # comb(n - c, k) is 0 when n - c < k: pass@k is 1


def majority_correct(answers: list[str | None], correct: list[bool]) -> bool:
    """maj@k for one problem: is the most common extracted answer a correct one?

    Samples without an answer do not vote. Ties go to the answer seen first, so the outcome is deterministic.
    """
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    winner = votes.most_common(1)[0][0]  # of equal counts, the first seen
    return any(ok for a, ok in zip(answers, correct) if a == winner)


def bootstrap_ci(values: list[float], seed: int, resamples: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`."""
    if not values:
        return (float("nan"), float("nan"))
    rng, n = random.Random(seed), len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))]


Z = NormalDist().inv_cdf(0.975)  # of a two-sided 95% interval


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion `successes / n`; (nan, nan) when n is 0."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    # at 0 and n the bound is exactly 0 or 1 (rounding would leave it a hair off)
    return (0.0 if successes == 0 else centre - half, 1.0 if successes == n else centre + half)


def summarize(name: str, per_problem: list[float], seed: int, resamples: int, outcomes: bool = True) -> dict:
    """`{name}`, `{name}_ci_low`, `{name}_ci_high` for the mean of per-problem values: the Wilson interval when
    every value is 0 or 1 (the mean is a proportion of problems), else the percentile bootstrap over problems.
    `outcomes=False` says the values are not one trial's outcome per problem even where they are 0 or 1 (a
    difference of two outcomes): always the bootstrap."""
    mean = sum(per_problem) / len(per_problem) if per_problem else float("nan")
    if outcomes and all(v in (0.0, 1.0) for v in per_problem):
        lo, hi = wilson_interval(round(sum(per_problem)), len(per_problem))
    else:
        lo, hi = bootstrap_ci(per_problem, seed=seed, resamples=resamples)
    return {name: mean, f"{name}_ci_low": lo, f"{name}_ci_high": hi}


def interval(m: dict, key: str, signed: bool = False) -> str:
    """`m[key]` as a percentage with its 95% interval (`{key}_ci_low`, `{key}_ci_high`, as `summarize` and `ratio`
    name them), e.g. `52.0% [44.0%, 60.7%]`; without the interval where it has none, "-" where the value is
    undefined (None: a conditional share with nothing to condition on)."""
    if m.get(key) is None:
        return "-"
    low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    text = format(m[key], "+.1%" if signed else ".1%")
    return f"{text} [{low:.1%}, {high:.1%}]" if low is not None and high is not None else text


def ratio(name: str, successes: list[int], trials: list[int], seed: int, resamples: int) -> dict:
    """A conditional proportion pooled over problems, sum(successes) / sum(trials) (per problem: how many of its
    `trials` samples met the condition, and how many of those `successes` were), with `{name}_n` = sum(trials).

    The Wilson interval when no problem has more than one trial (then trials are independent problems), else the
    percentile bootstrap over problems of the pooled ratio (a problem's samples move together). With no trial at
    all the ratio is undefined: None, with no interval (None, not NaN, so that saved metrics compare equal)."""
    total = sum(trials)
    value, lo, hi = (sum(successes) / total if total else None), None, None
    if total and all(t <= 1 for t in trials):
        lo, hi = wilson_interval(sum(successes), total)
    elif total:
        rng, n, ratios = random.Random(seed), len(trials), []
        for _ in range(resamples):
            picks = [rng.randrange(n) for _ in range(n)]
            drawn = sum(trials[i] for i in picks)
            if drawn:  # a resample with no trial at all has no ratio
                ratios.append(sum(successes[i] for i in picks) / drawn)
        ratios.sort()
        if ratios:  # else every resample missed the few problems with trials: too little data for an interval
            lo, hi = ratios[int(0.025 * len(ratios))], ratios[min(len(ratios) - 1, int(0.975 * len(ratios)))]
    return {name: value, f"{name}_ci_low": lo, f"{name}_ci_high": hi, f"{name}_n": total}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for `b` and `c` discordant pairs: under the null each discordant pair goes
    either way with probability 1/2, so p = min(1, 2 · P(X <= min(b, c))), X ~ Binomial(b + c, 1/2)."""
    n = b + c  # no discordant pair: the tail is 1, p = 1
    tail = sum(comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@dataclass
class PairedDifference:
    """`second` − `first` on the same problems: the mean difference of their 0/1 outcomes with its interval
    (Newcombe's method 10), and the exact McNemar p-value."""

    problems: int
    both: int  # right in both
    first_only: int  # right in `first`, wrong in `second`
    second_only: int  # wrong in `first`, right in `second`
    difference: float
    ci_low: float
    ci_high: float
    p_value: float


def paired_difference(first: list[bool], second: list[bool]) -> PairedDifference:
    """`second` − `first` for outcomes paired by position (module docstring: Newcombe method 10, exact McNemar).

    With a = both right, b = only `first` right, c = only `second` right, d = both wrong (n problems):
    p1 = (a + b) / n, p2 = (a + c) / n and the difference is p2 − p1 = (c − b) / n. Each proportion gets its
    Wilson interval (l1, u1), (l2, u2); their correlation is estimated by φ = (ad − bc − n/2) / √(product of the
    margins) when ad − bc > n/2, 0 when 0 <= ad − bc <= n/2, (ad − bc) / √(...) when negative, and 0 when a margin
    is empty; then low = (p2 − p1) − √((p2 − l2)² − 2φ(p2 − l2)(u1 − p1) + (u1 − p1)²) and
    high = (p2 − p1) + √((u2 − p2)² − 2φ(u2 − p2)(p1 − l1) + (p1 − l1)²)."""
    if len(first) != len(second):
        raise ValueError(f"paired outcomes need equal lengths, got {len(first)} and {len(second)}")
    n = len(first)
    if n == 0:
        return PairedDifference(0, 0, 0, 0, *[float("nan")] * 4)
    pairs = Counter((bool(x), bool(y)) for x, y in zip(first, second))
    a, b, c = pairs[True, True], pairs[True, False], pairs[False, True]
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    (l1, u1), (l2, u2) = wilson_interval(a + b, n), wilson_interval(a + c, n)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    if margins == 0 or 0 <= cross <= n / 2:
        phi = 0.0
    else:
        phi = (cross - n / 2 if cross > 0 else cross) / sqrt(margins)
    diff = p2 - p1
    low = diff - sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    high = diff + sqrt(max(0.0, (u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2))
    return PairedDifference(n, a, b, c, diff, max(-1.0, low), min(1.0, high), mcnemar_exact(b, c))


def auroc_interval(scores: list[float], gold: list[bool]) -> tuple[float | None, float | None, float | None]:
    """(AUROC, low, high) with DeLong's interval (module docstring). The AUROC is None when the samples are all
    correct or all incorrect; the interval is None with fewer than two of either (its variance is undefined).

    Placement values: V10(x) is the share of incorrect samples that a correct sample's score x beats (ties one
    half), V01(y) the share of correct samples that beat an incorrect sample's score y; AUROC is the mean of
    either, and Var = s²(V10) / m + s²(V01) / n for m correct and n incorrect samples."""
    pos = sorted(s for s, g in zip(scores, gold) if g)
    neg = sorted(s for s, g in zip(scores, gold) if not g)
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return None, None, None
    v10 = [(bisect_left(neg, x) + (bisect_right(neg, x) - bisect_left(neg, x)) / 2) / n for x in pos]
    v01 = [(m - bisect_right(pos, y) + (bisect_right(pos, y) - bisect_left(pos, y)) / 2) / m for y in neg]
    area = sum(v10) / m
    if m < 2 or n < 2:
        return area, None, None
    variance = (sum((v - area) ** 2 for v in v10) / (m - 1) / m + sum((v - area) ** 2 for v in v01) / (n - 1) / n)
    half = Z * sqrt(variance)
    return area, max(0.0, area - half), min(1.0, area + half)
