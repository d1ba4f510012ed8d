"""Judge data: pairs whose better side is known without gold answers, to train the judge and to measure it each
round (Self-Taught Evaluator: Wang et al., 2024; the judge-training half of Meta-Rewarding, Wu et al., 2024).

For each problem x the policy answers x and x′, a copy of x with one digit of one number in its question changed
(`perturb_question`). The answer to x′ answers another question, so for x it is the worse response: the pair's
better side is known with no gold label. The judge, the model asked whether an answer is correct (P(yes), as
the `self_verify` critic reads it: `judge:` holds that critic's settings), scores both sides for x with the
weights named by `weights:`: `base`, or the stage that trains the judge (`role: judge` on a train stage), whose
newest finished adapter from before this stage is used, so round r measures and selects with round r-1's judge.

Rows (the training-row schema of records.py) for the judge's train stage: on the pairs of training problems the
judge ranked right (P(yes) of the better side higher), its conversation about each side with the reply it
should give (`yes` for the better side, `no` for the worse): the judgements it got right, as STE fine-tunes on.

Metrics, on the pairs of the `measure` problems (the first 64 of `dev` by default: the same problems every round,
never trained on): `judge/pair_accuracy` (better side scored higher, ties half) and `judge/auroc` (better sides
against worse ones) with DeLong's interval; with a trained judge, the base model's judgement of the same pairs
(`judge/base_auroc`) and the paired difference of the share of pairs each ranks right (`judge/vs_base_*`: Newcombe's
interval, exact McNemar p); where the problems carry gold answers, for the record only (nothing is selected by
them), `judge/gold_auroc`: the judge's scores of the policy's answers to x against their correctness, the number
by which Self-Rewarding's untrained judge fell below chance. Every pair, with both scores, is kept in `pairs/`.

Deviations from STE: the judge is pointwise (P(yes) that one answer is right) rather than a pairwise LLM judge
with a sampled reasoning chain, so a right judgement is a pair whose two scores are in the right order and the
training targets are the one-word replies, not sampled judgements; the perturbation changes a digit instead of
having an LLM write a similar instruction; an answer to x′ that happens to be right for x stays a worse side.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from ..artifacts import save_rows
from ..critics import CriticContext
from ..critics.self_verify import SelfVerifyCritic
from ..metrics import auroc_interval, paired_difference
from ..registry import STAGES
from ..records import SamplingConfig, reply
from .base import Stage
from .common import EvalProblems, ProblemSelection
from .rollout import sample_chunk

PERTURBED = "~perturbed"  # suffix of a perturbed problem's id


def perturb_question(question: str, rng: random.Random) -> str | None:
    """`question` with one digit of one of its numbers replaced by another digit (a leading digit never by 0), or
    None when it has no number."""
    numbers = list(re.finditer(r"\d+", question))
    if not numbers:
        return None
    number = rng.choice(numbers)
    at = rng.randrange(number.start(), number.end())
    leading = at == number.start() and number.end() - number.start() > 1
    digit = rng.choice([d for d in "0123456789" if d != question[at] and not (leading and d == "0")])
    return question[:at] + digit + question[at + 1:]


def judgement_rows(pairs: list[tuple[dict, dict]], scores: list[tuple[float, float]], judge: SelfVerifyCritic,
                   source: str) -> list[dict]:
    """Training rows from the pairs (better sample, worse sample) whose scores are in the right order: each side's
    judge conversation with the reply the judge should give."""
    c, rows = judge.config, []
    for (good, bad), (good_score, bad_score) in zip(pairs, scores):
        if good_score <= bad_score:
            continue
        for sample, answer in ((good, c.yes), (bad, c.no)):
            prompt = judge.conversation(sample)
            rows.append({"prompt": prompt, "completion": reply(prompt, answer),
                         "problem_id": good["problem_id"], "sample_ids": [sample["sample_id"]], "source": source,
                         "rationalized": False})
    return rows


@STAGES.register("judge_data")
class JudgeData(Stage):
    outputs = ("data", "pairs")
    @dataclass
    class Config:
        problems: ProblemSelection = field(default_factory=ProblemSelection)
        sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.7, max_tokens=256))
        weights: str = "base"  # the judge's: base, or the judge's train stage (module docstring)
        judge: SelfVerifyCritic.Config = field(default_factory=SelfVerifyCritic.Config)
        measure: EvalProblems = field(default_factory=lambda: EvalProblems(split="dev", num_problems=64))

        def __post_init__(self):
            if self.sampling.n != 1:
                raise ValueError("sampling.n must be 1: one answer to each problem and to its perturbed copy")
            if self.measure.num_problems is not None and self.measure.num_problems < 2:
                raise ValueError("measure.num_problems must be >= 2: the judge's AUROC needs pairs to rank")
            if self.measure.split == self.problems.split:
                raise ValueError(f"measure.split and problems.split are both {self.problems.split!r}: the judge "
                                 f"would be measured on problems it is trained on; measure on dev")

    def run(self) -> dict:
        c, ctx = self.config, self.ctx
        measured = self._perturbable(c.measure.take(ctx.task), "measure")
        trained = self._perturbable(c.problems.select(ctx.task.problems(c.problems.split), ctx.seed("problems")),
                                    "problems")
        rng = random.Random(ctx.seed("perturb"))
        originals = measured + trained
        perturbed = [{**p, "problem_id": p["problem_id"] + PERTURBED, "question": perturb_question(p["question"], rng),
                      "answer": ""} for p in originals]
        policy, judge_weights = ctx.weights("policy"), ctx.weights(c.weights)
        answers = sample_chunk(engine=ctx.engine(), task=ctx.task, problems=originals + perturbed, sampling=c.sampling,
                               weights=policy, seeds=[ctx.seed("answers")], id_prefix=f"r{ctx.round:03d}/{ctx.stage}")
        n = len(originals)
        # Both sides are judged as answers to x: the worse side keeps x's prompt and columns, its own completion.
        pairs = [(good, {**good, "sample_id": bad["sample_id"], "completion": bad["completion"]})
                 for good, bad in zip(answers[:n], answers[n:])]
        judge, scores = self._score(pairs, judge_weights)
        m = len(measured)
        rows = judgement_rows(pairs[m:], scores[m:], judge, ctx.stage)
        save_rows(rows, ctx.out_dir / "data")
        save_rows([{"problem_id": good["problem_id"], "measured": i < m, "better_sample_id": good["sample_id"],
                    "worse_sample_id": bad["sample_id"], "prompt": good["prompt"], "better": good["completion"],
                    "worse": bad["completion"], "perturbed_question": question["question"], "better_score": gs,
                    "worse_score": bs} for i, ((good, bad), (gs, bs), question) in enumerate(zip(pairs, scores,
                                                                                                perturbed))],
                  ctx.out_dir / "pairs")
        metrics = judge_metrics(pairs[:m], scores[:m], ctx.task)
        if judge_weights.adapter is not None:  # the untrained judge (the base) on the same pairs, for a paired test
            _, base = self._score(pairs[:m], ctx.weights("base"))
            metrics.update(compare_to_base(scores[:m], base))
        return {"problems": n - m, "measured": m, "examples": len(rows), "judge_weights": judge_weights.label,
                **metrics}

    def _score(self, pairs: list[tuple[dict, dict]], weights) -> tuple[SelfVerifyCritic, list[tuple[float, float]]]:
        """The judge with `weights`, and its (better, worse) P(yes) for each pair."""
        ctx = self.ctx
        judge = SelfVerifyCritic(self.config.judge, CriticContext(task=ctx.task, engine=ctx.engine, weights=weights))
        verdicts = judge.judge([side for pair in pairs for side in pair])
        return judge, [(verdicts[2 * i].score, verdicts[2 * i + 1].score) for i in range(len(pairs))]

    def _perturbable(self, problems: list[dict], field_name: str) -> list[dict]:
        """The problems whose question has a number to change; an error naming the field when fewer than two."""
        kept = [p for p in problems if re.search(r"\d", p["question"])]
        if len(kept) < 2:
            raise ValueError(f"stage {self.ctx.stage}: {field_name}: {len(kept)} of {len(problems)} problems have a "
                             f"number in the question to perturb; the judge's pairs need at least 2: choose more "
                             f"problems, or a task whose questions hold numbers")
        return kept

    @classmethod
    def report(cls, metrics: dict) -> dict[str, str]:
        low, high = metrics["judge/auroc_ci_low"], metrics["judge/auroc_ci_high"]
        cells = {"judge AUROC (pairs)": f"{metrics['judge/auroc']:.2f}"
                 + (f" [{low:.2f}, {high:.2f}]" if low is not None else "")}
        if metrics.get("judge/gold_auroc") is not None:
            cells["judge AUROC (gold)"] = f"{metrics['judge/gold_auroc']:.2f}"
        return cells


def judge_metrics(pairs: list[tuple[dict, dict]], scores: list[tuple[float, float]], task) -> dict:
    """The judge on held-out pairs (module docstring); gold AUROC only where every better side has a gold answer."""
    auroc, low, high = pair_auroc(scores)
    right = sum(1.0 if g > b else 0.5 if g == b else 0.0 for g, b in scores)
    out = {"judge/pair_accuracy": right / len(scores), "judge/auroc": auroc, "judge/auroc_ci_low": low,
           "judge/auroc_ci_high": high, "judge/gold_auroc": None}
    if all(good.get("answer") for good, _ in pairs):
        correct = [bool(task.grade(good, good["completion"]).correct) for good, _ in pairs]
        out["judge/gold_auroc"], out["judge/gold_auroc_ci_low"], out["judge/gold_auroc_ci_high"] = auroc_interval(
            [g for g, _ in scores], correct)
        out["judge/gold_accuracy"] = sum(correct) / len(correct)  # the policy's own, on these problems
    return out


def compare_to_base(trained: list[tuple[float, float]], base: list[tuple[float, float]]) -> dict:
    """The base judge's AUROC on the same pairs, and the paired difference (trained − base) of the share of pairs
    each ranks right (strictly; metrics.paired_difference: Newcombe's interval, exact McNemar p)."""
    auroc, low, high = pair_auroc(base)
    d = paired_difference([g > b for g, b in base], [g > b for g, b in trained])
    return {"judge/base_auroc": auroc, "judge/base_auroc_ci_low": low, "judge/base_auroc_ci_high": high,
            "judge/vs_base_difference": d.difference, "judge/vs_base_ci_low": d.ci_low,
            "judge/vs_base_ci_high": d.ci_high, "judge/vs_base_p": d.p_value}


def pair_auroc(scores: list[tuple[float, float]]) -> tuple[float | None, float | None, float | None]:
    """AUROC of better sides (positives) against worse sides, with DeLong's interval (metrics.auroc_interval)."""
    return auroc_interval([g for g, _ in scores] + [b for _, b in scores], [True] * len(scores) + [False] * len(scores))
