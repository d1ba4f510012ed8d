"""The package's import graph, read from the source with `ast` (imports at module level and inside functions alike,
since a deferred import still ties two modules together): no cycle, no module reaching for another's private name,
and stages reach trainers only through the trainer registry (and its launcher).

`python -m tests.test_layers` prints the graph, one "module -> imports" line per module, lowest layer first.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "selfimprove"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported selfimprove module, the names taken from it) for every import statement of `module`.

    `from .x import y` imports the module `x.y` where that is a module, else the name `y` of `x`."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names if alias.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base not in MODULES:
                continue
            names = [alias.name for alias in node.names]
            out += [(f"{base}.{n}", []) for n in names if f"{base}.{n}" in MODULES]
            taken = [n for n in names if f"{base}.{n}" not in MODULES]
            if taken:
                out.append((base, taken))
    return out


def graph() -> dict[str, set[str]]:
    """Module → the selfimprove modules it imports (itself left out: `from . import x` in a package's __init__)."""
    return {m: {target for target, _ in imports(m)} - {m} for m in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a closed path [a, b, ..., a], or None (depth-first search, grey/black colouring)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layers(edges: dict[str, set[str]]) -> list[list[str]]:
    """Modules by layer: layer 0 imports no selfimprove module, layer k only modules of layers below k."""
    out, placed = [], set()
    while len(placed) < len(edges):
        layer = sorted(m for m in edges if m not in placed and edges[m] <= placed)
        if not layer:  # a cycle: test_no_import_cycle names it
            layer = sorted(set(edges) - placed)
        out.append(layer)
        placed |= set(layer)
    return out


def test_no_import_cycle():
    edges, found = graph(), []
    while cycle := find_cycle(edges):  # cut each cycle found at its first edge, so that every one is named
        found.append(" -> ".join(cycle))
        edges[cycle[0]] = edges[cycle[0]] - {cycle[1]}
    assert found == [], "\n".join(found)


def test_no_private_name_taken_from_another_module():
    taken = [f"{m} takes {name} from {target}" for m in MODULES for target, names in imports(m) for name in names
             if name.startswith("_") and not name.startswith("__") and target != m]
    assert taken == [], "\n".join(taken)


def test_stages_reach_trainers_only_through_the_registry():
    """A stage names its trainer in the config and builds it from the registry (registry.TrainerSpec), so that a
    user's own trainer plugs in the same way; importing a trainer module directly would bypass that. The modules
    of trainers/ a stage may import are the launchers, which run a registered trainer in several processes: the
    train stage's (launch) and the rl stage's (rl_launch)."""
    launchers = {"selfimprove.trainers.launch", "selfimprove.trainers.rl_launch"}
    reached = sorted(f"{m} -> {t}" for m, targets in graph().items() if m.startswith("selfimprove.stages.")
                     for t in targets if t.startswith("selfimprove.trainers") and t not in launchers)
    assert reached == [], "\n".join(reached)


def test_the_graph_reader_sees_what_it_guards():
    """The checks above can fail: relative imports resolve, deferred imports count, a cycle is found."""
    edges = graph()
    assert "selfimprove.records" in edges["selfimprove.stages.rl"]  # `from ..records import ...`
    assert "selfimprove.compare" in edges["selfimprove.cli"]  # imported inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layers({"a": {"b"}, "b": set()}) == [["b"], ["a"]]


if __name__ == "__main__":
    edges = graph()
    for number, layer in enumerate(layers(edges)):
        print(f"# layer {number}")
        for m in layer:
            print(f"{m} -> {', '.join(sorted(edges[m])) or '(nothing)'}")
