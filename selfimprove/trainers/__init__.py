"""Trainers: TRL-based fitting of LoRA adapters (offline: sft, dpo) and the online policy-gradient trainer (rl).

An offline trainer is a class with a `Config` dataclass and
    train(rows, base_path, init_adapter, adapter_out, work_dir, seed, round_index, policy_adapter) -> metrics
that writes a PEFT adapter to `adapter_out`. `init_adapter` is what training starts from (None = a fresh
adapter on the base); `policy_adapter` is the adapter the round's policy used (for reference models).
An online trainer (`online = True`) is driven step by step by the rl stage instead: see rl.py.
"""

from . import dpo, rl, sft  # noqa: F401  (register)
