"""Trainers: TRL-based fitting of LoRA adapters."""

from . import dpo, sft  # noqa: F401  (register)
from . import rl  # noqa: F401  (register: the online policy-gradient trainer)

# A trainer is a class with a `Config` dataclass and
#   train(rows, base_path, init_adapter, adapter_out, work_dir, seed, round_index, policy_adapter) -> metrics
# that writes a PEFT adapter to `adapter_out`. `init_adapter` is what training starts from (None = a fresh
# adapter on the base); `policy_adapter` is the adapter the round's policy used (for reference models).


def resolve_trainer(spec: dict, where: str, key: str):
    """(trainer class, its Config) for a `{name: ..., parameters}` mapping, checked strictly."""
    from ..registry import TRAINERS

    params = dict(spec)
    return TRAINERS.build_config(params.pop("name"), params, where, key)
