"""Reading YAML config files safely: anything that is not a sane config is a `ConfigError`, quickly.

`selfimprove run` reads whatever file it is given, so a wrong file fails the way a wrong key does: one line naming
the file, where in it and what to do, never a traceback or a hang. The bytes are checked before YAML sees them
(the decoder's errors name no file). PyYAML shares an alias's value, but include resolution, merging and config
building copy it, so `_Loader` counts an alias as the nodes it stands for: anchors that multiply ("billion
laughs") are refused while composing, before anything expands them. Included files (config.py's docstring says
how `include:` merges) and command-line overrides meet the same limits.
"""

from __future__ import annotations

import reprlib
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import ScalarNode

from .config import ConfigError, deep_merge
from .shipped import find

MAX_BYTES = 1 << 20  # a pipeline is a few KiB; a model or component file less
MAX_NODES = 20_000  # keys and values of one config with its includes and aliases expanded; pipelines have ~300
MAX_DEPTH = 32  # nesting levels (the composer and everything after it recurse); pipelines use about 6
MAX_FILES = 64  # file reads for one config, an include counted each time it occurs


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, resolving `include:` keys (at any depth) recursively."""
    return _load(Path(path), Counter(), depth=0, chain=())  # the nodes and files the config has used so far


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings, each value read as YAML, to a nested mapping (copying, not mutating)."""
    data = dict(data)
    for item in overrides:
        dotted, eq, raw = item.partition("=")
        if not eq:
            raise ConfigError(f"command line: override {item!r} is not of the form key.sub=value")
        where = f"command line: override {dotted!r}"
        *parents, last = dotted.split(".")
        node = data
        for i, key in enumerate(parents):
            child = {} if node.get(key) is None else node[key]
            if not isinstance(child, dict):
                raise ConfigError(f"{where}: {'.'.join(parents[:i + 1])} is not a mapping")
            node[key] = dict(child)  # copied on the way down: the caller's mapping stays as it was
            node = node[key]
        node[last] = _parse(raw, where, Counter(), depth=0) if raw else ""
    return data


def _load(path: Path, budget: Counter, depth: int, chain: tuple[Path, ...]) -> dict:
    """One file's mapping with its includes resolved: `depth` is the level its top lands at, `chain` the files
    that include it, outermost first."""
    budget["files"] += 1
    where = f"{path} (included by {' -> '.join(map(str, chain))})" if chain else str(path)
    data = _parse(_read(path, where), where, budget, depth)
    if data is None:
        raise ConfigError(f"{where}: the file is empty (or only comments); a config is a mapping such as `name: ...`")
    if not isinstance(data, dict):
        got = "a list" if isinstance(data, list) else f"the single value {reprlib.repr(data)}"
        raise ConfigError(f"{where}: the top level must be a mapping (`key: value` lines), got {got}")
    return _resolve(data, (*chain, path), where, budget, depth + 1, "")


def _read(path: Path, where: str) -> str:
    """The file's text, after the checks whose failures YAML and the UTF-8 decoder would report without its name."""
    try:
        if not path.is_file():  # missing, or a folder, or a device or pipe that reading would never finish
            raise ConfigError(f"{where}: no such config file, or not a regular file; give the path of a .yaml file")
        if (size := path.stat().st_size) > MAX_BYTES:
            raise ConfigError(f"{where}: {size} bytes is more than the {MAX_BYTES} a config may have; is this the "
                              f"right file?")
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{where}: cannot read it: {err.strerror or err}") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{where}: the file is UTF-16 encoded; re-save it as UTF-8")
    if (nul := data.find(b"\0")) >= 0:
        raise ConfigError(f"{where}: NUL byte at byte offset {nul}: this is a binary file, not YAML text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{where}: not valid UTF-8: byte 0x{data[err.start]:02x} at byte offset {err.start} "
                          f"(line {line}); re-save the file as UTF-8") from None


def _parse(text: str, where: str, budget: Counter, depth: int) -> Any:
    """The value of one YAML document; PyYAML's errors become ConfigErrors naming the place and a fix."""
    if len(text) > MAX_BYTES:  # an override (a file's size was checked before reading)
        raise ConfigError(f"{where}: the value is {len(text)} characters long; at most {MAX_BYTES} are read")
    try:
        return _Loader(text, where, budget, depth).get_single_data()
    except yaml.reader.ReaderError as err:  # a control character (the Reader checks the whole text first)
        line = text.count("\n", 0, err.position) + 1
        raise ConfigError(f"{where}: line {line}: character 0x{err.character:02x} is not allowed in YAML; "
                          f"remove it") from None
    except yaml.MarkedYAMLError as err:
        mark, problem, fix = err.problem_mark or err.context_mark, err.problem or err.context, ""
        if err.problem and err.context_mark:
            problem += f" ({err.context} at line {err.context_mark.line + 1})"
        if "single document" in (err.context or ""):
            problem, fix = "a second document (`---`)", "; a config is one YAML document: remove the `---`"
        elif isinstance(err, (yaml.scanner.ScannerError, yaml.parser.ParserError)):
            fix = "; check the indentation, the `key: value` colons and the quoting there"
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{where}: {at}not valid YAML: {problem}{fix}") from None


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, checking the limits while composing (linear in the text, before anything expands)
    and refusing duplicate keys and values Python cannot build (`2024-13-40`) while constructing."""

    def __init__(self, text: str, where: str, budget: Counter, depth: int):
        super().__init__(text)
        self.where, self.budget, self.depth = where, budget, depth
        self.sizes: dict[str, int] = {}  # anchor → nodes its value stands for; absent while composing it
        self.keys: list[str | None] = []  # the key or [index] of each level being composed (None: a key)

    def compose_node(self, parent, index):
        label = index.value if isinstance(index, ScalarNode) else f"[{index}]" if isinstance(index, int) else None
        self.keys.append(label)
        event, start = self.peek_event(), self.budget["nodes"]
        alias = isinstance(event, yaml.AliasEvent) and event.anchor in self.anchors  # undefined: PyYAML's error
        if alias and event.anchor not in self.sizes:
            self.refuse(f"alias *{event.anchor} refers to a value that contains it; write the value out", event)
        if not alias and self.depth + len(self.keys) > MAX_DEPTH:
            self.refuse(f"nested more than {MAX_DEPTH} levels deep (a pipeline needs about 6); flatten it", event)
        self.budget["nodes"] += self.sizes[event.anchor] if alias else 1
        if self.budget["nodes"] > MAX_NODES:
            why = f"alias *{event.anchor} stands for {self.sizes[event.anchor]} values: " if alias else ""
            self.refuse(f"{why}more than {MAX_NODES} keys and values in the config, aliases expanded (a pipeline "
                        f"has a few hundred); use fewer aliases, or check it is the right file", event)
        node = super().compose_node(parent, index)
        if event.anchor and not alias:
            self.sizes[event.anchor] = self.budget["nodes"] - start
        self.keys.pop()
        return node

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as err:  # a date or number out of range
            if not isinstance(node, ScalarNode):  # our own refusal, from a mapping's keys
                raise
            reason = str(err).split(";")[0]  # Python's advice after the `;` is for programmers
            self.refuse(f"cannot read the value {reprlib.repr(node.value)}: {reason}; quote it to make it a string",
                        node)

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if isinstance(key_node, ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if (key := self.construct_object(key_node)) in seen:
                    self.refuse(f"duplicate key {reprlib.repr(key)} (first at line {seen[key] + 1}); YAML would "
                                f"keep only the last one: merge or remove one", key_node)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)

    def refuse(self, problem: str, at: yaml.Event | yaml.Node):
        key = "".join(k if k.startswith("[") else f".{k}" for k in self.keys if k is not None).lstrip(".")
        raise ConfigError(f"{self.where}: line {at.start_mark.line + 1}, column {at.start_mark.column + 1}: "
                          f"{key + ': ' if key else ''}{problem}")


def _resolve(node: Any, chain: tuple[Path, ...], file: str, budget: Counter, depth: int, key: str) -> Any:
    """`node` with each mapping's `include:` replaced by the included files' mappings, its own keys merged over
    them. `chain` ends with the file `node` is in (`file` names it in errors); `depth` is `node`'s level, where an
    included file's top lands."""
    if isinstance(node, list):
        return [_resolve(v, chain, file, budget, depth + 1, f"{key}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    dot = f"{key}." if key else ""
    where = f"{file}: {dot}include"
    includes = [node["include"]] if isinstance(node.get("include"), str) else node.get("include", [])
    if not isinstance(includes, list) or not all(isinstance(inc, str) and inc for inc in includes):
        raise ConfigError(f"{where}: expected a file name or a list of file names, got {reprlib.repr(includes)}")
    merged: dict = {}
    for inc in includes:
        if not (target := find(inc, chain[-1].parent)).exists():
            raise ConfigError(f"{where}: included file {inc} does not exist (looked for {target} and among the "
                              f"shipped files); fix the name or path")
        if target.resolve() in [p.resolve() for p in chain]:
            raise ConfigError(f"{where}: circular include: {inc} is this file or includes it; remove one include")
        if budget["files"] >= MAX_FILES:
            raise ConfigError(f"{where}: more than {MAX_FILES} files read for one config (an include counts each "
                              f"time it occurs); include each shared file once, where it is needed")
        merged = deep_merge(merged, _load(target, budget, depth - 1, chain))
    own = {k: _resolve(v, chain, file, budget, depth + 1, f"{dot}{k}") for k, v in node.items() if k != "include"}
    return deep_merge(merged, own)
