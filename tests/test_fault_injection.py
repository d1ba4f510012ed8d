"""Crash safety to the step, end to end: tiny STaR (one round) SIGKILLed through the real command line inside a
critique stage, inside training right after its first checkpoint, and between training and evaluation — one kill
per attempt, the same command run again each time — must end with exactly the uninterrupted run's results (every
manifest's metrics and checksums, every row, every adapter, metrics.jsonl, the reports) and leave no process of
any killed attempt alive. tests/fault_inject.py does the work; this runs its functions, and
tests/run_diff.py compares.

The kills are placed so that only the first and last attempts start the engine (critique_rationalize, filter and
train need none): one reference run and four attempts, two of them short.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests import fault_inject as fi
from tests.run_diff import run_differences

REPO = Path(__file__).resolve().parents[1]
TINY_STAR = REPO / "tests" / "pipelines" / "tiny_star.yaml"
# Four chunks in the rationalizations' critique (8 unsolved problems, 2 a chunk), so that a kill can fall between
# two of them; a checkpoint after every training step, so that a kill after the first leaves two steps to resume;
# no round 0, which would only add an evaluation.
OVERRIDES = ["rounds=1", "evaluate_base=false", "stages.critique_rationalize.chunking.size=2",
             "stages.train.trainer.optim.checkpoint_every=1"]
KILLS = ["round_001/critique_rationalize/shards/00-00001",  # inside critique: chunk 2 of 4 saved
         "round_001/train/trainer/checkpoint-1/checkpoint_complete.json",  # inside training, after a checkpoint
         "round_001/train/manifest.json"]  # between stages: train done, evaluate not started




def quiet(*_):
    pass


def test_killed_inside_critique_training_and_between_stages_ends_as_if_never_killed(tmp_path):
    from selfimprove.artifacts import read_json

    reference = fi.run_reference(TINY_STAR, OVERRIDES, tmp_path, log=quiet)
    at_once = {p.trigger: p for points in fi.catalogue(reference).values() for p in points if p.span == 0}
    assert all(k in at_once for k in KILLS), f"the reference run never wrote some of {KILLS}: {sorted(at_once)}"
    assert [at_once[k].category for k in KILLS] == ["critique", "training", "between_stages"]

    trial = fi.run_trial(reference, [at_once[k] for k in KILLS], index=1, log=quiet)

    assert trial.error is None, trial.error
    assert [k.fired for k in trial.kills] == [True, True, True]
    assert trial.attempts == 4
    landed = dict(k.landed for k in trial.kills)
    assert list(landed) == ["round_001/critique_rationalize", "round_001/train", "round_001/evaluate"], landed
    assert "shards/00-00001" in landed["round_001/critique_rationalize"], landed
    assert "trainer/checkpoint-1/checkpoint_complete.json" in landed["round_001/train"], landed
    # The training that finished resumed from the checkpoint the kill left (it did not start over).
    assert read_json(trial.run_dir / "round_001" / "train" / "manifest.json")["metrics"]["resumed_from_step"] == 1
    assert [k.left for k in trial.kills] == [[], [], []] and trial.left_at_end == []
    assert trial.differences == [], "\n".join(map(str, trial.differences))

    # The comparison sees a result that differs (a metric, an adapter, a sample, the report), and not a timing
    # field.
    tampered = tmp_path / "tampered"
    shutil.copytree(trial.run_dir, tampered)
    _tamper(tampered)
    found = run_differences(reference.run_dir, tampered)
    assert any(d.startswith("round_001/train/manifest.json: .metrics.final_loss:") for d in found), found
    assert any(d.startswith("round_001/train/adapter/adapter_model.safetensors:") for d in found), found
    assert any(d.startswith("round_001/generate/data: [3].completion:") for d in found), found
    # The manifests' checksums no longer match the tampered adapter and rows: said once per manifest.
    assert any(d.startswith("round_001/train/manifest.json: its checksums") for d in found), found
    assert any(d.startswith("report.md: .text:") for d in found), found
    assert not any("seconds" in d or "peak_rss" in d for d in found), found


def _tamper(run_dir: Path) -> None:
    from selfimprove.artifacts import load_rows, read_json, save_rows, write_json

    manifest = run_dir / "round_001" / "train" / "manifest.json"
    m = read_json(manifest)
    m["metrics"]["final_loss"] += 1e-6
    m["metrics"]["train_seconds"] += 100  # timing: not a difference
    m["seconds"] += 100
    m["peak_rss_mib"] += 100
    write_json(manifest, m)
    weights = run_dir / "round_001" / "train" / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    rows = load_rows(run_dir / "round_001" / "generate" / "data")
    rows[3]["completion"] += "!"
    save_rows(rows, run_dir / "round_001" / "generate" / "data")
    report = run_dir / "report.md"
    report.write_text(report.read_text() + "\nA line the run did not write.\n")


def test_survivors_are_the_run_s_processes_and_its_token_carriers():
    """The no-survivor check above is only as good as its search: it finds a process the run had and a process
    that carries the run's token, and none once they are gone."""
    import os
    import subprocess

    import psutil

    from selfimprove.lifecycle import RUN_TOKEN

    had = subprocess.Popen(["sleep", "30"])
    carrier = subprocess.Popen(["sleep", "30"], env=dict(os.environ, **{RUN_TOKEN: "t0ken"}))
    stranger = subprocess.Popen(["sleep", "30"], env=dict(os.environ, **{RUN_TOKEN: "other"}))
    try:
        known = {had.pid: psutil.Process(had.pid).create_time(), 1: 0.0}  # pid 1 with a wrong create time: reused
        assert sorted(p.pid for p in fi.survivors(known, "t0ken", wait_s=0)) == sorted([had.pid, carrier.pid])
        for proc in (had, carrier):
            proc.kill()
            proc.wait()
        assert fi.survivors(known, "t0ken", wait_s=0) == []
    finally:
        for proc in (had, carrier, stranger):
            proc.kill()
            proc.wait()
