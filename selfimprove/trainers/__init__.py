"""Trainers: TRL-based fitting of LoRA adapters."""

from . import sft  # noqa: F401  (register)
