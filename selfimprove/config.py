"""YAML files mapped onto typed dataclasses.

Every config object in selfimprove is a dataclass whose field defaults are the only defaults. This module
turns a YAML mapping into such an object strictly: an unknown key, a wrong type or a missing required field
is a `ConfigError` that names the file, the dotted key and what would be accepted, raised before any model
is loaded.

Two conveniences on top of plain YAML, read by yamlio.py:
- `include: other.yaml` (or a list of files) in any mapping, resolved relative to the including file, else among
  the files shipped in the package (a bare name is a shipped pipeline; shipped.py); the
  mapping's own keys are deep-merged over the included ones (mappings merge, everything else replaces, and
  keys keep the included file's order). At the top level it makes variants of a pipeline; inside `engine:` or
  a stage's `trainer:` it pulls in a shared component file from `configs/`.
- command-line overrides `key.sub=value`, whose value is parsed as YAML (`n=8`, `stages.train.lr=1e-4`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A config that cannot be used; the message names file, key and fix."""


def deep_merge(base: dict, over: dict) -> dict:
    """`over` merged into `base`; keys keep `base`'s order, new keys come after (stage order is key order)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not _other_component(out[key], value):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _other_component(base: dict, over: dict) -> bool:
    """A mapping naming another component (`name:` or `type:`) replaces the old one instead of merging into it:
    a variant that switches task from arithmetic to gsm8k must not inherit arithmetic's parameters."""
    return any(k in base and k in over and base[k] != over[k] for k in ("name", "type"))


def build(cls: type, data: Any, where: str, key: str = "") -> Any:
    """Build dataclass `cls` from `data`, checking every key and type; errors name `where` (the file or other
    source) and `key` (the dotted path to `data` within it)."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {key or '<top>'}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys may be numbers or null
    if unknown:
        raise ConfigError(
            f"{where}: {_join(key, unknown[0])}: unknown key; valid keys of {cls.__qualname__}: "
            f"{', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = convert(hints[name], _over_default(field, data[name]), where, _join(key, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: {_join(key, name)}: required key is missing ({cls.__name__})")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {key or '<top>'}: {err}") from err


def _over_default(field: dataclasses.Field, value: Any) -> Any:
    """A mapping given for a field whose default is a config object (a nested dataclass or a component) is merged
    over that default, not over the class's bare defaults: `sampling: {max_tokens: 96}` on a stage whose sampling
    default is `n: 4, temperature: 1.0` keeps n and temperature. A component of another name replaces it."""
    if not isinstance(value, dict) or field.default_factory is dataclasses.MISSING:
        return value
    default = field.default_factory()
    if not (dataclasses.is_dataclass(default) or hasattr(default, "as_config")):
        return value
    base = to_dict(default)
    return value if _other_component(base, value) else deep_merge(base, value)


# Scalar type → the Python types a YAML value of it may have, and its name in errors. A bool is accepted only
# where a bool is asked for: Python's True is also an int.
_SCALARS = {float: ((int, float), "a number"), int: (int, "an integer"), bool: (bool, "true or false"),
            str: ((str, int, float), "a string")}


def convert(tp: Any, value: Any, where: str, key: str) -> Any:
    """Check `value` against type annotation `tp`, converting where YAML is looser than Python (int → float)."""
    origin = typing.get_origin(tp) or (tp if tp in (list, dict, tuple) else None)
    if tp is Any:
        return value
    if isinstance(tp, type) and hasattr(tp, "from_config"):  # a component (registry.Component): resolved here
        return value if isinstance(value, tp) else tp.from_config(value, where, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(arg, value, where, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[-1] if len(errors) == 1 else f"{where}: {key}: {value!r} does not match {_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(tp) or (Any,)
        if origin is list and arg is str and isinstance(value, str):
            return [value]  # `stop: "\n\n"` reads as a one-item list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key}: expected a list, got {value!r}")
        items = [convert(arg, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): convert(vt, v, where, _join(key, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build(tp, value, where, key)
    if tp in _SCALARS:
        accepted, expected = _SCALARS[tp]
        if not isinstance(value, accepted) or (isinstance(value, bool) and tp is not bool):
            raise ConfigError(f"{where}: {key}: expected {expected}, got {value!r}")
        return tp(value)
    raise ConfigError(f"{where}: {key}: unsupported field type {tp!r}")


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config object (what `config.yaml` in a run directory holds)."""
    if hasattr(obj, "as_config"):
        return obj.as_config()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def flatten(node: Any, key: str = "", lists: bool = False) -> dict[str, Any]:
    """{dotted key: value} for every leaf of nested mappings: {"a": {"b": 1}} → {"a.b": 1}. Lists are leaves, or
    with `lists` are walked too (`stages.critique.critics[1].max_words`); an empty mapping or list is a leaf."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if lists and isinstance(node, list) else None
    if items is None or (not node and key):
        return {key: node}
    out: dict[str, Any] = {}
    for name, value in items:
        out.update(flatten(value, f"{key}[{name}]" if isinstance(node, list) else f"{key}.{name}" if key else name,
                           lists))
    return out
