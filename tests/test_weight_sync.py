"""New weights reach the running engine in memory: the worker merges the adapter's LoRA factors into the layers
they touch, and what it serves is exactly what PEFT's merge on disk would have served."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from selfimprove.records import SamplingConfig, Weights

CHOICE = "The answer is 42."


def _random_adapter(base: str, out, targets: list[str], **config) -> str:
    """A LoRA adapter with random non-zero factors (PEFT initialises B to zero, which would merge to nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype="float32"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **config))
    model.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_in_memory_merge_is_bitwise_pefts_merge(tiny_model, tmp_path, dtype):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfimprove.engines.merge import lora_factors, merge_weight, merged_folder

    base = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(base)
    adapter = _random_adapter(str(base), tmp_path / "adapter", ["q_proj", "v_proj", "gate_proj"], use_rslora=True)
    factors = lora_factors(adapter)
    assert factors and all(".q_proj." in n or ".v_proj." in n or ".gate_proj." in n for n in factors)
    pristine = load_file(str(base / "model.safetensors"))
    merged = load_file(str(merged_folder(Weights(str(base), adapter)) / "model.safetensors"))
    assert set(merged) == set(pristine)
    for name, tensor in merged.items():
        expected = merge_weight(pristine[name], *factors[name]) if name in factors else pristine[name]
        assert expected.dtype == tensor.dtype and torch.equal(expected, tensor), name
    assert sum(not torch.equal(merged[n], pristine[n]) for n in factors) == len(factors)  # the adapter did merge


def test_adapters_peft_must_merge_fall_back_to_disk(tiny_model, tmp_path):
    from selfimprove.engines.merge import lora_factors

    plain = _random_adapter(tiny_model, tmp_path / "plain", ["q_proj"])
    assert lora_factors(plain) is not None
    for change in ({"use_dora": True}, {"modules_to_save": ["lm_head"]}, {"rank_pattern": {"q_proj": 2}},
                   {"bias": "lora_only"}):
        other = tmp_path / next(iter(change))
        shutil.copytree(plain, other)
        config = json.loads((other / "adapter_config.json").read_text())
        (other / "adapter_config.json").write_text(json.dumps({**config, **change}))
        assert lora_factors(other) is None, change


def test_engine_serves_in_memory_merge_as_disk_merge(engine, tiny_model, tiny_adapter, tmp_path):
    """Greedy outputs through the in-memory path equal those after a full reload of PEFT's merged folder, for
    the adapter (attention and MLP: both of vLLM's fused layers), a second adapter touching fewer layers (the
    first one's layers must go back to the base), and the base again."""
    from selfimprove.engines.merge import merged_folder
    from selfimprove.tasks.arithmetic import Arithmetic

    task = Arithmetic(Arithmetic.Config(num_train=8, num_test=6, prompt_format="chat"))
    prompts = [task.prompt(p) for p in task.problems("test")]
    greedy = SamplingConfig(max_tokens=12)
    other = _random_adapter(tiny_model, tmp_path / "other", ["k_proj", "up_proj"])
    versions = [Weights.of(tiny_model, tiny_adapter, "sft"), Weights.of(tiny_model, other, "other"),
                Weights(tiny_model)]

    def served(weights):
        """Greedy texts and the log-probability of a fixed answer: the second sees any change of weights."""
        texts = [c[0].text for c in engine.generate(prompts, greedy, weights, seed=0)]
        return texts, [d[CHOICE] for d in engine.choice_logprobs(prompts, [CHOICE], weights)]

    loads = engine.weight_loads
    in_memory = [served(w) for w in versions]
    assert engine.weight_loads == loads + 3
    assert in_memory[0][0] != in_memory[2][0]  # the trained adapter changes the greedy answers
    assert all(abs(a - b) > 1e-3 for a, b in zip(in_memory[1][1], in_memory[2][1]))  # the random one the scores
    for weights, got in zip(versions, in_memory):
        folder = merged_folder(weights)
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        engine.llm.reset_prefix_cache()
        engine._loaded = ("disk", weights.adapter_hash)
        assert served(weights) == got, weights.label  # float32: bitwise the same weights, the same numbers
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": tiny_model})
    engine._loaded = ("disk", None)
    assert served(Weights(tiny_model)) == in_memory[2]
    assert served(versions[0]) == in_memory[0]  # back from a disk-loaded model to the in-memory path
