"""Helpers shared by stages: problem subsets and joining samples with verdicts."""

from __future__ import annotations

import random
from collections import defaultdict


def problem_subset(problems: list[dict], num: int | None, rng: random.Random | None) -> list[dict]:
    """`num` problems: a seeded random subset (kept in the split's order) when `rng` is given, else the first."""
    if num is None or num >= len(problems):
        return list(problems)
    if rng is None:
        return list(problems[:num])
    chosen = sorted(rng.sample(range(len(problems)), num))
    return [problems[i] for i in chosen]


def unsolved_problem_ids(verdicts: list[dict]) -> set[str]:
    """Problems none of whose samples any critic labelled correct."""
    solved, seen = set(), set()
    for v in verdicts:
        seen.add(v["problem_id"])
        if v["label"]:
            solved.add(v["problem_id"])
    return seen - solved


def join_verdicts(samples: list[dict], verdicts: list[dict]) -> list[dict]:
    """Each sample with `verdicts`: {critic id: verdict row} for the critics that judged it."""
    by_sample: dict[str, dict] = defaultdict(dict)
    for v in verdicts:
        by_sample[v["sample_id"]][v["critic"]] = v
    return [{**s, "verdicts": by_sample.get(s["sample_id"], {})} for s in samples]


def pick_verdict(verdicts: dict, critic: str | None, stage: str) -> dict | None:
    """The verdict of `critic` among a sample's verdicts; with no critic named, the only one there is."""
    if critic is not None:
        return verdicts.get(critic)
    if len(verdicts) > 1:
        raise ValueError(f"critique stage {stage!r} ran {sorted(verdicts)}: set `critic:` to say which one decides")
    return next(iter(verdicts.values()), None)
