"""Train PRM: a process reward model (selfimprove/prm.py) fitted on a step_labels stage's Monte-Carlo labels, after
Math-Shepherd (Wang et al., 2024), and measured on the steps of held-out problems.

`labels: hard` trains on "some rollout from this step reached the answer" (Math-Shepherd's HE, the paper's
default), `soft` on the fraction that did (SE). A fraction `held_out` of the labelled *problems* (every sample of
them, so no held-out problem is seen in training) is kept out of training and scored by the saved adapter:
`held_out/step_accuracy` (P >= 0.5 against the label, soft labels read as >= 0.5) and `held_out/step_auroc` with
DeLong's interval, and, where the rows carry the task's exact prefix oracle (arithmetic), the same two against it
(`held_out/oracle_*`). The interval treats steps as independent; the steps of one response are not, so it is
narrower than the evidence warrants. Every held-out row is kept, with its step scores, in `held_out/`.

Writes `adapter/` (PEFT, TOKEN_CLS: the head inside) and `weights.json`, which the `prm` critic names with
`weights:`. The adapter is never the policy: a PRM cannot generate, so `policy` and `latest` pass it by.

`init: base` (the default) fits a fresh adapter and head every round; `init: previous` continues this same
stage's adapter of the previous round (round 1, having none, starts fresh), so that a PRM trained each round on
the new policy's labels keeps what it learnt from earlier rounds (ReST-MCTS*'s loop, pipelines/
rest_mcts_arithmetic.yaml). It is found as every stage's earlier weights are (the runner's `weights`: the newest
finished round before this one), and `weights.json` records it under `init`; the trainer's checkpoints are keyed
on its content hash, so a resumed stage continues the same start and never another's.

Deviations from Math-Shepherd's PRM:
- Model: a LoRA adapter (plus the new head, trained in full) on the run's base model, 135M parameters by
  default, instead of fully fine-tuning a 7B-70B model.
- Head: a new one-logit token-classification head read at each step's last token, trained with binary
  cross-entropy; the paper appends a step tag ("ки") after each step and trains the language-model head's
  logits of two label tokens ("+" / "-") there.
- Labels: rolled out by the policy itself at the step_labels stage's K (the paper: a separately fine-tuned
  completer, N = 8), the last step graded by its own answer, on a few hundred responses (the paper: ~440K).
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ..artifacts import load_rows, save_rows, write_json
from ..metrics import auroc_interval
from ..models import model_identity
from ..prm import ProcessRewardModel, PrmTraining, train
from ..records import adapter_hash
from ..registry import STAGES
from .base import Stage
from .step_labels import StepLabels
from .train import NothingToTrain


@STAGES.register("train_prm")
class TrainPRM(Stage):
    produces_weights = True
    trains_offline = True
    outputs = ("adapter", "weights.json", "held_out")

    @dataclass
    class Config:
        data: str = "step_labels"  # the step_labels stage whose rows are trained on
        labels: Literal["hard", "soft"] = "hard"
        init: Literal["base", "previous"] = "base"  # a fresh adapter, or this stage's of the previous round
        held_out: float = 0.2  # fraction of the problems kept out of training to measure the PRM on
        training: PrmTraining = field(default_factory=PrmTraining)
        eval_batch_size: int = 16  # responses per forward pass when scoring the held-out steps
        # Not the policy (the runner's policy/latest pass by weights whose stage has another role); not settable.
        role: ClassVar[str] = "prm"

        def __post_init__(self):
            if not 0 <= self.held_out < 1:
                raise ValueError(f"held_out must be in [0, 1), got {self.held_out}")
            if self.eval_batch_size < 1:
                raise ValueError("eval_batch_size must be >= 1")

    @classmethod
    def references(cls, config) -> list[str]:
        return [config.data]

    @classmethod
    def check(cls, config, earlier: dict) -> None:
        if earlier[config.data].target is not StepLabels:
            raise ValueError(f"data: {config.data!r} is not a step_labels stage")

    def run(self) -> dict:
        ctx, c = self.ctx, self.config
        rows = load_rows(ctx.input_dir(c.data) / "data")
        held = held_out_problems([r["problem_id"] for r in rows], c.held_out, ctx.seed("held_out"))
        examples = [{"prompt": r["prompt"], "steps": r["steps"], "targets": [float(t) for t in r[c.labels]]}
                    for r in rows if r["problem_id"] not in held and r["steps"]]
        if not examples:
            raise NothingToTrain(f"stage {ctx.stage} (round {ctx.round}): no response with steps to train on among "
                                 f"the {len(rows)} rows of stage {c.data!r} outside the held-out problems")
        # Naming this stage itself gives its weights of the newest finished earlier round (the base in round 1).
        start = ctx.weights(ctx.stage) if c.init == "previous" else ctx.weights("base")
        adapter_dir, work = ctx.out_dir / "adapter", ctx.out_dir / "trainer"
        metrics = train(examples, ctx.base_model, adapter_dir, work, seed=ctx.seed("train"), settings=c.training,
                        round_index=ctx.round, init_adapter=start.adapter)
        tested = [r for r in rows if r["problem_id"] in held]
        prm = ProcessRewardModel(ctx.base_model, str(adapter_dir), c.training.optim.max_length)
        scores = prm.step_scores([r["prompt"] for r in tested], [r["steps"] for r in tested], c.eval_batch_size)
        prm.close()
        save_rows([{**r, "scores": s} for r, s in zip(tested, scores)], ctx.out_dir / "held_out")
        write_json(ctx.out_dir / "weights.json", {
            "base": ctx.base_model, "base_identity": model_identity(ctx.base_model), "adapter": str(adapter_dir),
            "adapter_hash": adapter_hash(adapter_dir), "label": f"round_{ctx.round:03d}/{ctx.stage}",
            "init": start.to_dict(), "trained": True,
        })
        shutil.rmtree(work, ignore_errors=True)  # kept until now: a kill while scoring resumes without retraining
        return {**metrics, "held_out/problems": len(held), "held_out/samples": len(tested),
                **step_metrics(tested, scores, c.labels)}

    @classmethod
    def report(cls, metrics: dict) -> dict[str, str]:
        cells = {}
        if metrics.get("first_loss") is not None:
            cells["PRM train loss"] = f"{metrics['first_loss']:.3f}→{metrics['final_loss']:.3f}"
        if metrics.get("held_out/step_auroc") is not None:
            low, high = metrics["held_out/step_auroc_ci_low"], metrics["held_out/step_auroc_ci_high"]
            cells["PRM step AUROC (held out)"] = f"{metrics['held_out/step_auroc']:.2f}" + (
                f" [{low:.2f}, {high:.2f}]" if low is not None else "")
        return cells


def held_out_problems(problem_ids: list[str], fraction: float, seed: int) -> set[str]:
    """`fraction` of the distinct problems (rounded, at least one when fraction > 0), drawn with `seed`; at least
    one problem is left to train on."""
    problems = list(dict.fromkeys(problem_ids))
    if fraction == 0 or not problems:
        return set()
    count = max(1, round(fraction * len(problems)))
    if count >= len(problems):
        raise ValueError(f"held_out={fraction} of {len(problems)} problems leaves none to train on")
    return set(random.Random(seed).sample(problems, count))


def step_metrics(rows: list[dict], scores: list[list[float | None]], labels: str) -> dict:
    """Step accuracy and AUROC (DeLong interval) of the scores against the trained-on labels (soft ones read as
    >= 0.5) and, over rows that carry it, against the exact prefix oracle; steps truncation cut off are left out."""
    out: dict = {}
    for name, key in (("", labels), ("oracle_", "oracle")):
        pairs = [(s, float(t) >= 0.5) for r, ss in zip(rows, scores) if r.get(key) is not None
                 for s, t in zip(ss, r[key]) if s is not None]
        if name and not pairs:
            continue
        auroc, low, high = auroc_interval([s for s, _ in pairs], [t for _, t in pairs])
        out.update({f"held_out/{name}steps": len(pairs),
                    f"held_out/{name}positive_rate": sum(t for _, t in pairs) / len(pairs) if pairs else None,
                    f"held_out/{name}step_accuracy": (sum((s >= 0.5) == t for s, t in pairs) / len(pairs)
                                                      if pairs else None),
                    f"held_out/{name}step_auroc": auroc, f"held_out/{name}step_auroc_ci_low": low,
                    f"held_out/{name}step_auroc_ci_high": high})
    return out
