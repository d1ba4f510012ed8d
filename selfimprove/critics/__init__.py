"""Critics: samples in, verdicts out. Built-in ones register themselves here; see base.py for the protocol.

Built in, one module each: `answer` (the task's grader against the gold answer: GSM8K, arithmetic, MATH through
Math-Verify), `majority` (label-free vote), `self_verify` (P(yes) from the policy), `llm_judge` (template + score
parser on the policy, another local model or an OpenAI-compatible endpoint), `reward_model` (a sequence
classifier's score) and `combine` (weights and gates over the critics before it).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from ..config import ConfigError
from ..registry import CRITICS
from . import answer, combine, llm_judge, majority, reward_model, self_verify  # noqa: F401  (register)
from .base import Critic, CriticContext, FunctionCritic, Verdict


@dataclass
class ResolvedCritic:
    """A critic reference checked at config load: its id (the verdicts' `critic` column), class or function,
    and its parameters."""

    id: str
    target: object
    params: object

    def build(self, context: CriticContext) -> Critic:
        if inspect.isclass(self.target):
            return self.target(self.params, context)
        return FunctionCritic(self.target, self.params, context)


def resolve_critic(spec: dict, where: str, key: str) -> ResolvedCritic:
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"{where}: {key}: a critic is a mapping with a 'name' (and its parameters), got {spec!r}")
    params = dict(spec)
    name = params.pop("name")
    critic_id = params.pop("id", name)
    target = CRITICS.get(name, where, key)
    if inspect.isclass(target):
        if not issubclass(target, Critic):
            raise ConfigError(f"{where}: {key}: {name!r} is a class but not a selfimprove Critic subclass")
        _, config = CRITICS.build_config(name, params, where, key) if hasattr(target, "Config") else (None, None)
        if not hasattr(target, "Config") and params:
            raise ConfigError(f"{where}: {key}: critic {name!r} takes no parameters, got {sorted(params)}")
        return ResolvedCritic(critic_id, target, config)
    if not callable(target):
        raise ConfigError(f"{where}: {key}: {name!r} is neither a Critic class nor a function")
    try:
        FunctionCritic(target, params, CriticContext(task=None))
    except ValueError as err:
        raise ConfigError(f"{where}: {key}: {err}") from err
    return ResolvedCritic(critic_id, target, params)


__all__ = ["Critic", "CriticContext", "Verdict", "ResolvedCritic", "resolve_critic"]
