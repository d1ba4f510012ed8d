"""The baseline protocol: one attempt's rewards over a batch of trajectories → one advantage per trajectory.

`advantages(rewards, groups)`: `rewards[i]` is trajectory i's reward for this attempt (None: the objective
gives this attempt no reward term, so its advantage is 0), `groups[i]` its group (the problem it answers: a
problem's samples are compared with each other). How per-token losses are then aggregated is not the
baseline's business: the trainer's `loss_agg_mode`. Each estimator's docstring says which mode its paper used;
the shipped pipelines set it explicitly.
"""

from __future__ import annotations

from collections import defaultdict


class Baseline:
    Config: type

    def __init__(self, config):
        self.config = config

    def advantages(self, rewards: list[float | None], groups: list[str]) -> list[float]:
        """The protocol. The shipped estimators are group-wise: `group` turns one comparable group's rewards into
        its advantages, and every trajectory outside such a group (`by_group`) gets 0."""
        out = [0.0] * len(rewards)
        for idx in by_group(rewards, groups):
            for i, advantage in zip(idx, self.group([rewards[i] for i in idx])):
                out[i] = advantage
        return out

    def group(self, rewards: list[float]) -> list[float]:
        raise NotImplementedError


def by_group(rewards: list[float | None], groups: list[str]) -> list[list[int]]:
    """Positions of each group's trajectories, for groups whose every reward is known and that have at least two
    members (a group of one has nothing to compare with: its advantage stays 0)."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    return [idx for idx in members.values() if len(idx) >= 2 and all(rewards[i] is not None for i in idx)]
