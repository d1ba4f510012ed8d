"""Tasks: data, prompts, answer extraction and grading, one module each (base.py: the interface)."""

from . import arithmetic, dataset, gsm8k, math  # noqa: F401  (register)
from .base import Grade, Task

__all__ = ["Grade", "Task"]
