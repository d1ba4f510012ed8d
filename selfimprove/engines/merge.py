"""Merging a PEFT adapter into its base model.

On CPU a compiled vLLM engine serving merged weights runs ~10x faster than one serving a LoRA per request
(docs/cpu.md: ~850 vs ~60-90 tok/s), so the vLLM engine serves merged weights there, two ways:
- in memory (`lora_factors` + `merge_weight`, used by the engine's worker extension): the worker reads the
  adapter's small A/B matrices and writes base + delta into the layers the adapter touches, without writing
  or reading a full copy of the model; for plain LoRA on linear layers, which is what selfimprove trains;
- on disk (`merged_folder`): PEFT's own `merge_and_unload`, saved beside the adapter (`<adapter>-merged/`),
  tagged with the adapter's content hash; a cache that can be deleted at any time and is rebuilt on demand.
  For any other adapter, for servers that reload from a path, and as the reference the in-memory merge is
  tested against (tests/test_weight_sync.py: bitwise equal).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..artifacts import read_json, replace_dir, write_json
from ..records import Weights, adapter_hash


def merged_folder(weights: Weights) -> Path:
    """A model folder holding `weights` with the adapter merged in (the base folder if there is none)."""
    if weights.adapter is None:
        return Path(weights.base)
    adapter = Path(weights.adapter)
    out = adapter.parent / f"{adapter.name}-merged"
    tag = adapter_hash(adapter)
    marker = out / "merged.json"
    if marker.exists() and read_json(marker).get("adapter_hash") == tag:
        return out

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(weights.base, dtype="auto")
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        with torch.no_grad():
            model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(weights.base).save_pretrained(tmp)
        write_json(tmp / "merged.json", {"adapter": str(adapter), "adapter_hash": tag, "base": weights.base})
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def plain_lora(adapter: str | Path) -> bool:
    """Whether the adapter's config is plain LoRA, which the in-memory merge handles (read from the config alone,
    so the engine can choose a path without loading the weights its worker is about to load)."""
    adapter = Path(adapter)
    config = read_json(adapter / "adapter_config.json")
    return (config.get("peft_type") == "LORA" and not config.get("use_dora") and not config.get("rank_pattern")
            and not config.get("alpha_pattern") and not config.get("modules_to_save")
            and config.get("bias", "none") == "none" and not config.get("fan_in_fan_out")
            and not config.get("layer_replication") and (adapter / "adapter_model.safetensors").exists())


def lora_factors(adapter: str | Path) -> dict[str, tuple] | None:
    """{base weight name: (A, B, scaling)} for a plain LoRA adapter on linear layers, or None when the adapter
    needs PEFT's own merge (DoRA, per-module rank or alpha patterns, extra trained modules, biases, fan-in/out
    layout). Base weight names are the checkpoint's (`model.layers.0.self_attn.q_proj.weight`)."""
    import math

    from safetensors.torch import load_file

    adapter = Path(adapter)
    if not plain_lora(adapter):
        return None
    config = read_json(adapter / "adapter_config.json")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r  # as peft's LoraLayer.update_layer
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "base_model.model."
    factors = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                return None  # something other than LoRA factors (e.g. a trained embedding): PEFT merges it
            continue
        module = key[:-len(".lora_A.weight")]
        b = tensors.get(f"{module}.lora_B.weight")
        if b is None or a.ndim != 2 or b.ndim != 2 or not module.startswith(prefix):
            return None
        factors[f"{module[len(prefix):]}.weight"] = (a, b, scaling)
    return factors or None


def merge_weight(base, a, b, scaling: float):
    """base + scaling * (b @ a), computed exactly as PEFT's merge does it for a base in any dtype: PEFT loads
    the factors in float32 (autocast_adapter_dtype) and adds the float32 delta in place, which promotes the sum
    to float32 and rounds it once to the base's dtype."""
    import torch

    delta = (b.to(torch.float32) @ a.to(torch.float32)) * scaling
    return (base.to(torch.float32) + delta).to(base.dtype)
