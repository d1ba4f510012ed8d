"""The generate stage's `search:` setting: responses built step by step by PRM-guided search (selfimprove/search.py
holds the algorithms, their rules and their deviations from the papers), chunked and resumable as sampling is.

A step is sampled by continuing the trace as the assistant's unfinished reply (step_labels.chat_continuation) up
to the next newline (`stop: ["\\n"]`, with the stage's temperature and top_p, `sampling.max_tokens` tokens per
step at most). The engine strips the newline from the text either way, so whether the model ended its response
or a line is told by the sampled tokens: a step that stopped at the newline has one in its decoded tokens.

Each depth level (beam) or iteration (tree) is one engine call over every open trace of the chunk's problems,
then one PRM pass over all the new traces; a trace's value is its steps' P(correct) from the train_prm stage
named by `weights`, aggregated by `value` (`last`: the newest step's, the default; `min`; `prod`); a trace with no
steps yet (blank lines only) is worth 0.

Rows are sample rows (records.py) with `num_tokens` the trace's own steps' tokens and no `token_ids`/`logprobs`
(a trace is stitched from several calls), plus `search`: the strategy, the trace's `value` and `rank`, its
`depth`, the PRM value of each of its prefixes (`values`), and its problem's cost: the tokens sampled for it
(`problem_tokens`), the nodes expanded (`expansions`) and its share of its chunk's seconds; `chunk` and
`chunk_calls` (the chunk's engine calls). vLLM's prefix-cache hit rate is not recorded: the engine builds
vLLM with statistics logging off (vLLM's default), and its metrics cannot be read without it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from ..artifacts import load_rows, save_rows
from ..prm import MAX_LENGTH, Aggregate, ProcessRewardModel, aggregate
from ..records import Completion, SamplingConfig, Weights
from ..search import Step, beam_search, results, tree_search
from ..step_labels import chat_continuation, chat_tokenizer
from .common import Chunking, check_weights


@dataclass
class Search:
    """PRM-guided search instead of sampling whole responses (selfimprove/search.py)."""

    strategy: Literal["beam", "tree"]
    weights: str  # the train_prm stage (earlier in the round) whose PRM values the traces
    expansions: int = 4  # E: steps sampled for each expanded trace
    max_steps: int = 16  # a trace is finished at this many steps (blank lines count: a run of them ends too)
    value: Aggregate = "last"  # a trace's value from its steps' P(correct)
    keep: Literal["best", "all_finished"] = "best"  # rows per problem: the best finished trace, or all, ranked
    width: int = 4  # beam: traces kept per depth
    budget: int = 16  # tree: iterations (selection, expansion, backup) per problem
    exploration: float = 0.5  # tree: the UCT constant
    unvisited: float = 0.8  # tree: selection bonus of a never-visited child (ReST-MCTS*'s `inf`)
    batch_size: int = 16  # traces per PRM forward pass
    max_length: int = MAX_LENGTH  # PRM input tokens, at most: by default what it trained on
    device: str = "auto"  # the PRM's: "auto" = cuda when available, else cpu

    def __post_init__(self):
        if min(self.expansions, self.max_steps, self.width, self.budget, self.batch_size) < 1:
            raise ValueError("expansions, max_steps, width, budget and batch_size must be >= 1")
        if self.exploration < 0:
            raise ValueError("exploration must be >= 0")


def check(search: Search, sampling: SamplingConfig, earlier: dict) -> None:
    """Config-time checks of a generate stage's `search` against its sampling and the round's earlier stages."""
    try:
        check_weights(search.weights, earlier, prm=True)
    except ValueError as err:
        raise ValueError(f"search.{err}") from err
    if sampling.n != 1:
        raise ValueError("search: search.expansions sets the samples per step and keep the rows per problem; "
                         "leave sampling.n at 1")
    if sampling.stop:
        raise ValueError("search: a step ends at a newline; sampling.stop must be empty")
    if sampling.temperature == 0 and search.expansions > 1:
        raise ValueError(f"search.expansions={search.expansions} at temperature 0 would be copies of one step")


def trace_value(step_scores: list[float | None], how: Aggregate) -> float:
    """A trace's value from its steps' P(correct); steps the PRM's max_length cut off are left out; no step: 0."""
    scores = [s for s in step_scores if s is not None]
    return aggregate(scores, how) if scores else 0.0


def to_step(c: Completion, tokenizer) -> Step:
    """A step from a completion stopped at "\\n" (stripped by the engine): final unless its tokens hold the newline."""
    if c.token_ids is None:
        raise ValueError("search needs the engine's sampled token ids to tell a step's newline from the end of the "
                         "response; this engine reports none")
    newline = c.finish_reason == "stop" and "\n" in tokenizer.decode(c.token_ids, skip_special_tokens=True)
    return Step(c.text, final=not newline, tokens=c.num_tokens, finish_reason=c.finish_reason)


def search_chunk(*, search: Search, engine, prm, tokenizer, task, problems: list[dict], sampling: SamplingConfig,
                 weights: Weights, seed: Callable[..., int], chunk: int, id_prefix: str, hint: bool,
                 extra: dict) -> list[dict]:
    """The rows of chunk number `chunk`: the search over `problems`, engine call k sampled with
    `seed("chunk", chunk, "call", k)`."""
    prompts = [task.prompt(p, hint=hint) for p in problems]
    continuation = chat_continuation(tokenizer)
    step_sampling = dataclasses.replace(sampling, n=search.expansions, stop=["\n"])
    calls = 0

    def expand(batch: list[tuple[int, str]]) -> list[list[Step]]:
        nonlocal calls
        out = engine.generate([continuation(prompts[i], text) for i, text in batch], step_sampling, weights,
                              seed=seed("chunk", chunk, "call", calls))
        calls += 1
        return [[to_step(c, tokenizer) for c in completions] for completions in out]

    def score(batch: list[tuple[int, str]]) -> list[float]:
        scores = prm.step_scores([prompts[i] for i, _ in batch], [task.steps(text) for _, text in batch],
                                 search.batch_size)
        return [trace_value(s, search.value) for s in scores]

    started = time.time()
    if search.strategy == "beam":
        traces, cost = beam_search(len(problems), expand, score, search.width, search.max_steps)
    else:
        roots, cost = tree_search(len(problems), expand, score, search.budget, search.max_steps, search.exploration,
                                  search.unvisited)
        traces = [results(root) for root in roots]
    seconds = (time.time() - started) / len(problems)
    rows = []
    for i, (problem, prompt) in enumerate(zip(problems, prompts)):
        for k, node in enumerate(traces[i][:1] if search.keep == "best" else traces[i]):
            rows.append({
                **problem, **extra, "sample_id": f"{id_prefix}/{problem['problem_id']}/{k}", "index": k,
                "weights": weights.to_dict(), "seed": seed("chunk", chunk), "hint": hint,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_tokens, "prompt": prompt,
                "completion": node.completion, "finish_reason": node.finish_reason or "length",
                "num_tokens": node.tokens, "token_ids": None, "logprobs": None,
                "search": {"strategy": search.strategy, "value": node.value, "rank": k, "depth": node.depth,
                           "values": [n.prm_value for n in node.path()], "problem_tokens": cost.tokens[i],
                           "expansions": cost.expansions[i], "seconds": seconds, "chunk": chunk, "chunk_calls": calls},
            })
    return rows


def search_problems(*, search: Search, engine: Callable, task, problems: list[dict], sampling: SamplingConfig,
                    weights: Weights, prm_weights: Callable[[], Weights], chunking: Chunking, shard_dir: Path,
                    seed: Callable[..., int], round_index: int, stage: str, hint: bool) -> list[dict]:
    """Search rows for `problems`, resuming from `shard_dir` as rollout.sample_problems does; the engine and the
    PRM are loaded only when a chunk is left to search."""
    rows: list[dict] = []
    prm = tokenizer = None
    try:
        for index, part in enumerate(chunking.split(problems)):
            shard = shard_dir / f"{index:05d}"
            if shard.exists():  # finished before an interruption
                rows.extend(load_rows(shard))
                continue
            if prm is None:
                which = prm_weights()
                if which.adapter is None:
                    raise ValueError(f"search.weights: {search.weights!r} gave the base model: no train_prm stage "
                                     f"has finished")
                tokenizer = chat_tokenizer(engine(), weights.base)
                prm = ProcessRewardModel(which.base, which.adapter, search.max_length, search.device)
            chunk_rows = search_chunk(search=search, engine=engine(), prm=prm, tokenizer=tokenizer, task=task,
                                      problems=part, sampling=sampling, weights=weights,
                                      seed=seed, chunk=index, id_prefix=f"r{round_index:03d}/{stage}", hint=hint,
                                      extra={"round": round_index, "stage": stage})
            save_rows(chunk_rows, shard)
            rows.extend(chunk_rows)
    finally:
        if prm is not None:
            prm.close()
    return rows


def cost_metrics(rows: list[dict]) -> dict:
    """Search cost from the rows: per problem, tokens sampled, nodes expanded and seconds; engine calls in all."""
    per_problem = {r["problem_id"]: r["search"] for r in rows}
    chunks = {r["search"]["chunk"]: r["search"]["chunk_calls"] for r in rows}
    n = len(per_problem)
    return {"search/tokens_per_problem": sum(s["problem_tokens"] for s in per_problem.values()) / n,
            "search/expansions_per_problem": sum(s["expansions"] for s in per_problem.values()) / n,
            "search/seconds_per_problem": sum(s["seconds"] for s in per_problem.values()) / n,
            "search/engine_calls": sum(chunks.values()),
            "search/finished_by_model": sum(r["finish_reason"] == "stop" for r in rows) / len(rows)}


def report(metrics: dict) -> dict[str, str]:
    if "search/tokens_per_problem" not in metrics:
        return {}
    return {"Search cost per problem": f"{metrics['search/tokens_per_problem']:.0f} tokens, "
                                       f"{metrics['search/seconds_per_problem']:.1f} s"}
