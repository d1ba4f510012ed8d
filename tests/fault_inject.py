"""Fault injection: SIGKILL a pipeline run at chosen moments, run the same command again until it finishes, and
check that it ends exactly where an uninterrupted run ends, and that no process of a killed run survives it.

    python -m tests.fault_inject tests/pipelines/tiny_star.yaml --kills 6 --seed 0 rounds=1

The reference run is polled for the moment each resume-relevant path first appears (stage folders, chunks,
data/, trainer checkpoints, RL versions, adapters, manifests, plots, reports). A kill point is right after one
appears, or a share of the time until the next; `--seed` picks `--kills` of them, categories taking turns. A
trial SIGKILLs the command's process group at its point and reruns the command (`--chain K`: killed at its next
point) until it exits 0. After each kill nothing of the run may be alive: its descendants (the lifecycle
watchdog among them) and any process carrying its SELFIMPROVE_RUN_TOKEN (VLLM::EngineCore / VLLM::Worker).
Every finished trial is compared with the reference (tests/run_diff.py). All runs use one absolute run
directory, WORK/live, so that the paths recorded inside the outputs are the same bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil

from selfimprove.artifacts import MANIFEST, read_json
from selfimprove.lifecycle import PROCESS_FILE, RUN_TOKEN
from selfimprove.report import collect
from selfimprove.trainers.common import COMPLETE
from tests.run_diff import run_differences

REPO = Path(__file__).resolve().parents[1]

STAGE_KINDS = {"generate": "generation", "critique": "critique", "filter": "selection", "pairs": "selection",
               "spin_pairs": "selection", "train": "training", "rl": "rl", "evaluate": "evaluation",
               "evaluate_self_correction": "evaluation"}


def scan(run_dir: Path) -> set[str]:
    """The resume-relevant paths in `run_dir`, relative to it. Hidden names are temporaries of atomic writes; a
    trainer checkpoint counts once its completion marker exists."""
    try:
        found = {p for p in ("report.md", "report.html") if (run_dir / p).exists()}
        found |= {f"plots/{p.name}" for p in (run_dir / "plots").glob("[!.]*")}
        for stage in run_dir.glob("round_*/[!.]*/"):
            prefix = stage.relative_to(run_dir).as_posix()
            found.add(prefix)
            found |= {f"{prefix}/{p.name}" for p in stage.glob("[!.]*") if p.name in (MANIFEST, "data", "adapter")}
            found |= {f"{prefix}/{p.parent.name}/{p.name}" for p in stage.glob("*/[!.]*")
                      if p.parent.name in ("shards", "versions")}
            found |= {p.relative_to(run_dir).as_posix() for p in stage.glob(f"trainer/checkpoint-*/{COMPLETE}")}
        return found
    except FileNotFoundError:  # a folder vanished while listed (a rotated checkpoint): look again
        return scan(run_dir)


def start(pipeline: Path, run_dir: Path, overrides: list[str], logfile: Path) -> subprocess.Popen:
    """`selfimprove run` in its own session (one SIGKILL reaches its whole group), the repository on the path
    (test pipelines name plugins in `tests.plugins`)."""
    cmd = [sys.executable, "-m", "selfimprove.cli", "run", str(pipeline), "--run-dir", str(run_dir), *overrides]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    with open(logfile, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


@dataclass(frozen=True)
class KillPoint:
    """Kill `fraction` × `span` seconds after `trigger` (a path relative to the run directory) appears."""

    category: str
    trigger: str
    at: float  # when the trigger appeared in the reference run (seconds after its start)
    span: float = 0.0  # seconds until the next watched path appeared (0: kill at once)
    fraction: float = 0.0


@dataclass
class Reference:
    pipeline: Path
    overrides: list[str]
    work: Path
    run_dir: Path  # WORK/reference
    timeline: dict[str, float]  # watched path → seconds after the command started
    kinds: dict[str, str]  # round_NNN/<stage> → its kind (STAGE_KINDS), in the order the stages ran


def run_reference(pipeline: str | Path, overrides: list[str], work: str | Path, timeout: float = 1800,
                  log=print) -> Reference:
    """Run the pipeline once, uninterrupted, recording when each watched path first appears (every 10 ms)."""
    pipeline, work = Path(pipeline).resolve(), Path(work).resolve()
    live, final = work / "live", work / "reference"
    for folder in (live, final):
        shutil.rmtree(folder, ignore_errors=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    timeline: dict[str, float] = {}
    started = time.monotonic()
    proc = start(pipeline, live, overrides, work / "logs" / "reference.log")
    try:
        while proc.poll() is None and time.monotonic() - started < timeout:
            for path in scan(live):
                timeline.setdefault(path, round(time.monotonic() - started, 3))
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for path in scan(live):
        timeline.setdefault(path, round(time.monotonic() - started, 3))
    if proc.wait() != 0:
        raise RuntimeError(f"the reference run failed (exit {proc.returncode}); see {work / 'logs'}")
    kinds = {f"round_{m['round']:03d}/{m['stage']}": STAGE_KINDS.get(m["type"]) or
             ("evaluation" if m.get("evaluates") else "other") for ms in collect(live).values() for m in ms}
    os.replace(live, final)
    log(f"reference: {time.monotonic() - started:.1f}s, {len(kinds)} stages, {len(timeline)} watched paths")
    timeline = dict(sorted(timeline.items(), key=lambda kv: kv[1]))
    return Reference(pipeline, list(overrides), work, final, timeline, kinds)


def catalogue(reference: Reference) -> dict[str, list[KillPoint]]:
    """Every kill point of the reference run, by category: right after each watched path appears, and within the
    time until the next one appears."""
    out: dict[str, list[KillPoint]] = {}
    last = list(reference.kinds)[-1]
    timeline = list(reference.timeline.items())
    for i, (path, at) in enumerate(timeline):
        stage = "/".join(path.split("/")[:2])
        kind = reference.kinds.get(stage, "other")
        if not path.startswith("round_"):
            at_once = within = "report"
        elif path.endswith(MANIFEST):
            at_once = within = "report" if stage == last else "between_stages"
        elif kind == "rl":
            at_once, within = "rl_between_steps", "rl_within_step"
        else:
            at_once = within = kind
        out.setdefault(at_once, []).append(KillPoint(at_once, path, at))
        span = round(timeline[i + 1][1] - at, 3) if i + 1 < len(timeline) else 0.0
        if span > 0:
            out.setdefault(within, []).append(KillPoint(within, path, at, span))
    return out


def plan(points: dict[str, list[KillPoint]], kills: int, seed: int, chain: int = 1) -> list[list[KillPoint]]:
    """`kills` points in trials of `chain`, from `seed`: categories take turns, a point repeats only once all were
    used, one with a span gets a share of it. A trial's points are in the order the run meets them."""
    rng = random.Random(seed)
    order = rng.sample(sorted(points), len(points))
    used, picks = set(), []
    for i in range(kills):
        options = points[order[i % len(order)]]
        point = rng.choice([p for p in options if p not in used] or options)
        used.add(point)
        picks.append(replace(point, fraction=round(rng.uniform(0.1, 0.9), 2)) if point.span else point)
    trials = [picks[i:i + chain] for i in range(0, len(picks), chain)]
    return [sorted(trial, key=lambda p: p.at + p.fraction * p.span) for trial in trials]


def landing(run_dir: Path, kinds: dict[str, str]) -> tuple[str, str]:
    """Where a kill landed: the first unfinished stage (or "report" after the last), and what it had written."""
    stage = next((s for s in kinds if not (run_dir / s / MANIFEST).exists()), "report")
    written = sorted(p.removeprefix(stage + "/") for p in scan(run_dir)
                     if p.startswith(stage + "/") or stage == "report" and not p.startswith("round_"))
    return stage, ", ".join(written) or ("started" if (run_dir / stage).exists() else "not started")


def survivors(known: dict[int, float], token: str | None, wait_s: float) -> list[psutil.Process]:
    """The processes of a dead run still alive after `wait_s`: those it had (pid and create time, as a pid may
    be reused) and any carrying its run token. Zombies hold nothing and count as gone."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for proc in psutil.process_iter():
            try:
                if proc.status() != psutil.STATUS_ZOMBIE and (known.get(proc.pid) == proc.create_time() or
                                                              token and proc.environ().get(RUN_TOKEN) == token):
                    alive.append(proc)
            except psutil.Error:  # gone, or another user's
                pass
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


@dataclass
class Kill:
    point: KillPoint
    fired: bool = False
    landed: tuple[str, str] | None = None  # landing()
    left: list[str] = field(default_factory=list)  # processes of the killed run that survived it


@dataclass
class Trial:
    kills: list[Kill]
    run_dir: Path
    attempts: int = 0
    error: str | None = None
    differences: list[str] = field(default_factory=list)
    left_at_end: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.error or self.differences or self.left_at_end or any(k.left for k in self.kills))


def run_trial(reference: Reference, points: list[KillPoint], index: int, timeout: float = 1800,
              reap_wait: float = 15.0, log=print) -> Trial:
    """Run the pipeline on a fresh run directory, killed at each of `points` in turn (one kill per attempt, a
    point whose trigger is already there is skipped), then until it finishes; compare it with the reference."""
    live, final = reference.work / "live", reference.work / f"trial-{index:02d}"
    for folder in (live, final):
        shutil.rmtree(folder, ignore_errors=True)
    trial = Trial([Kill(p) for p in points], final)
    pending = list(trial.kills)
    while trial.error is None:
        trial.attempts += 1
        pending = [k for k in pending if not (live / k.point.trigger).exists()]
        kill = pending.pop(0) if pending else None
        logfile = reference.work / "logs" / f"trial-{index:02d}-attempt-{trial.attempts}.log"
        started, seen, known, listed = time.monotonic(), None, {}, 0.0
        proc = start(reference.pipeline, live, reference.overrides, logfile)
        try:
            while proc.poll() is None and time.monotonic() - started < timeout:
                now = time.monotonic()
                if seen is None and kill and (live / kill.point.trigger).exists():
                    seen = now
                if seen is not None and now - seen >= kill.point.fraction * kill.point.span:
                    break
                if seen is None and now - listed > 0.5:  # not at the kill: listing takes milliseconds
                    with contextlib.suppress(psutil.Error):  # pid → create time: a pid may be reused
                        root = psutil.Process(proc.pid)
                        known.update({p.pid: p.create_time() for p in [root, *root.children(recursive=True)]})
                    listed = now
                time.sleep(0.002)
        finally:  # the kill, a timeout, or this process interrupted
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # it may have exited a moment ago
                    os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
        token = read_json(live / PROCESS_FILE).get("token") if (live / PROCESS_FILE).exists() else None
        left = survivors(known, token, reap_wait if code < 0 else 5.0)
        for survivor in left:  # so that the next attempt starts clean
            with contextlib.suppress(psutil.Error):
                survivor.kill()
        left = [f"pid {p.pid}" for p in left]
        if code == -9 and seen is not None:
            kill.fired, kill.landed, kill.left = True, landing(live, reference.kinds), left
            log(f"[trial {index}] attempt {trial.attempts}: {kill.point} landed in {kill.landed[0]} "
                f"({kill.landed[1]})" + (f"; SURVIVED: {left}" if left else ""))
        elif code != 0:
            trial.error = f"attempt {trial.attempts} exited with {code} (-9: ran over {timeout:.0f}s); see {logfile}"
        else:
            trial.left_at_end = left
            break
    if live.exists():
        os.replace(live, final)
    if trial.error is None:
        trial.differences = run_differences(reference.run_dir, final)
    log(f"[trial {index}] " + ("identical to the reference" if trial.ok else
                               f"FAILED: {trial.error or ''} {trial.differences[:20]} {trial.left_at_end}"))
    return trial


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", help="pipeline YAML")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, passed to every run")
    parser.add_argument("--kills", type=int, default=6, help="kill points in all (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="picks the kill points and delays (default 0)")
    parser.add_argument("--chain", type=int, default=1, help="kills per trial (default 1)")
    parser.add_argument("--work", help="folder for the runs and logs (default: a new temporary folder)")
    args = parser.parse_intermixed_args(argv)
    if args.kills < 1 or args.chain < 1:
        parser.error("--kills and --chain must be >= 1")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fault-inject-"))
    print(f"fault injection: {args.pipeline} {' '.join(args.overrides)}; work folder {work}", flush=True)
    reference = run_reference(args.pipeline, args.overrides, work)
    points = catalogue(reference)
    print("kill points: " + ", ".join(f"{c} {len(p)}" for c, p in points.items()), flush=True)
    trials = [run_trial(reference, ps, i) for i, ps in enumerate(plan(points, args.kills, args.seed, args.chain), 1)]
    fired = [(k.point.category, t.ok) for t in trials for k in t.kills if k.fired]
    print(f"kills planned {args.kills}, fired {len(fired)}, survived with identical results "
          f"{sum(ok for _, ok in fired)}; by category (survived/fired): " + ", ".join(
              f"{c} {sum(ok for x, ok in fired if x == c)}/{sum(x == c for x, _ in fired)}" for c in sorted(points)))
    return 0 if fired and all(t.ok for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
