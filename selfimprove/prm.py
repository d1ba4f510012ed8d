"""A process reward model (PRM): P(step correct) for every step of a response, from the base model with a one-logit
token-classification head and a LoRA adapter of its own, read at the last token of each step.

Input: the prompt as the generator saw it (chat template with the generation prompt; a text prompt as it is),
then the response's steps (`Task.steps`) joined by newlines: the text that step_labels rolled out from
(`step_labels.chat_continuation`, `step_prefixes`). Step i's label sits on the last token of its text, the token
holding its last character; every other token is -100. One logit and binary cross-entropy take hard labels (0/1)
and soft ones (a fraction of rollouts) alike; P(step correct) = sigmoid(logit).

Training is transformers' `Trainer` on a PEFT LoRA model with `task_type=TOKEN_CLS`, which trains the new head in
full and saves it in the adapter folder (a module to save); checkpoints, resume and the atomic adapter are
trainers/common.py's, so a killed training resumes to the same adapter. The model is loaded in float32: the head
starts from random, and bf16 weights would round away its small updates.
"""

from __future__ import annotations

import json
import math
import time
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from .records import adapter_hash
from .step_labels import chat_continuation
from .trainers.common import LoraSettings, Optimization, common_args, fit, make_trainer

Aggregate = Literal["min", "prod", "last"]


def aggregate(scores: list[float], how: Aggregate) -> float:
    """A response's score from its steps' P(correct): the weakest step (Math-Shepherd's choice), the product (every
    step right, if steps were independent), or the last step's."""
    if how == "min":
        return min(scores)
    if how == "prod":
        return math.prod(scores)
    return scores[-1]


@dataclass
class PrmTraining:
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: Optimization = field(default_factory=Optimization)  # optim.max_length: tokens per response, at most


def load_tokenizer(base: str):
    from transformers import AutoTokenizer

    # Right padding: step positions are counted from the start of each row.
    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="right")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# Tokens per response a PRM trains on by default (optim.max_length), and what its readers score at most by default.
MAX_LENGTH = Optimization.max_length


def encode(tokenizer, prompt, steps: list[str], max_length: int) -> tuple[list[int], list[int | None]]:
    """Token ids of prompt + steps, and per step the index of its last token (None where truncation cut it off).

    Longer inputs lose tokens from the left: the steps, at the end, are what is scored."""
    continuation = chat_continuation(tokenizer)
    head = len(continuation(prompt, ""))
    ends = [head + len("\n".join(steps[: i + 1])) for i in range(len(steps))]  # one past each step's last character
    # A chat template writes its own special tokens; a text prompt gets the tokenizer's (BOS).
    enc = tokenizer(continuation(prompt, "\n".join(steps)), add_special_tokens=isinstance(prompt, str),
                    return_offsets_mapping=True)
    starts = [start for start, _ in enc["offset_mapping"]]
    positions = [bisect_left(starts, end) - 1 for end in ends]  # the last token starting before the step's end
    cut = max(0, len(enc["input_ids"]) - max_length)
    return enc["input_ids"][cut:], [p - cut if p >= cut else None for p in positions]


def training_example(tokenizer, prompt, steps: list[str], targets: list[float], max_length: int) -> dict:
    """`input_ids` and per-token `labels`: each step's target on its last token, -100 elsewhere."""
    ids, positions = encode(tokenizer, prompt, steps, max_length)
    labels = [-100.0] * len(ids)
    for position, target in zip(positions, targets):
        if position is not None:
            labels[position] = float(target)
    return {"input_ids": ids, "labels": labels}


def load_model(base: str, pad_token_id: int, adapter: str | None = None, lora: LoraSettings | None = None,
               trainable: bool = False):
    """The PRM: base + one-logit token-classification head, with the trained `adapter` (frozen, or `trainable`
    to continue training it, head included) or a fresh LoRA adapter from `lora` (trainable, head included)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForTokenClassification

    from transformers.utils import logging as hf_logging

    # The base has no head, and transformers warns that it "should be trained" at every load: training adds it,
    # and a trained adapter replaces it, so the warning is noise here.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForTokenClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = pad_token_id
    if adapter is not None:
        task = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("task_type")
        if task != "TOKEN_CLS":
            raise ValueError(f"{adapter} is a {task} adapter, not a process reward model's (TOKEN_CLS): name a "
                             f"train_prm stage")
        return PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=list(lora.target_modules), task_type="TOKEN_CLS"))


def pad_batch(rows: list[dict], pad_token_id: int) -> dict:
    """Right-padded `input_ids`, `attention_mask` and (when the rows have them) float `labels` padded with -100."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100.0)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), 1
        if "labels" in r:
            labels[i, :n] = torch.tensor(r["labels"], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": mask, **({"labels": labels} if "labels" in rows[0] else {})}


def step_loss(outputs, labels, num_items_in_batch=None):
    """Binary cross-entropy of the step-end logits against their labels, summed and divided by the labelled
    steps of the whole accumulated batch (the Trainer counts them: labels != -100)."""
    import torch.nn.functional as F

    logits = outputs.logits[..., 0].float()
    labelled = labels != -100
    loss = F.binary_cross_entropy_with_logits(logits[labelled], labels[labelled].float(), reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else labelled.sum().clamp(min=1))


def train(examples: list[dict], base: str, adapter_out: Path, work_dir: Path, seed: int, settings: PrmTraining,
          round_index: int = 1, init_adapter: str | None = None) -> dict:
    """Fit a PRM adapter on `examples` ({prompt, steps, targets}: one target in [0, 1] per step) and write it to
    `adapter_out`; resumes from the newest complete checkpoint of the same training in `work_dir`.

    `init_adapter`: a trained PRM adapter to continue (its LoRA shape and head; `settings.lora` is then unused),
    instead of a fresh one. Its content hash is part of what identifies the training, so checkpoints of a training
    that started elsewhere are never resumed."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, set_seed

    started = time.time()
    tokenizer = load_tokenizer(base)
    set_seed(seed)  # the head and the LoRA weights are initialised here, before the Trainer seeds anything
    model = load_model(base, tokenizer.pad_token_id, adapter=init_adapter, lora=settings.lora, trainable=True)
    max_length = settings.optim.max_length
    dataset = Dataset.from_list([training_example(tokenizer, e["prompt"], e["steps"], e["targets"], max_length)
                                 for e in examples])
    args = common_args(settings.optim, work_dir, seed, round_index)
    del args["max_length"]  # a TRL setting: transformers' TrainingArguments has none (examples are cut above)
    args = TrainingArguments(**args, remove_unused_columns=False)
    trainer = make_trainer(Trainer, model=model, args=args, train_dataset=dataset, compute_loss_func=step_loss,
                           data_collator=lambda rows: pad_batch(rows, tokenizer.pad_token_id))
    init = {"init": init_adapter, "init_hash": adapter_hash(init_adapter)} if init_adapter else {}
    metrics = fit(trainer, {"trainer": "prm", "config": asdict(settings), "examples": examples, "base": base,
                            "seed": seed, "round": round_index, **init}, adapter_out, started)
    labelled = sum(sum(label != -100 for label in row["labels"]) for row in dataset)
    return {"examples": len(examples), "labelled_steps": labelled, **metrics}


class ProcessRewardModel:
    """A trained PRM (base model + a train_prm adapter) that scores the steps of responses."""

    def __init__(self, base: str, adapter: str, max_length: int, device: str = "auto"):
        import torch

        self.device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(base)
        self.model = load_model(base, self.tokenizer.pad_token_id, adapter=adapter).to(self.device).eval()
        self.max_length = max_length

    def step_scores(self, prompts: list, steps: list[list[str]], batch_size: int) -> list[list[float | None]]:
        """P(step correct) for every step of every response (None for a step truncation cut off), one forward pass
        per batch of responses."""
        import torch

        encoded = [encode(self.tokenizer, p, s, self.max_length) for p, s in zip(prompts, steps)]
        out: list[list[float | None]] = []
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start:start + batch_size]
            inputs = pad_batch([{"input_ids": ids} for ids, _ in batch], self.tokenizer.pad_token_id)
            with torch.no_grad():
                probs = torch.sigmoid(self.model(**{k: v.to(self.device) for k, v in inputs.items()})
                                      .logits[..., 0].float()).cpu()
            out.extend([None if p is None else probs[i, p].item() for p in positions]
                       for i, (_, positions) in enumerate(batch))
        return out

    def close(self) -> None:
        self.model = None
