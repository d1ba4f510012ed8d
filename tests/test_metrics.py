"""Statistics against brute force and hand-computed values."""

import itertools
import random

import pytest

from selfimprove.metrics import bootstrap_ci, majority_correct, pass_at_k


@pytest.mark.parametrize("n, c, k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 2), (4, 4, 2), (8, 1, 8)])
def test_pass_at_k_equals_brute_force(n, c, k):
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_majority_vote():
    assert majority_correct(["5", "6", "5", None], [True, False, True, False])
    assert not majority_correct(["6", "6", "5"], [False, False, True])
    assert not majority_correct([None, None], [False, False])
    # a tie goes to the answer seen first
    assert majority_correct(["5", "6"], [True, False]) and not majority_correct(["6", "5"], [False, True])


def test_bootstrap_interval_covers_mean_and_narrows():
    rng = random.Random(0)
    small = [float(rng.random() < 0.3) for _ in range(50)]
    big = [float(rng.random() < 0.3) for _ in range(2000)]
    lo, hi = bootstrap_ci(small, seed=1, resamples=1000)
    mean = sum(small) / len(small)
    assert lo <= mean <= hi and lo < hi
    blo, bhi = bootstrap_ci(big, seed=1, resamples=1000)
    assert bhi - blo < hi - lo
    assert bootstrap_ci([1.0] * 10, seed=0, resamples=100) == (1.0, 1.0)
