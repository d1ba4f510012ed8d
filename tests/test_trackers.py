"""`report_to`: tensorboard and trackio (both offline) receive a tiny run's config, stage metrics per round, every
training step and every RL step, in one tracker run that a resumed pipeline appends to."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from selfimprove.config import ConfigError
from selfimprove.pipeline import Runner, load_pipeline

REPO = Path(__file__).resolve().parents[1]


def scalars(log_dir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list] = {}
    for events in sorted(log_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_tensorboard_and_trackio_receive_stage_and_training_metrics_in_one_resumed_run(engine, tmp_path):
    from trackio.sqlite_storage import SQLiteStorage

    run_dir = tmp_path / f"star-{uuid.uuid4().hex[:8]}"
    overrides = ["rounds=1", "evaluate_base=false", "report_to=[tensorboard, trackio]"]
    pipeline = load_pipeline(REPO / "tests" / "pipelines" / "tiny_star.yaml", overrides)
    Runner(pipeline, run_dir, engine=engine, log=lambda *a: None).run()
    tb = scalars(run_dir / "tensorboard")
    assert [v for _, v in tb["train/step/loss"]] and len(tb["train/step/loss"]) >= 3  # every logged training step
    assert tb["evaluate/accuracy"][0][1] == pytest.approx(0.0) and tb["generate/samples"][0][1] == 32
    assert tb["filter/examples"] and tb["critique/verdicts"][0][1] == 32
    logs = SQLiteStorage.get_logs("selfimprove", run_dir.name)
    assert any("train/step/loss" in entry for entry in logs) and any("evaluate/accuracy" in entry for entry in logs)
    steps = sorted(s for series in tb.values() for s, _ in series)

    # a second round on the same run directory resumes the same tracker run; steps keep increasing
    Runner(load_pipeline(REPO / "tests" / "pipelines" / "tiny_star.yaml", [*overrides, "rounds=2"]), run_dir,
           engine=engine, log=lambda *a: None).run()
    tb = scalars(run_dir / "tensorboard")
    later = sorted(s for series in tb.values() for s, _ in series)[len(steps):]
    assert later and min(later) > max(steps)
    assert len(tb["evaluate/accuracy"]) == 2 and tb["evaluate/round"][-1][1] == 2
    assert SQLiteStorage.get_runs("selfimprove").count(run_dir.name) == 1


def test_rl_steps_reach_the_tracker(engine, tmp_path):
    overrides = ["rounds=1", "evaluate_base=false", "stages.rl.steps=2", "report_to=[tensorboard]"]
    pipeline = load_pipeline(REPO / "tests" / "pipelines" / "tiny_grpo.yaml", overrides)
    Runner(pipeline, tmp_path / "run", engine=engine, log=lambda *a: None).run()
    tb = scalars(tmp_path / "run" / "tensorboard")
    assert len(tb["rl/step/reward/attempt1"]) == 2 and len(tb["rl/step/update_seconds"]) == 2
    assert tb["rl/steps"][0][1] == 2


def test_unknown_or_missing_tracker_is_a_load_error(monkeypatch):
    import importlib.util

    path = REPO / "tests" / "pipelines" / "tiny_star.yaml"
    with pytest.raises(ConfigError, match="report_to: unknown tracker 'neptune'; valid: trackio, tensorboard"):
        load_pipeline(path, ["report_to=[neptune]"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="report_to: wandb is not installed: pip install wandb"):
        load_pipeline(path, ["report_to=[wandb]"])
