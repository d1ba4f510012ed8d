"""Comparing runs: two fake run directories with configs, manifests and graded rows, and hand-computed tests."""

import base64
import re

import pytest
import yaml

from selfimprove.artifacts import save_rows, write_json
from selfimprove.compare import (
    ABSENT, accuracy_table, compare, differing_keys, first_sample_correct, flatten, main, paired_bootstrap,
    render_html, render_text,
)
from selfimprove.metrics import bootstrap_ci

PROBLEMS = [f"p{i}" for i in range(10)]


def _config(name: str, temperature: float, max_per_problem: int | None = None) -> dict:
    filter_stage = {"type": "filter"}
    if max_per_problem is not None:
        filter_stage["max_per_problem"] = max_per_problem
    return {"name": name, "runs_dir": f"runs/{name}", "model": "smollm2-135m-instruct", "rounds": 2, "seed": 0,
            "task": {"name": "arithmetic", "digits": [1, 2, 3]},
            "stages": {"generate": {"type": "generate", "sampling": {"n": 4, "temperature": temperature}},
                       "filter": filter_stage, "evaluate": {"type": "evaluate"}}}


def _manifest(run, round_index, stage, metrics, evaluates=True, stage_type="evaluate", second=0):
    write_json(run / f"round_{round_index:03d}" / stage / "manifest.json", {
        "done": True, "round": round_index, "stage": stage, "type": stage_type, "evaluates": evaluates,
        "seconds": 1.0, "metrics": metrics, "finished_at": f"2024-01-01T00:00:{round_index * 10 + second:02d}"})


def _make_run(root, name, config, accuracies, correct):
    """A finished run: `accuracies` = [(accuracy, low, high)] for rounds 0.., graded rows of the last round with
    `correct` = {problem id: first sample correct}; each problem also has a second sample that is the opposite,
    written first, so reading the wrong sample shows."""
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for r, (acc, low, high) in enumerate(accuracies):
        if r > 0:  # a non-evaluating stage, finished before the evaluation
            _manifest(run, r, "critique", {"gold_accuracy": 0.99, "accuracy": 0.99}, evaluates=False,
                      stage_type="critique")
        _manifest(run, r, "evaluate", {"accuracy": acc, "accuracy_ci_low": low, "accuracy_ci_high": high}, second=1)
    last = len(accuracies) - 1
    rows = []
    for pid, ok in correct.items():
        rows.append({"problem_id": pid, "index": 1, "correct": not ok, "completion": "second"})
        rows.append({"problem_id": pid, "index": 0, "correct": ok, "completion": "first"})
    save_rows(rows, run / f"round_{last:03d}" / "evaluate" / "data")
    return run


@pytest.fixture
def runs(tmp_path):
    # A is right on p0..p3; B on p0..p3 and k = 3 more (p4..p6), and B also evaluated p10, which A did not.
    a = _make_run(tmp_path, "run_a", _config("run_a", 0.7), [(0.10, 0.05, 0.15), (0.30, 0.2, 0.4), (0.40, 0.3, 0.5)],
                  {p: i < 4 for i, p in enumerate(PROBLEMS)})
    b = _make_run(tmp_path, "run_b", _config("run_b", 1.0, max_per_problem=2),
                  [(0.10, 0.05, 0.15), (0.45, 0.35, 0.55), (0.70, 0.6, 0.8)],
                  {**{p: i < 7 for i, p in enumerate(PROBLEMS)}, "p10": True})
    # a later evaluating stage without `accuracy` (a self-correction evaluation) must not displace `evaluate`
    _manifest(a, 2, "evaluate_self_correction", {"accuracy@t1": 0.5}, stage_type="evaluate_self_correction", second=5)
    return a, b


def test_accuracy_per_round_with_intervals(runs):
    c = compare(runs)
    assert [r.label for r in c.runs] == ["run_a", "run_b"]
    assert [(r.round, r.stage, r.accuracy) for r in c.runs[0].rounds] == [(0, "evaluate", 0.1), (1, "evaluate", 0.3),
                                                                          (2, "evaluate", 0.4)]
    header, rows = accuracy_table(c)
    assert header == ["round", "run_a", "run_b"]
    assert rows[1] == ["1", "30.0% [20.0%, 40.0%]", "45.0% [35.0%, 55.0%]"]
    assert c.runs[1].final_round == 2


def test_final_rows_use_each_problems_first_sample(runs):
    c = compare(runs)
    assert c.runs[0].final == {p: float(i < 4) for i, p in enumerate(PROBLEMS)}
    assert first_sample_correct([{"problem_id": "q", "index": 3, "correct": True},
                                 {"problem_id": "q", "index": 2, "correct": False}]) == {"q": 0.0}


def test_differing_config_keys(runs):
    c = compare(runs)
    assert c.differing == {"stages.filter.max_per_problem": [ABSENT, 2],
                           "stages.generate.sampling.temperature": [0.7, 1.0]}  # name and runs_dir ignored


def test_flatten_and_nested_names_are_not_ignored():
    assert flatten({"a": {"b": 1, "c": [1, {"d": 2}]}, "e": {}}) == {"a.b": 1, "a.c": [1, {"d": 2}], "e": {}}
    assert differing_keys([{"name": "x", "task": {"name": "gsm8k"}}, {"name": "y", "task": {"name": "math"}}]) == {
        "task.name": ["gsm8k", "math"]}
    assert differing_keys([{"rounds": 2}, {"rounds": 2}, {"rounds": 3}]) == {"rounds": [2, 2, 3]}


def test_paired_test_hand_computed(runs):
    test = compare(runs, seed=0, resamples=1000).tests[0]
    assert (test.baseline, test.other, test.problems) == ("run_a", "run_b", 10)  # p10 is not shared
    assert test.difference == pytest.approx(3 / 10)  # B is right on 3 more of the 10 shared problems
    # every per-problem difference is >= 0, so no resample's mean is below 0
    assert 0.0 <= test.ci_low < test.difference < test.ci_high <= 0.7
    # the interval is exactly bootstrap_ci of the differences, in sorted problem order
    diffs = [1.0 if 4 <= i < 7 else 0.0 for i in range(10)]
    assert (test.ci_low, test.ci_high) == bootstrap_ci(diffs, seed=0, resamples=1000)
    # two-sided shifted-null p: P(|m* - 0.3| >= 0.3) = P(X = 0) + P(X >= 6), X ~ Binomial(10, 0.3): 0.0755
    assert test.p_value == pytest.approx(0.0755, abs=0.03)


def test_paired_bootstrap_edge_cases():
    mean, low, high, p = paired_bootstrap([0.0] * 20, seed=1, resamples=200)
    assert (mean, low, high, p) == (0.0, 0.0, 0.0, 1.0)  # identical runs: no evidence of a difference
    mean, low, high, p = paired_bootstrap([1.0] * 20, seed=1, resamples=200)
    assert (mean, low, high) == (1.0, 1.0, 1.0) and p == pytest.approx(1 / 201)  # never as extreme under the null
    mean, low, high, p = paired_bootstrap([-1.0] * 5 + [0.0] * 5, seed=2, resamples=500)
    assert mean == -0.5 and low < -0.5 < high <= 0.0 and p < 0.05


def test_terminal_table_names_both_runs(runs):
    text = render_text(compare(runs))
    assert "run_a" in text and "run_b" in text
    assert "stages.generate.sampling.temperature" in text
    assert "+30.0%" in text  # the paired difference


def test_html_page_is_self_contained(runs, tmp_path, capsys):
    out = tmp_path / "pages" / "compare.html"
    assert main([str(r) for r in runs], str(out)) == 0
    page = out.read_text()
    match = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match and base64.b64decode(match.group(1)).startswith(b"\x89PNG\r\n\x1a\n")
    assert "<style>" in page and "stages.filter.max_per_problem" in page and "run_b − run_a" in page
    assert "run_a" in capsys.readouterr().out
    assert render_html(compare(runs)).count("<table>") == 3


def test_main_refuses_fewer_than_two_runs_and_non_runs(runs, tmp_path, capsys):
    assert main([str(runs[0])], None) == 2
    assert main([str(runs[0]), str(tmp_path / "nowhere")], None) == 2
    assert "no config.yaml" in capsys.readouterr().err
