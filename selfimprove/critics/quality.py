"""Critic quality: how well a critic's verdicts agree with the task's gold grading.

For the samples whose gold is known (task.grade against the gold answer) and whose verdict did not fail:
- precision and recall of the critic's label (label True = "correct"; a missing label counts as not correct);
- AUROC of its score: the probability that a correct sample outscores an incorrect one, ties counting one
  half (the Mann-Whitney statistic); None when the samples are all correct or all incorrect; with DeLong's 95%
  interval (`auroc_ci_low`, `auroc_ci_high`; metrics.auroc_interval), None with fewer than two of either.
A critic worth plugging in for filtering has high precision; AUROC says whether its score ranks at all.
"""

from __future__ import annotations

from ..metrics import auroc_interval


def critic_quality(labels: list[bool | None], scores: list[float | None], gold: list[bool]) -> dict:
    """precision, recall, auroc and counts over the samples given (callers drop failed verdicts)."""
    predicted = [bool(label) for label in labels]
    tp = sum(p and g for p, g in zip(predicted, gold))
    scored = [(s, g) for s, g in zip(scores, gold) if s is not None]
    auroc, low, high = auroc_interval([s for s, _ in scored], [g for _, g in scored])
    return {"n": len(gold), "gold_positive": sum(gold), "precision": tp / sum(predicted) if any(predicted) else None,
            "recall": tp / sum(gold) if any(gold) else None, "auroc": auroc, "auroc_ci_low": low, "auroc_ci_high": high}
