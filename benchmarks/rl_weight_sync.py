"""What it costs to get each new RL policy version into a running vLLM engine, three ways.

    .venv/bin/python benchmarks/rl_weight_sync.py [--model smollm2-135m-instruct] [--versions 2] [--prompts 8] [--lora]

Policy versions come from real `policy_gradient` updates (trainers/rl.py) on short rollouts. Per version:
1. merged (the CPU default): merge the adapter into the base and save it (`merged_folder`), then vLLM's in-place
   `reload_weights` into the running compiled engine (+ prefix-cache reset), timed separately;
2. restart: start a fresh engine on the merged folder (what a pipeline without in-place reload would pay);
3. with --lora: an `enable_lora` engine serving the version as a new `LoRARequest` (the GPU default): the first
   call's extra time over a warm call, and its generation speed.
Prints seconds; nothing here is a pass/fail threshold.
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
    parser.add_argument("--versions", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--lora", action="store_true", help="also measure per-request LoRA versions")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    from selfimprove.records import SamplingConfig, Weights
    from selfimprove.engines.merge import merged_folder
    from selfimprove.engines.vllm_engine import VLLMEngine
    from selfimprove.models import prepare_model
    from selfimprove.tasks.gsm8k import GSM8K
    from selfimprove.trainers.rl import PolicyGradient, Rollout

    model = str(prepare_model(args.model))
    task = GSM8K(GSM8K.Config())
    prompts = [task.prompt(p) for p in task.problems("test")[:args.prompts]]
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=64)
    work = Path(tempfile.mkdtemp(prefix="si-rlsync-"))

    t = time.time()
    engine = VLLMEngine(VLLMEngine.Config(adapter_mode="merged"), model, seed=0)
    print(f"engine start (merged mode, compiled): {time.time() - t:.1f}s")
    trainer = PolicyGradient(PolicyGradient.Config(learning_rate=1e-4))
    trainer.setup(model, None, seed=0)
    versions = []
    for v in range(args.versions + 1):
        folder = work / f"v{v}"
        version = trainer.save(folder)
        weights = Weights(model, str(folder / "adapter"), f"v{v}")
        versions.append(weights)
        t = time.time()
        merged_folder(weights)
        merge = time.time() - t
        t = time.time()
        engine._use(weights)  # the in-place reload alone (the merged folder is ready)
        reload = time.time() - t
        t = time.time()
        outputs = engine.generate(prompts, sampling, weights, seed=v)
        gen = time.time() - t
        tokens = sum(c.num_tokens for out in outputs for c in out)
        print(f"version {v}: merge+save {merge:.2f}s, in-place reload {reload:.2f}s, "
              f"generate {tokens} tokens in {gen:.1f}s ({tokens / gen:.0f} tok/s)")
        if v == args.versions:
            break
        rollouts = [Rollout("p" + str(i // 2), [p], [c.text], [c.finish_reason == "stop"], [1.0 if k else -1.0], version)
                    for i, (p, out) in enumerate(zip(prompts, outputs)) for k, c in enumerate(out)]
        t = time.time()
        metrics = trainer.step(rollouts, [0.01])
        print(f"  update on {len(rollouts)} rollouts: {time.time() - t:.1f}s (kl {metrics['kl/attempt1']:.2e})")
    engine.close()

    t = time.time()
    fresh = VLLMEngine(VLLMEngine.Config(adapter_mode="merged"), str(merged_folder(versions[-1])), seed=0)
    print(f"restart instead: a fresh engine on the merged folder started in {time.time() - t:.1f}s")
    fresh.close()

    if args.lora:
        t = time.time()
        lora = VLLMEngine(VLLMEngine.Config(adapter_mode="lora"), model, seed=0)
        print(f"engine start (enable_lora): {time.time() - t:.1f}s")
        for weights in versions[1:]:
            t = time.time()
            outputs = lora.generate(prompts, sampling, weights, seed=0)
            first = time.time() - t
            t = time.time()
            lora.generate(prompts, sampling, weights, seed=0)
            warm = time.time() - t
            tokens = sum(c.num_tokens for out in outputs for c in out)
            print(f"lora {weights.label}: first call {first:.1f}s, warm call {warm:.1f}s "
                  f"(load ≈ {first - warm:.2f}s; {tokens / warm:.0f} tok/s)")
        lora.close()


if __name__ == "__main__":
    main()
