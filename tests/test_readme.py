"""The README's plugin examples, executed: the `# mycritics.py` and `# mypipeline.yaml` blocks are written to a
folder exactly as a user would save them, the pipeline loads with that folder on PYTHONPATH (through the real
CLI), and both critics judge samples as the README says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_block(first_line: str) -> str:
    """The fenced code block of README.md whose first line is `first_line`."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if b.splitlines()[0].strip() == first_line]
    return block


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    (tmp_path / "mycritics.py").write_text(readme_block("# mycritics.py"))
    (tmp_path / "mypipeline.yaml").write_text(readme_block("# mypipeline.yaml"))  # includes a shipped pipeline
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("mycritics", None)


def test_readme_pipeline_with_plugin_critics_passes_check(user_folder):
    env = {"PYTHONPATH": str(user_folder), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "selfimprove.cli", "run", str(user_folder / "mypipeline.yaml"), "--check"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ok (7 stages x 3 rounds)" in proc.stdout
    # without the folder on PYTHONPATH the error says how to fix it
    proc = subprocess.run(cmd, cwd=REPO, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)
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
