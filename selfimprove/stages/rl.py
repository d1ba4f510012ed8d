"""RL: on-policy policy-gradient training with rollouts from the run's engine — any objective, any baseline.
What a step does, the stage's options and its run directory: docs/rl.md.

Each step samples with the policy's current adapter version, scores every attempt with `critic`, turns the scores
into per-attempt rewards with the `objective` (objectives/), makes one update with the trainer (trainers/rl.py)
and saves the new adapter as the next version: one folder under `versions/`, renamed into place, so a killed run
resumes from its newest version (finished steps are never repeated; an interrupted one is redone, same seeds).

Asynchronous generation (`max_staleness` k >= 1): step s trains on rollouts sampled with version max(0, s - k),
while a background thread already samples step s+1. The version depends only on s and k, never on timing, so a
run is deterministic and resumes identically. Only sampling runs in the background; the critic scores in the
stage's own thread while the engine is idle.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tqdm import tqdm

from .. import trackers
from ..artifacts import load_rows, read_json, replace_dir, save_rows, write_json
from ..critics import CriticContext
from ..critics.calls import CriticCalls, check_error_budget, judge_all
from ..models import model_identity
from ..records import Rollout, SamplingConfig, Weights, adapter_hash
from ..registry import STAGES, CriticSpec, ObjectiveSpec, TrainerSpec
from ..trainers import rl_launch
from ..trainers.launch import Launch
from .base import Stage, gold_critics
from .common import ProblemSelection, check_critic_weights
from .rollout import sample_chunk


@STAGES.register("rl")
class RL(Stage):
    produces_weights = True
    outputs = ("data", "adapter", "weights.json", "steps.jsonl")

    @dataclass
    class Config:
        objective: ObjectiveSpec = field(default_factory=lambda: ObjectiveSpec.named("single"))
        steps: int = 10  # updates in this stage (SCoRe's stage lengths are two rl stages' `steps`)
        problems_per_step: int = 8
        problems: ProblemSelection = field(default_factory=ProblemSelection)  # the pool steps draw from
        sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=4, temperature=1.0))
        critic: CriticSpec = field(default_factory=lambda: CriticSpec.named("answer"))
        calls: CriticCalls = field(default_factory=CriticCalls)
        trainer: TrainerSpec = field(default_factory=lambda: TrainerSpec.named("policy_gradient"))
        weights: str = "latest"  # the policy the stage starts from (latest: this round's newest, else the round's)
        # Drop groups whose trajectories all got the same rewards (zero advantages: the KL term only, at the cost of
        # a forward/backward): DAPO's filter (Yu et al., 2025) without its resampling to refill the batch, so a step
        # updates on the groups left, or not at all. Off by default: GRPO and SCoRe as published keep every group.
        filter_groups: bool = False
        # How many versions old a rollout may be (module docstring): 0 = strictly on-policy, each step sampled with
        # the newest policy; k >= 1 samples the next step with version s+1-k while step s trains.
        max_staleness: int = 0
        launch: Launch = field(default_factory=Launch)  # training processes (trainers/rl_launch.py); 1: this one

        def __post_init__(self):
            if self.steps < 1 or self.problems_per_step < 1:
                raise ValueError("steps and problems_per_step must be >= 1")
            if self.max_staleness < 0:
                raise ValueError(f"max_staleness must be >= 0 (0: on-policy), got {self.max_staleness}")
            if self.sampling.temperature <= 0 or self.sampling.n < 2:
                raise ValueError("on-policy RL samples several answers per problem: sampling.n >= 2, temperature > 0")
            if self.sampling.top_p < 1:
                raise ValueError(f"sampling.top_p is {self.sampling.top_p}: the policy-gradient trainer scores the full "
                                 f"(temperature-scaled) distribution, so truncated sampling would make the update "
                                 f"silently off-policy; set sampling.top_p: 1.0")
            if not getattr(self.trainer.target, "online", False):
                raise ValueError(f"trainer {self.trainer.name!r} is an offline trainer; an rl stage needs an online "
                                 f"one (policy_gradient)")
            rl_launch.check(self.launch)

    def run(self) -> dict:
        c, ctx = self.config, self.ctx
        if c.launch.num_processes == 1:
            return self._run(c.trainer.build())
        with rl_launch.LaunchedPolicy(c.launch, c.trainer, ctx.out_dir / "trainer", ctx.out_dir / "train.log",
                                      f"stage {ctx.stage} (round {ctx.round})") as trainer:
            return self._run(trainer)

    def _run(self, trainer) -> dict:
        c, ctx = self.config, self.ctx
        objective = c.objective.build()
        versions = ctx.out_dir / "versions"
        start = ctx.weights(c.weights)
        done = sorted(int(p.name) for p in versions.glob("[0-9]*"))
        if done:  # resume from the newest finished step; the versions before it that rollouts may still come from
            earlier = [adapter_hash(versions / f"{v:05d}" / "adapter")
                       for v in range(max(0, done[-1] - c.max_staleness), done[-1])]
            trainer.setup(ctx.base_model, None, seed=ctx.seed("init"), state=versions / f"{done[-1]:05d}",
                          earlier=earlier)
        else:
            trainer.setup(ctx.base_model, start.adapter, seed=ctx.seed("init"))
            self._commit(trainer, versions, 0, rows=None, metrics=None)
            done = [0]
        pool = c.problems.select(ctx.task.problems(c.problems.split), ctx.seed("problems"))
        critic = c.critic.build(CriticContext(task=ctx.task, engine=ctx.engine, stage_weights=ctx.weights))
        bar = tqdm(total=c.steps, initial=done[-1], desc=f"round {ctx.round} {ctx.stage}", unit="step", leave=False)

        ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rl-sampling")
        pending = None  # the next step's sampling, running while this step trains
        try:
            for step in range(done[-1], c.steps):
                started = time.time()
                rows, weights, timing = pending.result() if pending else self._sample(objective, versions, pool, step)
                timing["sampling_wait_seconds"] = round(time.time() - started, 2)  # all of sampling when in line
                scored = time.time()
                scores = self._scores(critic, rows, objective.attempts)
                timing["reward_seconds"] = round(time.time() - scored, 2)
                pending = None
                if c.max_staleness and step + 1 < c.steps:  # the engine is free again: sample the next step meanwhile
                    pending = ahead.submit(self._sample, objective, versions, pool, step + 1)
                metrics = self._update(trainer, objective, weights, rows, scores, step, timing)
                metrics["step_seconds"] = round(time.time() - started, 2)
                self._commit(trainer, versions, step + 1, rows, metrics)
                _prune(versions, keep=range(max(0, step + 1 - c.max_staleness), step + 2))
                trackers.log_step(metrics)
                bar.set_postfix_str(", ".join(f"{k}={metrics[k]:.3g}" for k in metrics
                                              if k.startswith("reward/") and metrics[k] is not None))
                bar.update(1)
        finally:
            ahead.shutdown(cancel_futures=True)
            bar.close()
            critic.close()
        return self._finish(versions, start)

    def _batch(self, pool: list[dict], step: int) -> list[dict]:
        """Step `step`'s problems: consecutive slices of a fresh seeded shuffle of the pool per pass (epoch)."""
        size = self.config.problems_per_step
        out = []
        for i in range(step * size, (step + 1) * size):
            epoch, pos = divmod(i, len(pool))
            order = list(range(len(pool)))
            random.Random(self.ctx.seed("epoch", epoch)).shuffle(order)
            out.append(pool[order[pos]])
        return list({p["problem_id"]: p for p in out}.values())  # a pool smaller than a step: no duplicates

    def _sample(self, objective, versions, pool: list[dict], step: int) -> tuple[list[dict], Weights, dict]:
        """Step `step`'s rollouts, sampled with the version its staleness allows (max(0, step - max_staleness)).
        Touches only the engine: with max_staleness > 0 it runs in a thread while the previous step trains."""
        c, ctx = self.config, self.ctx
        started = time.time()
        version = max(0, step - c.max_staleness)
        weights = Weights.of(ctx.base_model, str(versions / f"{version:05d}" / "adapter"),
                             f"round_{ctx.round:03d}/{ctx.stage}/v{version}")
        engine = ctx.engine()
        engine.prepare(weights)  # the weight update, timed apart from sampling
        prepared = time.time()
        rows = sample_chunk(
            engine=engine, task=ctx.task, problems=self._batch(pool, step), sampling=c.sampling, weights=weights,
            seeds=[ctx.seed("step", step, "attempt", t) for t in range(1, objective.attempts + 1)],
            follow_up=objective.follow_up if objective.attempts > 1 else None,
            id_prefix=f"r{ctx.round:03d}/{ctx.stage}/s{step:05d}",
            extra={"round": ctx.round, "stage": ctx.stage, "step": step})
        return rows, weights, {"staleness": step - version, "weight_sync_seconds": round(prepared - started, 2),
                               "generate_seconds": round(time.time() - prepared, 2)}

    def _update(self, trainer, objective, weights: Weights, rows: list[dict], scored, step: int, timing: dict):
        """Rewards from the critic's scores, then one update on the step's valid (and informative) groups."""
        c = self.config
        scores, errors, critic_stats = scored
        # a row with an invalid verdict on any attempt gets no rewards and is left out of training
        rewards = [None if None in s else objective.rewards(s) for s in scores]
        for row, row_scores, row_rewards in zip(rows, scores, rewards):
            row["scores"], row["rewards"] = row_scores, row_rewards
        stop_strings = bool(c.sampling.stop)  # a stop string is not the EOS token; the text does not say which
        rollouts = [Rollout(group=row["problem_id"], prompts=[a["prompt"] for a in _attempts(row)],
                            completions=[a["completion"] for a in _attempts(row)],
                            eos=[a["finish_reason"] == "stop" and not stop_strings for a in _attempts(row)],
                            rewards=row_rewards, version=weights.adapter_hash,
                            token_ids=[a.get("token_ids") for a in _attempts(row)],
                            logprobs=[a.get("logprobs") for a in _attempts(row)])
                    for row, row_rewards in zip(rows, rewards) if row_rewards is not None]
        rollouts = _valid_groups(rollouts)
        if c.filter_groups:
            rollouts = _informative(rollouts)
        update = trainer.step(rollouts, objective.kl_weights(), temperature=c.sampling.temperature,
                              max_tokens=c.sampling.max_tokens, max_staleness=c.max_staleness)
        metrics = {"step": step, "policy_version": weights.adapter_hash, "samples": len(rows), "invalid_rewards": errors,
                   "trained_samples": len(rollouts),
                   **{f"reward/attempt{t + 1}": _mean([s[t] for s in scores]) for t in range(objective.attempts)},
                   **critic_stats, **update, **timing}
        return metrics

    def _scores(self, critic, rows: list[dict], attempts: int) -> tuple[list[list[float]], int, dict]:
        """The critic's score per attempt per row; an invalid verdict's is None (no reward, not 0: the row is
        left out of training), and more failures than the error budget allows stop the stage. Also the critic's
        `stats` of the last attempt's verdicts, under `<critic id>/`."""
        c, ctx = self.config, self.ctx
        out: list[list[float | None]] = [[] for _ in rows]
        for t in range(attempts):
            inputs = [{**row, **_attempts(row)[t], "verdicts": {}} for row in rows]
            verdicts, _ = judge_all(critic, inputs, c.calls)
            check_error_budget(ctx.stage, c.critic.id, verdicts, c.calls)
            for i, v in enumerate(verdicts):
                out[i].append(None if v.error is not None or v.score is None else float(v.score))
        errors = sum(score is None for row_scores in out for score in row_scores)
        stats = {f"{c.critic.id}/{k}": v for k, v in critic.stats(inputs, verdicts).items()}
        return out, errors, stats

    def _commit(self, trainer, versions, index: int, rows: list[dict] | None, metrics: dict | None) -> None:
        """Write version `index` (adapter, optimizer state, the rollouts and metrics of the step that made it)."""
        tmp = versions / f".{index:05d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainer.save(tmp)
        if rows is not None:
            save_rows(rows, tmp / "rollouts")
            write_json(tmp / "step.json", metrics)
        replace_dir(tmp, versions / f"{index:05d}")

    def _finish(self, versions, start: Weights) -> dict:
        ctx = self.ctx
        folders = sorted(versions.glob("[0-9]*"))  # 00000 (the start), then one per step, in order
        steps = [read_json(folder / "step.json") for folder in folders[1:]]
        rows = [row for folder in folders[1:] for row in load_rows(folder / "rollouts")]
        save_rows(rows, ctx.out_dir / "data")
        tmp = ctx.out_dir / ".steps.jsonl.tmp"
        tmp.write_text("".join(json.dumps(s, sort_keys=True) + "\n" for s in steps))
        tmp.replace(ctx.out_dir / "steps.jsonl")
        tmp = ctx.out_dir / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folders[-1] / "adapter", tmp)
        replace_dir(tmp, ctx.out_dir / "adapter")
        _prune(versions, keep=None)  # merged copies are caches; the evaluate stage merges adapter/ itself
        adapter_dir = ctx.out_dir / "adapter"
        write_json(ctx.out_dir / "weights.json", {
            "base": ctx.base_model, "base_identity": model_identity(ctx.base_model), "adapter": str(adapter_dir),
            "adapter_hash": adapter_hash(adapter_dir), "label": f"round_{ctx.round:03d}/{ctx.stage}",
            "init": start.to_dict(), "policy": ctx.weights("policy").to_dict(), "trained": True,
        })
        c = self.config
        out: dict = {"steps": len(steps), "samples": len(rows), "objective": c.objective.name, "critic": c.critic.id,
                     "split": c.problems.split,
                     "invalid_rewards": sum(s.get("invalid_rewards", 0) for s in steps)}  # invalid verdicts, all steps
        for key in [k for k in steps[-1] if k.startswith(f"{c.critic.id}/")]:  # the critic's stats
            out[f"{key}/mean"], out[f"{key}/last"] = _mean([s.get(key) for s in steps]), steps[-1][key]
        for key in [k for k in steps[0] if k.startswith("reward/")]:
            out[f"{key}/first"], out[f"{key}/last"] = steps[0][key], steps[-1][key]
            out[f"{key}/mean"] = _mean([s[key] for s in steps])
        for key in ("step_seconds", "update_seconds", "generate_seconds", "weight_sync_seconds", "reward_seconds"):
            out[f"{key}/mean"] = round(sum(s[key] for s in steps) / len(steps), 2)
        for key in [k for k in steps[-1] if k.startswith(("kl/", "sampler_gap/"))]:
            out[f"{key}/last"] = steps[-1][key]
        return out

    @classmethod
    def check(cls, config, earlier: dict) -> None:
        check_critic_weights([config.critic], earlier)

    @classmethod
    def needs_gold(cls, config) -> str | None:
        if gold_critics([config.critic]):
            return (f"reward with a label-free critic (critic: majority, or likelihood): critic {config.critic.id!r} "
                    f"grades against gold")
        return None

    @classmethod
    def report(cls, metrics: dict) -> dict[str, str]:
        keys = sorted(k[: -len("/mean")] for k in metrics if k.startswith("reward/") and k.endswith("/mean"))
        cells = {"trained on": f"{metrics['steps']} RL steps"}
        if metrics.get("split") == "test":  # so no one reads the evaluation as held-out
            cells["trained on"] += " (test-time training on the evaluation problems)"
        prefix = f"{metrics.get('critic')}/"
        stats = [f"{k[len(prefix):-len('/mean')]} {metrics[k]:.3f}" for k in sorted(metrics)
                 if k.startswith(prefix) and k.endswith("/mean") and metrics[k] is not None]
        if stats:
            cells["critic signal (mean over steps)"] = ", ".join(stats)
        if keys:
            k = keys[-1]
            # "-": a step whose every verdict was invalid (no reward to average)
            first, last, mean = ("-" if metrics[k + s] is None else f"{metrics[k + s]:.3f}"
                                 for s in ("/first", "/last", "/mean"))
            cells["RL reward"] = f"{k}: {first}→{last} (mean {mean})"
        if metrics.get("invalid_rewards"):
            cells["invalid rewards"] = str(metrics["invalid_rewards"])  # invalid verdicts, left out of training
        return cells


def _attempts(row: dict) -> list[dict]:
    """A sampled row's attempts: its `attempts` list, or the row itself for a single attempt."""
    return row.get("attempts") or [{k: row.get(k) for k in ("prompt", "completion", "finish_reason", "num_tokens",
                                                            "token_ids", "logprobs")}]


def _mean(values: list[float | None]) -> float | None:
    """The mean of the values that are not None (invalid verdicts' scores are None); None when none is."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _valid_groups(rollouts: list[Rollout]) -> list[Rollout]:
    """The rollouts of groups that kept at least 2 members after invalid verdicts were left out: a lone member
    has no group to be compared with."""
    size = Counter(r.group for r in rollouts)
    return [r for r in rollouts if size[r.group] >= 2]


def _informative(rollouts: list[Rollout]) -> list[Rollout]:
    """The rollouts of groups whose trajectories did not all get the same rewards (DAPO's dynamic sampling
    filter, without refilling)."""
    distinct = Counter(group for group, _ in {(r.group, tuple(r.rewards)) for r in rollouts})
    return [r for r in rollouts if distinct[r.group] > 1]


def _prune(versions, keep: range | None) -> None:
    """Delete the merged-weights caches of every version outside `keep` (the versions sampling may still use; None:
    all of them), and the optimizer state of all but the two newest versions: resuming needs the newest; the one
    before lets a bad last step be undone by deleting its folder. Adapters, rollouts and metrics stay."""
    for folder in versions.glob("[0-9]*"):
        index = int(folder.name)
        if keep is None or index not in keep:
            shutil.rmtree(folder / "adapter-merged", ignore_errors=True)
        if keep is not None and index < keep[-1] - 1:
            (folder / "optimizer.pt").unlink(missing_ok=True)
