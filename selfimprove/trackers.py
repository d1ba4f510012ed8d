"""Experiment trackers: one tracker run per pipeline run, receiving the config, every stage's metrics per round,
every training step's logs and every RL step's metrics.

`report_to:` at the pipeline level names them: `trackio` (local, no account), `tensorboard`, `wandb`, `mlflow`, or
an empty list (the default). Each is an optional extra (`pip install -e .[track]` installs trackio and
tensorboard); a missing one is an error when the config loads, not at round 3. Keys for hosted trackers (wandb,
mlflow servers) come from their own environment variables only, never from the YAML.

One run, resumed: the tracker run is named after the run directory and its id is kept in the run directory
(`trackers.json`), so a resumed pipeline appends to the same tracker run; the step counter is kept there too, so
steps keep increasing across resumes instead of starting over.

How training logs arrive: TRL/transformers' own `report_to` would open a tracker run per training call (one per
round and stage), so the trainers instead add `TrackerCallback`, which forwards each `on_log` to the pipeline's
tracker; the policy-gradient stage logs its steps the same way.
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
from pathlib import Path
from typing import Any

# tracker name → the module it needs
MODULES = {"trackio": "trackio", "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
_ACTIVE: "Trackers | None" = None


def check(names: list[str]) -> None:
    """Config-time check: known names, installed packages (raises ValueError naming the fix)."""
    for name in names:
        if name not in MODULES:
            raise ValueError(f"report_to: unknown tracker {name!r}; valid: {', '.join(MODULES)}")
        if importlib.util.find_spec(MODULES[name]) is None:
            raise ValueError(f"report_to: {name} is not installed: pip install {MODULES[name]} "
                             f"(or `pip install -e .[track]` for trackio and tensorboard)")


def active() -> "Trackers | None":
    """The running pipeline's trackers, for trainers and stages that log steps."""
    return _ACTIVE


def log(metrics: dict, prefix: str = "") -> None:
    """Log to the running pipeline's trackers, if any (a no-op without `report_to`)."""
    if _ACTIVE is not None:
        _ACTIVE.log(metrics, prefix)


class Trackers:
    """The pipeline's trackers as one: `with Trackers(names, run_dir, config):` makes them the active ones."""

    def __init__(self, names: list[str], run_dir: Path, config: dict):
        self.names, self.run_dir, self.config = list(names), Path(run_dir), config
        self.stage = ""  # the stage running now: training and RL steps are logged under "<stage>/step/"
        self.state_path = self.run_dir / "trackers.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"step": 0, "ids": {}}
        self.backends: list[Any] = []

    def __enter__(self) -> "Trackers":
        global _ACTIVE
        run_name = self.run_dir.name
        for name in self.names:
            backend = BACKENDS[name](self.run_dir, run_name, self.state["ids"].get(name))
            backend.start(self.config)
            self.state["ids"][name] = backend.run_id
            self.backends.append(backend)
        self._save()
        _ACTIVE = self if self.backends else None
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = None
        for backend in self.backends:
            backend.finish()
        self._save()

    def log(self, metrics: dict, prefix: str = "") -> None:
        scalars = {f"{prefix}{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, numbers.Number) and not isinstance(v, bool) and math.isfinite(float(v))}
        if not scalars or not self.backends:
            return
        self.state["step"] += 1
        for backend in self.backends:
            backend.log(scalars, self.state["step"])
        self._save()

    def _save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.state_path)


class _Trackio:
    def __init__(self, run_dir: Path, run_name: str, run_id: str | None):
        self.run_name, self.run_id = run_name, run_id or run_name

    def start(self, config: dict) -> None:
        import trackio

        # project: the pipeline's runs_dir folder name groups runs the way a researcher keeps them
        trackio.init(project="selfimprove", name=self.run_id, config=config, resume="allow")

    def log(self, metrics: dict, step: int) -> None:
        import trackio

        trackio.log(metrics, step=step)

    def finish(self) -> None:
        import trackio

        trackio.finish()


class _TensorBoard:
    def __init__(self, run_dir: Path, run_name: str, run_id: str | None):
        self.log_dir, self.run_id = run_dir / "tensorboard", run_id or run_name

    def start(self, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir))  # a resumed run appends a new event file
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run_dir: Path, run_name: str, run_id: str | None):
        self.run_dir, self.run_name, self.run_id = run_dir, run_name, run_id

    def start(self, config: dict) -> None:
        import wandb

        run = wandb.init(project="selfimprove", name=self.run_name, id=self.run_id, resume="allow", config=config,
                         dir=str(self.run_dir))
        self.run_id = run.id

    def log(self, metrics: dict, step: int) -> None:
        import wandb

        wandb.log(metrics, step=step)

    def finish(self) -> None:
        import wandb

        wandb.finish()


class _MLflow:
    def __init__(self, run_dir: Path, run_name: str, run_id: str | None):
        self.run_name, self.run_id = run_name, run_id

    def start(self, config: dict) -> None:
        import mlflow

        new = self.run_id is None
        run = mlflow.start_run(run_id=self.run_id, run_name=self.run_name if new else None)
        self.run_id = run.info.run_id
        if new:  # params cannot be logged twice with other values; a resumed run's config is the same anyway
            mlflow.log_params({k: json.dumps(v, default=str)[:500] for k, v in _flat(config).items()})

    def log(self, metrics: dict, step: int) -> None:
        import mlflow

        mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()}, step=step)

    def finish(self) -> None:
        import mlflow

        mlflow.end_run()


BACKENDS = {"trackio": _Trackio, "tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
