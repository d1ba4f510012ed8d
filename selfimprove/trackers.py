"""Experiment trackers (`report_to:`; the README lists the shipped ones): one tracker run per pipeline run, receiving
the config, every stage's metrics per round, every training step's logs and every RL step's metrics.

One run, resumed: the tracker run is named after the run directory and its id is kept in the run directory
(`trackers.json`), so a resumed pipeline appends to the same tracker run; the step counter is kept there too, so
steps keep increasing across resumes instead of starting over. A missing tracker package is an error when the
config loads, not at round 3.

How training logs arrive: TRL/transformers' own `report_to` would open a tracker run per training call (one per
round and stage), so the trainers instead add `TrackerCallback`, which forwards each `on_log` to the pipeline's
tracker; the policy-gradient stage logs its steps the same way.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import numbers
from pathlib import Path

from .artifacts import read_json, write_json
from .config import ConfigError, flatten
from .registry import TRACKERS, Component

_ACTIVE: "Trackers | None" = None


class Tracker:
    """A tracker of your own subclasses this: `start(run_config)` opens its run, or reopens `run_id` (kept in the
    run directory; None at first) and sets `run_id` to the run's id; `log(metrics, step)` receives finite scalars
    under one step counter that keeps increasing across resumes; `finish()` closes it."""

    module: str | None = None  # the package it needs, checked when the config loads

    def __init__(self, config, run_dir: Path, run_name: str, run_id: str | None):
        self.config, self.run_dir, self.run_name, self.run_id = config, run_dir, run_name, run_id


class TrackerSpec(Component):
    registry = TRACKERS

    @classmethod
    def resolve(cls, name: str, params: dict, where: str, key: str):
        spec = super().resolve(name, params, where, key)
        if not (inspect.isclass(spec.target) and issubclass(spec.target, Tracker)):
            raise ConfigError(f"{where}: {key}: {name!r} is not a subclass of selfimprove.trackers.Tracker")
        if spec.target.module and importlib.util.find_spec(spec.target.module) is None:
            raise ConfigError(f"{where}: {key}: tracker {name!r} is not installed: pip install {spec.target.module} "
                              f"(or `pip install -e .[track]` for trackio and tensorboard)")
        return spec


def active() -> "Trackers | None":
    """The running pipeline's trackers, for trainers and stages that log steps."""
    return _ACTIVE


def log(metrics: dict, prefix: str = "") -> None:
    """Log to the running pipeline's trackers, if any (a no-op without `report_to`)."""
    if _ACTIVE is not None:
        _ACTIVE.log(metrics, prefix)


class Trackers:
    """The pipeline's trackers as one: `with Trackers(specs, run_dir, config):` makes them the active ones."""

    def __init__(self, specs: list[TrackerSpec], run_dir: Path, config: dict):
        self.specs, self.run_dir, self.config = list(specs), Path(run_dir), config
        self.stage = ""  # the stage running now: training and RL steps are logged under "<stage>/step/"
        self.state_path = self.run_dir / "trackers.json"
        self.state = read_json(self.state_path) if self.state_path.exists() else {"step": 0, "ids": {}}
        self.trackers: list[Tracker] = []

    def __enter__(self) -> "Trackers":
        global _ACTIVE
        for spec in self.specs:
            tracker = spec.build(self.run_dir, self.run_dir.name, self.state["ids"].get(spec.name))
            tracker.start(self.config)
            self.state["ids"][spec.name] = tracker.run_id
            self.trackers.append(tracker)
        write_json(self.state_path, self.state)
        _ACTIVE = self if self.trackers else None
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = None
        for tracker in self.trackers:
            tracker.finish()
        write_json(self.state_path, self.state)

    def log(self, metrics: dict, prefix: str = "") -> None:
        scalars = {f"{prefix}{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, numbers.Number) and not isinstance(v, bool) and math.isfinite(float(v))}
        if not scalars or not self.trackers:
            return
        self.state["step"] += 1
        for tracker in self.trackers:
            tracker.log(scalars, self.state["step"])
        write_json(self.state_path, self.state)


@TRACKERS.register("tensorboard")
class TensorBoard(Tracker):
    module = "tensorboard"

    def start(self, run_config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))  # a resumed run appends a new file
        self.writer.add_text("config", "```\n" + json.dumps(run_config, indent=2, default=str) + "\n```")

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


@TRACKERS.register("wandb")
class Wandb(Tracker):
    module = "wandb"

    def start(self, run_config: dict) -> None:
        import wandb

        self.lib = wandb
        self.run_id = wandb.init(project="selfimprove", name=self.run_name, id=self.run_id, resume="allow",
                                 config=run_config, dir=str(self.run_dir)).id

    def log(self, metrics: dict, step: int) -> None:
        self.lib.log(metrics, step=step)

    def finish(self) -> None:
        self.lib.finish()


@TRACKERS.register("trackio")
class Trackio(Wandb):
    """trackio logs through wandb's API; it finds a run to resume by its name."""

    module = "trackio"

    def start(self, run_config: dict) -> None:
        import trackio

        self.lib, self.run_id = trackio, self.run_id or self.run_name
        trackio.init(project="selfimprove", name=self.run_id, config=run_config, resume="allow")


@TRACKERS.register("mlflow")
class MLflow(Tracker):
    module = "mlflow"

    def start(self, run_config: dict) -> None:
        import mlflow

        self.mlflow, new = mlflow, self.run_id is None
        self.run_id = mlflow.start_run(run_id=self.run_id, run_name=self.run_name if new else None).info.run_id
        if new:  # params cannot be logged twice with other values; a resumed run's config is the same anyway
            mlflow.log_params({k: json.dumps(v, default=str)[:500] for k, v in flatten(run_config).items()})

    def log(self, metrics: dict, step: int) -> None:
        self.mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()}, step=step)

    def finish(self) -> None:
        self.mlflow.end_run()


def log_step(metrics: dict) -> None:
    """One training or RL step of the running stage, logged under "<stage>/step/"."""
    if _ACTIVE is not None:
        _ACTIVE.log(metrics, f"{_ACTIVE.stage}/step/")


def training_callback():
    """A transformers TrainerCallback forwarding a training call's logs (loss, grad norm, learning rate, ...) to
    the pipeline's trackers as steps of the running stage; None when no tracker is active."""
    if _ACTIVE is None:
        return None
    from transformers import TrainerCallback

    class TrackerCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                log_step({**logs, "global_step": state.global_step})

    return TrackerCallback()
