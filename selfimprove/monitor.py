"""The B-STaR monitor (Zeng et al., 2024): how much a round explores and how well its selection exploits.

Self-improvement stalls when the model stops producing varied correct solutions (exploration) or the critic
stops separating good samples from bad ones (exploitation); B-STaR folds both into the balance score, which picks
the next round's sampling temperature and reward threshold. Pure functions over rows, so a stage, the report or a
notebook can call them on a saved run. Inputs and every metric, as a user reads them: docs/monitor.md.

The balance score. B-STaR defines it per query x_i as bs_i = min(n'_i / n*, 1) · (n'_i / n_i): n'_i counts the
*unique* correct responses among those selected for x_i, n_i the responses selected for x_i, n* the correct
responses a query needs to count fully (the authors' 8 is the default); the score is the mean of bs_i over the
queries. n_i is counted after de-duplication too, as the authors' code counts it (hkust-nlp/B-STaR,
train_code/determine_hyper.py: `get_unique_trn_json` drops repeated (query, response) pairs from the selection,
then `cal_modi_acc_soft` counts what is left), so repeats of one completion never raise a query's score: eight
copies of one correct completion give n'_i = n_i = 1 and, with n* = 8, bs_i = 1/8, not 1. Exactly:
- two kept samples of a query are one response when their completions are equal after stripping surrounding
  whitespace (the filter's `dedupe` compares the same; the authors compare the exact text). The extracted answer
  plays no part: two different derivations of the same answer are two responses, as in the authors' code;
- a response is correct by the task's gold grading (the authors compare its final answer to the reference);
  a kept sample without gold is left out of n_i and n'_i (their data always has a reference);
- the mean runs over the queries of `samples` with gold (`bstar/balance_queries`), and a query whose selection
  kept nothing scores 0. The authors' mean runs over the queries present in the selection, but their selection
  always holds each query's reference solution (scored 1.0, above every threshold they try), so every query is
  in it; here the selection holds the model's own samples only, and leaving out the queries that kept nothing
  would let a setting that keeps one right sample of one query score as well as one that does so on every
  query. With no query with gold the score is NaN.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .metrics import pass_at_k

N_STAR = 8  # the authors' n*: a query needs this many distinct correct kept responses to count fully


def balance_score(selected: Mapping[str, Sequence[tuple[str, bool]]], n_star: int = N_STAR) -> float:
    """B-STaR's balance score (module docstring) from each query's selected responses: query id → [(completion,
    correct), ...], with every query the mean runs over present, an empty list where nothing was selected."""
    if n_star < 1:
        raise ValueError(f"n_star must be >= 1, got {n_star}")
    scores = []
    for responses in selected.values():
        distinct = {_text(completion) for completion, _ in responses}
        correct = {_text(completion) for completion, ok in responses if ok}
        scores.append(min(len(correct) / n_star, 1.0) * len(correct) / len(distinct) if distinct else 0.0)
    return _mean(scores)


def exploration(samples: Sequence[dict], gold: Sequence[bool | None]) -> dict:
    """The exploration metrics (docs/monitor.md), from sampled rows and their gold correctness."""
    _check_aligned(samples, gold)
    groups: dict[str, list[tuple[dict, bool | None]]] = defaultdict(list)
    for row, g in zip(samples, gold):
        groups[row["problem_id"]].append((row, g))
    out: dict = {"bstar/prompts": len(groups),
                 "bstar/distinct_completions": _mean([len({_text(r["completion"]) for r, _ in g})
                                                      for g in groups.values()])}
    graded = [g for g in groups.values() if all(ok is not None for _, ok in g)]
    out["bstar/prompts_with_gold"] = len(graded)
    if not graded:
        return out
    k = min(len(g) for g in graded)
    correct = [[r for r, ok in g if ok] for g in graded]
    out.update({
        "bstar/k": k,
        "bstar/pass@k": _mean([pass_at_k(len(g), len(c), k) for g, c in zip(graded, correct)]),
        "bstar/correct_per_prompt": _mean([len(c) for c in correct]),
        "bstar/distinct_correct_answers": _mean([len({str(r["extracted"]) for r in c if r["extracted"] is not None})
                                                 for c in correct]),
        "bstar/distinct_correct_completions": _mean([len({_text(r["completion"]) for r in c}) for c in correct]),
    })
    return out


def exploitation(samples: Sequence[dict], gold: Sequence[bool | None], kept_ids: Iterable[str],
                 n_star: int = N_STAR) -> dict:
    """Precision of the kept samples against gold, and the balance score (module docstring). The adaptive sweep
    (stages/generate.py) scores each candidate setting with this function too."""
    _check_aligned(samples, gold)
    kept_ids = set(kept_ids)
    kept = [(row, g) for row, g in zip(samples, gold) if row["sample_id"] in kept_ids]
    judged = [(row, bool(g)) for row, g in kept if g is not None]
    selected: dict[str, list[tuple[str, bool]]] = {row["problem_id"]: [] for row, g in zip(samples, gold)
                                                   if g is not None}
    for row, ok in judged:
        selected[row["problem_id"]].append((row["completion"], ok))
    return {"bstar/kept": len(kept),
            "bstar/precision": sum(ok for _, ok in judged) / len(judged) if judged else float("nan"),
            "bstar/balance": balance_score(selected, n_star),
            "bstar/balance_queries": len(selected), "bstar/n_star": n_star}


def monitor_round(samples: Sequence[dict], gold: Sequence[bool | None], kept_ids: Iterable[str],
                  n_star: int = N_STAR) -> dict:
    """Every B-STaR metric of one round, as one flat dict (names: docs/monitor.md)."""
    return {**exploration(samples, gold), **exploitation(samples, gold, kept_ids, n_star)}


def choose_setting(results: Mapping[Any, float] | Iterable[tuple[Any, float]]) -> Any:
    """The candidate setting with the highest balance score, from a sweep: {setting: score} or (setting, score)
    pairs, e.g. [(0.7, 0.31), (1.0, 0.42)] over temperatures, or [((t, threshold), score), ...].

    Ties go to the candidate listed first, as the authors' `combinations[effect_values.index(max(...))]` does, so
    the choice depends only on the order the sweep lists its candidates. A NaN score (no query with gold to
    measure) never wins; a sweep with no finite score is an error."""
    pairs = list(results.items() if isinstance(results, Mapping) else results)
    finite = [(setting, score) for setting, score in pairs if not math.isnan(score)]
    if not finite:
        raise ValueError(f"no candidate setting has a balance score (got {len(pairs)} candidates, none finite)")
    return max(finite, key=lambda pair: pair[1])[0]  # max keeps the first of equal scores


def _text(completion: str) -> str:
    """What two completions of a query must share to count as one response (as the filter's dedupe)."""
    return completion.strip()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _check_aligned(samples: Sequence[dict], gold: Sequence[bool | None]) -> None:
    if len(samples) != len(gold):
        raise ValueError(f"gold has {len(gold)} entries for {len(samples)} samples: give one per sample, in order")
