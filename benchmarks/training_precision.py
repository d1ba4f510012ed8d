"""Training precision: selfimprove's trainers with the frozen base in bf16 (LoRA in float32) vs all in float32,
side by side in one run (issue 24).

    .venv/bin/python benchmarks/training_precision.py [--model smollm2-135m-instruct] [--parts sft,dpo,rl]
        [--sft-steps 12] [--dpo-steps 6] [--rl-steps 4] [--rl-groups 4] [--out FILE]

The two sides differ only in the model folder they are given. The model is written twice, in bfloat16 and, from
that, in float32 (bf16 -> float32 is exact: both folders hold the same weights). The trainers load a folder in its
own dtype (`trainers/common.py: load_policy`) and PEFT keeps the LoRA weights in float32 on either, so the bf16
side is what the pipelines run on the embedded bf16 model and the float32 side what they would run on a float32
folder. Neither side autocasts (TRL's `bf16` flag is off on a CPU: `device_kwargs`). Per part, the same data,
order, seed and steps on both sides:
- `sft`: the SFT trainer with the main job's settings (pipelines/star_arithmetic.yaml: LoRA r16 on q/k/v/o, lr
  3e-4, batch 8, max length 768) on `--sft-steps` x 8 gold scratchpads of the arithmetic task (each seen once).
- `dpo`: the DPO trainer with trainers/dpo.py's defaults (reference = the base with the adapter disabled, beta
  0.1, sigmoid loss, lr 5e-5, batch 4) on `--dpo-steps` x 4 pairs (gold scratchpad chosen, a wrong sum rejected).
  Since this measurement DPO trains in float32 on a CPU whatever the folder (`dpo.training_dtype`); here that
  choice is replaced by the folder's dtype on both sides, so the bf16 side is DPO as it trained before.
- `rl`: `PolicyGradient.step` with pipelines/grpo_arithmetic.yaml's trainer settings (GRPO advantages, lr 1e-4,
  micro-batches of 16, seq-mean-token-mean, KL beta 0.01 against the base with the adapter disabled, T 0.7) on
  the same fixed rollouts per step (training_overhead.py's: `--rl-groups` problems x 8 completions of varied
  lengths, random 0/1 rewards).
Each part runs its two sides in two processes started together that take turns step by step (one trains while
the other waits on a semaphore), so neither gets a warmer or quieter machine, and each process's peak RSS
(`ru_maxrss`: load, tokenize, train, save) is its side's own. The first step of each side is a warm-up (one-off
kernel and allocator set-up, and the other side still loading) and is not timed: seconds per step are the median
of steps 2..N, from one step's end to the next (SFT, DPO: the Trainer's per-step log, received by a tracker) or
`step`'s own `update_seconds` (RL).

Whether the result holds, measured afterwards in this process on the saved adapters:
- every part: the per-step training losses (the same batches on both sides), and how the two sides' learned
  weight updates agree: the LoRA products B A of every adapted layer, concatenated (both start from the same
  seeded A and B = 0, so B A is exactly what training added): their cosine and the ratio of their norms (bf16 /
  float32). A bf16 side that learns less, or otherwise, would show as a norm ratio below 1 or a cosine well
  below 1; where bf16 only reads the adapter's effect wrongly (its forward pass adds a layer's small LoRA output
  to bf16 activations and rounds it away), the adapters agree and the losses and the evaluations below differ.
- `sft`: held-out loss (mean negative log-likelihood per completion token) of the gold scratchpads of 32 test
  sums, for the base and each side's adapter, each evaluated on the float32 and on the bf16 base.
- `dpo`: on 32 held-out pairs, each side's adapter's implicit reward margin beta((log pi - log ref)(chosen) -
  (...)(rejected)), evaluated on the float32 and on the bf16 base (the reference: that base, adapter off), so
  that one adapter's margin as each precision reads it is side by side; and, for a separate reference model
  in another precision than the policy (`dpo._plain_model` loaded float32 beside a bf16 policy before this
  measurement), how far the bf16 base's sequence log-probabilities lie from float32's on these completions
  (mean |difference| per completion) and the margin that difference alone adds (mean |beta x (difference on
  chosen - difference on rejected)|).
Prints a table and writes everything as JSON (to --out, else $OUT/training_precision.json when OUT is set).
Nothing here is a pass/fail threshold: the target is in benchmarks/README.md (P15).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

from training_overhead import rollouts_for, wrong_solution

SIDES = ("bf16", "float32")
TIMEOUT = 1800  # seconds one side may wait for the other before the run is declared stuck
HELD_OUT = 32
DPO_BETA = 0.1  # DPO.Config's default
RL = dict(learning_rate=1e-4, micro_batch_size=16, loss_agg_mode="seq-mean-token-mean")  # grpo_arithmetic.yaml
RL_KL, RL_TEMPERATURE, RL_MAX_TOKENS = 0.01, 0.7, 96


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def write_copies(model_path: str, work: Path) -> dict[str, str]:
    """The model as a bf16 folder and a float32 folder with the same weights (the float32 one upcast from the bf16
    one, which for a bf16 model such as the embedded one holds its weights bit for bit)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    folders = {}
    for side, dtype in zip(SIDES, (torch.bfloat16, torch.float32)):
        folders[side] = str(work / f"model-{side}")
        model.to(dtype).save_pretrained(folders[side])
        tokenizer.save_pretrained(folders[side])
    return folders


class Lockstep:
    """Two processes taking turns step by step. `after_step(k)` is called by side `me` right after its step k:
    both pass step 1 (the untimed warm-up) before either starts step 2; from then on one side steps while the other
    waits, side 0 first; after the last step each waits for the other to finish its steps too, so that nothing a
    side does after training (saving) overlaps the other's timed steps. `seconds` holds the time of steps 2..N."""

    def __init__(self, me: int, go, both, steps: int):
        if steps < 2:
            raise ValueError("at least 2 steps per side: the first is a warm-up")
        self.me, self.go, self.both, self.steps = me, go, both, steps
        self.seconds: list[float] = []
        self.started = 0.0

    def after_step(self, k: int) -> None:
        if k > 1:
            self.seconds.append(time.perf_counter() - self.started)
            self.go[1 - self.me].release()
        else:
            self.both.wait(TIMEOUT)
        if k == self.steps:
            self.both.wait(TIMEOUT)
            return
        if (k > 1 or self.me == 1) and not self.go[self.me].acquire(timeout=TIMEOUT):
            raise TimeoutError(f"the other side did not finish its step {k} within {TIMEOUT} s")
        self.started = time.perf_counter()


# -- one side, in its own process ------------------------------------------------------------------------------
def run_side(part: str, me: int, side: str, folder: str, steps: int, rl_groups: int, go, both, out: str) -> None:
    import datasets
    import torch

    datasets.disable_progress_bars()
    torch.manual_seed(0)
    lockstep = Lockstep(me, go, both, steps)
    work = Path(out).with_suffix("")
    if part == "rl":
        result = train_rl(folder, steps, rl_groups, lockstep, work)
    else:
        result = train_trl(part, folder, steps, lockstep, work)
    result.update(side=side, seconds_per_step=[round(s, 3) for s in result.get("seconds_per_step", lockstep.seconds)],
                  peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    Path(out).write_text(json.dumps(result))


def arithmetic_rows(part: str, split: str, n: int) -> list[dict]:
    """The first `n` problems of `split` as SFT rows (gold scratchpad) or DPO pairs (gold chosen, a wrong sum
    rejected); one task config for training and held-out rows, so that no held-out sum is trained on."""
    from selfimprove.tasks.arithmetic import Arithmetic

    task = Arithmetic(Arithmetic.Config(num_train=max(n, 64), num_test=HELD_OUT))
    problems = task.problems(split)[:n]
    if part == "sft":
        return [{"prompt": task.prompt(p), "completion": assistant(p["solution"])} for p in problems]
    return [{"prompt": task.prompt(p), "chosen": assistant(p["solution"]), "rejected": assistant(wrong_solution(p))}
            for p in problems]


def train_trl(part: str, folder: str, steps: int, lockstep: Lockstep, work: Path) -> dict:
    """The SFT or DPO trainer as the pipelines call it, its per-step logs (one per step: logging_steps 1, which
    changes no numerics) received by a tracker that also hands the turn over."""
    from selfimprove.registry import TRACKERS
    from selfimprove.trackers import Tracker, TrackerSpec, Trackers
    from selfimprove.trainers import dpo
    from selfimprove.trainers.common import Optimization
    from selfimprove.trainers.dpo import DPO
    from selfimprove.trainers.sft import SFT

    logged: list[dict] = []

    @TRACKERS.register("step_clock")
    class StepClock(Tracker):
        def start(self, run_config: dict) -> None:
            pass

        def log(self, metrics: dict, step: int) -> None:
            row = {k.removeprefix("train/step/"): v for k, v in metrics.items()}
            if "loss" in row:  # a step's log (the Trainer's closing summary has train_loss instead)
                logged.append(row)
                lockstep.after_step(int(row["global_step"]))

        def finish(self) -> None:
            pass

    if part == "sft":
        batch = 8
        trainer = SFT(SFT.Config(optim=Optimization(learning_rate=3e-4, batch_size=batch, max_length=768,
                                                    max_steps=steps, logging_steps=1)))
    else:
        batch = Optimization().batch_size
        trainer = DPO(DPO.Config(optim=Optimization(learning_rate=5e-5, max_steps=steps, logging_steps=1)))
    rows = arithmetic_rows(part, "train", steps * batch)
    (work / "tracker").mkdir(parents=True, exist_ok=True)
    # DPO picks float32 on a CPU whatever the folder (this measurement is why): here both sides load their folder's
    with mock.patch.object(dpo, "training_dtype", lambda: "auto"), \
            Trackers([TrackerSpec.named("step_clock")], work / "tracker", {}) as trackers:
        trackers.stage = "train"
        metrics = trainer.train(rows, folder, None, work / "adapter", work / "train", seed=0, round_index=1)
    if len(logged) != steps:
        raise RuntimeError(f"{part}: {len(logged)} step logs for {steps} steps")
    keep = ("loss", "grad_norm", "rewards/margins", "rewards/accuracies")
    return {"rows": len(rows), "adapter": str(work / "adapter"), "final_loss": metrics["final_loss"],
            "steps": [{k: r[k] for k in keep if k in r} for r in logged]}


def train_rl(folder: str, steps: int, groups: int, lockstep: Lockstep, work: Path) -> dict:
    from selfimprove.trainers.rl import PolicyGradient

    trainer = PolicyGradient(PolicyGradient.Config(**RL))
    trainer.setup(folder, None, seed=0)
    trainer.save(work / "v0")
    dtypes = {"base": sorted({str(p.dtype) for p in trainer.model.parameters() if not p.requires_grad}),
              "lora": sorted({str(p.dtype) for p in trainer.params})}
    logged = []
    for k in range(1, steps + 1):
        update = trainer.step(rollouts_for(trainer, groups, 8, seed=k), [RL_KL], RL_TEMPERATURE, RL_MAX_TOKENS)
        trainer.save(work / f"v{k}")
        logged.append({key: update[key] for key in ("loss", "kl/attempt1", "grad_norm", "tokens", "update_seconds")})
        lockstep.after_step(k)
    return {"trajectories": groups * 8, "dtypes": dtypes, "adapter": str(work / f"v{steps}" / "adapter"),
            "final_loss": logged[-1]["loss"], "steps": logged,
            "seconds_per_step": [r["update_seconds"] for r in logged[1:]]}


def run_part(part: str, index: int, folders: dict[str, str], steps: int, rl_groups: int, work: Path) -> dict:
    """Both sides of `part` in two processes taking turns; which side steps first alternates from part to part."""
    ctx = multiprocessing.get_context("spawn")
    go, both = [ctx.Semaphore(0), ctx.Semaphore(0)], ctx.Barrier(2)
    order = SIDES if index % 2 == 0 else SIDES[::-1]
    outs = {side: work / f"{part}-{side}.json" for side in SIDES}
    procs = [ctx.Process(target=run_side, args=(part, me, side, folders[side], steps, rl_groups, go, both,
                                                str(outs[side])))
             for me, side in enumerate(order)]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):  # one side failed: the other would wait for it
            for p in procs:
                p.terminate()
        time.sleep(0.5)
    failed = [side for side, p in zip(order, procs) if p.exitcode != 0]
    if failed:
        raise SystemExit(f"{part}: the {', '.join(failed)} side failed (its traceback is above)")
    sides = {side: json.loads(outs[side].read_text()) for side in SIDES}
    median = {side: statistics.median(r["seconds_per_step"]) for side, r in sides.items()}
    return {"steps": steps, "first_timed": order[0], "sides": sides,
            "median_seconds_per_step": {side: round(v, 3) for side, v in median.items()},
            "float32_over_bf16": round(median["float32"] / median["bf16"], 3),
            "update_agreement": update_agreement(sides["bf16"]["adapter"], sides["float32"]["adapter"])}


# -- quality, measured on the saved adapters -------------------------------------------------------------------
def update_agreement(adapter_a: str, adapter_b: str) -> dict:
    """Cosine and norm ratio (a / b) of two adapters' weight updates B A, over every adapted layer."""
    from safetensors.torch import load_file

    a, b = (load_file(Path(x) / "adapter_model.safetensors") for x in (adapter_a, adapter_b))
    dot = norm_a = norm_b = 0.0
    for key in (k for k in a if "lora_A" in k):
        up = key.replace("lora_A", "lora_B")
        wa, wb = a[up].double() @ a[key].double(), b[up].double() @ b[key].double()
        dot += (wa * wb).sum().item()
        norm_a += wa.square().sum().item()
        norm_b += wb.square().sum().item()
    if not norm_a or not norm_b:
        return {"cosine": None, "norm_ratio": None}  # an update that is exactly zero has no direction
    return {"cosine": round(dot / math.sqrt(norm_a * norm_b), 5), "norm_ratio": round(math.sqrt(norm_a / norm_b), 5)}


def completion_logps(model, tokenizer, rows: list[dict], key: str, batch: int = 8) -> list[list[float]]:
    """Per row, the log-probability of each token of the assistant message `row[key]` after `row["prompt"]`,
    rendered by the chat template as TRL renders a prompt-completion row."""
    import torch

    encoded = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=False)
        ids, head = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in (full, prompt))
        if ids[:len(head)] != head:
            raise ValueError("the chat template renders the prompt differently inside the conversation")
        encoded.append((ids, len(head)))
    out = []
    for start in range(0, len(encoded), batch):
        part = encoded[start:start + batch]
        width = max(len(ids) for ids, _ in part)
        ids = torch.zeros((len(part), width), dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, (seq, _) in enumerate(part):
            ids[i, :len(seq)], attention[i, :len(seq)] = torch.tensor(seq), 1
        with torch.no_grad():
            logps = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float().log_softmax(-1)
        token_logps = logps.gather(2, ids[:, 1:, None]).squeeze(-1).double()
        out += [token_logps[i, head - 1:len(seq) - 1].tolist() for i, (seq, head) in enumerate(part)]
    return out


def evaluated(folder: str, adapters: dict[str, str]):
    """The base in `folder`'s dtype with every adapter loaded (PEFT keeps them in float32), for `scored`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(adapters)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype="auto"),
                                      adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def scored(model, name: str | None, fn):
    """`fn(model)` with adapter `name` active, or the base (every adapter off) for None."""
    if name is None:
        with model.disable_adapter():
            return fn(model)
    model.set_adapter(name)
    return fn(model)


def sft_quality(folders: dict[str, str], result: dict) -> dict:
    """Held-out loss per completion token, {evaluated on the bf16 / float32 base: {base, bf16-trained adapter,
    float32-trained adapter}}."""
    from transformers import AutoTokenizer

    rows = arithmetic_rows("sft", "test", HELD_OUT)
    tokenizer = AutoTokenizer.from_pretrained(folders["float32"])
    adapters = {f"{side}-trained": r["adapter"] for side, r in result["sides"].items()}
    out = {}
    for on in SIDES:
        model = evaluated(folders[on], adapters)
        out[f"on {on} base"] = {}
        for name in (None, *adapters):
            logps = scored(model, name, lambda m: completion_logps(m, tokenizer, rows, "completion"))
            out[f"on {on} base"][name or "base"] = round(-sum(map(sum, logps)) / sum(map(len, logps)), 4)
    return {"held_out_sums": len(rows), "held_out_nll_per_token": out}


def dpo_quality(folders: dict[str, str], result: dict) -> dict:
    """Held-out implicit reward margins, {evaluated on the bf16 / float32 base (the reference: that base, adapter
    off): {bf16-trained, float32-trained adapter: mean margin, accuracy, DPO loss}}, and the bf16 base's
    sequence log-probabilities against float32's."""
    from transformers import AutoTokenizer

    rows = arithmetic_rows("dpo", "test", HELD_OUT)
    tokenizer = AutoTokenizer.from_pretrained(folders["float32"])
    adapters = {f"{side}-trained": r["adapter"] for side, r in result["sides"].items()}

    def sums(model, name):
        return {key: [sum(x) for x in scored(model, name, lambda m: completion_logps(m, tokenizer, rows, key))]
                for key in ("chosen", "rejected")}

    out, refs = {}, {}
    for on in SIDES:
        model = evaluated(folders[on], adapters)
        ref = refs[on] = sums(model, None)
        out[f"on {on} base"] = {}
        for name in adapters:
            policy = sums(model, name)
            margins = [DPO_BETA * ((pc - rc) - (pr - rr)) for pc, rc, pr, rr in
                       zip(policy["chosen"], ref["chosen"], policy["rejected"], ref["rejected"])]
            out[f"on {on} base"][name] = {
                "mean_margin": round(statistics.mean(margins), 5),
                "accuracy": sum(m > 0 for m in margins) / len(margins),
                "dpo_loss": round(statistics.mean(math.log1p(math.exp(-m)) for m in margins), 5)}
    gap = {key: [b - f for b, f in zip(refs["bf16"][key], refs["float32"][key])] for key in refs["bf16"]}
    return {"held_out_pairs": len(rows), "held_out_margins": out,
            "bf16_vs_float32_base_logp": {
                "mean_abs_per_completion": round(statistics.mean(abs(x) for x in gap["chosen"] + gap["rejected"]), 4),
                "mean_abs_margin_it_adds": round(statistics.mean(
                    abs(DPO_BETA * (c - r)) for c, r in zip(gap["chosen"], gap["rejected"])), 5)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--parts", default="sft,dpo,rl")
    parser.add_argument("--sft-steps", type=int, default=12)
    parser.add_argument("--dpo-steps", type=int, default=6)
    parser.add_argument("--rl-steps", type=int, default=4)
    parser.add_argument("--rl-groups", type=int, default=4, help="problems per update (8 completions each)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    parts = args.parts.split(",")
    if unknown := sorted(set(parts) - {"sft", "dpo", "rl"}):
        raise SystemExit(f"unknown part(s) {unknown}: choose from sft, dpo, rl")
    import datasets

    from selfimprove.models import prepare_model

    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="si-precision-bench-"))
    folders = write_copies(str(prepare_model(args.model)), work)
    steps = {"sft": args.sft_steps, "dpo": args.dpo_steps, "rl": args.rl_steps}
    results = {}
    for index, part in enumerate(parts):
        started = time.time()
        results[part] = run_part(part, index, folders, steps[part], args.rl_groups, work)
        if part == "sft":
            results[part]["quality"] = sft_quality(folders, results[part])
        elif part == "dpo":
            results[part]["quality"] = dpo_quality(folders, results[part])
        results[part]["wall_seconds"] = round(time.time() - started, 1)
        print(part, json.dumps(results[part]), flush=True)

    print(f"\n{args.model}, {os.cpu_count()} CPUs; float32 / bf16 > 1: bf16 is faster")
    print("| part | bf16 s/step | float32 s/step | float32 / bf16 | peak RSS bf16 / float32 MiB | final loss bf16 / "
          "float32 | update cosine, norm ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for part, r in results.items():
        s, a = r["sides"], r["update_agreement"]
        print(f"| {part} ({r['steps']} steps) | {r['median_seconds_per_step']['bf16']} | "
              f"{r['median_seconds_per_step']['float32']} | {r['float32_over_bf16']:.2f}x | "
              f"{s['bf16']['peak_rss_mib']:.0f} / {s['float32']['peak_rss_mib']:.0f} | "
              f"{s['bf16']['final_loss']:.4f} / {s['float32']['final_loss']:.4f} | {a['cosine']}, {a['norm_ratio']} |")
    out = args.out or (os.path.join(os.environ["OUT"], "training_precision.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps({"model": args.model, "cpus": os.cpu_count(), **results}, indent=2))


if __name__ == "__main__":
    main()
