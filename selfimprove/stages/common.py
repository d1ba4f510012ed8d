"""What stages share: problem selection, chunking, bootstrap settings, and joining samples with verdicts."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass


def check_weights(which: str | None, stages: dict, prm: bool = False) -> None:
    """`which` (a `weights:` field) names weights a language model can generate or judge with: None, base, policy,
    latest, or one of `stages` (specs by name) that produces weights. A process reward model's adapter (a
    train_prm stage's, `role: prm`) is a token-classification head, not a language model: only a reader of
    process rewards (`prm=True`, which accepts nothing else) may name it."""
    if which in (None, "base", "policy", "latest") and not prm:
        return
    spec = stages.get(which)
    if spec is None or not spec.target.produces_weights:
        raise ValueError(f"weights: {which!r} is not base, policy, latest or a weights-producing stage"
                         if not prm else f"weights: {which!r} is not an earlier train_prm stage")
    is_prm = getattr(spec.config, "role", None) == "prm"
    if is_prm != prm:
        raise ValueError(f"weights: {which!r} is a train_prm stage, whose adapter scores steps and cannot generate; "
                         f"name a policy or judge stage, or base" if is_prm else
                         f"weights: {which!r} is a {spec.name} stage, not a train_prm stage (a process reward model)")


def check_critic_weights(critics: list, earlier: dict) -> None:
    """Each critic's own `weights:` (self_verify's judge, prm's process reward model), as `check_weights` says."""
    for critic in critics:
        which = getattr(critic.config, "weights", None)  # (combine's `weights` is a mapping)
        if isinstance(which, str):
            try:
                check_weights(which, earlier, prm=getattr(critic.target, "reads_process_rewards", False))
            except ValueError as err:
                raise ValueError(f"critic {critic.id!r}: {err}") from err


@dataclass
class ProblemSelection:
    """Training problems: `num_problems` of a split, a random subset (kept in the split's order) drawn afresh each
    round (seeded by run seed and round), or with `shuffle: false` the first ones."""

    split: str = "train"
    num_problems: int | None = None  # None = the whole split
    shuffle: bool = True

    def select(self, problems: list[dict], seed: int) -> list[dict]:
        if self.num_problems is None or self.num_problems >= len(problems) or not self.shuffle:
            return list(problems[: self.num_problems])
        chosen = sorted(random.Random(seed).sample(range(len(problems)), self.num_problems))
        return [problems[i] for i in chosen]


@dataclass
class EvalProblems:
    """Evaluation always takes the first `num_problems` of the split, so every round sees the same problems."""

    split: str = "test"
    num_problems: int | None = None  # None = the whole split

    def take(self, task) -> list[dict]:
        return task.problems(self.split)[: self.num_problems]


@dataclass
class Chunking:
    """Problems per engine call (or critic pass) and per resume point. Large chunks keep the engine's batch full
    (small ones starve it: each chunk's tail runs a shrinking batch); each finished chunk is saved, so a killed
    stage redoes at most one chunk."""

    size: int = 256

    def __post_init__(self):
        if self.size < 1:
            raise ValueError("size must be >= 1")

    def split(self, items: list) -> list[list]:
        return [items[i:i + self.size] for i in range(0, len(items), self.size)]


@dataclass
class Bootstrap:
    """Percentile-bootstrap intervals over problems (metrics.summarize)."""

    resamples: int = 1000

    def __post_init__(self):
        if self.resamples < 10:
            raise ValueError("resamples must be >= 10")


def unsolved_problem_ids(verdicts: list[dict], critic: str | None, stage: str) -> set[str]:
    """Problems none of whose samples the deciding critic (`pick_verdict`) labelled correct, from verdict rows; a
    problem whose verdicts are all invalid (`error` set) is unknown, not unsolved, and left out."""
    solved, judged = set(), set()
    for sample_verdicts in _by_sample(verdicts).values():
        verdict = pick_verdict(sample_verdicts, critic, stage)
        if verdict and verdict["error"] is None:
            if verdict["label"] is None:
                raise ValueError(f"critic {verdict['critic']!r} in stage {stage!r} gives scores without labels, so "
                                 f"no problem would count as solved; `unsolved_in` needs a critic that labels")
            judged.add(verdict["problem_id"])
        if verdict and verdict["label"]:
            solved.add(verdict["problem_id"])
    return judged - solved


def join_verdicts(samples: list[dict], verdicts: list[dict], critic: str | None, stage: str) -> list[tuple]:
    """Each sample with the deciding critic's verdict on it (`pick_verdict`) among stage `stage`'s verdict rows."""
    by_sample = _by_sample(verdicts)
    return [(s, pick_verdict(by_sample.get(s["sample_id"], {}), critic, stage)) for s in samples]


def _by_sample(verdicts: list[dict]) -> dict[str, dict]:
    """Verdict rows grouped: sample id → {critic id: verdict row}."""
    by_sample: dict[str, dict] = defaultdict(dict)
    for v in verdicts:
        by_sample[v["sample_id"]][v["critic"]] = v
    return by_sample


def pick_verdict(verdicts: dict, critic: str | None, stage: str) -> dict | None:
    """The verdict of `critic` among a sample's verdicts; with no critic named, the only one there is (a
    critique stage running several critics needs `critic:` to say which decides: checked at config load)."""
    if critic is not None:
        return verdicts.get(critic)
    if len(verdicts) > 1:
        raise ValueError(f"critique stage {stage!r} ran {sorted(verdicts)}: set `critic:` to say which one decides")
    return next(iter(verdicts.values()), None)


def selected(verdict: dict | None, threshold: float | None) -> bool:
    """By the verdict's label, or, with a threshold, by its score."""
    if verdict is None:
        return False
    if threshold is None:
        return bool(verdict["label"])
    return verdict["score"] is not None and verdict["score"] >= threshold


def check_critic_choice(critic: str | None, verdicts: str, earlier: dict) -> None:
    """Config-time check of a `critic:` choice against the critics that stage `verdicts` runs (`earlier`: the
    specs of the round's earlier stages by name)."""
    spec = earlier[verdicts]
    if not hasattr(spec.target, "critic_ids"):
        raise ValueError(f"stage {verdicts!r} ({spec.name}) writes no verdicts; name a critique stage")
    ids = spec.target.critic_ids(spec.config)
    if critic is None and len(ids) > 1:
        raise ValueError(f"stage {verdicts!r} runs critics {', '.join(ids)}: set `critic:` to the id of the one "
                         f"that decides")
    if critic is not None and critic not in ids:
        raise ValueError(f"critic {critic!r} is not run by stage {verdicts!r}; its critic ids: {', '.join(ids)}")
