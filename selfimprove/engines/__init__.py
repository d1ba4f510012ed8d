"""Generation engines. vLLM is imported only when its engine is built, so configs load without it."""

from . import hf_engine, vllm_engine, vllm_server  # noqa: F401  (register)
from .base import Engine

__all__ = ["Engine"]
