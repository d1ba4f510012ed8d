"""Names → classes, one registry per kind of component.

A component class carries a `Config` dataclass (its parameters, with their defaults). YAML names a component
either by its registered name or by a dotted path `package.module:Name` to a user's own class; the
critics registry also reads the `selfimprove.critics` entry-point group, so an installed package can add
critics by name. An unknown name fails with the list of valid names.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any, Callable

from .config import ConfigError, build


class Registry:
    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._classes: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        def decorator(cls: type) -> type:
            if name in self._classes:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            cls.registered_name = name
            self._classes[name] = cls
            return cls

        return decorator

    def names(self) -> list[str]:
        return sorted(set(self._classes) | set(self._entry_points()))

    def get(self, name: str, where: str = "", key: str = "") -> type:
        """The class for `name`; `where`/`key` locate the reference for the error message."""
        if name in self._classes:
            return self._classes[name]
        if ":" in name:
            return _load_dotted(name, where, key, self.kind)
        entry_points = self._entry_points()
        if name in entry_points:
            return entry_points[name].load()
        loc = f"{where}: {key}: " if where else ""
        raise ConfigError(
            f"{loc}unknown {self.kind} {name!r}; valid names: {', '.join(self.names())} "
            f"(or a dotted path package.module:Name to your own)"
        )

    def build_config(self, name: str, params: dict, where: str, key: str) -> tuple[type, Any]:
        """Resolve `name` and build its `Config` from `params`, both checked strictly."""
        cls = self.get(name, where, key)
        config_cls = getattr(cls, "Config", None)
        if config_cls is None:
            if params:
                raise ConfigError(f"{where}: {key}: {self.kind} {name!r} takes no parameters, got {sorted(params)}")
            return cls, None
        return cls, build(config_cls, params, where, key)

    def _entry_points(self) -> dict[str, Any]:
        if not self.entry_point_group:
            return {}
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=self.entry_point_group)}


def _load_dotted(path: str, where: str, key: str, kind: str) -> Any:
    module_name, _, attr = path.partition(":")
    loc = f"{where}: {key}: " if where else ""
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{loc}cannot import module {module_name!r} for {kind} {path!r}: {err}") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{loc}module {module_name!r} has no attribute {attr!r} (for {kind} {path!r})")
        obj = getattr(obj, part)
    return obj


TASKS = Registry("task")
CRITICS = Registry("critic", entry_point_group="selfimprove.critics")
STAGES = Registry("stage")
ENGINES = Registry("engine")
TRAINERS = Registry("trainer")
