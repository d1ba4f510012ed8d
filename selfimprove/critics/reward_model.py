"""A reward model: the score of a transformers sequence-classification model on (prompt, completion).

The conversation (the sample's prompt plus the completion as the assistant's turn) goes through the reward
model's own chat template when its tokenizer has one, else prompt and completion are joined by a blank line.
A one-logit head gives sigmoid(logit); a multi-class head gives the softmax probability of `positive_index`.
Either way the score lies in [0, 1]; label = score >= `threshold` when a threshold is set.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import CRITICS
from .base import Critic, Verdict


@CRITICS.register("reward_model")
class RewardModelCritic(Critic):
    batched = True

    @dataclass
    class Config:
        model: str  # a folder (or hub id, for users with a network) of an AutoModelForSequenceClassification
        batch_size: int = 8
        max_length: int = 2048  # longer conversations are truncated from the left (the answer is at the end)
        positive_index: int = 1  # multi-class heads: the class that means "good"
        threshold: float | None = 0.5  # None: scores only, no label
        dtype: str = "auto"
        device: str = "auto"  # "auto" = cuda when available, else cpu

    def __init__(self, config: "RewardModelCritic.Config", context):
        super().__init__(config, context)
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        # Right padding: the head pools the last non-pad token, and left padding would shift position ids.
        self.tokenizer = AutoTokenizer.from_pretrained(config.model, truncation_side="left", padding_side="right")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(config.model, dtype=config.dtype)
        self.model.to(self.device).eval()
        if self.model.config.pad_token_id is None:  # the head pools the last non-pad token of each row
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def judge(self, samples: list[dict]) -> list[Verdict]:
        import torch

        texts = [self.text(s) for s in samples]
        scores: list[float] = []
        for start in range(0, len(texts), self.config.batch_size):
            batch = texts[start:start + self.config.batch_size]
            # A chat template writes its own special tokens; plain text gets the tokenizer's (BOS).
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.config.max_length,
                                 add_special_tokens=not self.tokenizer.chat_template).to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits.float()
            if logits.shape[-1] == 1:
                scores.extend(torch.sigmoid(logits[:, 0]).tolist())
            else:
                scores.extend(torch.softmax(logits, dim=-1)[:, self.config.positive_index].tolist())
        t = self.config.threshold
        return [Verdict(score=s, label=None if t is None else s >= t, rationale=f"reward {s:.4f}") for s in scores]

    def text(self, sample: dict) -> str:
        prompt, completion = sample["prompt"], sample["completion"]
        if isinstance(prompt, str):
            return f"{prompt}\n\n{completion}"
        messages = [*prompt, {"role": "assistant", "content": completion}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n\n".join(m["content"] for m in messages)

    def close(self) -> None:
        self.model = None
