"""Stages: one job each, connected through datasets in the run directory."""

from . import critique, evaluate, generate, pairs, select, train  # noqa: F401  (register)
from . import multiturn, rl  # noqa: F401  (register: self-correction evaluation, on-policy RL)
from .base import Stage, StageContext

__all__ = ["Stage", "StageContext"]
