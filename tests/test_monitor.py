"""The B-STaR monitor against hand-computed values on small hand-made rows, and properties of the balance score."""

import math
import random

import pytest

from selfimprove.monitor import balance_score, choose_setting, exploitation, exploration, monitor_round


def _row(sample_id, problem_id, completion, extracted):
    return {"sample_id": sample_id, "problem_id": problem_id, "completion": completion, "extracted": extracted}


# p1: 4 samples, 3 correct, completions a, b, a (again), c; every correct one answers "5".
# p2: 4 samples, none correct, one without an extracted answer.
# p3: two correct samples with differently written answers, one wrong, one without gold (so p3 is left out of
#     the gold-based exploration metrics).
SAMPLES = [
    _row("s1", "p1", "a", "5"), _row("s2", "p1", "b", "5"), _row("s3", "p1", " a\n", "5"),
    _row("s4", "p1", "c", "6"),
    _row("s5", "p2", "x", "7"), _row("s6", "p2", "y", None), _row("s7", "p2", "z", "8"), _row("s8", "p2", "w", "9"),
    _row("s9", "p3", "m", "1/2"), _row("s10", "p3", "n", "0.5"), _row("s11", "p3", "o", "3"),
    _row("s12", "p3", "p", "4"),
]
GOLD = [True, True, True, False, False, False, False, False, True, True, False, None]
# kept: three correct samples of p1 (s3 repeats s1's text) and its wrong one, one correct and one ungraded sample
# of p3, and an id from another stage that is not among SAMPLES.
KEPT = {"s1", "s2", "s3", "s4", "s9", "s12", "rationalize-s1"}


def test_exploration_hand_computed():
    out = exploration(SAMPLES, GOLD)
    assert out["bstar/prompts"] == 3 and out["bstar/prompts_with_gold"] == 2
    # distinct completions over every prompt: p1 {a, b, c} = 3 (" a\n" strips to "a"), p2 4, p3 4
    assert out["bstar/distinct_completions"] == pytest.approx(11 / 3)
    # over p1 and p2: k = 4; pass@4 is 1 for p1 (3 correct), 0 for p2
    assert out["bstar/k"] == 4
    assert out["bstar/pass@k"] == pytest.approx(0.5)
    assert out["bstar/correct_per_prompt"] == pytest.approx(1.5)  # (3 + 0) / 2
    assert out["bstar/distinct_correct_answers"] == pytest.approx(0.5)  # p1 {"5"}, p2 {}
    assert out["bstar/distinct_correct_completions"] == pytest.approx(1.0)  # p1 {a, b}, p2 {}


def test_pass_at_k_uses_the_fewest_samples_and_the_unbiased_estimator():
    samples = [_row(f"a{i}", "A", str(i), str(i)) for i in range(4)]
    samples += [_row(f"b{i}", "B", str(i), str(i)) for i in range(2)]
    gold = [True, False, False, False, False, False]
    out = exploration(samples, gold)
    # k = 2; A: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5; B: 0
    assert out["bstar/k"] == 2
    assert out["bstar/pass@k"] == pytest.approx(0.25)


def test_distinct_correct_answers_counts_differently_written_answers():
    out = exploration(SAMPLES[8:11], GOLD[8:11])  # p3 without its ungraded sample
    assert out["bstar/distinct_correct_answers"] == 2  # "1/2" and "0.5"
    assert out["bstar/pass@k"] == 1.0 and out["bstar/k"] == 3


def test_exploitation_hand_computed():
    out = exploitation(SAMPLES, GOLD, KEPT, n_star=8)
    assert out["bstar/kept"] == 6  # the other stage's id is ignored
    assert out["bstar/precision"] == pytest.approx(4 / 5)  # s12 has no gold
    # p1: kept a, b, " a\n" (= a), c: n = 3 distinct, n' = 2 correct → min(2/8, 1) · 2/3 = 1/6;
    # p2 kept nothing → 0;
    # p3: n = 1 (s12 has no gold), n' = 1 → 1/8 · 1; the mean runs over all three prompts with gold
    assert out["bstar/balance_queries"] == 3
    assert out["bstar/balance"] == pytest.approx((1 / 6 + 0 + 1 / 8) / 3)
    # with n* = 2 p1's correct count saturates: min(2/2, 1) · 2/3 = 2/3; p3: 1/2 · 1
    assert exploitation(SAMPLES, GOLD, KEPT, n_star=2)["bstar/balance"] == pytest.approx((2 / 3 + 0 + 1 / 2) / 3)


def test_balance_score_worked_case_from_the_definition():
    six = [("r1", True), ("r2", True), ("r3", True), ("w1", False), ("w2", False), ("w3", False)]
    # n* = 4, 6 distinct kept of which 3 correct: min(3/4, 1) · 3/6 = 0.375
    assert balance_score({"q": six}, n_star=4) == pytest.approx(0.375)
    # 10 distinct kept, all correct: min(10/4, 1) · 1 = 1 (the cap), averaged with the query above
    assert balance_score({"q": six, "r": [(f"s{i}", True) for i in range(10)]}, n_star=4) == pytest.approx(0.6875)


def test_balance_score_counts_repeated_completions_once():
    # eight copies of one correct completion: n' = n = 1, so 1/8 · 1, not min(8/8, 1) · 8/8 = 1
    assert balance_score({"q": [("x = 5", True)] * 8}, n_star=8) == pytest.approx(1 / 8)
    # four copies of a correct and four of a wrong one: n = 2, n' = 1 → 1/8 · 1/2
    assert balance_score({"q": [("x = 5", True)] * 4 + [("x = 6", False)] * 4}, n_star=8) == pytest.approx(1 / 16)
    # surrounding whitespace does not make a completion distinct; inner text does
    assert balance_score({"q": [("x = 5", True), (" x = 5\n", True)]}, n_star=2) == pytest.approx(1 / 2)
    assert balance_score({"q": [("x = 5", True), ("x  = 5", True)]}, n_star=2) == pytest.approx(1.0)


def test_balance_score_counts_queries_with_nothing_kept_as_zero():
    eight = [(str(i), True) for i in range(8)]
    assert balance_score({"q1": eight, "q2": []}, n_star=8) == pytest.approx(0.5)  # q2 is in the mean, at 0
    assert balance_score({"q": []}, n_star=8) == 0.0
    assert math.isnan(balance_score({}, n_star=8))
    with pytest.raises(ValueError):
        balance_score({"q": [("a", True)]}, n_star=0)


def test_balance_score_properties_on_random_selections():
    """Repeating a kept completion changes nothing; one more distinct correct completion never lowers the score,
    one more distinct wrong one never raises it; the score lies in [0, 1]."""
    rng = random.Random(0)
    for _ in range(200):
        kept = {f"q{i}": [(f"c{rng.randrange(12)}", None) for _ in range(rng.randint(0, 10))]
                for i in range(rng.randint(1, 5))}
        kept = {q: [(text, int(text[1:]) % 3 != 0) for text, _ in pairs] for q, pairs in kept.items()}  # text → grade
        n_star = rng.randint(1, 6)
        score = balance_score(kept, n_star)
        assert 0.0 <= score <= 1.0
        q = rng.choice(sorted(kept))
        if kept[q]:
            repeated = {**kept, q: kept[q] + [rng.choice(kept[q])]}
            assert balance_score(repeated, n_star) == pytest.approx(score)
        assert balance_score({**kept, q: kept[q] + [("new right", True)]}, n_star) >= score - 1e-12
        assert balance_score({**kept, q: kept[q] + [("new wrong", False)]}, n_star) <= score + 1e-12


def test_monitor_round_is_exploration_and_exploitation_in_one_dict():
    out = monitor_round(SAMPLES, GOLD, KEPT, n_star=8)
    assert set(out) == {"bstar/prompts", "bstar/distinct_completions", "bstar/prompts_with_gold", "bstar/k",
                        "bstar/pass@k", "bstar/correct_per_prompt", "bstar/distinct_correct_answers",
                        "bstar/distinct_correct_completions", "bstar/kept", "bstar/precision", "bstar/balance",
                        "bstar/balance_queries", "bstar/n_star"}
    assert out["bstar/pass@k"] == pytest.approx(0.5) and out["bstar/balance"] == pytest.approx(7 / 72)
    assert out["bstar/n_star"] == 8


def test_precision_is_nan_without_gold_and_misaligned_gold_fails():
    out = exploitation(SAMPLES[:2], [None, None], {"s1"})
    assert out["bstar/kept"] == 1 and math.isnan(out["bstar/precision"]) and math.isnan(out["bstar/balance"])
    assert exploration(SAMPLES[:2], [None, None]) == {"bstar/prompts": 1, "bstar/distinct_completions": 2.0,
                                                      "bstar/prompts_with_gold": 0}
    with pytest.raises(ValueError, match="one per sample"):
        monitor_round(SAMPLES, GOLD[:-1], KEPT)


def test_choose_setting_picks_the_highest_balance():
    assert choose_setting({0.5: 0.21, 0.7: 0.43, 1.0: 0.38, 1.2: float("nan")}) == 0.7
    sweep = [((0.7, 0.0), 0.30), ((0.7, 0.5), 0.52), ((1.0, 0.0), 0.41), ((1.0, 0.5), 0.49)]
    assert choose_setting(sweep) == (0.7, 0.5)


def test_choose_setting_breaks_ties_by_listing_order():
    assert choose_setting([(1.0, 0.4), (0.7, 0.4), (0.5, 0.1)]) == 1.0
    assert choose_setting([(0.7, 0.4), (1.0, 0.4), (0.5, 0.1)]) == 0.7
    assert choose_setting([(0.5, float("nan")), (0.9, 0.0)]) == 0.9


def test_choose_setting_without_a_finite_score_fails():
    with pytest.raises(ValueError):
        choose_setting([])
    with pytest.raises(ValueError):
        choose_setting({0.7: float("nan")})
