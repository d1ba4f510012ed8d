"""P11: the engine's start on a fresh machine, and whether compiling it pays for itself over a run.

    .venv/bin/python benchmarks/engine_start.py [--model smollm2-135m-instruct] [--prompts 64] [--max-tokens 96]
        [--job-tokens N | --run-dir runs/star_arithmetic]

vLLM-CPU compiles the model with torch.compile when the engine starts (about 100 s from a cold cache on 2 cores)
unless `enforce_eager` is set; compiled generation is faster. Which wins depends on how much a run generates.
Four variants, each in a fresh process, one after the other, starting selfimprove's engine (`vllm`, merged mode,
as real runs use it):
- compiled, cold: vLLM's and Inductor's caches point at an empty folder (what a fresh machine has);
- compiled, warm: the same folder again (a second run on the same machine);
- eager: `enforce_eager: true` (no compile; the cache does not matter);
- eager with a 1 GiB KV cache instead of the default 2 (`cpu_kv_cache_gib`).
Each measures the start (constructor to ready), the output tokens per second of sampled generation as the main
job's generate stage does it (4 samples per arithmetic prompt, T = 0.7, 96 tokens), and the resident memory of
every process after generating (P6). The job estimate is start + job tokens / tokens per second: `--run-dir`
counts the output tokens every generating stage of a finished run wrote (`num_tokens` of its samples),
`--job-tokens` gives the count. The estimate leaves out what does not
depend on the engine (training, critics), so it compares the variants, not whole jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args) -> None:
    """One variant: start the engine, time a warm sampled call; print one JSON line."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import SamplingParams

    from selfimprove.engines.vllm_engine import VLLMEngine
    from selfimprove.models import prepare_model
    from selfimprove.tasks.arithmetic import Arithmetic

    model = str(prepare_model(args.model))
    task = Arithmetic(Arithmetic.Config(num_test=args.prompts))
    prompts = [task.prompt(p) for p in task.problems("test")]
    t = time.time()
    engine = VLLMEngine(VLLMEngine.Config(adapter_mode="merged", enforce_eager=args.eager,
                                          cpu_kv_cache_gib=args.kv_cache_gib), model)
    out = {"start_seconds": round(time.time() - t, 1)}
    params = SamplingParams(n=4, temperature=0.7, max_tokens=args.max_tokens)
    engine.llm.chat(prompts[:8], params, use_tqdm=False)  # first-call costs
    t = time.time()
    results = engine.llm.chat(prompts, params, use_tqdm=False)
    out["tok_s"] = round(sum(len(c.token_ids) for r in results for c in r.outputs) / (time.time() - t), 1)
    out["rss_gib"] = resident_gib()
    engine.close()
    print("RESULT " + json.dumps(out), flush=True)


def resident_gib() -> dict:
    """Resident memory now, of this process (the run's main process: imports, the engine client) and of each
    child (the engine core, its worker: weights, KV cache, compiled graphs), in GiB."""
    import psutil

    me = psutil.Process()
    sizes = {"main": me.memory_info().rss}
    for child in me.children(recursive=True):
        try:
            sizes[f"{child.pid} {child.name()}"] = child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    sizes = {k: round(v / 2**30, 2) for k, v in sizes.items()}
    return {**sizes, "total": round(sum(sizes.values()), 2)}


def job_tokens(run_dir: Path) -> int:
    """Output tokens of every sample a finished run's generating stages wrote (all rounds, round 0 included)."""
    from selfimprove.artifacts import load_rows

    total = 0
    for data in sorted(run_dir.glob("round_*/*/data")):
        rows = load_rows(data)
        if rows and "num_tokens" in rows[0]:
            total += sum(row["num_tokens"] or 0 for row in rows)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--job-tokens", type=int, help="output tokens a run generates (default: from --run-dir)")
    parser.add_argument("--run-dir", type=Path, help="a finished run whose generated tokens to count")
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kv-cache-gib", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    tokens = args.job_tokens or (job_tokens(args.run_dir) if args.run_dir else None)

    cache = Path(tempfile.mkdtemp(prefix="engine-start-cache."))
    variants = {"compiled, cold cache": [], "compiled, warm cache": [], "eager": ["--eager"],
                "eager, KV cache 1 GiB": ["--eager", "--kv-cache-gib", "1"]}
    results = {}
    for name, flags in variants.items():
        env = {**os.environ, "VLLM_CACHE_ROOT": str(cache / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor")}
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--prompts", str(args.prompts),
               "--max-tokens", str(args.max_tokens), *flags]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        results[name] = (json.loads(lines[-1][len("RESULT "):]) if proc.returncode == 0 and lines
                         else {"error": (proc.stderr or proc.stdout)[-400:]})
        print(name, results[name], flush=True)

    print(f"\n{args.model}, {args.prompts} arithmetic prompts x 4 samples, T = 0.7, {args.max_tokens} tokens, "
          f"{os.cpu_count()} CPUs" + (f"; job: {tokens:,} output tokens" if tokens else ""))
    print("| variant | engine start s | sampled tok/s | job estimate s (start + tokens / rate) | resident GiB, all "
          "processes (main) |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error'][-120:]!r} | | | |")
            continue
        estimate = f"{r['start_seconds'] + tokens / r['tok_s']:.0f}" if tokens else "-"
        print(f"| {name} | {r['start_seconds']} | {r['tok_s']:.0f} | {estimate} | {r['rss_gib']['total']} "
              f"({r['rss_gib']['main']}) |")


if __name__ == "__main__":
    main()
