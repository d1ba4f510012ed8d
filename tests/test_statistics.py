"""Intervals and paired tests against published values and hand-computed examples."""

import pytest
import yaml

from selfimprove.artifacts import save_rows, write_json
from selfimprove.compare import compare, render_text
from selfimprove.metrics import (
    auroc_interval, bootstrap_ci, mcnemar_exact, paired_difference, ratio, summarize, wilson_interval,
)
from selfimprove.selfcorrection import self_correction_metrics


@pytest.mark.parametrize("successes, n, low, high", [
    (0, 10, 0.0, 0.2775),  # the textbook trio: never [0, 0] at 0%, never [1, 1] at 100%
    (10, 10, 0.7225, 1.0),
    (3, 10, 0.1078, 0.6032),
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3 (Wilson)
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_interval_matches_published_values(successes, n, low, high):
    lo, hi = wilson_interval(successes, n)
    assert (lo, hi) == (pytest.approx(low, abs=5e-5), pytest.approx(high, abs=5e-5))


def test_accuracy_intervals_do_not_collapse_at_0_or_100_percent():
    zero = summarize("accuracy", [0.0] * 150, seed=0, resamples=200)
    assert zero["accuracy"] == 0.0 and zero["accuracy_ci_low"] == 0.0 and zero["accuracy_ci_high"] > 0.02
    full = summarize("accuracy", [1.0] * 150, seed=0, resamples=200)
    assert full["accuracy_ci_high"] == 1.0 and full["accuracy_ci_low"] < 0.98
    # 0/1 values are a proportion: Wilson, whatever the seed
    assert summarize("a", [1.0, 0.0, 0.0], seed=1, resamples=50) == summarize("a", [1.0, 0.0, 0.0], seed=2,
                                                                                resamples=50)
    # any other per-problem mean is bootstrapped over problems
    values = [0.25, 0.5, 0.0, 1.0, 0.75, 0.25]
    a = summarize("p", values, seed=1, resamples=200)
    assert (a["p_ci_low"], a["p_ci_high"]) == bootstrap_ci(values, seed=1, resamples=200)
    assert 0.0 <= a["p_ci_low"] < a["p"] < a["p_ci_high"] <= 1.0
    # a difference is never taken for a proportion, even when no value happens to be negative
    c = summarize("d", [1.0, 0.0, 0.0, 1.0], seed=3, resamples=200, outcomes=False)
    assert (c["d_ci_low"], c["d_ci_high"]) == bootstrap_ci([1.0, 0.0, 0.0, 1.0], seed=3, resamples=200)


def test_exact_mcnemar_by_hand():
    # b = 1, c = 6: P(X <= 1) for X ~ Binomial(7, 1/2) = (1 + 7) / 128, doubled
    assert mcnemar_exact(1, 6) == pytest.approx(16 / 128) == mcnemar_exact(6, 1)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0  # capped at 1; no discordant pair: no evidence


def _pairs(both, first_only, second_only, neither):
    first = [True] * both + [True] * first_only + [False] * second_only + [False] * neither
    second = [True] * both + [False] * first_only + [True] * second_only + [False] * neither
    return first, second


def test_newcombe_paired_interval_matches_published_values():
    # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables" (2017), ch. 8: complete response
    # before and after consolidation therapy (Cavo et al., 2012), table [[59, 6], [16, 80]]; the
    # square-and-add (Newcombe) interval of p1+ − p+1 = -0.0621 is [-0.1186, -0.0046], exact McNemar p = 0.052.
    first, second = _pairs(59, 6, 16, 80)  # rows: before; columns: after
    d = paired_difference(second, first)  # the book's difference is before − after: the second argument first
    assert d.difference == pytest.approx(-10 / 161)
    assert (d.ci_low, d.ci_high) == (pytest.approx(-0.1186, abs=5e-5), pytest.approx(-0.0046, abs=5e-5))
    assert d.p_value == pytest.approx(0.0525, abs=5e-4)
    assert (d.problems, d.both, d.first_only, d.second_only) == (161, 59, 16, 6)


def test_paired_difference_edges():
    same = paired_difference([True, False] * 10, [True, False] * 10)
    assert (same.difference, same.p_value) == (0.0, 1.0) and same.ci_low < 0 < same.ci_high  # not "no difference"
    allwrong = paired_difference([False] * 30, [False] * 30)
    assert allwrong.difference == 0.0 and allwrong.ci_low < 0 < allwrong.ci_high
    up = paired_difference([False] * 20, [True] * 20)
    assert up.difference == 1.0 and 0.5 < up.ci_low < up.ci_high == 1.0 and up.p_value == pytest.approx(2 / 2 ** 20)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([True], [True, False])


def test_auroc_with_delong_interval_by_hand():
    # correct {0.9, 0.8, 0.4}, incorrect {0.5, 0.3}. Placements: V10 = (1, 1, 1/2), V01 = (2/3, 1); AUROC = 5/6;
    # s²(V10) = 1/12, s²(V01) = 1/18, Var = (1/12)/3 + (1/18)/2 = 1/18; 5/6 ± 1.959964 · √(1/18) = [0.3714, 1.2953]
    area, low, high = auroc_interval([0.9, 0.8, 0.4, 0.5, 0.3], [True, True, True, False, False])
    assert area == pytest.approx(5 / 6)
    assert low == pytest.approx(5 / 6 - 1.959964 * (1 / 18) ** 0.5, abs=1e-6) and high == 1.0  # clipped
    # ties count one half; one class only: no AUROC; one sample of a class: no interval
    assert auroc_interval([0.5, 0.5, 0.5, 0.5], [True, True, False, False])[0] == 0.5
    assert auroc_interval([0.1, 0.2], [True, True]) == (None, None, None)
    assert auroc_interval([0.9, 0.1, 0.2], [True, False, False]) == (1.0, None, None)


def test_ratio_pools_samples_and_uses_wilson_for_single_trials():
    single = ratio("r", [1, 0, 1, 0], [1, 1, 1, 0], seed=0, resamples=100)
    assert (single["r"], single["r_n"]) == (pytest.approx(2 / 3), 3)
    assert (single["r_ci_low"], single["r_ci_high"]) == wilson_interval(2, 3)
    pooled = ratio("r", [2, 0, 1], [2, 1, 1], seed=0, resamples=200)  # 3 of 4, problems resampled whole
    assert pooled["r"] == 0.75 and 0.0 <= pooled["r_ci_low"] < 0.75 < pooled["r_ci_high"] <= 1.0
    assert ratio("r", [0, 0], [0, 0], seed=0, resamples=10) == {"r": None, "r_ci_low": None, "r_ci_high": None,
                                                               "r_n": 0}


def test_confidence_and_critique_decompose_accuracy_at_t2():
    # 10 problems: c→c 4, c→i 2, i→c 1, i→i 3. Confidence 4/6, critique 1/4; Acc@t2 = 0.6 · 4/6 + 0.4 · 1/4 = 0.5
    table = [(True, True)] * 4 + [(True, False)] * 2 + [(False, True)] + [(False, False)] * 3
    m = self_correction_metrics(table, seed=0, resamples=100)
    assert (m["confidence"], m["confidence_n"]) == (pytest.approx(4 / 6), 6)
    assert (m["critique"], m["critique_n"]) == (pytest.approx(1 / 4), 4)
    assert m["accuracy@t2"] == pytest.approx(m["accuracy@t1"] * m["confidence"]
                                             + (1 - m["accuracy@t1"]) * m["critique"])
    assert (m["confidence_ci_low"], m["confidence_ci_high"]) == wilson_interval(4, 6)
    # Δ(t1,t2) with one sample per problem: the paired interval and the exact McNemar p (b = 2, c = 1)
    assert m["delta_t1_t2"] == pytest.approx(-0.1) and m["delta_t1_t2_p"] == pytest.approx(1.0)
    assert m["delta_t1_t2_ci_low"] < -0.1 < m["delta_t1_t2_ci_high"]
    # several samples per problem: the conditionals pool samples; Δ(t1,t2) falls back to the bootstrap
    grouped = self_correction_metrics(table, seed=0, resamples=100, groups=[str(i // 2) for i in range(10)])
    assert grouped["confidence"] == pytest.approx(4 / 6) and "delta_t1_t2_p" not in grouped


def _run(root, name, rounds):
    """A run whose every round's evaluation has graded rows: rounds = [{problem id: correct}, ...]."""
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"name": name, "stages": {"evaluate": {}}}))
    for r, correct in enumerate(rounds):
        stage = run / f"round_{r:03d}" / "evaluate"
        write_json(stage / "manifest.json", {"done": True, "round": r, "stage": "evaluate", "type": "evaluate",
                                             "evaluates": True, "seconds": 1.0,
                                             "metrics": {"accuracy": sum(correct.values()) / len(correct)}})
        save_rows([{"problem_id": p, "index": 0, "correct": ok} for p, ok in correct.items()], stage / "data")
    return run


def test_compare_reports_each_runs_lift_over_its_own_base(tmp_path):
    problems = [f"p{i}" for i in range(12)]
    # run a: base right on p0..p1; final right on p0..p7 except p1: 7 gained, 1 lost
    a = _run(tmp_path, "a", [{p: i < 2 for i, p in enumerate(problems)},
                             {p: i < 8 and i != 1 for i, p in enumerate(problems)}])
    b = _run(tmp_path, "b", [{p: i < 2 for i, p in enumerate(problems)}])  # base only: no lift to report
    c = compare([a, b])
    (lift,) = c.lifts
    assert (lift.baseline, lift.other, lift.problems) == ("a round 0", "a round 1", 12)
    assert (lift.first_only, lift.second_only, lift.difference) == (1, 6, pytest.approx(5 / 12))
    assert lift.p_value == pytest.approx(16 / 128)  # exact McNemar on b = 1, c = 6
    text = render_text(c)
    assert "Lift over the base model" in text and "a round 1 − a round 0" in text and "0.125" in text
    assert "does not show that there is no difference" in text
