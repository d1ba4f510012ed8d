#!/usr/bin/env python
"""Fault injection: SIGKILL a pipeline run at chosen moments, run the same command again until it finishes, and
check that it ends exactly where an uninterrupted run ends.

    python scripts/fault_inject.py tests/pipelines/tiny_star.yaml --kills 6 --seed 0 rounds=1

The README promises that a run killed at any point and started again gives the result an uninterrupted run gives
(generation and critique resume per chunk, training from its newest checkpoint, RL from its newest step). Unit
tests check each mechanism on its own; this script checks the promise on the whole pipeline, at moments nobody
chose by hand, through the real command line in real processes, and that no process of a killed run survives it.

How:
1. The reference: `python -m selfimprove.cli run PIPELINE --run-dir WORK/live overrides...`, uninterrupted, while
   the run directory is polled and the moment every resume-relevant path first appears is recorded (stage folders,
   generation/critique/evaluation shards, data/, trainer checkpoints, RL versions, adapters, manifests, plots,
   report.md). Then WORK/live is renamed WORK/reference.
2. The candidates: from that timeline, the moments a kill can aim at, by category (`CATEGORIES`): right after a
   path appears (a chunk saved, a checkpoint complete, a step's version committed, a manifest written, a plot
   drawn), or a fraction of a span after it (a stage's start + a share of its duration, a version + a share of the
   next step). `--seed` picks `--kills` of them (categories in turn, so that N kills cover min(N, #categories)
   categories) and the fractions, so a failing campaign reruns the same way, up to the machine's timing.
3. Each trial: the same command on a fresh WORK/live, in its own session; the run directory is polled every 2 ms
   for the kill's trigger path; after its delay the whole process group gets SIGKILL. Where the kill landed is
   read off the run directory (which stage was unfinished, what it had written). Then the same command again
   (with `--chain K`, killed again at the trial's next point) until it exits 0; WORK/live becomes WORK/trial-NN.
4. After every kill: no process of the killed run may survive it (its process group, its descendants, the
   lifecycle watchdog, and any process carrying the run's SELFIMPROVE_RUN_TOKEN, VLLM::EngineCore and
   VLLM::Worker included) — `reap_children_on_exit` must have ended them within `--reap-wait` seconds.
5. Every trial is compared with the reference, file by file (`compare_runs`).

Every run uses the same absolute run directory (WORK/live) so that the paths recorded inside the outputs (a
sample's weights, weights.json, merged.json) are the same bytes, and checksums can be compared exactly.

Exit status 0 only when every trial finished with results identical to the reference, no process survived any
kill, and at least one kill fired.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import html
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python scripts/fault_inject.py`: sys.path[0] is scripts/
    sys.path.insert(0, str(REPO))

from selfimprove.artifacts import EMPTY_MARKER, MANIFEST, checksum_files, load_rows, read_json  # noqa: E402
from selfimprove.lifecycle import PROCESS_FILE, RUN_TOKEN  # noqa: E402
from selfimprove.records import adapter_hash  # noqa: E402
from selfimprove.trainers.common import COMPLETE  # noqa: E402

# -- what may differ between an uninterrupted run and a killed-and-resumed one ---------------------------------------
# Each entry says why it is not a result. Everything else in the run directory must be identical.

IGNORED_MANIFEST_FIELDS = {
    "seconds": "wall time of the stage: machine load, and a resumed stage only redoes what the kill interrupted",
    "finished_at": "the wall-clock time stamp of the manifest",
    "peak_rss_mib": "peak memory of the process that finished the stage; a resumed process did other work before "
                    "it (it may never have started the engine)",
    "peak_memory_mib": "peak memory summed over the run's processes, as the watchdog sampled it during the stage: "
                       "depends on when the samples fell and on what the resumed process had loaded",
}
IGNORED_METRICS = {
    "seconds": "metrics.jsonl's copy of the manifest's `seconds`",
    "train_seconds": "wall time of the training call",
    "seconds_per_step": "wall time per step of the training call (a resumed call ran fewer steps)",
    "resumed_from_step": "the checkpoint step the finishing training call resumed from: 0 in an uninterrupted run, "
                         "the checkpoint's step after a kill; it records the kill, not the result",
    "step_seconds/mean": "RL wall time per step",
    "update_seconds/mean": "RL wall time per update",
    "generate_seconds/mean": "RL sampling wall time per step",
    "weight_sync_seconds/mean": "RL weight-sync wall time per step",
    "reward_seconds/mean": "RL critic wall time per step",
}
IGNORED_STEP_FIELDS = {  # in an rl stage's steps.jsonl and versions/<k>/step.json
    "step_seconds": "RL wall time of the step",
    "update_seconds": "RL wall time of the update",
    "generate_seconds": "RL sampling wall time",
    "weight_sync_seconds": "RL weight-sync wall time",
    "reward_seconds": "RL critic wall time",
}
IGNORED_REPORT_COLUMNS = {  # in report.md's table and report.html's
    "seconds per stage": "the manifests' `seconds`",
    "peak RSS MiB": "the manifests' `peak_rss_mib`",
    "peak memory MiB, all processes": "the manifests' `peak_memory_mib`",
}
IGNORED_FILES = {
    "run.lock": "pid, host and start time of the last process that wrote the directory",
    PROCESS_FILE: "pids of the last run's processes (the lifecycle watchdog's record)",
    "memory.tsv": "the watchdog's memory samples (time stamp, MiB) of every process that ran",
    "versions.json": "the environment when the last process started (package versions, git revision): not a result",
}
IGNORED_FOLDERS = {
    "logs/": "what the processes printed (library logs with time stamps and pids, tracebacks of failed stages): a "
             "killed process's log is cut short, a resumed one's starts over; a failed stage fails its attempt anyway",
}
# Files holding one JSON record (or one per line) with timing fields in them; compared with those fields removed.
JSON_LINES_FILES = {"metrics.jsonl": IGNORED_METRICS, "steps.jsonl": IGNORED_STEP_FIELDS}
JSON_FILES = {"step.json": IGNORED_STEP_FIELDS}

# -- kill categories ------------------------------------------------------------------------------------------------

CATEGORIES = {
    "generation": "inside a generate stage (after a chunk, or a share of the stage's time after it started)",
    "critique": "inside a critique stage (after a critic's chunk, or a share of its time)",
    "selection": "inside a filter / pairs / spin_pairs stage (a share of its time, or after data/ before the "
                 "manifest)",
    "training": "inside a train stage (right after a checkpoint, a share of the next step, a share of the stage, or "
                "after the adapter before the manifest)",
    "rl_between_steps": "inside an rl stage, right after a step's version was committed",
    "rl_within_step": "inside an rl stage, a share of a step's time after the previous version",
    "evaluation": "inside an evaluating stage (after a chunk, or a share of its time)",
    "other": "inside a stage of a user's own type (a share of its time)",
    "between_stages": "right after a stage's manifest, before the next stage",
    "report": "after the last stage: before metrics.jsonl, while the plots, report.md and report.html are "
              "written",
}
STAGE_KINDS = {"generate": "generation", "critique": "critique", "filter": "selection", "pairs": "selection",
               "spin_pairs": "selection", "train": "training", "rl": "rl", "evaluate": "evaluation",
               "evaluate_self_correction": "evaluation"}


def stage_kind(manifest: dict) -> str:
    """The kill category of a stage, from its manifest (a user's stage type falls back on what it declares)."""
    kind = STAGE_KINDS.get(manifest["type"])
    if kind:
        return kind
    if manifest.get("evaluates"):
        return "evaluation"
    if "weights.json" in manifest.get("outputs", []):
        return "training"
    return "other"


# -- watching a run directory ---------------------------------------------------------------------------------------

def scan_events(run_dir: Path) -> set[str]:
    """The resume-relevant paths present in `run_dir`, relative to it: what a kill can be aimed right after.

    Hidden names are temporaries (atomic writes rename them into place); a trainer checkpoint counts once its
    completion marker exists (transformers writes its files one by one)."""
    found: set[str] = set()
    for top in _entries(run_dir):
        if top.name in ("report.md", "report.html"):
            found.add(top.name)
        elif top.name == "plots":
            found.update(f"plots/{p.name}" for p in _entries(top))
        elif top.name.startswith("round_") and top.is_dir():
            for stage in _entries(top):
                if not stage.is_dir():
                    continue
                prefix = f"{top.name}/{stage.name}"
                found.add(prefix)
                for item in _entries(stage):
                    if item.name in (MANIFEST, "data", "adapter", "weights.json"):
                        found.add(f"{prefix}/{item.name}")
                    elif item.name in ("shards", "versions"):
                        found.update(f"{prefix}/{item.name}/{p.name}" for p in _entries(item))
                    elif item.name == "trainer":
                        for ck in _entries(item):
                            if ck.name.startswith("checkpoint-") and (Path(ck.path) / COMPLETE).exists():
                                found.add(f"{prefix}/trainer/{ck.name}/{COMPLETE}")
    return found


def _entries(path) -> list[os.DirEntry]:
    """The non-hidden entries of a folder; none when it is gone or not a folder (it may vanish while we look)."""
    try:
        with os.scandir(path) as it:
            return [e for e in it if not e.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []


# -- the command ----------------------------------------------------------------------------------------------------

def run_command(pipeline: Path, run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "selfimprove.cli", "run", str(pipeline), "--run-dir", str(run_dir), *overrides]


def run_env() -> dict:
    """The repository on the path (test pipelines name plugins in `tests.plugins`), output unbuffered for the logs."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def code_fingerprint(pipeline: Path) -> str:
    """A hash of the code and configs a run executes. Others may edit the working tree during a long campaign; a
    difference found after the code changed may come from the edit, not from the kill, and is flagged so."""
    digest = hashlib.sha256()
    files = [*sorted((REPO / "selfimprove").rglob("*.py")), *sorted((REPO / "selfimprove").rglob("*.yaml")),
             *sorted((REPO / "tests" / "pipelines").rglob("*.yaml")),
             REPO / "tests" / "plugins.py", pipeline]
    for f in files:
        if f.is_file():
            digest.update(str(f).encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


# -- the reference run ----------------------------------------------------------------------------------------------

@dataclass
class StageInfo:
    round: int
    name: str
    kind: str
    seconds: float

    @property
    def path(self) -> str:
        return f"round_{self.round:03d}/{self.name}"


@dataclass
class Reference:
    pipeline: Path
    overrides: list[str]
    work: Path
    run_dir: Path  # WORK/reference
    timeline: dict[str, float]  # path (relative to the run directory) → seconds after the command started
    stages: list[StageInfo]  # in the order they ran
    seconds: float
    fingerprint: str

    @property
    def live(self) -> Path:
        return self.work / "live"


def run_reference(pipeline: str | Path, overrides: list[str], work: str | Path, timeout: float = 1800,
                  log=print) -> Reference:
    """Run the pipeline once, uninterrupted, recording when each watched path first appears (every 10 ms)."""
    pipeline, work = Path(pipeline).resolve(), Path(work).resolve()
    live, final = work / "live", work / "reference"
    for folder in (live, final):
        shutil.rmtree(folder, ignore_errors=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    fingerprint = code_fingerprint(pipeline)
    cmd = run_command(pipeline, live, overrides)
    log(f"reference: {' '.join(cmd)}")
    timeline: dict[str, float] = {}
    with open(work / "logs" / "reference.log", "w") as out:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            while proc.poll() is None:
                now = time.monotonic() - started
                for path in scan_events(live):
                    timeline.setdefault(path, round(now, 3))
                if now > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise RuntimeError(f"the reference run took over {timeout:.0f}s; see {work / 'logs'}")
                time.sleep(0.01)
        except BaseException:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise
    seconds = time.monotonic() - started
    for path in scan_events(live):
        timeline.setdefault(path, round(seconds, 3))
    if proc.returncode != 0:
        raise RuntimeError(f"the reference run failed (exit {proc.returncode}):\n{_tail(work / 'logs' / 'reference.log')}")
    stages = run_order(live)
    os.replace(live, final)
    log(f"reference: finished in {seconds:.1f}s, {len(stages)} stages, {len(timeline)} watched paths")
    return Reference(pipeline, list(overrides), work, final, dict(sorted(timeline.items(), key=lambda kv: kv[1])),
                     stages, seconds, fingerprint)


def run_order(run_dir: Path) -> list[StageInfo]:
    """The finished stages of a run in the order they ran: by round, then as config.yaml lists them."""
    import yaml

    order = list(yaml.safe_load((run_dir / "config.yaml").read_text())["stages"])
    out = []
    for round_dir in sorted(run_dir.glob("round_*")):
        for name in order:
            path = round_dir / name / MANIFEST
            if path.exists():
                m = read_json(path)
                out.append(StageInfo(m["round"], m["stage"], stage_kind(m), float(m.get("seconds", 0.0))))
    return out


# -- kill points ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KillPoint:
    """Kill `fraction` × `span` seconds after `trigger` (a path relative to the run directory) appears."""

    category: str
    trigger: str
    what: str  # in words: where this aims
    at: float  # when the trigger appeared in the reference run (seconds after its start)
    span: float = 0.0  # seconds the delay is a share of (0: kill at once)
    fraction: float = 0.0

    @property
    def delay(self) -> float:
        return self.fraction * self.span

    def describe(self) -> str:
        when = "at once" if self.delay == 0 else f"+{self.delay:.2f}s ({self.fraction:.0%} of {self.span:.2f}s)"
        return f"{self.category}: {self.what} — after {self.trigger} appears, {when}"


def catalogue(reference: Reference) -> dict[str, list[KillPoint]]:
    """Every moment worth a kill in this pipeline, by category, from the reference run's timeline. Entries with a
    span get their fraction from the planner; the others kill the moment their trigger appears."""
    t = reference.timeline
    out: dict[str, list[KillPoint]] = {}

    def add(category: str, trigger: str, what: str, span: float | None = None) -> None:
        if trigger in t:
            out.setdefault(category, []).append(KillPoint(category, trigger, what, t[trigger],
                                                          span=max(span or 0.0, 0.0)))

    for i, stage in enumerate(reference.stages):
        p, kind = stage.path, stage.kind
        start, end = t.get(p), t.get(f"{p}/{MANIFEST}")
        if start is None or end is None:
            continue
        span = max(end - start, stage.seconds)
        label = f"round {stage.round} {stage.name}"
        inside = "rl_within_step" if kind == "rl" else kind
        add(inside, p, f"{label}, a share of its time after it started", span)
        shards = sorted(k for k in t if k.startswith(f"{p}/shards/"))
        for k, shard in enumerate(shards):
            add(kind, shard, f"{label}, after chunk {shard.rsplit('/', 1)[1]} was saved "
                             f"({k + 1} of {len(shards)})")
        add("rl_between_steps" if kind == "rl" else kind, f"{p}/data",
            f"{label}, after data/ was written, before the manifest"
            + (" (every step done)" if kind == "rl" else ""))
        if kind == "training":
            marks = sorted((k for k in t if k.startswith(f"{p}/trainer/checkpoint-")),
                           key=lambda k: int(k.split("/")[-2].split("-")[1]))
            nexts = [*marks[1:], f"{p}/adapter"]
            for mark, following in zip(marks, nexts):
                step = mark.split("/")[-2]
                add("training", mark, f"{label}, right after {step} was complete")
                if following in t:
                    add("training", mark, f"{label}, during the steps after {step}", t[following] - t[mark])
            add("training", f"{p}/adapter", f"{label}, after the adapter was saved, before weights.json/manifest")
        if kind == "rl":
            versions = sorted((k for k in t if k.startswith(f"{p}/versions/")), key=lambda k: int(k.rsplit("/", 1)[1]))
            for k, version in enumerate(versions):
                n = int(version.rsplit("/", 1)[1])
                add("rl_between_steps", version, f"{label}, right after version {n} was committed"
                                                 + (" (the last step)" if k == len(versions) - 1 else ""))
                if k + 1 < len(versions):
                    add("rl_within_step", version, f"{label}, inside step {n} (after version {n})",
                        t[versions[k + 1]] - t[version])
        last = i == len(reference.stages) - 1
        if last:
            report_at = t.get("report.html", t.get("report.md", reference.seconds))
            add("report", f"{p}/{MANIFEST}", f"right after the last manifest ({label})")
            add("report", f"{p}/{MANIFEST}", "while metrics.jsonl, the plots and the report are written",
                report_at - end)
        else:
            add("between_stages", f"{p}/{MANIFEST}", f"right after {label} finished")
    for plot in sorted(k for k in t if k.startswith("plots/")):
        add("report", plot, f"right after {plot} was drawn, before report.md")
    if "report.html" in t:
        add("report", "report.md", "right after report.md was written, before report.html")
    return out


def plan(points: dict[str, list[KillPoint]], kills: int, seed: int, categories: list[str] | None = None,
         chain: int = 1) -> list[list[KillPoint]]:
    """`kills` kill points in trials of `chain` each, chosen from `seed`: categories take turns (shuffled, or in the
    order given), a point is drawn within its category (no repeat while unused ones remain), and a point with a
    span gets a delay of 10-90% of it. A trial's points are in the order they come in the run."""
    rng = random.Random(seed)
    if categories:
        unknown = [c for c in categories if c not in CATEGORIES]
        missing = [c for c in categories if c in CATEGORIES and c not in points]
        if unknown or missing:
            raise ValueError(f"categories {unknown + missing} are unknown or have no kill point in this pipeline; "
                             f"it has: {', '.join(points)}")
        order = list(categories)
    else:
        order = [c for c in CATEGORIES if c in points]
        rng.shuffle(order)
    if not order:
        raise ValueError("no kill points: the reference run recorded no stage")
    used: set[KillPoint] = set()
    picks = []
    for i in range(kills):
        options = points[order[i % len(order)]]
        point = rng.choice([p for p in options if p not in used] or options)
        used.add(point)
        if point.span > 0:
            point = dataclasses.replace(point, fraction=round(rng.uniform(0.1, 0.9), 2))
        picks.append(point)
    trials = [picks[i:i + chain] for i in range(0, len(picks), max(chain, 1))]
    return [sorted(trial, key=lambda p: p.at + p.delay) for trial in trials]


# -- where a kill landed ---------------------------------------------------------------------------------------------

@dataclass
class Landing:
    stage: str  # round_NNN/<stage> of the unfinished stage, "report" after the last stage, "startup" before any
    inside: bool  # the stage had started (its folder existed)
    text: str


def landing(run_dir: Path, stages: list[StageInfo]) -> Landing:
    """What the run directory says about the moment of the kill."""
    if not (run_dir / "config.yaml").exists():
        return Landing("startup", False, "before the run directory was set up")
    done = 0
    previous = None
    for stage in stages:
        folder = run_dir / stage.path
        if _done(folder):
            done += 1
            previous = stage
            continue
        lag = _metrics_lag(run_dir, done)
        if not folder.exists():
            after = f"after round {previous.round} {previous.name} finished, " if previous else ""
            return Landing(stage.path, False, f"between stages: {after}before round {stage.round} {stage.name} "
                                              f"started{lag}")
        return Landing(stage.path, True, f"inside round {stage.round} {stage.name} ({_written(folder)}){lag}")
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png")) if (run_dir / "plots").exists() else []
    report = ", ".join(f"{name} {'written' if (run_dir / name).exists() else 'absent'}"
                       for name in ("report.md", "report.html"))
    return Landing("report", True, f"after the last stage: {report}, plots {plots or 'none'}"
                                   f"{_metrics_lag(run_dir, done)}")


def _done(folder: Path) -> bool:
    try:
        return read_json(folder / MANIFEST).get("done", False)
    except (OSError, ValueError):
        return False


def _written(folder: Path) -> str:
    parts = []
    shards = [p.name for p in _entries(folder / "shards")]
    if shards:
        parts.append(f"{len(shards)} chunk(s) saved")
    marks = sorted(int(p.parent.name.split("-")[1]) for p in (folder / "trainer").glob(f"checkpoint-*/{COMPLETE}"))
    if marks:
        parts.append(f"complete checkpoints at steps {marks}")
    elif (folder / "trainer").exists():
        parts.append("trainer started, no complete checkpoint")
    versions = sorted(int(p.name) for p in _entries(folder / "versions") if p.name.isdigit())
    if versions:
        parts.append(f"versions {versions[0]}..{versions[-1]}")
    parts += [f"{name} written" for name in ("data", "adapter", "weights.json") if (folder / name).exists()]
    return ", ".join(parts) or "nothing written yet"


def _metrics_lag(run_dir: Path, done: int) -> str:
    try:
        lines = sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        lines = 0
    return f"; metrics.jsonl has {lines} line(s) for {done} finished stage(s)" if lines != done else ""


# -- processes that outlive a kill -------------------------------------------------------------------------------------

def family(pid: int) -> dict[int, float]:
    """pid → create time of a process and all its descendants (the lifecycle watchdog included: its child, in its
    own session, so the process-group kill does not reach it)."""
    out = {}
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                out[proc.pid] = proc.create_time()
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return out


def _run_token(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / PROCESS_FILE).read_text()).get("token")
    except (OSError, ValueError, AttributeError):
        return None


def survivors(run_dir: Path, known: dict[int, float], token: str | None, wait_s: float = 15.0) -> list[str]:
    """The processes of a killed (or finished) run still alive after `wait_s`: one it had (`known`, checked by
    create time: a pid may be reused), one whose command line names the run directory, or one carrying the run's
    token (a VLLM::EngineCore / VLLM::Worker it started). Zombies count as gone: they hold nothing."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    deadline = time.monotonic() + wait_s
    while True:
        alive: dict[int, str] = {}
        for pid, created in known.items():
            try:
                proc = psutil.Process(pid)
                if abs(proc.create_time() - created) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                    alive[pid] = _describe(proc)
            except psutil.Error:
                pass
        for proc in psutil.process_iter():
            if proc.pid in mine or proc.pid in alive:
                continue
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                named = str(run_dir) in " ".join(proc.cmdline())
                carries = token is not None and proc.environ().get(RUN_TOKEN) == token
            except psutil.Error:  # gone, or another user's
                continue
            if named or carries:
                alive[proc.pid] = _describe(proc)
        if not alive or time.monotonic() >= deadline:
            return [alive[pid] for pid in sorted(alive)]
        time.sleep(0.2)


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} {' '.join(proc.cmdline())[:120] or proc.name()}"
    except psutil.Error:
        return f"pid {proc.pid}"


def _end(descriptions: list[str]) -> None:
    """Kill the survivors we found (they are our run's), by pid, so the next attempt starts clean."""
    for text in descriptions:
        try:
            psutil.Process(int(text.split()[1])).kill()
        except (psutil.Error, ValueError, IndexError):
            pass


# -- comparing a run with the reference --------------------------------------------------------------------------------

@dataclass
class Difference:
    where: str  # round_NNN/<stage>, or "run" for run-level files
    what: str  # the file, key or row
    reference: str = ""
    trial: str = ""

    def __str__(self) -> str:
        values = f": reference {self.reference} vs {self.trial}" if self.reference or self.trial else ""
        return f"{self.where}: {self.what}{values}"


def compare_runs(reference: Path, trial: Path) -> tuple[list[Difference], list[str]]:
    """Every difference between two finished run directories that is not a listed timing field, and notes
    (temporaries a kill left behind: harmless, but worth knowing).

    Files: the same set (hidden temporaries and `IGNORED_FILES` aside), and the same bytes, except: manifests
    (metrics, outputs, report cells and checksums compared; `IGNORED_MANIFEST_FIELDS` and `IGNORED_METRICS` left
    out), metrics.jsonl / steps.jsonl / step.json (timing fields left out), report.md (timing columns left out).
    Datasets are also compared row by row and adapters by `adapter_hash`, to say which row, key or adapter
    differs; each manifest's checksums are also checked against the files on disk."""
    for run_dir in (reference, trial):
        if not (run_dir / "config.yaml").is_file():
            raise ValueError(f"{run_dir} is not a run directory (no config.yaml)")
    diffs: list[Difference] = []
    ref_files, trial_files = _files(reference), _files(trial)
    notes = [f"left behind: {p}" for p in sorted(_hidden(trial))]
    for path in sorted(ref_files - trial_files):
        diffs.append(Difference(_where(path), f"{path} missing"))
    for path in sorted(trial_files - ref_files):
        diffs.append(Difference(_where(path), f"{path} only in the killed run"))
    datasets = sorted({p.rsplit("/", 1)[0] for p in ref_files & trial_files
                       if p.endswith("/dataset_info.json") or p.endswith("/" + EMPTY_MARKER)})
    adapters = sorted({p.rsplit("/", 1)[0] for p in ref_files & trial_files if p.endswith("/adapter_model.safetensors")})
    explained: list[str] = []  # folders whose difference is already reported by row or by adapter hash
    for folder in datasets:
        found = _compare_rows(reference, trial, folder)
        diffs += found
        explained += [f"{folder}/"] if found else []
    for folder in adapters:
        a, b = adapter_hash(reference / folder), adapter_hash(trial / folder)
        if a != b:
            diffs.append(Difference(_where(folder + "/x"), f"adapter hash of {folder}", a, b))
            explained.append(f"{folder}/adapter_model.safetensors")
    for path in sorted(ref_files & trial_files):
        name = path.rsplit("/", 1)[-1]
        a, b = reference / path, trial / path
        if name == MANIFEST:
            diffs += _compare_manifests(path, a, b)
        elif name in JSON_LINES_FILES:
            diffs += _compare_json_lines(path, a, b, JSON_LINES_FILES[name])
        elif name in JSON_FILES:
            diffs += _compare_records(_where(path), path, [read_json(a)], [read_json(b)], JSON_FILES[name])
        elif path == "report.md":
            if _report_text(a) != _report_text(b):
                diffs.append(Difference("run", "report.md (timing columns left out)"))
        elif path == "report.html":
            if _report_html(a) != _report_html(b):
                diffs.append(Difference("run", "report.html (timing columns left out)"))
        elif not path.startswith(tuple(explained)) and a.read_bytes() != b.read_bytes():
            diffs.append(Difference(_where(path), f"bytes of {path}"))
    return diffs, notes


def _files(run_dir: Path) -> set[str]:
    out = set()
    for p in run_dir.rglob("*"):
        rel = p.relative_to(run_dir).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in rel.split("/")) and rel not in IGNORED_FILES \
                and not rel.startswith(tuple(IGNORED_FOLDERS)):
            out.add(rel)
    return out


def _hidden(run_dir: Path) -> set[str]:
    out = set()
    for p in run_dir.rglob(".*"):
        rel = p.relative_to(run_dir).as_posix()
        if not any(part.startswith(".") for part in rel.split("/")[:-1]) and not rel.startswith(tuple(IGNORED_FOLDERS)):
            out.add(rel)
    return out


def _where(path: str) -> str:
    parts = path.split("/")
    return "/".join(parts[:2]) if parts[0].startswith("round_") and len(parts) > 2 else "run"


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _compare_rows(reference: Path, trial: Path, folder: str) -> list[Difference]:
    a, b = load_rows(reference / folder), load_rows(trial / folder)
    where = _where(folder + "/x")
    if len(a) != len(b):
        return [Difference(where, f"rows of {folder}: count", str(len(a)), str(len(b)))]
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            k = keys[0]
            return [Difference(where, f"rows of {folder} [{i}].{k} (keys differing: {', '.join(keys)})",
                               _short(x.get(k)), _short(y.get(k)))]
    return []


def _compare_records(where: str, what: str, a: list[dict], b: list[dict], ignored) -> list[Difference]:
    if len(a) != len(b):
        return [Difference(where, f"{what}: number of records", str(len(a)), str(len(b)))]
    out = []
    for i, (x, y) in enumerate(zip(a, b)):
        for k in sorted((set(x) | set(y)) - set(ignored)):
            if x.get(k, "<absent>") != y.get(k, "<absent>"):
                out.append(Difference(where, f"{what} [{i}] {k}", _short(x.get(k, "<absent>")),
                                      _short(y.get(k, "<absent>"))))
    return out


def _compare_json_lines(path: str, a: Path, b: Path, ignored) -> list[Difference]:
    def lines(p: Path) -> list[dict]:
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    return _compare_records(_where(path), path, lines(a), lines(b), ignored)


def _compare_manifests(path: str, a: Path, b: Path) -> list[Difference]:
    where = _where(path)
    x, y = read_json(a), read_json(b)
    out = []
    for k in sorted((set(x) | set(y)) - set(IGNORED_MANIFEST_FIELDS) - {"metrics", "checksums"}):
        if x.get(k) != y.get(k):
            out.append(Difference(where, f"manifest {k}", _short(x.get(k)), _short(y.get(k))))
    out += _compare_records(where, "metrics", [x.get("metrics", {})], [y.get("metrics", {})], IGNORED_METRICS)
    xc, yc = x.get("checksums", {}), y.get("checksums", {})
    for name in sorted(set(xc) | set(yc)):
        if xc.get(name) == yc.get(name):
            continue
        if name in JSON_LINES_FILES and name in xc and name in yc:
            # Timing fields inside (an rl stage's steps.jsonl): the file's comparison without them decides, and
            # reports what differs.
            continue
        out.append(Difference(where, f"checksum of output {name}", _short(xc.get(name)), _short(yc.get(name))))
    outputs = y.get("outputs", [])
    on_disk = checksum_files(b.parent / o for o in outputs if (b.parent / o).exists())
    if on_disk != yc:
        out.append(Difference(where, "the killed run's manifest checksums do not match its files on disk"))
    return out


def _report_text(path: Path) -> list[str]:
    """report.md without the timing columns of its table."""
    lines = path.read_text().splitlines()
    drop: list[int] = []
    out = []
    for line in lines:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if any(c in IGNORED_REPORT_COLUMNS for c in cells):
                drop = [i for i, c in enumerate(cells) if c in IGNORED_REPORT_COLUMNS]
            cells = [c for i, c in enumerate(cells) if i not in drop]
            out.append("|".join(cells))
        else:
            out.append(line)
    return out


def _report_html(path: Path) -> str:
    """report.html without the timing columns of its tables (render.html_table's plain <th>/<td> cells)."""

    def table(match: re.Match) -> str:
        head = re.search(r"<thead><tr>(.*?)</tr></thead>", match.group(0), flags=re.S)
        names = [html.unescape(h) for h in re.findall(r"<th>(.*?)</th>", head.group(1), flags=re.S)] if head else []
        drop = {i for i, name in enumerate(names) if name in IGNORED_REPORT_COLUMNS}
        if not drop:
            return match.group(0)

        def row(m: re.Match) -> str:
            cells = re.findall(r"<t([hd])>(.*?)</t\1>", m.group(1), flags=re.S)
            return "<tr>" + "".join(f"<t{k}>{c}</t{k}>" for i, (k, c) in enumerate(cells) if i not in drop) + "</tr>"

        return re.sub(r"<tr>(.*?)</tr>", row, match.group(0), flags=re.S)

    return re.sub(r"<table>.*?</table>", table, path.read_text(), flags=re.S)


# -- trials ---------------------------------------------------------------------------------------------------------

@dataclass
class Kill:
    point: KillPoint
    fired: bool = False
    attempt: int | None = None
    seconds_into_attempt: float | None = None
    after_trigger: float | None = None
    landing: Landing | None = None
    left: list[str] = field(default_factory=list)  # processes of the killed run that survived it
    note: str = ""  # why it did not fire


@dataclass
class Trial:
    index: int
    kills: list[Kill]
    run_dir: Path
    attempts: int = 0
    error: str | None = None
    differences: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    left_at_end: list[str] = field(default_factory=list)
    code_changed: bool = False

    @property
    def identical(self) -> bool:
        return self.error is None and not self.differences

    @property
    def clean(self) -> bool:
        return not self.left_at_end and not any(k.left for k in self.kills)


def run_trial(reference: Reference, points: list[KillPoint], index: int, timeout: float = 1800,
              reap_wait: float = 15.0, log=print) -> Trial:
    """Run the pipeline on a fresh run directory, killing it at each of `points` in turn (one kill per attempt),
    then once more without a kill until it finishes; compare the result with the reference."""
    live, work = reference.live, reference.work
    final = work / f"trial-{index:02d}"
    shutil.rmtree(live, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    trial = Trial(index, [Kill(p) for p in points], final)
    if code_fingerprint(reference.pipeline) != reference.fingerprint:
        trial.code_changed = True
        log(f"[trial {index}] WARNING: the code or configs changed since the reference run; a difference may come "
            f"from the edit")
    cmd = run_command(reference.pipeline, live, reference.overrides)
    pending = list(trial.kills)
    finished = False
    for attempt in range(1, len(points) + 2):
        trial.attempts = attempt
        while pending and (live / pending[0].point.trigger).exists():
            passed = pending.pop(0)
            passed.note = f"its trigger was already there when attempt {attempt} started"
            log(f"[trial {index}] kill not reached: {passed.point.describe()} ({passed.note})")
        kill = pending.pop(0) if pending else None
        logfile = work / "logs" / f"trial-{index:02d}-attempt-{attempt}.log"
        failure = _attempt(cmd, live, kill, attempt, logfile, timeout, reap_wait, reference.stages)
        if kill is not None and kill.fired:
            log(f"[trial {index}] kill {trial.kills.index(kill) + 1}/{len(points)} in attempt {attempt}: "
                f"{kill.point.describe()}; fired {kill.seconds_into_attempt:.2f}s into the attempt, "
                f"{kill.after_trigger:.3f}s after the trigger; landed {kill.landing.text}; "
                + (f"SURVIVED THE KILL: {kill.left}" if kill.left else "no process left"))
            continue
        if failure:  # the attempt failed by itself, or hung
            trial.error = f"attempt {attempt}: {failure}\n{_tail(logfile)}"
            log(f"[trial {index}] FAILED: {trial.error}")
        else:
            finished = True
            # A run that ended normally closed its engine and stopped its watchdog: nothing of it may remain.
            trial.left_at_end = survivors(live, {}, _run_token(live), wait_s=5.0)
            _end(trial.left_at_end)
        if kill is not None:
            kill.note = f"attempt {attempt} failed before its trigger" if failure else ""
            pending.insert(0, kill)
        break
    for kill in pending:
        kill.note = kill.note or "the run finished before its trigger appeared"
        log(f"[trial {index}] kill not reached: {kill.point.describe()} ({kill.note})")
    if not finished and trial.error is None:
        trial.error = f"did not finish within {trial.attempts} attempts"
    if live.exists():
        os.replace(live, final)
    if finished:
        trial.differences, trial.notes = compare_runs(reference.run_dir, final)
    return trial


def _attempt(cmd: list[str], live: Path, kill: Kill | None, attempt: int, logfile: Path, timeout: float,
             reap_wait: float, stages: list[StageInfo]) -> str | None:
    """One run of the command, killed at `kill`'s moment if that comes first. Returns None when it was killed
    (`kill` then says how) or exited 0, else what went wrong.

    The run's descendants are listed every half second while it runs, not at the kill: listing them takes
    milliseconds that would move the kill; a process started since the last listing carries the run's token
    (or names the run directory), which `survivors` also looks for."""
    with open(logfile, "w") as out:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        trigger = live / kill.point.trigger if kill else None
        seen = None
        known: dict[int, float] = {}
        listed = 0.0
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if now - started > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    _end(survivors(live, known, _run_token(live), reap_wait))
                    return f"no exit within {timeout:.0f}s (killed)"
                if trigger is not None and seen is None and trigger.exists():
                    seen = now
                if seen is not None and now - seen >= kill.point.delay:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:  # it exited on its own a moment ago
                        break
                    fired = time.monotonic()
                    proc.wait()
                    kill.fired, kill.attempt = True, attempt
                    kill.seconds_into_attempt, kill.after_trigger = fired - started, fired - seen
                    kill.landing = landing(live, stages)
                    kill.left = survivors(live, known, _run_token(live), reap_wait)
                    _end(kill.left)
                    return None
                if seen is None and now - listed > 0.5:
                    known.update(family(proc.pid))
                    listed = time.monotonic()
                time.sleep(0.002)
        except BaseException:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise
    proc.wait()
    return f"exited with {proc.returncode}" if proc.returncode != 0 else None


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- a campaign -----------------------------------------------------------------------------------------------------

@dataclass
class Campaign:
    reference: Reference
    trials: list[Trial]

    @property
    def kills(self) -> list[Kill]:
        return [k for t in self.trials for k in t.kills]

    @property
    def fired(self) -> list[Kill]:
        return [k for k in self.kills if k.fired]

    @property
    def survived(self) -> list[Kill]:
        """Kills after which the run finished with results identical to the reference and left no process."""
        return [k for t in self.trials if t.identical for k in t.kills if k.fired and not k.left]

    @property
    def ok(self) -> bool:
        return bool(self.fired) and all(t.identical and t.clean for t in self.trials)


def inject(pipeline: str | Path, overrides: list[str], kills: int, seed: int, work: str | Path, chain: int = 1,
           categories: list[str] | None = None, timeout: float = 1800, reap_wait: float = 15.0,
           log=print) -> Campaign:
    """The whole campaign: the reference run, the plan from `seed`, every trial, each compared with the reference."""
    reference = run_reference(pipeline, overrides, work, timeout=timeout, log=log)
    points = catalogue(reference)
    log("kill points in this pipeline: " + ", ".join(f"{c} {len(p)}" for c, p in points.items()))
    trials_plan = plan(points, kills, seed, categories, chain)
    trials = []
    for index, trial_points in enumerate(trials_plan, 1):
        for p in trial_points:
            log(f"[trial {index}] plan: {p.describe()} (reference: {p.at + p.delay:.2f}s into the run)")
        trial = run_trial(reference, trial_points, index, timeout=timeout, reap_wait=reap_wait, log=log)
        verdict = "identical to the reference" if trial.identical else \
            (trial.error and "FAILED") or f"{len(trial.differences)} DIFFERENCE(S)"
        log(f"[trial {index}] {verdict}" + ("" if not trial.code_changed else " (code changed since the reference)"))
        for d in trial.differences[:20]:
            log(f"    {d}")
        for note in trial.notes:
            log(f"    note: {note}")
        trials.append(trial)
    return Campaign(reference, trials)


def summary(campaign: Campaign) -> str:
    kills = campaign.kills
    lines = ["", "== fault injection summary", f"pipeline: {campaign.reference.pipeline} "
                                               f"{' '.join(campaign.reference.overrides)}",
             f"kills planned {len(kills)}, tried {len(campaign.fired)}, survived with identical results "
             f"{len(campaign.survived)}, not reached {len(kills) - len(campaign.fired)}"]
    by_category: dict[str, list[int]] = {}
    survived = {id(k) for k in campaign.survived}
    for k in campaign.fired:
        counts = by_category.setdefault(k.point.category, [0, 0])
        counts[0] += 1
        counts[1] += id(k) in survived
    lines.append("by category (survived/tried): " + (", ".join(f"{c} {s}/{n}" for c, (n, s) in by_category.items())
                                                      or "none"))
    for trial in campaign.trials:
        for k in trial.kills:
            status = ("survived" if id(k) in survived else "NOT SURVIVED") if k.fired else f"not reached ({k.note})"
            where = f" → landed {k.landing.text}" if k.landing else ""
            lines.append(f"  trial {trial.index}: {k.point.describe()}{where}: {status}")
        if trial.error:
            lines.append(f"  trial {trial.index} FAILED: {trial.error.splitlines()[0]}")
        for d in trial.differences:
            lines.append(f"  trial {trial.index} differs: {d}")
        for k in trial.kills:
            for p in k.left:
                lines.append(f"  trial {trial.index}: survived the kill: {p}")
        for p in trial.left_at_end:
            lines.append(f"  trial {trial.index}: left running after the run finished: {p}")
        if trial.code_changed and not trial.identical:
            lines.append(f"  trial {trial.index}: the code changed after the reference run: rerun before blaming "
                         f"the resume")
    lines.append("differences: " + ("none" if all(t.identical for t in campaign.trials) else "YES (above)"))
    lines.append("processes left behind: " + ("none" if all(t.clean for t in campaign.trials) else "YES (above)"))
    lines.append(f"runs kept under {campaign.reference.work} (reference/, trial-NN/, logs/)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", help="pipeline YAML")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, passed to every run")
    parser.add_argument("--kills", type=int, default=6, help="kill points in all (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="picks the kill points and delays (default 0)")
    parser.add_argument("--work", help="folder for the runs and logs (default: a new temporary folder)")
    parser.add_argument("--chain", type=int, default=1,
                        help="kills per trial: a trial is killed at each of its points in turn (default 1)")
    parser.add_argument("--categories", help=f"comma-separated categories to aim at, in turn "
                                             f"(default: all the pipeline has): {', '.join(CATEGORIES)}")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one attempt may run (default 1800)")
    parser.add_argument("--reap-wait", type=float, default=15.0,
                        help="seconds a killed run's processes get to disappear (default 15)")
    args = parser.parse_intermixed_args(argv)
    if args.kills < 1 or args.chain < 1:
        parser.error("--kills and --chain must be >= 1")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fault-inject-"))
    categories = [c.strip() for c in args.categories.split(",")] if args.categories else None

    def log(text: str) -> None:
        print(text, flush=True)

    log(f"fault injection: {args.pipeline} {' '.join(args.overrides)} --kills {args.kills} --seed {args.seed} "
        f"--chain {args.chain}; work folder {work}")
    log("compared with the timing fields left out: " + "; ".join(
        f"{k} ({why})" for table in (IGNORED_MANIFEST_FIELDS, IGNORED_METRICS, IGNORED_STEP_FIELDS)
        for k, why in table.items()))
    try:
        campaign = inject(args.pipeline, args.overrides, args.kills, args.seed, work, chain=args.chain,
                          categories=categories, timeout=args.timeout, reap_wait=args.reap_wait, log=log)
    except (RuntimeError, ValueError) as err:
        log(f"error: {err}")
        return 2
    log(summary(campaign))
    return 0 if campaign.ok else 1


if __name__ == "__main__":
    sys.exit(main())
