"""Reading YAML config files safely: anything that is not a sane config is a `ConfigError`, quickly.

`selfimprove run` reads whatever file it is given, so a wrong file must fail the way a wrong key does: one
line naming the file, where in it, and what to do, never a traceback and never a hang. What that takes beyond
`yaml.safe_load`:
- bytes are checked before YAML sees them: a size limit, NUL bytes (a binary file), UTF-16 byte-order marks and
  invalid UTF-8 (with the byte offset), because the decoder's own errors are tracebacks without a file name;
- the composer counts nodes as it builds them, an alias counting as the whole value it stands for, so anchors
  that multiply ("billion laughs": ten aliases of ten aliases of ...) are refused after a few thousand
  composed nodes instead of being expanded; PyYAML itself shares aliased values, but `include:` resolution,
  merging and config building copy them, which is where the exponential blow-up happened;
- nesting depth is limited (the composer and everything downstream recurse), aliases to a value that contains
  them (a cycle) are refused, and so are duplicate keys, where YAML would silently keep the last;
- `include:` files count against the same limits, a missing one names the including file and key, and a cycle
  of includes is named.

The include semantics are those of config.py's docstring: `include: file` or a list of files in any mapping,
relative to the including file, else a shipped file (shipped.py's rule); the mapping's own keys are deep-merged
over the included ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from .config import ConfigError, deep_merge
from .shipped import find

try:  # libyaml scans and parses in C; our composer and constructor run on its events
    from yaml._yaml import CParser as _Parser

    _LIBYAML = True
except ImportError:  # pragma: no cover - pyyaml without libyaml
    from yaml.parser import Parser as _Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    _LIBYAML = False

MAX_BYTES = 1 << 20  # a pipeline is a few KiB; a model or component file less
MAX_NODES = 20_000  # keys and values of one config with its includes and aliases expanded; pipelines have ~300
MAX_DEPTH = 32  # nesting levels; pipelines use about 6
MAX_FILES = 64  # file reads for one config, includes counted each time they occur

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Budget:
    """What one config (its file and everything it includes) may still use; shared across the includes."""

    def __init__(self):
        self.nodes = 0
        self.files = 0


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, resolving `include:` keys (at any depth) recursively."""
    return _load(Path(path), _Budget(), depth=0, chain=())


def parse_value(text: str, where: str) -> Any:
    """A YAML value from a string (a command-line override), under the same limits as a file."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{where}: the value is {len(text)} characters long; at most {MAX_BYTES} are read")
    return _parse(text, where, _Budget(), depth=0)


def _load(path: Path, budget: _Budget, depth: int, chain: tuple[Path, ...]) -> dict:
    """One file's mapping with its includes resolved; `depth` is where its top level sits in the including
    file, `chain` the files including it (for cycles)."""
    budget.files += 1
    where = str(path)
    try:
        data = _parse(_read_text(path), where, budget, depth)
        if data is None:
            raise ConfigError(f"{where}: the file is empty (or only comments); a config is a mapping such as "
                              f"`name: ...` and `stages: ...`")
        if not isinstance(data, dict):
            kind = "a list" if isinstance(data, list) else f"the single value {_short(data)}"
            raise ConfigError(f"{where}: the top level must be a mapping (`key: value` lines), got {kind}")
        return _resolve_includes(data, path, budget, depth + 1, "", (*chain, path))
    except _IncludedError:
        raise
    except ConfigError as err:
        if not chain:
            raise
        # The innermost included file with the error says how the file that was run reaches it.
        raise _IncludedError(f"{err} ({path.name} is included by {' -> '.join(_show(p) for p in chain)})") from None


class _IncludedError(ConfigError):
    """An error in an included file, already saying which files include it."""


def _read_text(path: Path) -> str:
    """The file's text, after the checks that YAML and the UTF-8 decoder would report without the file name."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ConfigError(f"{path}: not a regular file; give the path of a .yaml file")
        if size > MAX_BYTES:
            raise ConfigError(f"{path}: {size} bytes is more than the {MAX_BYTES} a config may have "
                              f"(a pipeline is a few KiB); is this the right file?")
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it: {err.strerror or err}") from None
    if len(data) > MAX_BYTES:  # grew since stat
        raise ConfigError(f"{path}: more than {MAX_BYTES} bytes; is this the right file?")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{path}: the file is UTF-16 encoded; re-save it as UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ConfigError(f"{path}: NUL byte at byte offset {nul}: this is a binary file, not YAML text; "
                          f"give the path of a .yaml file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}: not valid UTF-8: byte 0x{data[err.start]:02x} at byte offset {err.start} "
                          f"(line {line}); re-save the file as UTF-8") from None


def _parse(text: str, where: str, budget: _Budget, depth: int) -> Any:
    """The value of one YAML document, every YAML or limit error a ConfigError naming the place."""
    loader = _Loader(text, budget, depth)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        raise ConfigError(_describe(err, where)) from None
    except yaml.reader.ReaderError as err:  # a control character; libyaml gives its offset in the UTF-8 bytes
        line = text.encode()[: err.position].count(b"\n") + 1
        raise ConfigError(f"{where}: line {line}: character 0x{err.character:02x} at byte offset {err.position} is "
                          f"not allowed in YAML ({err.reason}); remove it") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    except RecursionError:  # only if the depth limit were raised past Python's stack
        raise ConfigError(f"{where}: nested too deeply to read") from None
    finally:
        loader.dispose()


def _describe(err: yaml.MarkedYAMLError, where: str) -> str:
    """`file: line L, column C: problem (context); fix` from a PyYAML error or one of ours."""
    mark = err.problem_mark or err.context_mark
    at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = err.problem or err.context or "not valid YAML"
    if isinstance(err, _LimitError):
        return f"{where}: {at}{problem}"
    context = ""
    if err.context and err.problem:
        cmark = err.context_mark
        context = f" ({err.context}" + (f" at line {cmark.line + 1}" if cmark is not None else "") + ")"
    fix = ""
    if isinstance(err, (yaml.scanner.ScannerError, yaml.parser.ParserError)):
        fix = "; check the indentation, the `key: value` colons and the quoting there"
    elif "single document" in (err.context or ""):
        problem, context, fix = "a second document (`---`)", "", "; a config is one YAML document: remove the `---`"
    return f"{where}: {at}not valid YAML: {problem}{context}{fix}"


class _LimitError(ComposerError):
    """A document past one of the limits; its message is complete (problem, key and fix)."""

    def __init__(self, problem: str, mark):
        super().__init__(None, None, problem, mark)


class _GuardedComposer(Composer):
    """PyYAML's composer, counting the nodes the document would have with every alias expanded and its depth,
    and refusing both past the limits while composing (which is linear in the text), before anything expands."""

    def __init__(self, budget: _Budget, depth: int):
        super().__init__()
        self._budget = budget
        self._depth = depth
        self._sizes: dict[int, int] = {}  # id(node) → its size with aliases expanded; absent while composing it
        self._path: list[str] = []

    def compose_node(self, parent, index):
        label = index.value if isinstance(index, ScalarNode) else f"[{index}]" if isinstance(index, int) else None
        if label is not None:
            self._path.append(str(label))
        try:
            return self._compose(parent, index)
        finally:
            if label is not None:
                self._path.pop()

    def _compose(self, parent, index):
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            node = self.anchors.get(event.anchor)
            if node is not None:  # an undefined alias is PyYAML's own error
                if id(node) not in self._sizes:
                    raise _LimitError(f"{self._key()}alias *{event.anchor} refers to a value that contains it, "
                                      f"which would never end; write the value out", event.start_mark)
                self._count(self._sizes[id(node)], event.start_mark, alias=event.anchor)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _LimitError(f"{self._key()}nested more than {MAX_DEPTH} levels deep (a pipeline needs about 6); "
                              f"flatten it", event.start_mark)
        self._count(1, event.start_mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        size = 1
        if isinstance(node, SequenceNode):
            size += sum(self._sizes[id(item)] for item in node.value)
        elif isinstance(node, MappingNode):
            size += sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
        self._sizes[id(node)] = size
        return node

    def _count(self, nodes: int, mark, alias: str | None = None) -> None:
        self._budget.nodes += nodes
        if self._budget.nodes <= MAX_NODES:
            return
        if alias is not None:
            raise _LimitError(
                f"{self._key()}alias *{alias} stands for {nodes} values, which takes the config past {MAX_NODES} "
                f"keys and values once aliases are expanded (anchors that multiply, as in a 'billion laughs' "
                f"file); write the values out or use fewer aliases", mark)
        raise _LimitError(f"{self._key()}the config has more than {MAX_NODES} keys and values (a pipeline has a "
                          f"few hundred); is this the right file?", mark)

    def _key(self) -> str:
        key = "".join(p if p.startswith("[") else f".{p}" for p in self._path).lstrip(".")
        return f"{key}: " if key else ""


class _Constructor(SafeConstructor):
    """SafeConstructor, with duplicate keys refused and a value Python cannot build (`2024-13-40`, an integer
    of a million digits) reported at its line instead of escaping as a ValueError."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as err:
            value = f" {_short(node.value)}" if isinstance(node, ScalarNode) else ""
            reason = str(err).split(";")[0]  # Python's advice after the `;` is for programmers
            raise ConstructorError(None, None, f"cannot read the value{value}: {reason}; quote it to make it a "
                                               f"string", node.start_mark) from None

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise _LimitError(f"duplicate key {_short(key)} (first at line {seen[key].line + 1}); YAML "
                                      f"would silently keep only the last one: merge or remove one",
                                      key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


if _LIBYAML:

    class _Loader(_GuardedComposer, _Parser, _Constructor, Resolver):
        def __init__(self, text: str, budget: _Budget, depth: int):
            _Parser.__init__(self, text)
            _GuardedComposer.__init__(self, budget, depth)
            _Constructor.__init__(self)
            Resolver.__init__(self)

else:  # pragma: no cover

    class _Loader(Reader, Scanner, _Parser, _GuardedComposer, _Constructor, Resolver):
        def __init__(self, text: str, budget: _Budget, depth: int):
            Reader.__init__(self, text)
            Scanner.__init__(self)
            _Parser.__init__(self)
            _GuardedComposer.__init__(self, budget, depth)
            _Constructor.__init__(self)
            Resolver.__init__(self)


def _resolve_includes(node: Any, path: Path, budget: _Budget, depth: int, key: str, chain: tuple[Path, ...]) -> Any:
    """Replace every mapping's `include:` (a file or list of files, relative to `path`) by the included
    mappings, with the mapping's own keys merged over them. `depth` is the nesting level of `node`, so that an
    included file's contents count at the level where they land."""
    if isinstance(node, list):
        return [_resolve_includes(v, path, budget, depth + 1, f"{key}[{i}]", chain) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    includes = node.pop("include", [])
    inc_key = _join(key, "include")
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(inc, str) and inc for inc in includes):
        raise ConfigError(f"{path}: {inc_key}: expected a file name or a list of file names, got {_short(includes)}")
    merged: dict = {}
    for inc in includes:
        target = find(inc, path.parent)
        if not target.exists():
            raise ConfigError(f"{path}: {inc_key}: included file {inc} does not exist (looked for {_show(target)}, "
                              f"relative to {path.name}, and among the shipped files); fix the name or path")
        if any(_same(target, p) for p in chain):
            cycle = " -> ".join(_show(p) for p in (*chain, target))
            raise _IncludedError(f"{path}: {inc_key}: circular include: {cycle}; remove one of these includes")
        if budget.files >= MAX_FILES:
            raise ConfigError(f"{path}: {inc_key}: more than {MAX_FILES} files read for one config (an include "
                              f"counts each time it occurs); include each shared file once, where it is needed")
        merged = deep_merge(merged, _load(target, budget, depth - 1, chain))
    own = {k: _resolve_includes(v, path, budget, depth + 1, _join(key, str(k)), chain) for k, v in node.items()}
    return deep_merge(merged, own)


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _show(path: Path) -> str:
    return os.path.normpath(path)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
