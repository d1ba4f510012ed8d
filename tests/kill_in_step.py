"""Kill a training in the middle of a step: the parent starts `python -m <test module> <args...> <ready>` and
SIGKILLs it once it signals (the file `ready` exists); the child, in its `__main__`, calls `hang_in_step(ready)`
before training, so that it stops inside step 5 with steps 1-4 (and their checkpoints) done."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def hang_in_step(ready: str, done: int = 4) -> None:
    """In the child: once `done` optimizer steps are finished, touch `ready` and hang in the next one."""
    from transformers import Trainer

    original = Trainer.training_step

    def hang(self, *args, **kwargs):
        if self.state.global_step == done:
            Path(ready).touch()
            time.sleep(600)
        return original(self, *args, **kwargs)

    Trainer.training_step = hang


def kill_in_step(module: str, args: list[str], ready: Path, log: Path, timeout: float = 180) -> None:
    """In the parent: run the child until it is hanging in its step, then SIGKILL it."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, *args, str(ready)], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout
        while not ready.exists():
            assert proc.poll() is None, f"the training process ended before step 5:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, "the training process never reached step 5"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
