"""Sampling problems from the engine: one or several attempts per trajectory, chunked and resumable.

Every stage that samples goes through `sample_chunk`: attempt 1 answers the task's prompt (`sampling.n` samples
per problem); each later attempt continues one trajectory (n = 1), with the same weights, in one more batched
engine call, from the prompt `follow_up(previous prompt, previous completion)` builds (SCoRe's self-correction).

`sample_problems` cuts the problems into chunks, each one call per attempt with its own derived seeds, saved
atomically as a shard before the next starts; a resumed run samples only the chunks without a shard, and as a
chunk's samples depend only on (its problems, sampling, weights, seeds), they equal an uninterrupted run's.
Rows follow records.py's sample schema; a multi-attempt row's `attempts` holds one {prompt, completion,
finish_reason, num_tokens, token_ids, logprobs, seed} per attempt.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from ..artifacts import load_rows, save_rows
from ..records import Completion, Prompt, SamplingConfig, Weights
from .common import Chunking

FollowUp = Callable[[Prompt, str], Prompt]  # (previous attempt's prompt, its completion) → the next prompt


def sample_chunk(*, engine, task, problems: list[dict], sampling: SamplingConfig, weights: Weights,
                 seeds: list[int], id_prefix: str, hint: bool = False, follow_up: FollowUp | None = None,
                 extra: dict | None = None) -> list[dict]:
    """`sampling.n` trajectories of `len(seeds)` attempts per problem (attempt t sampled with `seeds[t-1]`)."""
    prompts = [task.prompt(p, hint=hint) for p in problems]
    sampling = sampling.stopping_at(task.stop())
    first = engine.generate(prompts, sampling, weights, seed=seeds[0])
    rows = []
    for problem, prompt, completions in zip(problems, prompts, first):
        for k, c in enumerate(completions):
            rows.append({
                **problem, **(extra or {}),
                "sample_id": f"{id_prefix}/{problem['problem_id']}/{k}", "index": k, "weights": weights.to_dict(),
                "seed": seeds[0], "hint": hint, "temperature": sampling.temperature, "top_p": sampling.top_p,
                "max_tokens": sampling.max_tokens, "prompt": prompt, **_output(c),
                **({"attempts": [{"prompt": prompt, **_output(c), "seed": seeds[0]}]} if len(seeds) > 1 else {}),
            })
    if len(seeds) == 1:
        return rows
    once = dataclasses.replace(sampling, n=1)  # one continuation per trajectory keeps trajectories independent
    for seed in seeds[1:]:
        follow = [follow_up(r["attempts"][-1]["prompt"], r["attempts"][-1]["completion"]) for r in rows]
        for r, prompt, (c,) in zip(rows, follow, engine.generate(follow, once, weights, seed=seed)):
            r["attempts"].append({"prompt": prompt, **_output(c), "seed": seed})
    for r in rows:
        last = r["attempts"][-1]
        r.update(completion=last["completion"], finish_reason=last["finish_reason"], token_ids=last["token_ids"],
                 logprobs=last["logprobs"], num_tokens=sum(a["num_tokens"] for a in r["attempts"]))
    return rows


def _output(c: Completion) -> dict:
    """A completion's columns, in a sample row and in each of its `attempts`."""
    return {"completion": c.text, "finish_reason": c.finish_reason, "num_tokens": c.num_tokens,
            "token_ids": c.token_ids, "logprobs": c.logprobs}


def sample_problems(*, engine: Callable, task, problems: list[dict], sampling: SamplingConfig, weights: Weights,
                    chunking: Chunking, shard_dir: Path, seed: Callable[..., int], round_index: int, stage: str,
                    hint: bool = False, attempts: int = 1, follow_up: FollowUp | None = None) -> list[dict]:
    """Sample rows for `problems`, resuming from `shard_dir`. `engine` is called (to build it) only when a
    chunk is left to sample; `seed(*parts)` derives the chunk's seeds (ctx.seed)."""
    rows: list[dict] = []
    bar = tqdm(total=len(problems), desc=f"round {round_index} {stage}", unit="problem", leave=False)
    tokens, started = 0, time.time()
    for index, chunk in enumerate(chunking.split(problems)):
        shard = shard_dir / f"{index:05d}"
        if shard.exists():  # finished before an interruption
            chunk_rows = load_rows(shard)
        else:
            seeds = [seed("chunk", index)] + [seed("chunk", index, "attempt", t) for t in range(2, attempts + 1)]
            chunk_rows = sample_chunk(engine=engine(), task=task, problems=chunk, sampling=sampling, weights=weights,
                                      seeds=seeds, id_prefix=f"r{round_index:03d}/{stage}", hint=hint,
                                      follow_up=follow_up, extra={"round": round_index, "stage": stage})
            save_rows(chunk_rows, shard)
            tokens += sum(r["num_tokens"] for r in chunk_rows)
            bar.set_postfix_str(f"{tokens / (time.time() - started):.0f} tok/s")
        rows.extend(chunk_rows)
        bar.update(len(chunk))
    bar.close()
    return rows
