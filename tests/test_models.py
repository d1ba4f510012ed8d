"""Model preparation: a GGUF split over packages is reassembled and checked, and a description can give a base model
the chat template and end-of-turn token the shipped tasks' chat prompts need (Gemma-3-270M's case)."""

import hashlib
import json
from pathlib import Path

import pytest

from selfimprove.config import ConfigError
from selfimprove.models import _package_file, load_spec, prepare_model


def _smollm2_gguf() -> Path:
    """The embedded model's GGUF, where its shipped description says it is."""
    spec = load_spec("smollm2-135m-instruct")
    return _package_file(spec, spec.package, spec.file)


def _split_into_packages(root: Path, data: bytes, pieces: int) -> list[str]:
    """`data` cut into `pieces` importable packages (piece_0 … piece_n-1), each holding its part under data/; the
    description's `parts` lines for them, in order."""
    size = -(-len(data) // pieces)
    parts = []
    for i in range(pieces):
        package = root / f"piece_{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"model.gguf.part{i:02d}").write_bytes(data[i * size:(i + 1) * size])
        parts.append(f"piece_{i}/data/model.gguf.part{i:02d}")
    return parts


def _describe(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\n{body}")
    return str(path)


def test_a_gguf_split_over_packages_prepares_as_the_whole_file(tmp_path, monkeypatch):
    """SmolLM2's GGUF cut in three packages, reassembled: the same weights and tokenizer as the one-file model; the
    pieces in the wrong order fail on the checksum, naming the parts, before any conversion."""
    from safetensors.torch import load_file

    one_file = prepare_model("smollm2-135m-instruct")
    data = _smollm2_gguf().read_bytes()
    parts = _split_into_packages(tmp_path / "site", data, 3)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SELFIMPROVE_CACHE", str(tmp_path / "cache"))
    listed = "".join(f"  - {p}\n" for p in parts)
    digest = hashlib.sha256(data).hexdigest()

    swapped = "".join(f"  - {p}\n" for p in [parts[1], parts[0], parts[2]])
    wrong = _describe(tmp_path, "swapped", f"source: gguf_package\nparts:\n{swapped}sha256: {digest}\n")
    with pytest.raises(ConfigError, match=r"model 'swapped': sha256 of the concatenation of parts piece_1/.*piece_0/"
                                          r".* is [0-9a-f]{64}, not " + digest):
        prepare_model(wrong)
    assert not (tmp_path / "cache" / "models" / "swapped").exists()

    whole = prepare_model(_describe(tmp_path, "split", f"source: gguf_package\nparts:\n{listed}sha256: {digest}\n"))
    ours, theirs = load_file(whole / "model.safetensors"), load_file(one_file / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].equal(theirs[k]) for k in ours)
    assert (whole / "tokenizer.json").read_text() == (one_file / "tokenizer.json").read_text()
    assert not list((tmp_path / "cache" / "models").glob(".*"))  # the assembled GGUF is not left behind


def test_a_description_gives_a_model_its_turn_format(tmp_path, monkeypatch, tiny_model):
    """`eos_token` becomes the tokenizer's EOS and the first EOS id of both configs (the old one kept after it),
    `add_bos_token` makes the tokenizer start a text with BOS (SmolLM2's does not), and `chat_template` is the
    template the prepared tokenizer renders with."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("SELFIMPROVE_CACHE", str(tmp_path / "cache"))
    base = AutoTokenizer.from_pretrained(tiny_model)
    old_eos = base.eos_token_id
    template = ("{{- bos_token -}}{%- for m in messages -%}[{{ m['role'] }}]{{ m['content'] }}<|endoftext|>"
                "{%- endfor -%}{%- if add_generation_prompt -%}[assistant]{%- endif -%}")
    spec = (f"source: random\ntokenizer_from: {tiny_model}\nconfig: {{hidden_size: 64, num_hidden_layers: 1, "
            f"num_attention_heads: 2, num_key_value_heads: 1, intermediate_size: 64}}\ndtype: float32\n"
            f"add_bos_token: true\neos_token: <|endoftext|>\nchat_template: {json.dumps(template)}\n")
    folder = prepare_model(_describe(tmp_path, "turns", spec))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert end != old_eos and tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == end
    assert base("2 + 2").input_ids[0] != base.bos_token_id
    assert tokenizer("2 + 2").input_ids == [tokenizer.bos_token_id] + base("2 + 2").input_ids
    for name in ("config.json", "generation_config.json"):
        assert json.loads((folder / name).read_text())["eos_token_id"] == [end, old_eos], name
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "2 + 2?"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == f"{tokenizer.bos_token}[user]2 + 2?<|endoftext|>[assistant]"

    with pytest.raises(ConfigError, match=r"model 'nosuch': eos_token: '<end_of_turn>' is not a token of its tokenizer"):
        prepare_model(_describe(tmp_path, "nosuch", spec.replace("<|endoftext|>\nchat", "<end_of_turn>\nchat")))


def test_parts_or_package_and_file(tmp_path):
    both = _describe(tmp_path, "both", "source: gguf_package\npackage: p\nfile: f.gguf\nparts: [p/a, p/b]\n")
    with pytest.raises(ConfigError, match=r"both.yaml: <top>: source 'gguf_package' takes either package and file, "
                                          r"or parts, not both"):
        load_spec(both)
    neither = _describe(tmp_path, "neither", "source: gguf_package\n")
    with pytest.raises(ConfigError, match=r"neither.yaml: <top>: source 'gguf_package' needs package, file \(or parts\)"):
        load_spec(neither)
    flat = _describe(tmp_path, "flat", "source: gguf_package\nparts: [model.gguf.part00]\n")
    with pytest.raises(ConfigError, match=r"flat.yaml: <top>: parts: 'model.gguf.part00' must read "
                                          r"<package>/<file inside it>"):
        load_spec(flat)
