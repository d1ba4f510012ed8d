"""`report_to`: tensorboard and trackio (both offline) receive a tiny run's config, stage metrics per round, every
training step and every RL step, in one tracker run that a resumed pipeline appends to."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from selfimprove import trackers
from selfimprove.config import ConfigError, to_dict
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
    with pytest.raises(ConfigError, match=r"tiny_star.yaml\): report_to\[1\]: unknown tracker 'tensorbord'; "
                                          r"did you mean 'tensorboard'\? valid names: mlflow, tensorboard, trackio, "
                                          r"wandb \(or a dotted path package.module:Name to your own\)"):
        load_pipeline(path, ["report_to=[trackio, tensorbord]"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"report_to\[0\]: tracker 'wandb' is not installed: pip install wandb"):
        load_pipeline(path, ["report_to=[wandb]"])
    with pytest.raises(ConfigError, match=r"report_to\[0\]: 'tests.plugins:accept_all' is not a subclass of "
                                          r"selfimprove.trackers.Tracker"):
        load_pipeline(path, ["report_to=[tests.plugins:accept_all]"])


def test_a_tracker_of_your_own_by_dotted_path(tmp_path):
    """A user's tracker receives finite scalars under one step counter, and a second pipeline run on the same run
    directory reopens its run (same id) with steps that keep increasing."""
    pipeline = load_pipeline(REPO / "tests" / "pipelines" / "tiny_star.yaml",
                             ["report_to=[tests.plugins:RecordingTracker]"])
    for _ in range(2):
        with trackers.Trackers(pipeline.config.report_to, tmp_path, to_dict(pipeline.config)) as active:
            active.stage = "train"
            trackers.log({"accuracy": 0.5, "kept": 3, "note": "text", "flag": True, "bad": float("nan")}, "evaluate/")
            trackers.log_step({"loss": 1.5})
            trackers.log({"note": "nothing to log"})
        assert trackers.active() is None
    run_id = f"rec-{tmp_path.name}"
    once = [{"start": run_id, "name": pipeline.config.name},
            {"step": 1, "evaluate/accuracy": 0.5, "evaluate/kept": 3.0}, {"step": 2, "train/step/loss": 1.5},
            {"finish": run_id}]
    recorded = [json.loads(line) for line in (tmp_path / "recorded.jsonl").read_text().splitlines()]
    assert recorded[:4] == once and recorded[4:] == [once[0], {**once[1], "step": 3}, {**once[2], "step": 4}, once[3]]
