"""Chunked, resumable sampling shared by every stage that generates (generate, evaluate).

Problems are cut into fixed chunks; each chunk is one engine call with its own derived seed and is saved
atomically as a shard before the next starts. A resumed run loads the finished shards and generates only the
rest, so nothing is repeated or lost; since a chunk's samples depend only on (its problems, sampling, weights,
seed), a resumed run's samples equal an uninterrupted run's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from ..artifacts import load_rows, save_rows
from ..engines.base import Engine
from ..records import SamplingConfig, Weights


def sample_problems(*, engine: Callable[[], Engine], task, problems: list[dict], sampling: SamplingConfig,
                    weights: Weights, hint: bool, chunk_size: int, shard_dir: Path,
                    chunk_seed: Callable[[int], int], round_index: int, stage: str) -> list[dict]:
    """Sample rows (problem columns + sample columns) for `problems`, resuming from `shard_dir`."""
    rows: list[dict] = []
    chunks = [problems[i:i + chunk_size] for i in range(0, len(problems), chunk_size)]
    bar = tqdm(total=len(problems), desc=f"round {round_index} {stage}", unit="problem", leave=False)
    tokens, started = 0, time.time()
    for index, chunk in enumerate(chunks):
        shard = shard_dir / f"{index:05d}"
        if shard.exists():  # finished before an interruption
            rows.extend(load_rows(shard))
            bar.update(len(chunk))
            continue
        seed = chunk_seed(index)
        prompts = [task.prompt(p, hint=hint) for p in chunk]
        outputs = engine().generate(prompts, sampling, weights, seed=seed)
        chunk_rows = []
        for problem, prompt, completions in zip(chunk, prompts, outputs):
            for k, completion in enumerate(completions):
                chunk_rows.append({
                    **problem,
                    "sample_id": f"r{round_index:03d}/{stage}/{problem['problem_id']}/{k}",
                    "round": round_index, "stage": stage, "index": k,
                    "weights": weights.label, "seed": seed, "hint": hint,
                    "temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_tokens,
                    "prompt": prompt, "completion": completion.text,
                    "finish_reason": completion.finish_reason, "num_tokens": completion.num_tokens,
                })
        save_rows(chunk_rows, shard)
        rows.extend(chunk_rows)
        tokens += sum(r["num_tokens"] for r in chunk_rows)
        bar.set_postfix_str(f"{tokens / (time.time() - started):.0f} tok/s")
        bar.update(len(chunk))
    bar.close()
    return rows
