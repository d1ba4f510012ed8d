"""Keeping a task's splits apart: duplicates across train, dev and test under the task's canonical form, and the
seeded dev slice carved out of train.

A problem that appears in two splits is one problem: a model trained on it has seen the held-out copy. The
held-out split wins: a train (or dev) problem whose canonical form (`Task.canonical`; by default the question
with runs of whitespace collapsed) is in a held-out split is dropped, and the number dropped is logged, since a
split that shrinks without a word misleads whoever reads its size. A question repeated within one split is left
alone, unless the dev slice takes one copy: then the other leaves train. What this drops from the shipped GSM8K
and MATH data: docs/tasks.md.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

log = logging.getLogger(__name__)

Canonical = Callable[[dict], str]


def drop_seen(problems: Sequence[dict], held_out: Mapping[str, Sequence[dict]], canonical: Canonical,
              what: str) -> list[dict]:
    """`problems` without those whose canonical form is in a held-out split (`held_out`: split name → problems);
    logs how many were dropped, per held-out split, naming `what` (e.g. "GSM8K seeds train")."""
    seen: dict[str, str] = {}
    for split, rows in held_out.items():
        for p in rows:
            seen.setdefault(canonical(p), split)
    keys = [canonical(p) for p in problems]
    for split, count in Counter(seen[k] for k in keys if k in seen).items():
        log.warning("%s: dropped %d of %d problems that duplicate a %s problem (splits are kept disjoint)",
                    what, count, len(problems), split)
    return [p for p, k in zip(problems, keys) if k not in seen]


def carve(problems: Sequence[dict], count: int, seed: int, canonical: Canonical,
          what: str) -> tuple[list[dict], list[dict]]:
    """(the rest, a held-out slice of `count` problems chosen by random.Random(seed)); both keep the input's order,
    and the same input, count and seed always give the same slice. A problem of the rest that duplicates one of
    the slice (a split can repeat itself: MATH's train does once) is dropped and logged like any other."""
    if count > len(problems):
        raise ValueError(f"{what}: a dev slice of {count} problems does not fit in {len(problems)}; lower num_dev")
    chosen = set(random.Random(seed).sample(range(len(problems)), count))
    held = [p for i, p in enumerate(problems) if i in chosen]
    rest = drop_seen([p for i, p in enumerate(problems) if i not in chosen], {"dev": held}, canonical, what)
    return rest, held


def file_splits(read: Callable[[str], list[dict] | None], canonical: Canonical, dev_fraction: float, dev_seed: int,
                what: str) -> dict[str, list[dict]]:
    """train, dev and test of a task whose splits come as files (`read(split)`: its problems, None without a file):
    test as read; dev as read without test's problems, or else the `dev_fraction` slice of train; train without
    test's and dev's problems (and without the slice). A split without data is absent."""
    out = {"test": read("test")}
    dev = read("dev")
    if dev is not None:
        out["dev"] = drop_seen(dev, {"test": out["test"] or []}, canonical, f"{what} dev")
    train = read("train")
    if train is not None:
        train = drop_seen(train, {"test": out["test"] or [], "dev": out.get("dev") or []}, canonical, f"{what} train")
        if dev_fraction > 0:
            train, out["dev"] = carve(train, round(dev_fraction * len(train)), dev_seed, canonical, f"{what} train")
        out["train"] = train
    return {split: problems for split, problems in out.items() if problems is not None}
