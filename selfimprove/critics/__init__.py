"""Critics: samples in, verdicts out; base.py is the protocol, calls.py how every stage calls one (`judge_all`).
The built-in ones, one module each, are the README's *Critics built in*; a critic named in YAML is resolved by
`registry.CriticSpec`."""

from __future__ import annotations

from . import answer, combine, likelihood, llm_judge, majority, prm, reward_model, self_verify  # noqa: F401  (register)
from .base import Critic, CriticContext, Verdict

__all__ = ["Critic", "CriticContext", "Verdict"]
