"""The README's plugin and data examples, executed: the `# mycritics.py`, `# mypipeline.yaml`, `# mydata.yaml` and
JSONL blocks are written to an empty folder outside the checkout exactly as a user would save them; from there,
with the package importable and that folder on PYTHONPATH, `selfimprove run ... --check` accepts them, a bad row is
refused naming its row, and `mydata.yaml` runs for real (on the tiny model); both critics judge samples as the
README says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_console import ALARMING

REPO = Path(__file__).resolve().parents[1]


def readme_block(first_line: str, prefix: bool = False) -> str:
    """The fenced code block of README.md whose first line is `first_line` (or starts with it, with `prefix`)."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if (b.splitlines()[0].startswith(first_line) if prefix
                                      else b.splitlines()[0].strip() == first_line)]
    return block


def selfimprove(folder, *args, timeout=120):
    """The `selfimprove` command run from `folder` as a user runs it: their folder on PYTHONPATH, the package
    importable (here from the checkout, as an installed package would be). `-P`: like the `selfimprove` script,
    Python does not put the working directory on the path by itself, so PYTHONPATH is what makes plugins import."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([".", str(REPO)]), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-P", "-m", "selfimprove.cli", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    (tmp_path / "mycritics.py").write_text(readme_block("# mycritics.py"))
    (tmp_path / "mypipeline.yaml").write_text(readme_block("# mypipeline.yaml"))  # includes a shipped pipeline
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("mycritics", None)


def test_readme_pipeline_with_plugin_critics_passes_check(user_folder):
    proc = selfimprove(user_folder, "run", "mypipeline.yaml", "--check")
    assert proc.returncode == 0, proc.stderr
    assert "ok (7 stages x 3 rounds)" in proc.stdout
    # without the folder on PYTHONPATH the error says how to fix it
    proc = subprocess.run([sys.executable, "-P", "-m", "selfimprove.cli", "run", "mypipeline.yaml", "--check"],
                          cwd=user_folder, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "cannot import module 'mycritics'" in proc.stderr and "PYTHONPATH" in proc.stderr


def test_readme_critics_judge_as_described(user_folder):
    from selfimprove.critics import CriticContext
    from selfimprove.pipeline import load_pipeline

    pipeline = load_pipeline(user_folder / "mypipeline.yaml")
    critics = {c.id: c for c in pipeline.config.stages["critique"].config.critics}
    assert list(critics) == ["answer", "mycritics:short_and_correct", "steps"]
    task = pipeline.config.task.build()
    problem = task.problems("test")[0]
    answer = problem["answer"]
    samples = [{**problem, "completion": f"Add the digits.\nThe answer is {answer}."},  # correct, 2 lines
               {**problem, "completion": f"The answer is {answer}."},  # correct, 1 line
               {**problem, "completion": "The answer is -1."}]  # wrong
    context = CriticContext(task=task)
    short = critics["mycritics:short_and_correct"].build(context).judge(samples)
    assert [v.label for v in short] == [True, True, False]
    steps = critics["steps"].build(context).judge(samples)
    assert [v.label for v in steps] == [True, False, False] and steps[0].rationale == "2 lines"


# Other problems than the README's train rows (train and test are kept disjoint, so the same rows would leave no
# training data), in the same shape.
TEST_ROWS = [
    {"uid": "eggs-1", "problem": "A hen lays 4 eggs a day. How many eggs in 2 days?", "final_answer": "8",
     "worked_solution": "4 * 2 = 8.\nThe answer is 8."},
    {"uid": "books-1", "problem": "Ann has 10 books and gives away 4. How many are left?", "final_answer": "6",
     "worked_solution": "10 - 4 = 6.\nThe answer is 6."},
]


def test_readme_data_section_from_an_empty_folder(tmp_path):
    folder = tmp_path / "myproject"  # outside the checkout, as a user's folder is
    (folder / "data").mkdir(parents=True)
    (folder / "mydata.yaml").write_text(readme_block("# mydata.yaml"))
    train = readme_block('{"uid"', prefix=True)
    (folder / "data" / "train.jsonl").write_text(train)
    (folder / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEST_ROWS))
    assert len(train.splitlines()) == 3

    proc = selfimprove(folder, "run", "mydata.yaml", "--check")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "mydata.yaml: ok (4 stages x 2 rounds)"

    # a row with a null answer fails the check, naming the row and column; no run directory is made
    bad = [*TEST_ROWS, {**TEST_ROWS[0], "uid": "eggs-2", "final_answer": None}]
    (folder / "data" / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    proc = selfimprove(folder, "run", "mydata.yaml", "task.test.path=data/bad.jsonl", "--check")
    assert proc.returncode == 2
    assert "data/bad.jsonl row 3, column 'final_answer' (columns.answer): None is not an answer" in proc.stderr
    assert proc.stderr.startswith("config error: ") and len(proc.stderr.splitlines()) == 1
    assert not (folder / "runs").exists()

    # a real run, from the same folder: two SPIN iterations on the tiny model, into runs/<name>
    proc = selfimprove(folder, "run", "mydata.yaml", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = folder / "runs" / "spin-on-my-data"
    evaluated = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {m["round"] for m in evaluated if m["stage"] == "evaluate"} == {0, 1, 2}
    assert "accuracy [95% CI]" in proc.stdout
    # a quiet console: no loss dicts under the training bar, no weight-loading bars, no warnings (they are in the log)
    lines = [part.strip() for line in (proc.stdout + proc.stderr).splitlines() for part in line.split("\r")]
    noisy = [line for line in lines if ALARMING.search(line) or re.search(r"'loss'|Loading|Triton", line)]
    assert not noisy, "\n".join(noisy[:20])
    assert "'loss'" in (run / "logs" / "libraries.log").read_text()
    from datasets import load_from_disk

    ids = set(load_from_disk(str(run / "round_001" / "generate" / "data"))["problem_id"])
    assert ids == {"apples-1", "pens-1", "cake-1"}  # columns.id names the problems
