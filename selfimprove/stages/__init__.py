"""Stages: one job each, connected through datasets in the run directory."""

from . import critique, evaluate, filter, generate, gold, judge, pairs, prm, rl, step_labels, train  # noqa: F401  (register)
from .base import Stage, StageContext

__all__ = ["Stage", "StageContext"]
