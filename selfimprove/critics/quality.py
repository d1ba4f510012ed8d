"""Critic quality: how well a critic's verdicts agree with the task's gold grading.

For the samples whose gold is known (task.grade against the gold answer) and whose verdict did not fail:
- precision and recall of the critic's label (label True = "correct"; a missing label counts as not correct);
- AUROC of its score: the probability that a correct sample outscores an incorrect one, ties counting one
  half (the Mann-Whitney statistic); None when the samples are all correct or all incorrect.
A critic worth plugging in for filtering has high precision; AUROC says whether its score ranks at all.
"""

from __future__ import annotations


def auroc(scores: list[float], gold: list[bool]) -> float | None:
    """Mann-Whitney AUROC via average ranks: O(n log n), ties get their mean rank."""
    positives = sum(gold)
    negatives = len(gold) - positives
    if positives == 0 or negatives == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # mean 1-based rank of the tie group
        i = j + 1
    rank_sum = sum(r for r, g in zip(ranks, gold) if g)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def critic_quality(labels: list[bool | None], scores: list[float | None], gold: list[bool]) -> dict:
    """precision, recall, auroc and counts over the samples given (callers drop failed verdicts)."""
    predicted = [bool(label) for label in labels]
    tp = sum(p and g for p, g in zip(predicted, gold))
    out = {
        "n": len(gold),
        "gold_positive": sum(gold),
        "precision": tp / sum(predicted) if any(predicted) else None,
        "recall": tp / sum(gold) if any(gold) else None,
    }
    scored = [(s, g) for s, g in zip(scores, gold) if s is not None]
    out["auroc"] = auroc([s for s, _ in scored], [g for _, g in scored]) if scored else None
    return out
