"""Search over reasoning steps, guided by a process reward model: step-level beam search and a value-guided tree
search in the spirit of ReST-MCTS* (Zhang et al., 2024). Pure and engine-agnostic: the caller passes

- `expand(prefixes) -> steps`: for each (problem index, trace so far), E sampled next steps (`Step`s). One call
  per depth level (beam) or per iteration (tree) covers every open trace of every problem, so an engine serves
  it as one batch;
- `score(traces) -> values`: for each (problem index, trace), the PRM's value of that (partial) trace.

A trace is the response so far: its steps, each step that the model did not end the response with followed by
"\\n" (step_labels.step_prefixes' form, so the engine continues it as the assistant's unfinished reply). It is
finished when the model ended the response (end of sequence, or its per-step token limit) or when it reaches
`max_steps`. Within one parent, children with the same text are one child (a sample repeated adds nothing).

Beam search (after the PRM-guided beam search of Snell et al., 2024, *Scaling LLM test-time compute*, with
`width` their N/M beams and E their M): each depth expands every open beam into E steps and keeps the `width`
best of all their children by value (ties: the earlier child). A kept child that is finished is retired into the
results and the beam narrows by one, so a problem ends with `width` finished traces at most, ranked by value.
Deviations: the first step is sampled E times, not N; the PRM is this run's train_prm adapter on the base
model, not theirs; finished traces are ranked by the same value that ranked them as partial traces.

Tree search (ReST-MCTS*'s MCTS*, as its released code runs it), one iteration per problem per call:
- selection: from the root, while the node has been expanded, go to the child of highest
  `V + exploration * sqrt(2 ln N(parent) / N(child))`, or `V + unvisited` for a child never visited (the code's
  `inf`, the base value of an unvisited node); ties go to the earlier child (the code draws at random);
- expansion: the selected node, unless finished, gets E sampled children, each valued by the PRM (V = score);
- backup: every node from the selected one to the root gets N += 1 and, once expanded, V = the visit-weighted
  mean of its visited children's V (sum N(c) V(c) / sum N(c)); a node whose children are all unvisited keeps its
  own V. Re-selecting a finished leaf expands nothing and only backs up (its visits grow), as in the code;
- `budget` iterations per problem (fewer when no open leaf is left); the result is the finished leaves ranked by
  their V (their PRM value: leaves are never backed up from below), or, when none finished, the best open leaf,
  as the code falls back to the highest-value node.
Deviations from ReST-MCTS*: the value is a PRM trained by train_prm on Math-Shepherd labels, not their value
model trained on their weighted quality targets; no self-critic (a trace ends when the model ends it or at
`max_steps`, not when a critic says `<end>`); no simulation step (their greedy rollout from the best new child,
mixed into its V by alpha: here the PRM's value of each child is all the evaluation); no early stop at `end_gate`
(the whole budget is spent and the finished traces ranked after); leaves only, not inner nodes, are results.
Which traces are kept as training data (ReST-MCTS* keeps those that reach the right answer) is left to the
critique and filter stages, as for sampled traces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Step:
    """One sampled step: its text (no newline), whether the model ended the response with it, its cost."""

    text: str
    final: bool  # the model ended the response: end of sequence, or its token limit (finish_reason "length")
    tokens: int
    finish_reason: str = "stop"


Expand = Callable[[list[tuple[int, str]]], list[list[Step]]]  # (problem, trace) → its E next steps
Score = Callable[[list[tuple[int, str]]], list[float]]  # (problem, trace) → the PRM's value of the trace


@dataclass(eq=False)
class Node:
    text: str  # the trace: steps, each non-final one followed by "\n"
    depth: int = 0
    value: float = 0.0  # V: the PRM's value when created; in tree search, then the backed-up value
    prm_value: float = 0.0  # the PRM's value of the trace itself (the root's is 0: nothing to score)
    finished: bool = False
    finish_reason: str | None = None  # "stop": the model ended it; "length": a step's token limit, or max_steps
    tokens: int = 0  # tokens generated for the steps of this trace (the path from the root)
    parent: "Node | None" = None
    children: list["Node"] = field(default_factory=list)
    visits: int = 0
    expanded: bool = False

    @property
    def completion(self) -> str:
        """The trace as a response: a trace cut at max_steps loses the newline that would have led to its next step."""
        return self.text if self.finish_reason == "stop" or not self.text.endswith("\n") else self.text[:-1]

    def path(self) -> list["Node"]:
        """The nodes from the root's first child down to this one."""
        node, out = self, []
        while node.parent is not None:
            out.append(node)
            node = node.parent
        return out[::-1]


@dataclass
class Cost:
    """What a search spent: engine calls, steps sampled (and their tokens), traces scored."""

    calls: int = 0
    tokens: list[int] = field(default_factory=list)  # per problem
    expansions: list[int] = field(default_factory=list)  # per problem: nodes expanded
    scored: int = 0


def _children(parent: Node, steps: list[Step], max_steps: int) -> list[Node]:
    """`parent`'s new children from sampled steps, one per distinct text."""
    seen: set[str] = set()
    out = []
    for s in steps:
        text = parent.text + s.text + ("" if s.final else "\n")
        if text in seen:
            continue
        seen.add(text)
        depth = parent.depth + 1
        finished, reason = (True, s.finish_reason) if s.final else (depth >= max_steps, "length")
        out.append(Node(text, depth, finished=finished, finish_reason=reason if finished else None,
                        tokens=parent.tokens + s.tokens, parent=parent))
    return out


def _expand(batch: list[tuple[int, Node]], expand: Expand, score: Score, max_steps: int, cost: Cost) -> None:
    """Expand every (problem, node) of `batch` in one `expand` call and value all the children in one `score` call."""
    steps = expand([(i, node.text) for i, node in batch])
    cost.calls += 1
    new: list[tuple[int, Node]] = []
    for (i, node), sampled in zip(batch, steps):
        node.children = _children(node, sampled, max_steps)
        node.expanded = True
        cost.tokens[i] += sum(s.tokens for s in sampled)
        cost.expansions[i] += 1
        new += [(i, child) for child in node.children]
    values = score([(i, child.text) for i, child in new])
    cost.scored += len(new)
    for (_, child), v in zip(new, values):
        child.value = child.prm_value = float(v)


def _ranked(nodes: list[Node]) -> list[Node]:
    return sorted(nodes, key=lambda n: -n.value)  # stable: equal values keep their order


def beam_search(problems: int, expand: Expand, score: Score, width: int, max_steps: int) -> tuple[list[list[Node]], Cost]:
    """Per problem, its finished traces ranked by value (at most `width`); and the search's cost."""
    cost = Cost(tokens=[0] * problems, expansions=[0] * problems)
    beams = [[Node("")] for _ in range(problems)]
    done: list[list[Node]] = [[] for _ in range(problems)]
    while any(beams):
        batch = [(i, node) for i in range(problems) for node in beams[i]]
        _expand(batch, expand, score, max_steps, cost)
        for i in range(problems):
            kept = _ranked([child for node in beams[i] for child in node.children])[: width - len(done[i])]
            done[i] += [n for n in kept if n.finished]
            beams[i] = [n for n in kept if not n.finished]
    return [_ranked(d) for d in done], cost


def selection_score(child: Node, parent_visits: int, exploration: float, unvisited: float) -> float:
    """UCT as ReST-MCTS*'s code computes it: V plus the exploration term, or plus `unvisited` if never visited."""
    if child.visits == 0:
        return child.value + unvisited
    return child.value + exploration * math.sqrt(2 * math.log(parent_visits) / child.visits)


def select(root: Node, exploration: float, unvisited: float) -> Node:
    node = root
    while node.expanded:
        scores = [selection_score(c, node.visits, exploration, unvisited) for c in node.children]
        node = node.children[scores.index(max(scores))]  # the first of equal scores
    return node


def backed_up_value(node: Node) -> float:
    """ReST-MCTS*'s backup: the visit-weighted mean of the visited children's values (own V if none visited)."""
    visited = [c for c in node.children if c.visits]
    if not visited:
        return node.value
    return sum(c.value * c.visits for c in visited) / sum(c.visits for c in visited)


def backup(node: Node | None) -> None:
    while node is not None:
        node.visits += 1
        if node.expanded:
            node.value = backed_up_value(node)
        node = node.parent


def leaves(node: Node) -> list[Node]:
    """The tree's leaves, depth first in child order."""
    if not node.children:
        return [node]
    return [leaf for c in node.children for leaf in leaves(c)]


def tree_search(problems: int, expand: Expand, score: Score, budget: int, max_steps: int, exploration: float,
                unvisited: float) -> tuple[list[Node], Cost]:
    """Per problem, the root of its searched tree; and the search's cost. `results(root)` reads the traces."""
    cost = Cost(tokens=[0] * problems, expansions=[0] * problems)
    roots = [Node("") for _ in range(problems)]
    for _ in range(budget):
        live = [i for i in range(problems) if any(not n.finished and not n.expanded for n in leaves(roots[i]))]
        if not live:
            break
        chosen = [(i, select(roots[i], exploration, unvisited)) for i in live]
        to_expand = [(i, n) for i, n in chosen if not n.finished]
        if to_expand:
            _expand(to_expand, expand, score, max_steps, cost)
        for _, node in chosen:
            backup(node)
    return roots, cost


def results(root: Node) -> list[Node]:
    """A searched tree's finished leaves ranked by value, or (none finished) its best open leaf."""
    found = leaves(root)
    finished = [n for n in found if n.finished]
    return _ranked(finished) if finished else _ranked(found)[:1]
