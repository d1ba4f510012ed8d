"""Comparing runs: two fake run directories with configs, manifests and graded rows, and hand-computed tests."""

import base64
import re

import pytest
import yaml

from selfimprove.artifacts import save_rows, write_json
from selfimprove.compare import (
    ABSENT, accuracy_table, compare, differing_keys, first_sample_correct, flatten, main, render_html, render_text,
)

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
    assert [(m["round"], m["stage"], m["metrics"]["accuracy"]) for m in c.runs[0].rounds] == [
        (0, "evaluate", 0.1), (1, "evaluate", 0.3), (2, "evaluate", 0.4)]
    header, rows = accuracy_table(c)
    assert header == ["round", "run_a", "run_b"]
    assert rows[1] == ["1", "30.0% [20.0%, 40.0%]", "45.0% [35.0%, 55.0%]"]
    assert c.runs[1].final_round == 2


def test_final_rows_use_each_problems_first_sample(runs):
    c = compare(runs)
    assert c.runs[0].final == {p: i < 4 for i, p in enumerate(PROBLEMS)}
    assert first_sample_correct([{"problem_id": "q", "index": 3, "correct": True},
                                 {"problem_id": "q", "index": 2, "correct": False}]) == {"q": False}


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
    test = compare(runs).tests[0]
    assert (test.baseline, test.other, test.problems) == ("run_a", "run_b", 10)  # p10 is not shared
    assert test.difference == pytest.approx(3 / 10)  # B is right on 3 more of the 10 shared problems
    assert (test.first_only, test.second_only) == (0, 3)  # only run_a right, only run_b right
    # exact McNemar: 3 discordant problems, all one way: p = 2 * (1/2)^3 = 0.25
    assert test.p_value == pytest.approx(0.25)
    # Newcombe's interval (tests/test_statistics.py checks it against published values) holds the difference
    assert test.ci_low < 0.3 < test.ci_high


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
    assert "default-src 'none'" in page  # nothing may be fetched: the page opens offline as it is
    assert "run_a" in capsys.readouterr().out
    assert render_html(compare(runs)).count("<table>") == 3


def test_main_refuses_fewer_than_two_runs_and_non_runs(runs, tmp_path, capsys):
    assert main([str(runs[0])], None) == 2
    assert main([str(runs[0]), str(tmp_path / "nowhere")], None) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_lift_over_the_base_model_hand_computed(runs):
    a, _ = runs
    # run_a's base model (round 0) was right on p0, p1 and p8; its final round on p0..p3
    save_rows([{"problem_id": p, "index": 0, "correct": p in ("p0", "p1", "p8"), "completion": "base"}
               for p in PROBLEMS], a / "round_000" / "evaluate" / "data")
    lifts = compare(runs).lifts
    assert [(t.baseline, t.other) for t in lifts] == [("run_a round 0", "run_a round 2")]  # run_b has no round-0 rows
    lift = lifts[0]
    assert lift.problems == 10 and (lift.first_only, lift.second_only) == (1, 2)  # p8; p2 and p3
    assert lift.difference == pytest.approx(1 / 10)
    # exact McNemar: 2 of 3 discordant problems one way: p = 2 · P(X <= 1 | 3, 1/2) = 2 · 4/8, capped at 1
    assert lift.p_value == pytest.approx(1.0)
    assert "Lift over the base model" in render_text(compare(runs))
