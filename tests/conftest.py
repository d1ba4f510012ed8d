"""Shared fixtures: the tiny random model, and one in-process vLLM engine for the whole test session.

Engines cost seconds to start; every test that generates shares `engine` (merged-weights mode, float32, so
greedy and seeded outputs are reproducible).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import selfimprove  # noqa: E402,F401  (sets HF_HUB_OFFLINE before any test imports huggingface_hub)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TINY = "tiny-random-llama"


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from selfimprove.models import prepare_model

    return str(prepare_model(TINY))


@pytest.fixture(scope="session")
def engine(tiny_model):
    from selfimprove.engines.vllm_engine import VLLMEngine

    eng = VLLMEngine(VLLMEngine.Config(in_process=True, adapter_mode="merged", max_model_len=1024), tiny_model, seed=0)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model, tmp_path_factory) -> str:
    """A LoRA adapter trained hard to answer every arithmetic prompt with one fixed sentence, so that serving it
    visibly changes greedy outputs (the random base model emits newlines)."""
    from selfimprove.tasks.arithmetic import Arithmetic

    task = Arithmetic(Arithmetic.Config(num_train=40, num_test=12, prompt_format="chat"))
    rows = [{"prompt": task.prompt(p), "completion": [{"role": "assistant", "content": TARGET}]}
            for p in task.problems("train")]
    return train_hard(tiny_model, rows, tmp_path_factory.mktemp("adapter"))


def train_hard(tiny_model: str, rows: list[dict], out: Path) -> str:
    """A LoRA adapter on the tiny model, SFT-trained on `rows` until it answers with their completions."""
    from selfimprove.trainers.common import LoraSettings, Optimization
    from selfimprove.trainers.sft import SFT

    lora = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"])
    trainer = SFT(SFT.Config(lora=lora, optim=Optimization(learning_rate=1e-2, max_steps=40, batch_size=8,
                                                           logging_steps=10)))
    metrics = trainer.train(rows, tiny_model, None, out / "adapter", out / "work", seed=0, round_index=1)
    assert metrics["final_loss"] < metrics["first_loss"]
    return str(out / "adapter")


TARGET = "The answer is 42."
