"""benchmarks/lm_eval_agreement.py on hand-made generations: lm-evaluation-harness's own grading against ours."""

import importlib.util
from pathlib import Path

import pytest

from selfimprove.artifacts import save_rows
from selfimprove.tasks.gsm8k import GSM8K
from selfimprove.tasks.math import MATH500

pytest.importorskip("lm_eval")  # the `bench` extra
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lm_eval_agreement.py"


def agreement():
    spec = importlib.util.spec_from_file_location("lm_eval_agreement", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def graded_rows(task, completions: list[str]) -> list[dict]:
    rows = []
    for problem, completion in zip(task.problems("test"), completions):
        g = task.grade(problem, completion)
        rows.append({**problem, "index": 0, "completion": completion, "correct": g.strict,
                     "correct_flexible": g.flexible})
    return rows


def test_gsm8k_agreement(tmp_path, capsys):
    task = GSM8K(GSM8K.Config())
    gold = [p["answer"] for p in task.problems("test")[:6]]
    completions = [f"So it is {gold[0]}. The answer is {gold[0]}.", f"The answer is {int(gold[1]) + 1}.",
                   f"I think {gold[2]}", "", f"The answer is {int(gold[4]):,}.", f"The answer is {gold[5]}"]
    save_rows(graded_rows(task, completions), tmp_path / "data")
    module = agreement()
    harness = module.gsm8k_harness(module.first_samples(tmp_path))
    assert harness["strict-match"] == [True, False, False, False, True, False]  # no final "." on the last one
    assert harness["flexible-extract"] == [True, False, True, False, True, True]
    assert module.main([str(tmp_path), "--tolerance", "100"]) == 0
    assert "strict-match" in capsys.readouterr().out
    assert module.main([str(tmp_path), "--tolerance", "0.5"]) == 1  # ours accepts "The answer is N" without "."


def test_math_agreement(tmp_path, capsys):
    task = MATH500(MATH500.Config())
    problems = task.problems("test")[:4]
    completions = [f"Thus $\\boxed{{{problems[0]['answer']}}}$.", "\\boxed{12345}", "",
                   f"The final answer is ${problems[3]['answer']}$."]
    save_rows(graded_rows(task, completions), tmp_path / "data")
    module = agreement()
    assert module.math_harness(module.first_samples(tmp_path))["math_verify"] == [True, False, False, True]
    assert module.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "math_verify" in out and "within" in out
