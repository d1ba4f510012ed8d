"""Pipeline generation vs raw vLLM, and the cost of switching a round's weights, measured side by side.

    .venv/bin/python benchmarks/generation_overhead.py [--model smollm2-135m-instruct] [--problems 128]
                                                       [--lora]

In one process, on one engine, over the same arithmetic prompts (greedy, so the work is identical):
1. raw `vllm.LLM.chat` — the floor;
2. selfimprove's rollout (`sample_problems`: reseed RPC, rows, atomic shards on disk) in one chunk: the
   pipeline's own overhead at the same batch;
3. the same in chunks of `--chunk-size`: what resumability costs (each chunk's tail runs a shrinking batch);
4. the one-chunk rollout after loading an adapter as merged weights into the running engine (reload, no restart);
and it times the in-place weight reload against a fresh engine start. With `--lora`, a second engine with
`enable_lora=True` then serves the same adapter per request (the GPU default), for the CPU comparison.
Prints tokens/s and the ratios; nothing here is a pass/fail threshold.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--problems", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=32, help="chunk size of the chunked pipeline run")
    parser.add_argument("--lora", action="store_true", help="also measure per-request LoRA serving")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import datasets

    datasets.disable_progress_bars()

    from vllm import SamplingParams

    from selfimprove.records import SamplingConfig, Weights
    from selfimprove.engines.merge import merged_folder
    from selfimprove.engines.vllm_engine import VLLMEngine
    from selfimprove.models import prepare_model
    from selfimprove.stages.rollout import sample_problems
    from selfimprove.tasks.arithmetic import Arithmetic
    from selfimprove.trainers.common import LoraSettings, Optimization
    from selfimprove.trainers.sft import SFT

    model = str(prepare_model(args.model))
    task = Arithmetic(Arithmetic.Config(num_train=64, num_test=args.problems))
    problems = task.problems("test")
    prompts = [task.prompt(p) for p in problems]
    sampling = SamplingConfig(max_tokens=args.max_tokens)
    work = Path(tempfile.mkdtemp(prefix="si-bench-"))

    # A real adapter to serve: a few SFT steps on gold scratchpads.
    rows = [{"prompt": task.prompt(p), "completion": [{"role": "assistant", "content": p["solution"]}]}
            for p in task.problems("train")]
    SFT(SFT.Config(lora=LoraSettings(), optim=Optimization(max_steps=4, batch_size=4))).train(
        rows, model, None, work / "adapter", work / "trainer", seed=0, round_index=1)
    adapter = Weights(model, str(work / "adapter"), "bench")
    t = time.time()
    merged_folder(adapter)
    merge_seconds = time.time() - t

    t = time.time()
    engine = VLLMEngine(VLLMEngine.Config(adapter_mode="merged"), model)
    start_seconds = time.time() - t
    engine.generate(prompts[:8], sampling, Weights(model), seed=0)  # warm-up

    def raw() -> int:
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
        outs = engine.llm.chat(prompts, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def pipeline(weights, tag, chunk_size) -> int:
        out = sample_problems(engine=lambda: engine, task=task, problems=problems, sampling=sampling, weights=weights,
                              hint=False, chunk_size=chunk_size, shard_dir=work / tag, chunk_seed=lambda i: i,
                              round_index=1, stage=tag)
        return sum(r["num_tokens"] for r in out)

    results = {}
    one = len(problems)
    for name, fn in (("raw vLLM", raw), ("pipeline, base", lambda: pipeline(Weights(model), "base", one)),
                     (f"pipeline, chunks of {args.chunk_size}",
                      lambda: pipeline(Weights(model), "chunked", args.chunk_size)),
                     ("pipeline, merged adapter", lambda: pipeline(adapter, "merged", one))):
        t = time.time()
        tokens = fn()
        results[name] = tokens / (time.time() - t)
    t = time.time()
    engine.generate(prompts[:1], SamplingConfig(max_tokens=1), Weights(model), seed=0)  # reload base weights
    reload_seconds = time.time() - t
    engine.close()

    if args.lora:
        lora_engine = VLLMEngine(VLLMEngine.Config(adapter_mode="lora"), model)
        lora_engine.generate(prompts[:8], sampling, adapter, seed=0)
        t = time.time()
        out = lora_engine.generate(prompts, sampling, adapter, seed=0)
        results["per-request LoRA"] = sum(c[0].num_tokens for c in out) / (time.time() - t)
        lora_engine.close()

    floor = results["raw vLLM"]
    print(f"\n{args.model}, {len(prompts)} arithmetic prompts, greedy, max {args.max_tokens} tokens, "
          f"{os.cpu_count()} CPUs")
    print(f"{'path':28} {'tok/s':>8} {'vs raw vLLM':>12}")
    for name, rate in results.items():
        print(f"{name:28} {rate:8.0f} {rate / floor:11.2f}x")
    print(f"\nweights switch in the running engine: {reload_seconds:.2f} s (+ {merge_seconds:.1f} s one-time merge) "
          f"vs engine start {start_seconds:.1f} s: {start_seconds / max(reload_seconds, 1e-9):.0f}x cheaper")


if __name__ == "__main__":
    main()
