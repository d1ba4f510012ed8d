"""Merging a PEFT adapter into its base model, once per adapter version.

On CPU a compiled vLLM engine serving merged weights runs ~10x faster than one serving a LoRA per request
(docs/cpu.md: ~850 vs ~60-90 tok/s), so the vLLM engine loads merged weights there. The merged folder sits
beside the adapter (`<adapter>-merged/`), tagged with the adapter's content hash; it is a cache that can be
deleted at any time and is rebuilt on demand.
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
