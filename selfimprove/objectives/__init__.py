"""RL objectives: what an `rl` stage optimises. One module per objective family; base.py is the protocol."""

from . import score, single  # noqa: F401  (register)
from .base import Objective

__all__ = ["Objective"]
