"""Policy-gradient baselines: how a batch's rewards become advantages. One file per estimator; base.py is the
protocol. The policy-gradient trainer names one (`trainer: {name: policy_gradient, baseline: rloo}`)."""

from . import dr_grpo, grpo, reinforce_pp, rloo  # noqa: F401  (register)
from .base import Baseline

__all__ = ["Baseline"]
