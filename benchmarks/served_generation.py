"""Served vs in-process generation, one vs two local servers, and new weights by in-place sync vs a restart.

    .venv/bin/python benchmarks/served_generation.py [--model smollm2-135m-instruct] [--prompts 64] \
        [--max-tokens 128] [--n 1] [--temperature 0] [--enforce-eager]

On the same prompts and sampling, one after the other (never two engines at once, so none steals the other's
cores):
1. the in-process engine (`vllm`, merged mode, its own engine-core process, as real runs use it);
2. the served engine with one local server (`vllm_server`, `launch: 1`), which gets every core;
3. the served engine with two local servers (`launch: 2`), each bound to half of the cores;
   then, on those two servers, a new adapter version (random LoRA B matrices): the merge (paid once per version
   on either path), the in-place sync to both servers (`reload_weights` + prefix-cache reset + version label,
   measured as a two-prompt, one-token call with the new weights, one request per server, minus the same call
   once synced; the servers sync in parallel), against starting two fresh servers on the merged folder.
Prints one table at the end; timings are wall-clock seconds of a warm second call (the first call of an
engine pays one-off costs), nothing here is a pass/fail threshold. Greedy outputs are also compared with the
in-process engine's (identical in float32; bf16 kernels may break argmax ties differently).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def timed_generate(engine, prompts, sampling, weights):
    engine.generate(prompts[:4], sampling, weights, seed=0)  # warm-up: first-call costs
    t = time.time()
    out = engine.generate(prompts, sampling, weights, seed=0)
    seconds = time.time() - t
    return out, seconds, sum(c.num_tokens for row in out for c in row)


def random_adapter(model: str, folder: Path) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model, dtype="auto"),
                                LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype) * 0.01)
    peft_model.save_pretrained(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile anywhere (faster starts)")
    parser.add_argument("--port", type=int, default=8200)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    from selfimprove.engines.merge import merged_folder
    from selfimprove.engines.vllm_engine import VLLMEngine
    from selfimprove.engines.vllm_server import VLLMServerEngine
    from selfimprove.models import prepare_model
    from selfimprove.records import SamplingConfig, Weights
    from selfimprove.serve import ServerOptions, launch
    from selfimprove.tasks.arithmetic import Arithmetic

    model = str(prepare_model(args.model))
    task = Arithmetic(Arithmetic.Config(num_train=1, num_test=args.prompts, prompt_format="chat"))
    prompts = [task.prompt(p) for p in task.problems("test")][:args.prompts]
    sampling = SamplingConfig(n=args.n, temperature=args.temperature, max_tokens=args.max_tokens)
    base = Weights(model)
    rows = []  # (path, start s, generate s, tokens)

    t = time.time()
    local = VLLMEngine(VLLMEngine.Config(adapter_mode="merged", enforce_eager=args.enforce_eager), model, seed=0)
    start = time.time() - t
    reference, seconds, tokens = timed_generate(local, prompts, sampling, base)
    local.close()
    rows.append(("in-process (vllm)", start, seconds, tokens))
    print(f"in-process: {tokens} tokens in {seconds:.2f}s", flush=True)

    served_out = {}
    for replicas in (1, 2):
        config = VLLMServerEngine.Config(launch=replicas, port=args.port, enforce_eager=args.enforce_eager,
                                         adapter_mode="merged")
        t = time.time()
        engine = VLLMServerEngine(config, model)
        start = time.time() - t
        out, seconds, tokens = timed_generate(engine, prompts, sampling, base)
        served_out[replicas] = out
        rows.append((f"served, {replicas} server{'s' if replicas > 1 else ''}", start, seconds, tokens))
        print(f"{replicas} server(s): {tokens} tokens in {seconds:.2f}s", flush=True)
        if replicas == 1:
            engine.close()

    # New weights into the two running servers vs restarting them.
    work = Path(tempfile.mkdtemp(prefix="si-served-bench-"))
    version = Weights.of(model, random_adapter(model, work / "adapter"), "v1")
    t = time.time()
    folder = merged_folder(version)
    merge = time.time() - t
    one = SamplingConfig(max_tokens=1)
    loads = engine.weight_loads
    t = time.time()
    engine.generate(prompts[:2], one, version, seed=0)  # one request per server: each syncs, then one token
    first = time.time() - t
    t = time.time()
    engine.generate(prompts[:2], one, version, seed=0)
    again = time.time() - t
    sync = max(first - again, 0.0)
    loads = engine.weight_loads - loads
    engine.close()
    t = time.time()
    options = ServerOptions(enforce_eager=args.enforce_eager)
    fresh = launch(folder, 2, port=args.port, options=options)
    restart = time.time() - t
    fresh.stop()

    print()
    print(f"{args.prompts} chat prompts x n={args.n}, max {args.max_tokens} tokens, temperature {args.temperature}, "
          f"{args.model}, {os.cpu_count()} CPUs" + (", eager" if args.enforce_eager else ", compiled"))
    print(f"{'path':24} {'start s':>8} {'generate s':>11} {'tok/s':>8} {'vs in-process':>14}")
    local_rate = rows[0][3] / rows[0][2]
    for name, start, seconds, tokens in rows:
        print(f"{name:24} {start:8.1f} {seconds:11.2f} {tokens / seconds:8.0f} {tokens / seconds / local_rate:13.2f}x")
    print(f"two servers vs one: {rows[2][3] / rows[2][2] / (rows[1][3] / rows[1][2]):.2f}x the throughput")
    if args.temperature == 0:
        for replicas, out in served_out.items():
            same = sum(a.text == b.text for ra, rb in zip(out, reference) for a, b in zip(ra, rb))
            print(f"greedy outputs identical to in-process ({replicas} server(s)): {same}/{len(prompts) * args.n}")
    print(f"new weights: merge {merge:.2f}s (either path); in-place sync to 2 servers {sync:.2f}s ({loads} reloads) "
          f"vs restarting 2 servers {restart:.1f}s: restart costs {restart / max(sync, 1e-3):.0f}x the sync")


if __name__ == "__main__":
    main()
