"""Artifact identity depends on content only: an adapter's hash and its files do not change with the order in which
PEFT happens to write `target_modules` (set order, which differs from process to process)."""

import json

from selfimprove.artifacts import checksum_dir
from selfimprove.records import Weights, adapter_hash


def write_adapter(folder, modules):
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"same weights")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": modules}))
    return folder


def test_adapter_hash_ignores_the_order_of_target_modules(tmp_path):
    a = write_adapter(tmp_path / "a", ["q_proj", "v_proj", "k_proj"])
    b = write_adapter(tmp_path / "b", ["k_proj", "q_proj", "v_proj"])
    c = write_adapter(tmp_path / "c", ["k_proj", "q_proj"])
    assert adapter_hash(a) == adapter_hash(b) != adapter_hash(c)
    assert Weights.of("base", str(a)).adapter_hash == adapter_hash(a)
    assert Weights.from_dict(Weights.of("base", str(a), "r1").to_dict()) == Weights.of("base", str(a), "r1")


def test_saved_adapters_are_byte_identical_whatever_the_set_order(tiny_model, tmp_path):
    """save_adapter writes the config canonically, so two saves of the same weights checksum the same even when
    the in-memory module set iterates differently."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from selfimprove.trainers.common import save_adapter

    checksums = []
    for i, modules in enumerate((["q_proj", "v_proj", "k_proj", "o_proj"], ["o_proj", "k_proj", "v_proj", "q_proj"])):
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=modules, init_lora_weights=False))
        for p in model.parameters():  # the same weights in both saves
            if p.requires_grad:
                p.data.fill_(0.01)
        save_adapter(model, tmp_path / f"save{i}")
        config = json.loads((tmp_path / f"save{i}" / "adapter_config.json").read_text())
        assert config["target_modules"] == sorted(modules)
        checksums.append(checksum_dir(tmp_path / f"save{i}"))
    assert checksums[0] == checksums[1]
