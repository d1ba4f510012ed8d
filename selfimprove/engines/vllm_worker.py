"""Methods selfimprove adds to vLLM's workers (vLLM's `worker_extension_cls` mechanism), called by name with
`collective_rpc`. Naming a method instead of shipping a function means vLLM never has to unpickle code
(`VLLM_ALLOW_INSECURE_SERIALIZATION` stays off)."""

from __future__ import annotations

import logging
from pathlib import Path

# An in-place reload warns "Failed to load weights" for every layer it got no checkpoint weight for: those an
# adapter does not touch, and those that have none (RotaryEmbedding, a tied ParallelLMHead). Each is put back as it
# was, which is what we want; to a user the warning reads as a failure, so it is not shown. Set once, on import:
# in a process that loads this extension, every in-place reload is the engine's.
logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)


class WorkerExtension:
    def load_adapter(self, base: str, adapter: str | None) -> int:
        """Serve `adapter` merged into `base` (None: the base itself), without a full copy of the model on disk.

        The layers the adapter touches are rewritten as base + delta (merge.merge_weight, PEFT's arithmetic);
        layers an earlier adapter touched and this one does not get their base weights back. Pristine base
        weights come from the base checkpoint, read once per layer and kept here. vLLM fuses some checkpoint
        weights into one kernel (q/k/v into qkv_proj); its in-place reload processes a fused layer only when
        every part arrives, so the untouched parts of a touched fused layer are sent too. Returns how many
        checkpoint weights were written."""
        from safetensors import safe_open

        from .merge import lora_factors, merge_weight

        state = self.__dict__.setdefault("_selfimprove_adapter", {"base": None, "pristine": {}, "touched": set()})
        if state["base"] != base:  # another base: nothing cached applies (the engine serves one base)
            state.update(base=base, pristine={}, touched=set())
        factors = {} if adapter is None else lora_factors(adapter)
        if factors is None:
            raise ValueError(f"{adapter} is not a plain LoRA adapter: merge it on disk (merge.merged_folder)")
        model = self.model_runner.get_model()
        packed = getattr(model, "packed_modules_mapping", {})
        names = _with_fused_siblings(set(factors) | state["touched"], packed)
        missing = [n for n in names if n not in state["pristine"]]
        if missing:
            for file in sorted(Path(base).glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    for name in set(missing) & set(f.keys()):
                        state["pristine"][name] = f.get_tensor(name)
            absent = [n for n in missing if n not in state["pristine"]]
            if absent:
                raise KeyError(f"weights {absent[:3]} are not in the base checkpoint {base}")
        weights = [(n, merge_weight(state["pristine"][n], *factors[n]) if n in factors else state["pristine"][n])
                   for n in sorted(names)]
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        state["touched"] = set(factors)
        return len(weights)


def _with_fused_siblings(names: set[str], packed: dict[str, list[str]]) -> set[str]:
    """Add, for each weight of a fused vLLM layer (q_proj in qkv_proj), the other weights of that layer."""
    out = set(names)
    for name in names:
        module, _, param = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        for parts in packed.values():
            if leaf in parts:
                out.update(f"{parent}.{part}.{param}" for part in parts)
    return out
