"""selfimprove's trainers vs the plain scripts a researcher would write instead, side by side in one process.

    .venv/bin/python benchmarks/training_overhead.py [--model smollm2-135m-instruct] [--parts sft,dpo,rl]
        [--sft-steps 16] [--dpo-steps 8] [--rl-steps 3] [--rl-groups 4] [--out FILE]

- `sft` (row P4): the train stage's SFT trainer (`trainers/sft.py`, the main job's settings: LoRA r16 on the
  attention projections, lr 3e-4, batch 8, max length 768) against a plain TRL script: the same model loaded in
  its folder's dtype, `SFTTrainer` with the same `SFTConfig` values and `peft_config`, `trainer.train()`, then
  `save_pretrained`. The plain script keeps TRL's other defaults, as a user would, gradient checkpointing
  included (TRL turns it on; selfimprove's trainers turn it off where there is no GPU, docs/cpu.md): that
  recomputation is part of the measured difference. Both on the same 64 prompt-completion rows (the arithmetic task's gold scratchpads) for the
  same number of steps; timed whole (load, tokenize, train, save), as a user waits for either, after one
  untimed step of each (one-off costs of the first trainer in a process).
- `dpo` (row P4): the DPO trainer (`trainers/dpo.py`, its defaults: reference = base with the adapter disabled,
  β = 0.1, sigmoid loss, lr 5e-5, batch 4) against a plain `DPOTrainer` script with the same values, on 64
  pairs (gold scratchpad chosen, a wrong sum rejected).
- `rl` (row P8): one policy-gradient update (`PolicyGradient.step`: GRPO advantages, KL β = 0.01 against the
  base with the adapter disabled, micro-batches of 4) against a plain PyTorch loop on the same LoRA model
  class, the same token ids and the same micro-batch size: forward, reference forward, the same loss, backward,
  clip, AdamW step, micro-batches in the given order (a plain script does not sort by length). The two alternate
  step by step so that neither gets a warmer machine; the first step of each is a warm-up and not counted.
Prints seconds and the ratio plain / selfimprove per part (> 1: selfimprove is faster) and writes the raw
numbers as JSON (to --out, else $OUT/training_overhead.json when OUT is set). Nothing here is a pass/fail
threshold: the targets are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

LORA = dict(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def arithmetic_rows(n: int):
    from selfimprove.tasks.arithmetic import Arithmetic

    task = Arithmetic(Arithmetic.Config(num_train=max(n, 64), num_test=8))
    return task, task.problems("train")[:n]


def wrong_solution(problem: dict) -> str:
    wrong = int(problem["answer"]) + 1
    return f"{problem['question']} = {wrong}\nThe answer is {wrong}."


# -- P4: SFT and DPO -------------------------------------------------------------------------------------------
def ours(kind: str, model: str, rows: list[dict], steps: int, work: Path) -> float:
    from selfimprove.trainers.common import LoraSettings, Optimization
    from selfimprove.trainers.dpo import DPO
    from selfimprove.trainers.sft import SFT

    t = time.time()
    if kind == "sft":
        trainer = SFT(SFT.Config(lora=LoraSettings(**LORA), optim=Optimization(
            learning_rate=3e-4, batch_size=8, max_length=768, max_steps=steps)))
    else:
        trainer = DPO(DPO.Config(lora=LoraSettings(**LORA), optim=Optimization(
            learning_rate=5e-5, max_length=768, max_steps=steps)))
    trainer.train(rows, model, None, work / f"ours-{kind}" / "adapter", work / f"ours-{kind}" / "work", seed=0,
                  round_index=1)
    return time.time() - t


def plain(kind: str, model_path: str, rows: list[dict], steps: int, work: Path) -> float:
    """What a researcher writes with TRL directly: same values, no selfimprove code."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = time.time()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.05,
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    common = dict(output_dir=str(work / f"plain-{kind}"), max_steps=steps, lr_scheduler_type="constant",
                  logging_steps=5, save_strategy="no", report_to=[], seed=0, use_cpu=not torch.cuda.is_available(),
                  bf16=False, max_length=768, dataset_num_proc=None)
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, learning_rate=3e-4, per_device_train_batch_size=8, completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora)
    else:
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, learning_rate=5e-5, per_device_train_batch_size=4, beta=0.1)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora)
    trainer.train()
    trainer.model.save_pretrained(work / f"plain-{kind}" / "adapter")
    return time.time() - t


def training_part(kind: str, model: str, steps: int, work: Path) -> dict:
    task, problems = arithmetic_rows(64)

    def assistant(text):
        return [{"role": "assistant", "content": text}]

    if kind == "sft":
        rows = [{"prompt": task.prompt(p), "completion": assistant(p["solution"])} for p in problems]
    else:
        rows = [{"prompt": task.prompt(p), "chosen": assistant(p["solution"]), "rejected": assistant(wrong_solution(p))}
                for p in problems]
    # One untimed step of each first: the first trainer built in a process pays one-off costs (imports,
    # kernel set-up) that would otherwise land on whichever side ran first.
    ours(kind, model, rows, 1, work / "warm-up")
    plain(kind, model, rows, 1, work / "warm-up")
    seconds = {"selfimprove": ours(kind, model, rows, steps, work), "plain TRL": plain(kind, model, rows, steps, work)}
    return {"steps": steps, "rows": len(rows), "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "ratio": round(seconds["plain TRL"] / seconds["selfimprove"], 3)}


# -- P8: the RL update ------------------------------------------------------------------------------------------
def rollouts_for(trainer, groups: int, group_size: int, seed: int):
    """`groups` problems × `group_size` completions of varied lengths (gold, wrong, and gold cut short), with
    random 0/1 rewards; the token ids are the tokenizer's, as an engine would report them."""
    from selfimprove.trainers.rl import Rollout

    task, problems = arithmetic_rows(groups)
    rng = random.Random(seed)
    out = []
    for p in problems:
        for _ in range(group_size):
            text = rng.choice([p["solution"], wrong_solution(p), p["solution"][:rng.randint(5, 60)]])
            ids = trainer.tokenizer.encode(text, add_special_tokens=False) + [trainer.tokenizer.eos_token_id]
            out.append(Rollout(p["problem_id"], [task.prompt(p)], [text], [True], [float(rng.random() < 0.4)],
                               trainer.version, [ids]))
    return out


def plain_update(model, optimizer, batches, temperature: float, beta: float) -> float:
    """The textbook loop: per micro-batch forward, reference forward (adapter off), k3 KL, loss, backward."""
    import torch

    t = time.time()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total = sum(len(b[0]) for b in batches)
    for ids, attention, mask, adv in batches:
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float() / temperature
        logp = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(-1)
        with torch.no_grad(), model.disable_adapter():
            ref_logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float() / temperature
            ref = torch.gather(ref_logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(-1)
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        per_token = (-adv[:, None] * logp + beta * kl) * mask
        loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / total
        loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    return time.time() - t


def rl_part(model_path: str, steps: int, groups: int, work: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from selfimprove.trainers.common import LoraSettings
    from selfimprove.trainers.rl import PolicyGradient, encode_rollout

    beta, temperature, micro = 0.01, 0.7, 4
    trainer = PolicyGradient(PolicyGradient.Config(lora=LoraSettings(dropout=0.0, **LORA), learning_rate=1e-5,
                                                   micro_batch_size=micro))
    trainer.setup(model_path, None, seed=0)
    trainer.save(work / "rl" / "v0")

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path, dtype="auto"),
                           LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def plain_batches(rollouts):
        """The same token ids as the trainer's, padded per micro-batch in the given order, GRPO advantages."""
        advantages = trainer.baseline.advantages([r.rewards[0] for r in rollouts], [r.group for r in rollouts])
        encoded = [encode_rollout(trainer.tokenizer, r.prompts, r.completions, r.eos, r.token_ids) for r in rollouts]
        batches = []
        for start in range(0, len(rollouts), micro):
            part = encoded[start:start + micro]
            width = max(len(ids) for ids, _ in part)
            ids = torch.full((len(part), width), trainer.tokenizer.pad_token_id or 0, dtype=torch.long)
            attention = torch.zeros_like(ids)
            mask = torch.zeros((len(part), width - 1))
            for i, (seq, owner) in enumerate(part):
                ids[i, :len(seq)] = torch.tensor(seq)
                attention[i, :len(seq)] = 1
                mask[i, :len(seq) - 1] = (torch.tensor(owner[1:]) == 1).float()
            batches.append((ids, attention, mask, torch.tensor(advantages[start:start + micro])))
        return batches

    times = {"selfimprove": [], "plain PyTorch": []}
    tokens = []
    for step in range(steps + 1):  # step 0: warm-up of both
        rollouts = rollouts_for(trainer, groups, 8, seed=step)
        update = trainer.step(rollouts, [beta], temperature, 96)
        times["selfimprove"].append(update["update_seconds"])
        tokens.append(update["tokens"])
        trainer.save(work / "rl" / f"v{step + 1}")  # not timed: the next step needs a saved version
        times["plain PyTorch"].append(plain_update(model, optimizer, plain_batches(rollouts), temperature, beta))
    median = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {"steps": steps, "trajectories": groups * 8, "completion_tokens": tokens[1:],
            "seconds_per_update": {k: round(v, 2) for k, v in median.items()},
            "all_seconds": times, "ratio": round(median["plain PyTorch"] / median["selfimprove"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--parts", default="sft,dpo,rl")
    parser.add_argument("--sft-steps", type=int, default=16)
    parser.add_argument("--dpo-steps", type=int, default=8)
    parser.add_argument("--rl-steps", type=int, default=3)
    parser.add_argument("--rl-groups", type=int, default=4, help="problems per update (8 completions each)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import datasets

    from selfimprove.models import prepare_model

    datasets.disable_progress_bars()
    model = str(prepare_model(args.model))
    work = Path(tempfile.mkdtemp(prefix="si-train-bench-"))
    results = {}
    for part in args.parts.split(","):
        if part in ("sft", "dpo"):
            results[part] = training_part(part, model, args.sft_steps if part == "sft" else args.dpo_steps, work)
        elif part == "rl":
            results[part] = rl_part(model, args.rl_steps, args.rl_groups, work)
        else:
            raise SystemExit(f"unknown part {part!r}: choose from sft, dpo, rl")
        print(part, json.dumps(results[part]), flush=True)

    print(f"\n{args.model}, {os.cpu_count()} CPUs")
    print("| part | selfimprove s | plain s | plain / selfimprove |")
    print("| --- | --- | --- | --- |")
    for part, r in results.items():
        s = r["seconds"] if part != "rl" else r["seconds_per_update"]
        a, b = list(s.values())
        print(f"| {part} ({r['steps']} steps{', per update' if part == 'rl' else ', whole call'}) | {a} | {b} | "
              f"{r['ratio']:.2f}x |")
    out = args.out or (os.path.join(os.environ["OUT"], "training_overhead.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps({"model": args.model, **results}, indent=2))


if __name__ == "__main__":
    main()
