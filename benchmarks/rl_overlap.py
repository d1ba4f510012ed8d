"""The rl stage on a 2-core CPU: sampling overlapped with training (`max_staleness`), and one training process vs
two (`launch:`), each measured as a user runs it.

    .venv/bin/python benchmarks/rl_overlap.py [--model smollm2-135m-instruct] [--steps 5] [--prompts 16]
        [--group 8] [--max-tokens 96] [--variants served_sync,served_async,inproc_1proc,inproc_2proc]
        [--out-dir DIR]

`selfimprove run pipelines/grpo_arithmetic.yaml` (the CLI in a subprocess, one round of `--steps` steps, without
its evaluate stage: a copy of the YAML without it, as benchmarks/grpo_vs_trl.py does), once per variant, one
after the other (never two at once):
- `served_sync`: a vLLM server started by `selfimprove serve` under `taskset -c 0` (its compute threads bound to
  core 0), the pipeline under `taskset -c 1` with one thread (`OMP_NUM_THREADS=1`) talking to it
  (`engine: {name: vllm_server, urls: [...]}`); `max_staleness: 0`, today's strictly on-policy loop: the
  server waits while the trainer updates and the trainer waits while the server samples.
- `served_async`: the same layout, the same server, `max_staleness: 1`: step k+1 is sampled (with version k's
  weights) while step k trains.
- `inproc_1proc`: the pipeline's default in-process engine and the rl stage in the pipeline's process, on both
  cores (nothing pinned).
- `inproc_2proc`: the same with `stages.rl.launch={num_processes: 2}` (two torchrun workers, one thread each).

Per variant: the steps' wall times (from when each version's step.json was written, as grpo_vs_trl.py reads
them), steps per hour over all steps but the first (which holds first-call costs), the step's parts (generate,
weight sync, the wait for sampling, update), the rollouts trained on (`filter_groups` keeps only the groups
with a reward signal, so the update's work differs by step and variant: hence also update seconds per trained
rollout), the mean reward per step, the staleness of each step's rollouts,
and the peak summed RSS of every process of the variant (the CLI and its descendants, and the server's),
sampled every 0.5 s here. Everything raw goes to `<out-dir>/rl_overlap.json`; the table is printed.

The reward columns of sync and async differ by design (async samples step k+1 from version k, not k+1), those
of one and two processes only by float summation order (tests/test_rl_launch.py), so at a few steps they
compare speed, not learning.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "selfimprove" / "pipelines" / "grpo_arithmetic.yaml"
STAGE = "rl"
VARIANTS = ("served_sync", "served_async", "inproc_1proc", "inproc_2proc")


class TreeMemory:
    """Peak of the summed resident memory of some process trees, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.roots, self.peak_mib = interval, [], 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        import psutil

        while not self._stop.wait(self.interval):
            pids = set()
            for root in list(self.roots):
                try:
                    proc = psutil.Process(root)
                    pids |= {proc.pid} | {p.pid for p in proc.children(recursive=True)}
                except psutil.Error:
                    continue
            total = 0
            for pid in pids:
                try:
                    total += psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    pass
            self.peak_mib = max(self.peak_mib, total / 2**20)


def start_server(model: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`selfimprove serve` pinned to core 0; returns the process and its URL once it serves."""
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "selfimprove.cli", "serve", model],
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env, cwd=REPO)
    for line in proc.stdout:
        match = re.match(r"urls: (\S+)", line)
        if match:
            return proc, match.group(1)
    raise RuntimeError(f"the server exited before serving; see {log}")


def run_variant(name: str, args: argparse.Namespace, pipeline: Path, url: str | None, memory: TreeMemory) -> dict:
    from selfimprove.artifacts import read_json

    run_dir = args.out_dir / name
    overrides = ["rounds=1", "evaluate_base=false", f"model={args.model}", f"stages.{STAGE}.steps={args.steps}",
                 f"stages.{STAGE}.problems_per_step={args.prompts}", f"stages.{STAGE}.sampling.n={args.group}",
                 f"stages.{STAGE}.sampling.max_tokens={args.max_tokens}",
                 f"stages.{STAGE}.max_staleness={1 if name == 'served_async' else 0}"]
    cmd = [sys.executable, "-m", "selfimprove.cli", "run", str(pipeline), "--run-dir", str(run_dir)]
    env = dict(os.environ)
    if name.startswith("served"):
        overrides.append(f"engine={{name: vllm_server, urls: [{url}]}}")
        cmd = ["taskset", "-c", "1", *cmd]
        env["OMP_NUM_THREADS"] = "1"
    if name == "inproc_2proc":
        overrides.append(f"stages.{STAGE}.launch={{num_processes: 2}}")
    started = time.time()
    proc = subprocess.Popen([*cmd, *overrides], cwd=REPO, env=env)
    memory.roots.append(proc.pid)
    try:
        if proc.wait() != 0:
            raise RuntimeError(f"{name}: the run failed (exit code {proc.returncode}); see {run_dir}")
    finally:
        memory.roots.remove(proc.pid)
    total = time.time() - started
    steps = [json.loads(line) for line in (run_dir / "round_001" / STAGE / "steps.jsonl").read_text().splitlines()]
    manifest = read_json(run_dir / "round_001" / STAGE / "manifest.json")
    return {"overrides": overrides, "total_seconds": round(total, 1), "stage_seconds": manifest["seconds"],
            "steps": steps}


def summarize(name: str, result: dict) -> dict:
    steps = result["steps"]
    later = steps[1:] or steps
    wall = [s["step_seconds"] for s in later]

    def mean(key):
        values = [s[key] for s in later if s.get(key) is not None]
        return round(statistics.fmean(values), 1) if values else None

    return {"variant": name, "steps_per_hour": round(3600 * len(wall) / sum(wall), 1),
            "median_step_seconds": round(statistics.median(wall), 1), "generate": mean("generate_seconds"),
            "weight_sync": mean("weight_sync_seconds"), "sampling_wait": mean("sampling_wait_seconds"),
            "update": mean("update_seconds"), "trained": mean("trained_samples"),
            "update_per_rollout": round(sum(s["update_seconds"] for s in later)
                                        / max(1, sum(s["trained_samples"] for s in later)), 2),
            "staleness": [s.get("staleness") for s in steps],
            "reward": [round(s["reward/attempt1"], 3) for s in steps], "stage_seconds": result["stage_seconds"],
            "peak_mib": round(result["peak_mib"])}


def markdown(rows: list[dict]) -> str:
    head = ("| variant | steps/hour | median s/step | generate s | weight sync s | wait for sampling s | update s | "
            "trained rollouts | update s per rollout | staleness | mean reward per step | peak summed RSS |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['steps_per_hour']} | {r['median_step_seconds']} | {r['generate']} | "
                     f"{r['weight_sync']} | {r['sampling_wait']} | {r['update']} | {r['trained']} | {r['update_per_rollout']} | "
                     f"{','.join(str(s) for s in r['staleness'])} | {', '.join(map(str, r['reward']))} | "
                     f"{r['peak_mib'] / 1024:.1f} GiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out-dir", type=Path, default=REPO / "runs" / "bench_rl_overlap")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if os.cpu_count() < 2:
        parser.error("the pinned variants need 2 cores")
    sys.path.insert(0, str(REPO))
    from selfimprove.yamlio import load_yaml

    args.out_dir.mkdir(parents=True, exist_ok=True)
    pipeline = load_yaml(PIPELINE)
    pipeline["stages"] = {k: v for k, v in pipeline["stages"].items() if k == STAGE}  # no evaluate stage
    path = args.out_dir / "grpo_arithmetic-rl-only.yaml"
    path.write_text(json.dumps(pipeline, indent=1))  # JSON is YAML
    results, server, url = {}, None, None
    try:
        for name in variants:
            with TreeMemory() as memory:
                if name.startswith("served"):
                    if server is None:  # one server for both served variants: its start is not in either
                        server, url = start_server(args.model, args.out_dir / "server.log")
                    memory.roots.append(server.pid)
                elif server is not None:
                    server.send_signal(signal.SIGINT)
                    server.wait()
                    server = None
                results[name] = run_variant(name, args, path, url, memory)
            results[name]["peak_mib"] = memory.peak_mib
            print(f"{name}: {results[name]['stage_seconds']:.0f} s", flush=True)
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            server.wait()
    rows = [summarize(name, r) for name, r in results.items()]
    (args.out_dir / "rl_overlap.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                              "results": results, "summary": rows}, indent=1))
    print(markdown(rows))


if __name__ == "__main__":
    main()
