"""transformers `generate` behind the engine interface, for machines without vLLM.

About 6x slower than compiled vLLM on CPU (docs/cpu.md: 142 vs ~850 tok/s on SmolLM2-135M), but it needs
nothing beyond transformers and PEFT, and serves adapters directly through PEFT (no merge).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import ENGINES
from .base import Engine
from ..records import Completion, Prompt, SamplingConfig, Weights


@ENGINES.register("hf")
class HFEngine(Engine):
    @dataclass
    class Config:
        batch_size: int = 16
        dtype: str = "auto"
        device: str = "auto"  # "auto" = cuda when available, else cpu

    def __init__(self, config: "HFEngine.Config", model_path: str, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.model_path = str(model_path)
        self.device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=config.dtype).to(self.device).eval()
        self._model, self._adapter = self.base, None

    def _use(self, weights: Weights):
        if weights.adapter == self._adapter:
            return self._model
        from peft import PeftModel

        if isinstance(self._model, PeftModel):
            self.base = self._model.unload()  # drop the previous adapter's layers, keep the base weights
        self._model = self.base if weights.adapter is None else PeftModel.from_pretrained(self.base, weights.adapter)
        self._model.eval()
        self._adapter = weights.adapter
        return self._model

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig, weights: Weights, seed: int) -> list[list[Completion]]:
        import torch

        model = self._use(weights)
        texts = [
            p if isinstance(p, str) else self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        torch.manual_seed(seed)
        results: list[list[Completion]] = []
        for start in range(0, len(texts), self.config.batch_size):
            batch = texts[start:start + self.config.batch_size]
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            # output_scores: the logits after generate's processors (temperature, top-p/top-k), so each sampled
            # token's log-probability is under the distribution it was drawn from.
            kwargs = dict(max_new_tokens=sampling.max_tokens, num_return_sequences=sampling.n,
                          pad_token_id=self.tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True,
                          do_sample=sampling.temperature > 0)
            if sampling.temperature > 0:
                # top_k=0: no top-k cut, as vLLM samples; generate's default (50) would truncate the distribution
                kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
            if sampling.stop:
                kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
            with torch.no_grad():
                out = model.generate(**enc, **kwargs)
            new = out.sequences[:, enc["input_ids"].shape[1]:]
            scores = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # (B·n, new tokens, vocab)
            logprobs = scores.gather(-1, new[:, :scores.shape[1], None]).squeeze(-1)
            completions = [self._completion(ids, lps, sampling) for ids, lps in zip(new.tolist(), logprobs.tolist())]
            results += [completions[i:i + sampling.n] for i in range(0, len(completions), sampling.n)]
        return results

    def choice_logprobs(self, prompts: list[Prompt], choices: list[str], weights: Weights) -> list[dict[str, float]]:
        import torch

        if not choices or not all(choices):
            raise ValueError(f"choices must be non-empty strings, got {choices!r}")
        model = self._use(weights)
        choice_ids = [self.tokenizer.encode(c, add_special_tokens=False) for c in choices]
        results = []
        for prompt in prompts:  # one forward pass per prompt, its choices as a right-padded batch
            text = prompt if isinstance(prompt, str) else self.tokenizer.apply_chat_template(
                prompt, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]  # as generate() tokenizes
            seqs = [ids + c for c in choice_ids]
            batch = self.tokenizer.pad({"input_ids": seqs}, padding_side="right", return_tensors="pt").to(self.device)
            with torch.no_grad():
                logprobs = torch.log_softmax(model(**batch).logits.float(), dim=-1)
            # logprobs[j, t - 1] is the distribution over token t of sequence j
            results.append({
                choice: sum(logprobs[j, t - 1, seqs[j][t]].item() for t in range(len(ids), len(seqs[j])))
                for j, choice in enumerate(choices)
            })
        return results

    def _completion(self, ids: list[int], logprobs: list[float], sampling: SamplingConfig) -> Completion:
        eos = self.tokenizer.eos_token_id
        ids, finish = (ids[: ids.index(eos)], "stop") if eos in ids else (ids, "length")
        kept = [(t, lp) for t, lp in zip(ids, logprobs) if t != self.tokenizer.pad_token_id]
        ids, logprobs = [t for t, _ in kept], [lp for _, lp in kept]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in sampling.stop:  # vLLM strips the stop string; do the same so both engines agree
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        return Completion(text, finish, len(ids), [int(i) for i in ids], logprobs)
