"""Names → components, and the one function that turns a YAML component spec into a built config.

A component is a class with a `Config` dataclass (its parameters, with their defaults) registered under a
name in the registry of its kind; YAML names it by that name, by a dotted path `package.module:Name` to a
user's own class (the module must be importable: installed, or on `PYTHONPATH`), or — for critics — by an
entry point in the `selfimprove.critics` group.

A config field typed with a `Component` subclass (the `*Spec` classes below; `TrackerSpec` in trackers.py) is
resolved by `config.build` when the YAML loads: the mapping `{name: ..., parameters}` (or just the name, as a
string) becomes the class and its checked `Config`. Nothing resolves a component anywhere else, so an unknown
name, a wrong parameter or a plugin with the wrong shape is an error naming the file and key before any model
loads. `MODELS` holds model description files, not classes (models.py reads them).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import typing
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar

from .config import ConfigError, build, convert, to_dict


@dataclass(eq=False)
class Registry:
    kind: str
    package: str  # imported on first lookup: it registers the built-in components
    entry_point_group: str | None = None
    own: str = "a dotted path package.module:Name to your own"  # how else a user names one, for unknown names
    _classes: dict[str, type] = field(default_factory=dict, init=False, repr=False)

    def register(self, name: str) -> Callable[[type], type]:
        def decorator(cls: type) -> type:
            if name in self._classes:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._classes[name] = cls
            return cls

        return decorator

    def names(self) -> list[str]:
        importlib.import_module(self.package)
        return sorted(set(self._classes) | set(self._entry_points()))

    def get(self, name: str, where: str = "", key: str = "") -> Any:
        """The class (or, for critics, function) for `name`; `where`/`key` locate the reference in errors."""
        importlib.import_module(self.package)
        if name in self._classes:
            return self._classes[name]
        if ":" in name:
            return _load_dotted(name, where, key, self.kind)
        entry_points = self._entry_points()
        if name in entry_points:
            return entry_points[name].load()
        raise ConfigError(
            f"{_loc(where, key)}unknown {self.kind} {name!r};{_did_you_mean(name, self.names())} valid names: "
            f"{', '.join(self.names())} (or {self.own})"
        )

    def _entry_points(self) -> dict[str, Any]:
        if not self.entry_point_group:
            return {}
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=self.entry_point_group)}


def _loc(where: str, key: str) -> str:
    return f"{where}: {key}: " if where else ""


def _load_dotted(path: str, where: str, key: str, kind: str) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"{_loc(where, key)}cannot import module {module_name!r} for {kind} {path!r}: {err}. A plugin module "
            f"must be importable: install its package, or run with its folder on PYTHONPATH "
            f"(e.g. PYTHONPATH=. selfimprove run ...)") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(f"{_loc(where, key)}module {module_name!r} has no attribute {attr!r} (for {kind} "
                              f"{path!r});{_did_you_mean(part, public) or ' check the name'}")
        obj = getattr(obj, part)
    return obj


def _did_you_mean(name: str, choices: list[str]) -> str:
    """' did you mean 'x'?' for the closest of `choices` to a misspelt `name`, else ''."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" did you mean {close[0]!r}?" if close else ""


TASKS = Registry("task", "selfimprove.tasks")
CRITICS = Registry("critic", "selfimprove.critics", entry_point_group="selfimprove.critics")
STAGES = Registry("stage", "selfimprove.stages")
ENGINES = Registry("engine", "selfimprove.engines")
TRAINERS = Registry("trainer", "selfimprove.trainers")
OBJECTIVES = Registry("objective", "selfimprove.objectives")
BASELINES = Registry("baseline", "selfimprove.baselines")
JUDGE_BACKENDS = Registry("judge backend", "selfimprove.critics.llm_judge")
TRACKERS = Registry("tracker", "selfimprove.trackers")
GRADERS = Registry("grader", "selfimprove.tasks.graders")
MODELS = Registry("model", "selfimprove.models", own="a model description .yaml file, or a model folder")


@dataclass(frozen=True)
class Component:
    """A resolved component: its name as written, the class it names, and that class's built `Config`."""

    name: str
    target: Any
    config: Any

    registry: ClassVar[Registry]
    name_key: ClassVar[str] = "name"
    name_from_key: ClassVar[bool] = False  # without `name_key:`, the last part of its key names it

    def build(self, *args, **kwargs):
        return self.target(self.config, *args, **kwargs)

    def as_config(self) -> dict:
        """The plain-data form written to a run's config.yaml (it resolves back to an equal component)."""
        return {self.name_key: self.name, **(to_dict(self.config) or {})}

    @classmethod
    def named(cls, name: str, **params):
        """A component from code (defaults in dataclass fields): resolved exactly as YAML would be."""
        return cls.from_config({cls.name_key: name, **params}, "<default>", cls.registry.kind)

    @classmethod
    def from_config(cls, value: Any, where: str, key: str):
        if isinstance(value, str):
            value = {cls.name_key: value}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: a {cls.registry.kind} is a name or a mapping with "
                              f"'{cls.name_key}:' and its parameters, got {value!r}")
        params = dict(value)
        name = params.pop(cls.name_key, None) or (key.rsplit(".", 1)[-1] if cls.name_from_key else None)
        if name is None:
            raise ConfigError(f"{where}: {key}.{cls.name_key}: required; valid names: "
                              f"{', '.join(cls.registry.names())}")
        return cls.resolve(str(name), params, where, key)

    @classmethod
    def resolve(cls, name: str, params: dict, where: str, key: str):
        target = cls.registry.get(name, where, key)
        config_cls = getattr(target, "Config", None)
        if config_cls is None:
            if params:
                raise ConfigError(f"{where}: {key}: {cls.registry.kind} {name!r} takes no parameters, got "
                                  f"{sorted(params)}")
            return cls(name, target, None)
        return cls(name, target, build(config_cls, params, where, key))


def _spec(name: str, registry: Registry) -> type[Component]:
    return type(name, (Component,), {"registry": registry, "__module__": __name__, "__qualname__": name})


EngineSpec = _spec("EngineSpec", ENGINES)
TaskSpec = _spec("TaskSpec", TASKS)
TrainerSpec = _spec("TrainerSpec", TRAINERS)
ObjectiveSpec = _spec("ObjectiveSpec", OBJECTIVES)
BaselineSpec = _spec("BaselineSpec", BASELINES)
GraderSpec = _spec("GraderSpec", GRADERS)
JudgeBackendSpec = _spec("JudgeBackendSpec", JUDGE_BACKENDS)


class StageSpec(Component):
    """A stage: `type:` names its class; without one, the stage's own name (its key under `stages:`)."""

    registry = STAGES
    name_key = "type"
    name_from_key = True


@dataclass(frozen=True)
class CriticSpec(Component):
    """A critic: a `Critic` subclass (built with its Config) or a plain function `fn(samples, **params)`.

    `id` (default: the name) is what the critic's verdicts are filed under: the `critic` column of a critique
    stage's verdicts, which a filter's or pairs stage's `critic:` names."""

    id: str = ""
    registry = CRITICS

    def build(self, context):
        from .critics.base import FunctionCritic

        if inspect.isclass(self.target):
            return self.target(self.config, context)
        return FunctionCritic(self.target, self.config, context)

    def as_config(self) -> dict:
        return {**super().as_config(), **({"id": self.id} if self.id != self.name else {})}

    @classmethod
    def resolve(cls, name: str, params: dict, where: str, key: str):
        from .critics.base import Critic

        critic_id = str(params.pop("id", name))
        target = cls.registry.get(name, where, key)
        if inspect.isclass(target):
            if not issubclass(target, Critic):
                raise ConfigError(f"{where}: {key}: {name!r} is a class but not a subclass of "
                                  f"selfimprove.critics.Critic")
            if target.judge is Critic.judge:
                raise ConfigError(f"{where}: {key}: critic class {name!r} must implement "
                                  f"judge(self, samples: list[dict]) -> list[Verdict] (one verdict per sample)")
            return replace(super().resolve(name, params, where, key), id=critic_id)
        if not callable(target):
            raise ConfigError(f"{where}: {key}: {name!r} is neither a Critic class nor a function")
        return cls(name, target, _function_params(target, params, where, key), critic_id)


def _function_params(fn: Callable, params: dict, where: str, key: str) -> dict:
    """Check a plugin function's YAML parameters against its signature: `fn(samples, **params)`; annotated
    parameters are type-checked as config fields are."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {key}: cannot read the signature of {fn!r}: {err}") from err
    try:
        signature.bind([], **params)
    except TypeError as err:
        raise ConfigError(f"{where}: {key}: {fn.__name__}{signature} cannot be called as "
                          f"{fn.__name__}(samples{''.join(f', {k}=...' for k in params)}): {err}") from err
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations are the user's business; skip type checks
        hints = {}
    return {k: convert(hints[k], v, where, f"{key}.{k}") if k in hints else v for k, v in params.items()}
