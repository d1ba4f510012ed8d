"""Critics: samples in, verdicts out. Built-in ones register themselves here; see base.py for the protocol.

Built in, one module each: `answer` (the task's grader against the gold answer: GSM8K, arithmetic, MATH through
Math-Verify), `majority` (label-free vote), `likelihood` (the policy's log-probability of its own response),
`self_verify` (P(yes) from the weights that wrote the sample),
`llm_judge` (template + score parser on those weights, another local model or an OpenAI-compatible endpoint),
`reward_model` (a sequence classifier's score), `prm` (a process reward model's step scores, aggregated) and
`combine` (weights and gates over the critics before it).
A critic named in YAML is resolved by `registry.CriticSpec`; `calls.judge_all` is how every stage calls one.
"""

from __future__ import annotations

from . import answer, combine, likelihood, llm_judge, majority, prm, reward_model, self_verify  # noqa: F401  (register)
from .base import Critic, CriticContext, Verdict

__all__ = ["Critic", "CriticContext", "Verdict"]
