"""What a run prints: its own progress and tables on the console, library logs in the run directory, and no line
that reads like a failure during normal operation."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALARMING = re.compile(r"warn|error|fail|traceback|killing|not preloaded|insecure|deprecat", re.I)


def test_a_normal_run_keeps_library_chatter_out_of_the_console(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "selfimprove.cli", "run", str(REPO / "tests" / "pipelines" / "tiny_grpo.yaml"),
           "rounds=1", "stages.rl.steps=1", "--run-dir", str(run_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    # progress bars redraw with \r; judge the lines a user is left with
    lines = [part.strip() for line in console.splitlines() for part in line.split("\r") if part.strip()]
    alarming = [line for line in lines if ALARMING.search(line)]
    assert not alarming, "\n".join(alarming[:20])
    assert any(line.startswith("[round 1] rl:") for line in lines)  # one summary line per stage
    assert sum("accuracy [95% CI]" in line for line in lines) >= 2  # the table after round 0 and at the end
    log = (run_dir / "logs" / "libraries.log").read_text()
    assert "vllm" in log and len(log.splitlines()) > 5  # vLLM's start-up went to the file


def test_training_loss_dicts_go_to_the_log_and_the_bar_stays(tmp_path, capfd):
    """A transformers Trainer (as TRL's are) keeps its step bar on the console, but the dict it prints under the
    bar at every logging step goes to libraries.log."""
    import torch
    from transformers import Trainer, TrainingArguments

    from selfimprove.console import library_logs, quiet_training_logs

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def forward(self, x, labels):
            return {"loss": ((self.w(x).squeeze(-1) - labels) ** 2).mean()}

    data = [{"x": torch.ones(2), "labels": torch.tensor(1.0)}] * 4
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, logging_steps=1, report_to=[],
                             per_device_train_batch_size=2, use_cpu=True, disable_tqdm=False, save_strategy="no")
    with library_logs(tmp_path) as log:
        trainer = Trainer(model=Tiny(), args=args, train_dataset=data)
        quiet_training_logs(trainer)
        trainer.train()
    console = "".join(capfd.readouterr())
    assert "2/2" in console  # the bar
    assert "'loss'" not in console
    assert "step 2: {'loss'" in log.read_text()
