"""Tasks: data, prompts, answer extraction and grading, one module each."""

from . import arithmetic, gsm8k, math  # noqa: F401  (register)
from .base import Grade, Task

__all__ = ["Grade", "Task"]
