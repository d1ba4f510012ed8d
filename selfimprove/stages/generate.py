"""Generate: k samples per problem from the current policy (chunked and resumable: see rollout.py), or, with
`search`, responses built step by step by PRM-guided beam or tree search (stages/search.py).

With `adapt`, the stage first chooses its sampling temperature (and a selection threshold) as B-STaR does (Zeng
et al., 2024; the README's *The B-STaR monitor*): each candidate's probe samples are judged by `adapt.critic` and
scored with the balance score against gold (monitor.py); the sweep is `sweep.json` (`sweep/` lets it resume), the
choice the manifest's `adapt/temperature`, `adapt/threshold` and `adapt/balance`. Deviation: B-STaR sweeps on the
round's training queries with the full sample count; here on a seeded probe subset, to keep the sweep a small
fraction of the round.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field

from ..artifacts import load_rows, save_rows, write_json
from ..critics import CriticContext
from ..critics.calls import CriticCalls, judge_all
from ..monitor import N_STAR, choose_setting, exploitation
from ..records import SamplingConfig
from ..registry import STAGES, CriticSpec
from .base import Stage, gold_critics
from .common import Chunking, ProblemSelection, check_critic_choice, selected, unsolved_problem_ids
from .rollout import sample_chunk, sample_problems
from .search import Search, check as check_search, cost_metrics, report as search_report, search_problems


@dataclass
class Adapt:
    """B-STaR's adaptive configuration of one round's sampling (see the module docstring)."""

    temperatures: list[float] = field(default_factory=list)  # candidates, each > 0
    thresholds: list[float | None] = field(default_factory=lambda: [None])  # None: the critic's label selects
    probe_problems: int = 32  # a seeded subset of the stage's problems
    critic: CriticSpec = field(default_factory=lambda: CriticSpec.named("answer"))
    calls: CriticCalls = field(default_factory=CriticCalls)
    n_star: int = N_STAR

    def __post_init__(self):
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise ValueError("temperatures: list the candidate sampling temperatures, each > 0")
        if not self.thresholds:
            raise ValueError("thresholds: at least one (null = the critic's label)")
        if self.probe_problems < 1 or self.n_star < 1:
            raise ValueError("probe_problems and n_star must be >= 1")


@STAGES.register("generate")
class Generate(Stage):
    @dataclass
    class Config:
        problems: ProblemSelection = field(default_factory=ProblemSelection)
        sampling: SamplingConfig = field(default_factory=SamplingConfig)
        weights: str = "policy"
        hint: bool = False  # STaR rationalization: show the gold answer in the prompt (samples keep `hint: true`)
        # Only the problems of `problems.split` with no sample labelled correct in this round's critique stage
        # `unsolved_in` (STaR rationalizes the problems it failed); `critic`: whose label decides, if it runs several.
        unsolved_in: str | None = None
        critic: str | None = None
        chunking: Chunking = field(default_factory=Chunking)
        adapt: Adapt | None = None  # B-STaR: choose this round's temperature (and selection threshold) first
        search: Search | None = None  # build responses by PRM-guided search instead of sampling them whole

        def __post_init__(self):
            if self.critic is not None and self.unsolved_in is None:
                raise ValueError("critic: only decides which problems count as solved in `unsolved_in`; set both")
            if self.adapt is not None and self.search is not None:
                raise ValueError("adapt and search: B-STaR's sweep samples whole responses; use one or the other")
            if self.adapt is not None and self.sampling.n < 2:
                raise ValueError("adapt: the balance score compares several samples per problem: sampling.n >= 2")

    @classmethod
    def references(cls, config) -> list[str]:
        return [config.unsolved_in] if config.unsolved_in else []

    @classmethod
    def check(cls, config, earlier: dict) -> None:
        if config.unsolved_in:
            check_critic_choice(config.critic, config.unsolved_in, earlier)
        if config.search is not None:
            check_search(config.search, config.sampling, earlier)

    @classmethod
    def needs_gold(cls, config) -> str | None:
        if config.hint:
            return "set hint: false (the hint shows the gold answer)"
        if config.adapt is not None and gold_critics([config.adapt.critic]):
            return (f"give adapt a label-free critic (adapt.critic: majority, ...): critic {config.adapt.critic.id!r} "
                    f"grades against gold")
        return None

    outputs = ("data", "sweep.json")

    def run(self) -> dict:
        c, ctx = self.config, self.ctx
        problems = self._problems()
        sampling, adapted = c.sampling, {}
        if c.adapt is not None:
            adapted = self._sweep(problems)
            sampling = dataclasses.replace(c.sampling, temperature=adapted["adapt/temperature"])
        common = dict(engine=ctx.engine, task=ctx.task, problems=problems, sampling=sampling,
                      weights=ctx.weights(c.weights), hint=c.hint, chunking=c.chunking,
                      shard_dir=ctx.out_dir / "shards", seed=ctx.seed, round_index=ctx.round, stage=ctx.stage)
        if c.search is None:
            rows = sample_problems(**common)
        else:
            rows = search_problems(**common, search=c.search, prm_weights=lambda: ctx.weights(c.search.weights))
        save_rows(rows, ctx.out_dir / "data")
        return {"problems": len(problems), "samples": len(rows), "tokens": sum(r["num_tokens"] for r in rows),
                **adapted, **(cost_metrics(rows) if c.search is not None and rows else {})}

    def _sweep(self, problems: list[dict]) -> dict:
        """Each candidate temperature's probe samples, judged and scored; the best (temperature, threshold)."""
        a, ctx = self.config.adapt, self.ctx
        probe = list(problems)
        random.Random(ctx.seed("probe")).shuffle(probe)
        probe = probe[: a.probe_problems]
        weights, critic, results = ctx.weights(self.config.weights), None, []
        try:
            for i, temperature in enumerate(a.temperatures):
                shard = ctx.out_dir / "sweep" / f"{i:03d}"
                if shard.exists():  # judged before an interruption
                    rows = load_rows(shard)
                else:
                    sampling = dataclasses.replace(self.config.sampling, temperature=temperature)
                    rows = sample_chunk(engine=ctx.engine(), task=ctx.task, problems=probe, sampling=sampling,
                                        weights=weights, seeds=[ctx.seed("probe", i)], hint=self.config.hint,
                                        id_prefix=f"r{ctx.round:03d}/{ctx.stage}/probe{i}")
                    critic = critic or a.critic.build(CriticContext(task=ctx.task, engine=ctx.engine))
                    verdicts, _ = judge_all(critic, [{**r, "verdicts": {}} for r in rows], a.calls)
                    for r, v in zip(rows, verdicts):
                        r.update(score=v.score, label=v.label,
                                 gold=bool(ctx.task.grade(r, r["completion"]).correct) if r.get("answer") else None)
                    save_rows(rows, shard)
                gold = [r["gold"] for r in rows]
                for threshold in a.thresholds:
                    kept = {r["sample_id"] for r in rows if selected(r, threshold)}
                    m = exploitation(rows, gold, kept, a.n_star)  # the filter's monitor scores with it too
                    results.append({"temperature": temperature, "threshold": threshold,
                                    "balance": m["bstar/balance"], "kept": m["bstar/kept"]})
        finally:
            if critic is not None:
                critic.close()
        if not any(r["balance"] > 0 for r in results):  # NaN (no probe problem with gold) compares False
            raise RuntimeError(f"adapt: on {len(probe)} probe problems no candidate setting kept a correct sample "
                               f"(graded against gold answers), so the balance score cannot choose; widen "
                               f"temperatures / thresholds or probe_problems")
        best = choose_setting([(r, r["balance"]) for r in results])  # the first of equal balances
        for r in results:  # NaN: no probe problem has gold; JSON has no NaN
            r["balance"] = None if math.isnan(r["balance"]) else r["balance"]
        write_json(ctx.out_dir / "sweep.json", {"probe_problems": len(probe), "n_star": a.n_star, "results": results,
                                                "chosen": {k: best[k] for k in ("temperature", "threshold")}})
        return {f"adapt/{k}": best[k] for k in ("temperature", "threshold", "balance")}

    @classmethod
    def report(cls, metrics: dict) -> dict[str, str]:
        if "adapt/temperature" not in metrics:
            return search_report(metrics)
        threshold = metrics["adapt/threshold"]
        return {"B-STaR choice": f"T={metrics['adapt/temperature']:g}"
                                 + (f", score>={threshold:g}" if threshold is not None else "")
                                 + f" (balance {metrics['adapt/balance']:.3f})"}

    def _problems(self) -> list[dict]:
        c, ctx = self.config, self.ctx
        problems = ctx.task.problems(c.problems.split)
        if not c.unsolved_in:
            return c.problems.select(problems, ctx.seed("problems"))
        unsolved = unsolved_problem_ids(load_rows(ctx.input_dir(c.unsolved_in) / "data"), c.critic, c.unsolved_in)
        return [p for p in problems if p["problem_id"] in unsolved]
