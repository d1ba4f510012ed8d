"""PRM-guided search (selfimprove/search.py, stages/search.py): step-level beam search and the ReST-MCTS*-style tree
search on hand-made trees whose PRM values are given, so the kept beams, backed-up values, visits and chosen
traces are worked out by hand; the generate stage's `search:` setting on a scripted engine and PRM (rows, seeds,
one engine call per level over all problems, resume); config errors; the tiny pipeline end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import selfimprove.search as search_module
from selfimprove.artifacts import load_rows, write_json
from selfimprove.config import ConfigError, build
from selfimprove.records import Completion, SamplingConfig, Weights
from selfimprove.search import Step, beam_search, results, select, tree_search
from selfimprove.stages.common import Chunking
from selfimprove.stages.search import Search, search_problems, to_step, trace_value
from selfimprove.tasks.arithmetic import Arithmetic


def scripted(*trees: dict[str, list[tuple[str, bool, float]]]):
    """`expand` and `score` callables for hand-made trees, one per problem: tree[trace] = [(step, final, PRM
    value), ...]; each step costs 1 token. `calls` records every expand call's batch."""
    values = [{trace + step + ("" if final else "\n"): v for trace, steps in tree.items() for step, final, v in steps}
              for tree in trees]
    calls = []

    def expand(batch):
        calls.append(list(batch))
        return [[Step(step, final, 1) for step, final, _ in trees[i][trace]] for i, trace in batch]

    def score(batch):
        return [values[i][trace] for i, trace in batch]

    return expand, score, calls


# -- beam search -----------------------------------------------------------------------------------------------------
# Width 2, max_steps 3. Depth 1: A .9, B .6, C .5 (A repeated: one child) → keep A, B. Depth 2: A's children
# A1 .3, A2 .4; B's B1 .8, B2 .7 (B2 ends the response) → keep B1, B2; B2 is finished and retires, the beam narrows
# to 1. Depth 3 (= max_steps: every child finished): B1's B1a .95, B1b .5 → keep B1a. Results: B1a, B2.
BEAM_TREE = {
    "": [("A", False, .9), ("B", False, .6), ("A", False, .9), ("C", False, .5)],
    "A\n": [("A1", False, .3), ("A2", False, .4)],
    "B\n": [("B1", False, .8), ("B2.", True, .7)],
    "B\nB1\n": [("B1a", False, .95), ("B1b", False, .5)],
}


def test_beam_search_keeps_the_best_children_per_depth_and_retires_finished_ones():
    expand, score, calls = scripted(BEAM_TREE)
    [traces], cost = beam_search(1, expand, score, width=2, max_steps=3)
    assert [[t for _, t in c] for c in calls] == [[""], ["A\n", "B\n"], ["B\nB1\n"]]  # the open beams per depth
    assert [(t.text, t.value, t.depth) for t in traces] == [("B\nB1\nB1a\n", .95, 3), ("B\nB2.", .7, 2)]
    # cut at max_steps: no trailing newline, "length"; ended by the model: "stop"
    assert [(t.completion, t.finish_reason) for t in traces] == [("B\nB1\nB1a", "length"), ("B\nB2.", "stop")]
    assert [n.prm_value for n in traces[0].path()] == [.6, .8, .95] and traces[0].tokens == 3
    # tokens: 4 + 4 + 2 steps sampled; expansions: root, A, B, B1; scored: 3 + 4 + 2 distinct children
    assert cost.tokens == [10] and cost.expansions == [4] and cost.calls == 3 and cost.scored == 9


def test_beam_search_batches_every_problem_in_one_call_per_depth():
    expand, score, calls = scripted(BEAM_TREE, {"": [("done.", True, 1.0)]})
    traces, cost = beam_search(2, expand, score, width=2, max_steps=3)
    assert [[t.text for t in ts] for ts in traces] == [["B\nB1\nB1a\n", "B\nB2."], ["done."]]
    assert calls[0] == [(0, ""), (1, "")] and [len(c) for c in calls] == [2, 2, 1]
    assert cost.calls == 3 and cost.tokens == [10, 1] and cost.expansions == [4, 1]


# -- tree search -----------------------------------------------------------------------------------------------------
# E = 2, max_steps 3 (depth-3 nodes are finished), exploration c = 0.1, unvisited bonus u = 0.8.
TREE = {
    "": [("A", False, .6), ("B", False, .5)],
    "A\n": [("A1", False, .9), ("A2", False, .2)],
    "B\n": [("B1", False, .7), ("B2", False, .1)],
    "A\nA1\n": [("A1a", False, .6), ("A1b", False, .65)],
    "A\nA2\n": [("A2a", False, .3), ("A2b", False, .25)],
    "B\nB1\n": [("B1a", False, .95), ("B1b", False, .4)],
    "B\nB2\n": [("B2a", False, .2), ("B2b", False, .25)],
}


def node(root, text):
    found = [n for n in _all(root) if n.text == text]
    assert len(found) == 1, text
    return found[0]


def _all(n):
    return [n] + [m for c in n.children for m in _all(c)]


def test_tree_search_by_hand():
    """Seven iterations, worked by hand (UCT = V + 0.1 sqrt(2 ln N(parent) / N), unvisited: V + 0.8):
    1. expand the root: A .6, B .5.                                          root N1
    2. A 1.4 > B 1.3: expand A (A1 .9, A2 .2). A N1 V .6;                    root N2 V .6
    3. A .6 + .1 sqrt(2 ln 2) = .718 < B 1.3: expand B (B1 .7, B2 .1).       root N3 V (.6 + .5)/2 = .55
    4. A .6 + .148 = .748 > B .648; in A: A1 1.7 > A2 1.0: expand A1 (A1a .6, A1b .65). A1 N1 V .9, A N2 V .9
    5. A .9 + .1 sqrt(2 ln 4 / 2) = 1.018 > B .5 + .167; in A: A1 .9 + .118 = 1.018 > A2 1.0; in A1: A1b 1.45 >
       A1a 1.4: A1b is finished, so nothing is expanded, only backed up: A1b N1, A1 N2 V .65, A N3 V .65
    6. A .65 + .1 sqrt(2 ln 5 / 3) = .754 > B .5 + .179; in A: A1 .65 + .1 sqrt(2 ln 3 / 2) = .755 < A2 1.0:
       expand A2 (A2a .3, A2b .25). A2 N1 V .2; A N4 V (2 * .65 + 1 * .2) / 3 = .5
    7. A .5 + .1 sqrt(2 ln 6 / 4) = .595 < B .5 + .1 sqrt(2 ln 6) = .689; in B: B1 1.5 > B2 .9: expand B1
       (B1a .95, B1b .4). B1 N1 V .7, B N2 V .7; root N7 V (4 * .5 + 2 * .7) / 6 = .5667
    The finished leaves ranked: B1a .95, A1b .65, A1a .6, B1b .4, A2a .3, A2b .25; the chosen trace is B1a."""
    expand, score, calls = scripted(TREE)
    [root], cost = tree_search(1, expand, score, budget=7, max_steps=3, exploration=0.1, unvisited=0.8)
    visits = {t: node(root, t).visits for t in ("", "A\n", "B\n", "A\nA1\n", "A\nA2\n", "B\nB1\n", "A\nA1\nA1b\n")}
    assert visits == {"": 7, "A\n": 4, "B\n": 2, "A\nA1\n": 2, "A\nA2\n": 1, "B\nB1\n": 1, "A\nA1\nA1b\n": 1}
    assert root.value == pytest.approx((4 * .5 + 2 * .7) / 6)
    assert node(root, "A\n").value == pytest.approx(.5) and node(root, "B\n").value == pytest.approx(.7)
    assert node(root, "A\nA1\n").value == pytest.approx(.65) and node(root, "A\nA2\n").value == .2
    assert node(root, "B\nB2\n").visits == 0 and not node(root, "B\nB2\n").expanded
    # one engine call per iteration that expanded something: iteration 5 re-selected a finished leaf
    assert [[t for _, t in c] for c in calls] == [[""], ["A\n"], ["B\n"], ["A\nA1\n"], ["A\nA2\n"], ["B\nB1\n"]]
    assert cost.expansions == [6] and cost.tokens == [12]
    ranked = results(root)
    assert [(n.completion, n.value) for n in ranked] == [
        ("B\nB1\nB1a", .95), ("A\nA1\nA1b", .65), ("A\nA1\nA1a", .6), ("B\nB1\nB1b", .4), ("A\nA2\nA2a", .3),
        ("A\nA2\nA2b", .25)]


def test_a_max_backup_would_choose_another_trace(monkeypatch):
    """With max instead of the visit-weighted mean, A keeps .65 after iteration 6 (max of A1 .65, A2 .2), so
    iteration 7 goes to A (.65 + .095 > B .689) and re-selects the finished A1a; B1 is never expanded and the
    chosen trace is A1b. So the tree above pins the backup rule."""
    monkeypatch.setattr(search_module, "backed_up_value",
                        lambda n: max((c.value for c in n.children if c.visits), default=n.value))
    expand, score, _ = scripted(TREE)
    [root], _ = tree_search(1, expand, score, budget=7, max_steps=3, exploration=0.1, unvisited=0.8)
    assert results(root)[0].completion == "A\nA1\nA1b" and not node(root, "B\nB1\n").expanded


def test_selection_follows_uct_with_the_unvisited_bonus():
    expand, score, _ = scripted(TREE)
    [root], _ = tree_search(1, expand, score, budget=3, max_steps=3, exploration=0.1, unvisited=0.8)
    a, b = root.children  # both visited once, root N3: V + 0.1 sqrt(2 ln 3) each, so V decides: A .6 > B .5
    assert search_module.selection_score(b, 3, 0.1, 0.8) == pytest.approx(.5 + .1 * math.sqrt(2 * math.log(3)))
    assert select(root, 0.1, 0.8).text == "A\nA1\n"  # in A both unvisited: A1 .9 + .8 > A2 .2 + .8
    a.value = .4
    assert select(root, 0.1, 0.8).text == "B\nB1\n"
    # a visited child beats an unvisited one only by more than the bonus: B1 visited at .7 (+ .1 sqrt(2 ln 2))
    # loses to B2 unvisited at .1 + .8 = .9; with a bonus of .5 it wins over .6
    node(root, "B\nB1\n").visits, b.visits = 1, 2
    assert select(root, 0.1, 0.8).text == "B\nB2\n"
    assert select(root, 0.1, 0.5).text == "B\nB1\n"


def test_tree_search_stops_when_no_open_leaf_is_left_and_falls_back_to_the_best_open_leaf():
    expand, score, calls = scripted({"": [("x.", True, .3), ("y.", True, .8)]})
    [root], cost = tree_search(1, expand, score, budget=5, max_steps=3, exploration=0.1, unvisited=0.8)
    assert len(calls) == 1 and root.visits == 1  # no open leaf after the first iteration: the budget is not spent
    assert [n.text for n in results(root)] == ["y.", "x."]
    expand, score, _ = scripted(TREE)
    [root], _ = tree_search(1, expand, score, budget=2, max_steps=3, exploration=0.1, unvisited=0.8)
    [best] = results(root)  # nothing finished within the budget: the highest-valued leaf
    assert best.text == "A\nA1\n" and not best.finished and best.completion == "A\nA1"
