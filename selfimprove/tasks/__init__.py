"""Tasks: data, prompts, answer extraction and grading, one module each.

`dataset` reads a researcher's own files by a column map; a task of one's own is a `Task` subclass named by
dotted path (`task: {name: "mypkg.tasks:MyTask", ...}`)."""

from . import arithmetic, dataset, gsm8k, math  # noqa: F401  (register)
from .base import Grade, Task

__all__ = ["Grade", "Task"]
