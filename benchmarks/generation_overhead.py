"""Generation through selfimprove vs the raw engines, and the cost of putting a round's weights in a running
engine, measured side by side in one process (rows P1, P2, P3 and P7 of benchmarks/README.md).

    .venv/bin/python benchmarks/generation_overhead.py [--model smollm2-135m-instruct] [--problems 128]
        [--max-tokens 128] [--hf-problems 64] [--lora] [--out FILE]

On one engine (`vllm`, merged mode, as real runs on a CPU use it), over the same arithmetic chat prompts:
- P1: a generate stage's rollout (`sample_problems`: seeded requests, rows, atomic shards on disk) at the default
  chunking, and in chunks of `--chunk-size`, vs raw `vllm.LLM.chat` on the same prompts and sampling (greedy,
  so the work is identical); tokens per second of each;
- P2: generation with a round's weights (an SFT adapter, merged into the running engine) vs the base, both at a
  fixed length (`ignore_eos`), so the token counts are equal; the two alternate `--switches` times, each call
  right after its switch, and the medians are compared;
- P3: new weights live in the running engine — the in-memory merge (`load_adapter`: the worker rewrites the
  layers the adapter touches) and, for comparison, PEFT's merge saved to disk plus a full in-place reload from
  that folder — vs an engine restart (the same disk merge, then a fresh engine start);
- P7: vLLM vs transformers `generate` (what most research scripts use: the model in its folder's dtype, batches of
  16, left padding, greedy) on `--hf-problems` of the prompts, both at a fixed length.
With `--lora`, a second engine with `enable_lora=True` serves the adapter per request (the GPU default), for the
CPU comparison. Prints one table; writes the numbers as JSON (to --out, else $OUT/generation_overhead.json when
OUT is set). Nothing here is a pass/fail threshold: the targets are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def tokens_per_second(fn) -> float:
    t = time.time()
    tokens = fn()
    return tokens / (time.time() - t)


def hf_generate(model_path: str, prompts: list, max_tokens: int, batch_size: int = 16) -> float:
    """Tokens per second of transformers `generate`, greedy, exactly `max_tokens` new tokens per prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto").eval()
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]

    def run(batch_texts) -> int:
        enc = tokenizer(batch_texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        return (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]

    run(texts[:2])  # warm-up
    return tokens_per_second(lambda: sum(run(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--problems", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=32, help="chunk size of the chunked pipeline run")
    parser.add_argument("--hf-problems", type=int, default=64, help="prompts for transformers generate (P7)")
    parser.add_argument("--switches", type=int, default=3, help="weight switches timed per P3 path")
    parser.add_argument("--lora", action="store_true", help="also measure per-request LoRA serving")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import datasets

    datasets.disable_progress_bars()

    from vllm import SamplingParams

    from selfimprove.engines.merge import merged_folder
    from selfimprove.engines.vllm_engine import VLLMEngine
    from selfimprove.models import prepare_model
    from selfimprove.records import SamplingConfig, Weights
    from selfimprove.stages.common import Chunking
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

    # A real adapter to serve: a few SFT steps on gold scratchpads (the trainer's default LoRA: r16, attention).
    rows = [{"prompt": task.prompt(p), "completion": [{"role": "assistant", "content": p["solution"]}]}
            for p in task.problems("train")]
    SFT(SFT.Config(lora=LoraSettings(), optim=Optimization(max_steps=4, batch_size=4))).train(
        rows, model, None, work / "adapter", work / "trainer", seed=0, round_index=1)
    adapter = Weights.of(model, str(work / "adapter"), "bench")
    base = Weights(model)

    t = time.time()
    engine = VLLMEngine(VLLMEngine.Config(adapter_mode="merged"), model)
    start_seconds = time.time() - t
    engine.generate(prompts[:8], sampling, base, seed=0)  # warm-up: first-call costs

    def raw(params) -> int:
        outs = engine.llm.chat(prompts, params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    def pipeline(tag, chunk_size) -> int:
        out = sample_problems(engine=lambda: engine, task=task, problems=problems, sampling=sampling, weights=base,
                              chunking=Chunking(chunk_size), shard_dir=work / tag, seed=lambda *parts: 0,
                              round_index=1, stage=tag)
        return sum(r["num_tokens"] for r in out)

    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    fixed = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    default_chunk = Chunking().size
    rates = {
        "raw vLLM": tokens_per_second(lambda: raw(greedy)),
        f"pipeline, default chunking ({default_chunk})": tokens_per_second(lambda: pipeline("default", default_chunk)),
        f"pipeline, chunks of {args.chunk_size}": tokens_per_second(lambda: pipeline("chunked", args.chunk_size)),
    }
    # P2: base and round's weights alternate, each measured right after its switch (a first call on new weights
    # is what a round pays); medians of --switches pairs, as single calls on 2 cores vary by ±15%.
    fixed_rates = {"base": [], "adapter": []}
    for _ in range(args.switches):
        for tag, weights in (("base", base), ("adapter", adapter)):
            engine.prepare(weights)
            fixed_rates[tag].append(tokens_per_second(lambda: raw(fixed)))
    rates["base, fixed length"] = statistics.median(fixed_rates["base"])
    rates["round's weights (merged in memory), fixed length"] = statistics.median(fixed_rates["adapter"])

    # P3: weights switches. In memory: base <-> adapter, each switch a full load_adapter call.
    in_memory = []
    for i in range(args.switches):
        for weights in (base, adapter):
            t = time.time()
            engine.prepare(weights)
            in_memory.append(time.time() - t)
    # On disk: PEFT merge + save (cache removed first, as every new version pays it), then a full reload.
    disk_merge, disk_reload = [], []
    for i in range(args.switches):
        shutil.rmtree(Path(f"{adapter.adapter}-merged"), ignore_errors=True)
        t = time.time()
        folder = merged_folder(adapter)
        disk_merge.append(time.time() - t)
        t = time.time()
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        engine.llm.reset_prefix_cache()
        disk_reload.append(time.time() - t)
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": model})
    engine.close()

    if args.lora:
        lora_engine = VLLMEngine(VLLMEngine.Config(adapter_mode="lora"), model)
        lora_engine.generate(prompts[:8], sampling, adapter, seed=0)
        t = time.time()
        out = lora_engine.generate(prompts, sampling, adapter, seed=0)
        rates["per-request LoRA (enable_lora engine)"] = sum(c[0].num_tokens for c in out) / (time.time() - t)
        lora_engine.close()

    rates["transformers generate, fixed length"] = hf_generate(model, prompts[:args.hf_problems], args.max_tokens)

    memory = statistics.median(in_memory)
    disk = statistics.median(disk_merge) + statistics.median(disk_reload)
    restart = statistics.median(disk_merge) + start_seconds
    rows_out = {
        "P1": rates[f"pipeline, default chunking ({default_chunk})"] / rates["raw vLLM"],
        "P2": rates["round's weights (merged in memory), fixed length"] / rates["base, fixed length"],
        "P3": memory / restart,
        "P7": rates["base, fixed length"] / rates["transformers generate, fixed length"],
    }
    print(f"\n{args.model}, {len(prompts)} arithmetic prompts, greedy, {args.max_tokens} tokens, {os.cpu_count()} CPUs")
    print("| path | tok/s | vs raw vLLM |")
    print("| --- | --- | --- |")
    for name, r in rates.items():
        print(f"| {name} | {r:.0f} | {r / rates['raw vLLM']:.2f}x |")
    print(f"\nnew weights in the running engine, median of {args.switches} switches:")
    print(f"- in memory (load_adapter): {memory:.2f} s")
    print(f"- on disk: PEFT merge + save {statistics.median(disk_merge):.2f} s + full reload "
          f"{statistics.median(disk_reload):.2f} s = {disk:.2f} s")
    print(f"- restart: the same merge + engine start {start_seconds:.1f} s = {restart:.1f} s")
    print(f"\nP1 pipeline / raw vLLM {rows_out['P1']:.2f}x | P2 round's weights / base {rows_out['P2']:.2f}x | "
          f"P3 in-memory / restart 1/{1 / rows_out['P3']:.0f} (disk path 1/{restart / disk:.0f}) | "
          f"P7 vLLM / transformers {rows_out['P7']:.1f}x")
    out = args.out or (os.path.join(os.environ["OUT"], "generation_overhead.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps({
            "model": args.model, "prompts": len(prompts), "max_tokens": args.max_tokens, "tok_s": rates,
            "fixed_length_tok_s": fixed_rates, "switch_seconds": {"in_memory": in_memory, "disk_merge": disk_merge, "disk_reload": disk_reload,
                               "engine_start": start_seconds},
            "rows": rows_out}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
