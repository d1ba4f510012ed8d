"""RL: on-policy policy-gradient training with rollouts from the run's engine — GRPO/RLOO and SCoRe's two stages.

Each of `steps` steps: take `problems_per_step` problems (a seeded pass over the pool), sample `sampling.n`
trajectories per problem from the engine with the policy's current adapter version (one attempt, or two for
SCoRe: stages/multiturn.py), score every attempt with `critic` (any critic, a user's dotted-path plugin too),
turn rewards into per-attempt advantages (the trainer's baseline: GRPO or RLOO, over a problem's samples), make
one update (trainers/rl.py), and save the new adapter as the next version. The engine serves each version
without a restart: merged weights reloaded in place (CPU default) or a new per-request LoRA (GPU default);
the engine's `adapter_mode` decides, this stage only hands it the version's adapter folder.

Objectives (`objective`), with SCoRe's defaults (Kumar et al., 2024: α = 10, β1 = 0.01, β2 = 0.1):
- `single`: reward of the one attempt, KL β1 (single-turn GRPO / RLOO on verifiable rewards).
- `score_stage1`: reward of attempt 2 only; KL β2 on attempt 1 keeps it near the base model, β1 on attempt 2.
  (The paper states the β2 term on attempt 1; the β1 term on attempt 2 is its general KL penalty.)
- `score_stage2`: r(y1) on attempt 1, r(y2) + α·(r(y2) − r(y1)) on attempt 2, KL β1 on both
  (per-attempt credit: see selfcorrection.turn_rewards for why that deviates from summed returns).
The reference is always the base model (the adapter disabled). The paper trains with REINFORCE on large
batches; here the baseline is the group's (several samples per problem), which lowers variance at small batch.

Run directory (`ctx.out_dir`):
    versions/00000/adapter            the policy the stage starts from (version 0)
    versions/0000k/{adapter, optimizer.pt, rollouts/, step.json}
                                      after step k-1: the new policy, its optimizer state, the rollouts that
                                      trained it (rewards per attempt) and the step's metrics; written as one
                                      folder renamed into place, so a step is either all there or not at all
    data/, adapter/, weights.json     every rollout; the final adapter; its identity (as the train stage)
A killed run resumes from its newest version: finished steps are never repeated, and an interrupted step is
redone with the same seeds. Older versions keep their adapters, rollouts and metrics; optimizer states older than the
two newest and merged weights are deleted as the stage moves on.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field

from ..artifacts import load_rows, read_json, replace_dir, save_rows, write_json
from ..config import ConfigError
from ..critics import CriticContext, resolve_critic
from ..records import SamplingConfig, Weights, adapter_hash
from ..engines.merge import merged_folder
from ..models import model_identity
from ..registry import STAGES
from ..trainers import resolve_trainer
from ..selfcorrection import INSTRUCTION, TURNS, Objective, turn_rewards
from ..trainers.rl import Rollout, group_advantages
from .base import Stage
from .common import problem_subset
from .critique import judge_all
from .generate import ProblemSelection
from .multiturn import attempt_prompts, sample_attempts


@STAGES.register("rl")
class RL(Stage):
    produces_weights = True

    @dataclass
    class Config:
        objective: Objective = "single"
        steps: int = 10  # updates in this stage (SCoRe's stage lengths are two rl stages' `steps`)
        problems_per_step: int = 8
        problems: ProblemSelection = field(default_factory=ProblemSelection)  # the pool steps draw from
        sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=4, temperature=1.0, max_tokens=256))
        critic: dict = field(default_factory=lambda: {"name": "answer"})
        critic_batch_size: int = 256  # as the critique stage: samples per call of a batched critic
        critic_timeout: float | None = 60.0  # seconds per sample for unbatched critics
        trainer: dict = field(default_factory=lambda: {"name": "policy_gradient"})
        weights: str = "latest"  # the policy the stage starts from (latest: this round's newest, else the round's)
        instruction: str = INSTRUCTION  # SCoRe: the self-correction instruction before attempt 2
        alpha: float = 10.0  # stage II shaping bonus α·(r(y2) − r(y1))
        beta1: float = 0.01  # KL to the base on every attempt
        beta2: float = 0.1  # stage I: KL to the base on attempt 1
        # Drop groups (problems) whose every attempt got the same reward: their advantages are all zero, so they
        # would add only the KL term to the update while costing a full forward/backward. DAPO's filter (Yu et al.,
        # 2025) without its resampling to refill the batch: a step updates on the groups that remain, or makes no
        # update at all when none does. Off by default (GRPO and SCoRe as published keep every group).
        filter_groups: bool = False

        def __post_init__(self):
            if self.steps < 1 or self.problems_per_step < 1:
                raise ValueError("steps and problems_per_step must be >= 1")
            if self.sampling.temperature <= 0 or self.sampling.n < 2:
                raise ValueError("on-policy RL samples several answers per problem: sampling.n >= 2, temperature > 0")
            if min(self.alpha, self.beta1, self.beta2) < 0:
                raise ValueError("alpha, beta1 and beta2 must be >= 0")
            if "name" not in self.trainer:
                raise ValueError("trainer needs a name, e.g. {name: policy_gradient}")

        def betas(self) -> list[float]:
            """The KL coefficient on each attempt's tokens."""
            return [self.beta2, self.beta1] if self.objective == "score_stage1" else [self.beta1] * TURNS[self.objective]

    @classmethod
    def check(cls, config, where: str, key: str) -> None:
        resolve_critic(config.critic, where, f"{key}.critic")
        trainer_cls, _ = resolve_trainer(config.trainer, where, f"{key}.trainer")
        if not getattr(trainer_cls, "online", False):
            raise ConfigError(f"{where}: {key}.trainer: {trainer_cls.registered_name!r} is an offline trainer; "
                              f"an rl stage needs an online one (policy_gradient)")

    def run(self) -> dict:
        c, ctx = self.config, self.ctx
        trainer_cls, trainer_config = resolve_trainer(c.trainer, "pipeline", f"stages.{ctx.stage}.trainer")
        trainer = trainer_cls(trainer_config)
        versions = ctx.out_dir / "versions"
        start = ctx.weights(c.weights)
        done = sorted(int(p.name) for p in versions.glob("[0-9]*")) if versions.exists() else []
        if done:  # resume from the newest finished step
            trainer.setup(ctx.base_model, None, seed=ctx.seed("init"), state=versions / f"{done[-1]:05d}")
        else:
            trainer.setup(ctx.base_model, start.adapter, seed=ctx.seed("init"))
            self._commit(trainer, versions, 0, rows=None, metrics=None)
            done = [0]
        pool = ctx.task.problems(c.problems.split)
        if c.problems.num_problems is not None:
            rng = random.Random(ctx.seed("problems")) if c.problems.shuffle else None
            pool = problem_subset(pool, c.problems.num_problems, rng)
        resolved = resolve_critic(c.critic, "pipeline", f"stages.{ctx.stage}.critic")
        context = CriticContext(task=ctx.task, engine=ctx.engine, weights=None)
        critic = resolved.build(context)
        try:
            for step in range(done[-1], c.steps):
                weights = Weights(ctx.base_model, str(versions / f"{step:05d}" / "adapter"),
                                  f"round_{ctx.round:03d}/{ctx.stage}/v{step}")
                context.weights = weights
                rows, metrics = self._step(trainer, critic, resolved.id, weights, self._batch(pool, step), step)
                self._commit(trainer, versions, step + 1, rows, metrics)
                _prune(versions, keep=step + 1)
        finally:
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

    def _step(self, trainer, critic, critic_id: str, weights: Weights, problems: list[dict], step: int):
        c, ctx = self.config, self.ctx
        started = time.time()
        engine = ctx.engine()
        version = adapter_hash(weights.adapter)
        # Merge now (merged mode) so the step's timing shows the weight-sync cost apart from sampling; the
        # engine's in-place reload (~0.3 s on the 135M model) happens inside its next generate call.
        merge_seconds = 0.0
        if getattr(engine, "adapter_mode", None) == "merged":
            merge_started = time.time()
            merged_folder(weights)
            merge_seconds = time.time() - merge_started
        rows = sample_attempts(
            engine=engine, task=ctx.task, problems=problems, sampling=c.sampling, weights=weights,
            seeds=[ctx.seed("step", step, "attempt", t) for t in range(1, TURNS[c.objective] + 1)],
            instruction=c.instruction, id_prefix=f"r{ctx.round:03d}/{ctx.stage}/s{step:05d}",
            extra={"round": ctx.round, "stage": ctx.stage, "step": step, "policy_version": version})
        generated = time.time()
        rewards, errors = self._rewards(critic, rows)
        for row, row_rewards in zip(rows, rewards):
            for turn, (score, label) in zip(row["turns"], row_rewards):
                turn.update(reward=score, label=label, critic=critic_id)
        per_turn = [turn_rewards(c.objective, [s for s, _ in r], c.alpha) for r in rewards]
        groups = [r["problem_id"] for r in rows]
        advantages = [group_advantages([t[i] for t in per_turn], groups, trainer.config.baseline,
                                       trainer.config.scale_rewards) for i in range(TURNS[c.objective])]
        stop_strings = bool(c.sampling.stop)  # a stop string is not the EOS token; the text does not say which
        rollouts = [Rollout(group=row["problem_id"], prompts=attempt_prompts(row),
                            completions=[t["completion"] for t in row["turns"]],
                            eos=[t["finish_reason"] == "stop" and not stop_strings for t in row["turns"]],
                            advantages=[a[i] for a in advantages], version=row["policy_version"])
                    for i, row in enumerate(rows)]
        if c.filter_groups:
            informative = {r.group for r in rollouts if any(a != 0 for a in r.advantages)}
            rollouts = [r for r in rollouts if r.group in informative]
        scored = time.time()
        update = trainer.step(rollouts, c.betas(), temperature=c.sampling.temperature)
        metrics = {"step": step, "policy_version": version, "samples": len(rows), "reward_errors": errors,
                   "trained_samples": len(rollouts),
                   **{f"reward@t{t + 1}": sum(r[t][0] for r in rewards) / len(rows) for t in range(TURNS[c.objective])},
                   **update, "merge_seconds": round(merge_seconds, 2),
                   "generate_seconds": round(generated - started - merge_seconds, 2),
                   "reward_seconds": round(scored - generated, 2)}
        metrics["step_seconds"] = round(time.time() - started, 2)
        return rows, metrics

    def _rewards(self, critic, rows: list[dict]) -> tuple[list[list[tuple[float, bool | None]]], int]:
        """(score, label) per attempt per row from the critic; a failed verdict (None score) counts as 0 reward."""
        c = self.config
        out = [[] for _ in rows]
        errors = 0
        for t in range(TURNS[c.objective]):
            inputs = [{**row, "prompt": attempt_prompts(row)[t], "completion": row["turns"][t]["completion"],
                       "verdicts": {}} for row in rows]
            verdicts, _ = judge_all(critic, inputs, c.critic_batch_size, c.critic_timeout)
            for i, v in enumerate(verdicts):
                errors += v.score is None
                out[i].append((0.0 if v.score is None else float(v.score), None if v.label is None else bool(v.label)))
        return out, errors

    def _commit(self, trainer, versions, index: int, rows: list[dict] | None, metrics: dict | None) -> None:
        """Write version `index` (adapter, optimizer state, the rollouts and metrics of the step that made it)."""
        versions.mkdir(parents=True, exist_ok=True)
        tmp = versions / f".{index:05d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        trainer.save(tmp)
        if rows is not None:
            save_rows(rows, tmp / "rollouts")
            write_json(tmp / "step.json", metrics)
        replace_dir(tmp, versions / f"{index:05d}")

    def _finish(self, versions, start: Weights) -> dict:
        ctx = self.ctx
        indices = sorted(int(p.name) for p in versions.glob("[0-9]*"))
        last = versions / f"{indices[-1]:05d}"
        steps = [read_json(versions / f"{i:05d}" / "step.json") for i in indices if i > 0]
        rows = [row for i in indices if i > 0 for row in load_rows(versions / f"{i:05d}" / "rollouts")]
        save_rows(rows, ctx.out_dir / "data")
        tmp = ctx.out_dir / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(last / "adapter", tmp)
        replace_dir(tmp, ctx.out_dir / "adapter")
        _prune(versions, keep=None)  # merged copies are caches; the evaluate stage merges adapter/ itself
        adapter_dir = ctx.out_dir / "adapter"
        write_json(ctx.out_dir / "weights.json", {
            "base": ctx.base_model, "base_identity": model_identity(ctx.base_model), "adapter": str(adapter_dir),
            "adapter_hash": adapter_hash(adapter_dir), "label": f"round_{ctx.round:03d}/{ctx.stage}",
            "init": start.to_dict(), "policy": ctx.weights("policy").to_dict(), "trained": True,
        })
        out: dict = {"steps": len(steps), "samples": len(rows), "objective": self.config.objective}
        for key in [k for k in steps[0] if k.startswith("reward@")]:
            out[f"{key}/first"], out[f"{key}/last"] = steps[0][key], steps[-1][key]
            out[f"{key}/mean"] = sum(s[key] for s in steps) / len(steps)
        for key in ("step_seconds", "update_seconds", "generate_seconds", "merge_seconds", "reward_seconds"):
            out[f"{key}/mean"] = round(sum(s[key] for s in steps) / len(steps), 2)
        for key in [k for k in steps[-1] if k.startswith("kl/")]:
            out[f"{key}/last"] = steps[-1][key]
        return out


def _prune(versions, keep: int | None) -> None:
    """Delete every merged-weights cache but version `keep`'s (None: all of them), and the optimizer state of all
    but the two newest versions: resuming needs the newest; the one before lets a bad last step be undone by
    deleting its folder. Adapters, rollouts and metrics stay."""
    for folder in versions.glob("[0-9]*"):
        index = int(folder.name)
        if keep is None or index != keep:
            shutil.rmtree(folder / "adapter-merged", ignore_errors=True)
        if keep is not None and index < keep - 1:
            (folder / "optimizer.pt").unlink(missing_ok=True)
