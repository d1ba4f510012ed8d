"""Two-attempt (self-correction) sampling, and the stage that evaluates it.

`sample_attempts` asks every problem for attempt 1, then, in one more batched engine call, for attempt 2 after
the self-correction instruction (selfcorrection.second_prompt), both with the same weights. A row holds the
problem, the first prompt, every attempt (`turns`: completion, finish_reason, num_tokens) and, for code that
reads single-turn samples, `completion` = the last attempt. The `rl` stage samples its rollouts with it.

`evaluate_self_correction` samples the test problems that way, grades both attempts with the task's grader and
reports Accuracy@t1, Accuracy@t2, Δ(t1,t2), Δi→c and Δc→i with bootstrap intervals. It is an evaluating stage,
so round 0 (`evaluate_base: true`) runs it on the base model: the prompting-only baseline (two attempts, no
training), measured by the same code as every trained round. Generation is chunked and resumable like rollout.py.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

from ..artifacts import load_rows, save_rows
from ..records import SamplingConfig, Weights
from ..registry import STAGES
from ..selfcorrection import INSTRUCTION, second_prompt, self_correction_metrics
from .base import Stage
from .evaluate import EvalProblems


def sample_attempts(*, engine, task, problems: list[dict], sampling: SamplingConfig, weights: Weights,
                    seeds: list[int], instruction: str, id_prefix: str, extra: dict | None = None) -> list[dict]:
    """`sampling.n` trajectories of `len(seeds)` attempts per problem (attempt t sampled with seed `seeds[t-1]`).

    Attempt 2 samples one continuation per attempt 1 (n=1), so a problem's trajectories stay independent."""
    prompts = [task.prompt(p) for p in problems]
    first = engine.generate(prompts, sampling, weights, seed=seeds[0])
    rows = []
    for problem, prompt, completions in zip(problems, prompts, first):
        for k, c in enumerate(completions):
            rows.append({
                **problem, **(extra or {}),
                "sample_id": f"{id_prefix}/{problem['problem_id']}/{k}", "index": k, "weights": weights.label,
                "seed": seeds[0], "temperature": sampling.temperature, "top_p": sampling.top_p,
                "max_tokens": sampling.max_tokens, "prompt": prompt,
                "instruction": instruction if len(seeds) > 1 else "",
                "turns": [{"completion": c.text, "finish_reason": c.finish_reason, "num_tokens": c.num_tokens}],
            })
    once = dataclasses.replace(sampling, n=1)
    for seed in seeds[1:]:
        follow = [second_prompt(r["prompt"], r["turns"][-1]["completion"], instruction) for r in rows]
        for r, (c,) in zip(rows, engine.generate(follow, once, weights, seed=seed)):
            r["turns"].append({"completion": c.text, "finish_reason": c.finish_reason, "num_tokens": c.num_tokens})
    for r in rows:
        r.update(completion=r["turns"][-1]["completion"], finish_reason=r["turns"][-1]["finish_reason"],
                 num_tokens=sum(t["num_tokens"] for t in r["turns"]))
    return rows


def attempt_prompts(row: dict) -> list:
    """The prompt each attempt of a sampled row answered (attempt t's includes attempts before it)."""
    prompts = [row["prompt"]]
    for turn in row["turns"][:-1]:
        prompts.append(second_prompt(prompts[-1], turn["completion"], row["instruction"]))
    return prompts


@STAGES.register("evaluate_self_correction")
class EvaluateSelfCorrection(Stage):
    evaluates = True
    @dataclass
    class Config:
        problems: EvalProblems = field(default_factory=EvalProblems)
        sampling: SamplingConfig = field(default_factory=SamplingConfig)  # greedy by default, as in the paper
        weights: str = "latest"
        instruction: str = INSTRUCTION
        grade: Literal["strict", "flexible"] = "strict"  # which of the task's grades counts as correct
        bootstrap_resamples: int = 1000
        chunk_size: int = 256  # problems per engine call and per resume point (small chunks starve the batch)

        def __post_init__(self):
            if self.chunk_size < 1:
                raise ValueError("chunk_size must be >= 1")

    def run(self) -> dict:
        c, ctx = self.config, self.ctx
        problems = ctx.task.problems(c.problems.split)[: c.problems.num_problems]
        weights = ctx.weights(c.weights)
        rows: list[dict] = []
        for index in range(0, len(problems), c.chunk_size):
            shard = ctx.out_dir / "shards" / f"{index // c.chunk_size:05d}"
            if shard.exists():  # finished before an interruption
                rows.extend(load_rows(shard))
                continue
            chunk_rows = sample_attempts(
                engine=ctx.engine(), task=ctx.task, problems=problems[index:index + c.chunk_size], sampling=c.sampling,
                weights=weights, seeds=[ctx.seed("chunk", index, "attempt", t) for t in (1, 2)],
                instruction=c.instruction, id_prefix=f"r{ctx.round:03d}/{ctx.stage}",
                extra={"round": ctx.round, "stage": ctx.stage})
            for row in chunk_rows:
                for turn in row["turns"]:
                    g = ctx.task.grade(row, turn["completion"])
                    turn.update(correct=bool(g.strict if c.grade == "strict" else g.flexible), extracted=g.answer)
            save_rows(chunk_rows, shard)
            rows.extend(chunk_rows)
        save_rows(rows, ctx.out_dir / "data")
        metrics = self_correction_metrics([(r["turns"][0]["correct"], r["turns"][1]["correct"]) for r in rows],
                                          seed=ctx.seed("bootstrap"), resamples=c.bootstrap_resamples,
                                          groups=[r["problem_id"] for r in rows])
        tokens = defaultdict(list)
        for r in rows:
            for t, turn in enumerate(r["turns"], start=1):
                tokens[t].append(turn["num_tokens"])
        return {"weights": weights.label, **metrics, "samples": len(rows),
                **{f"mean_tokens@t{t}": sum(v) / len(v) for t, v in tokens.items()}}
