"""PRM-guided search (selfimprove/search.py, stages/search.py): step-level beam search and the ReST-MCTS*-style tree
search on hand-made trees whose PRM values are given, so the kept beams, backed-up values, visits and chosen
traces are worked out by hand; the generate stage's `search:` setting on a scripted engine and PRM (rows, seeds,
one engine call per level over all problems, resume); config errors; the tiny pipeline end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import selfimprove.search as search_module
from selfimprove.artifacts import load_rows
from selfimprove.config import ConfigError, build
from selfimprove.pipeline import derive_seed
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


# -- the generate stage's `search:` setting ----------------------------------------------------------------------------
TASK = Arithmetic(Arithmetic.Config(num_train=40, num_test=12, num_dev=12))
NEWLINE, EOS = 10, 2


class Tokenizer:
    """A chat template in angle brackets; token 10 decodes to a newline, the end of sequence (2) to nothing."""

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def decode(self, ids, skip_special_tokens):
        return "".join("\n" if i == NEWLINE else "" if i == EOS else "x" for i in ids)


class StepEngine:
    """Each trace (the text after <assistant>) continues with `steps[trace]`: (text, final) pairs, cycled to n;
    a step that is not final stopped at a newline (its token ids end with one). Records every call."""

    def __init__(self, steps: dict[str, list[tuple[str, bool]]]):
        self.steps, self.calls, self.tokenizer = steps, [], Tokenizer()

    def generate(self, prompts, sampling, weights, seed):
        self.calls.append({"prompts": list(prompts), "n": sampling.n, "stop": sampling.stop, "seed": seed,
                           "max_tokens": sampling.max_tokens})
        out = []
        for prompt in prompts:
            options = self.steps[prompt.split("<assistant>", 1)[1]]
            out.append([Completion(text, "stop", 3, [1, 1, EOS if final else NEWLINE])
                        for text, final in (options * sampling.n)[: sampling.n]])
        return out


class StepPRM:
    """P(step correct) = `table[step]`; records what it was built with and asked."""

    built, table = [], {"7 + 8 = 15.": .9, "junk": .2, "The answer is 425.": .8, "The answer is 7.": .3}

    def __init__(self, base, adapter, max_length, device):
        StepPRM.built.append((base, adapter, max_length, device))

    def step_scores(self, prompts, steps, batch_size):
        return [[self.table[s] for s in st] for st in steps]

    def close(self):
        pass


def test_to_step_tells_a_newline_from_the_end_of_the_response():
    tok = Tokenizer()
    assert to_step(Completion("a b", "stop", 3, [1, 1, NEWLINE]), tok) == Step("a b", False, 3, "stop")
    assert to_step(Completion("a b", "stop", 3, [1, 1, EOS]), tok) == Step("a b", True, 3, "stop")
    assert to_step(Completion("a b c", "length", 3, [1, 1, 1]), tok) == Step("a b c", True, 3, "length")
    with pytest.raises(ValueError, match="token ids"):
        to_step(Completion("a", "stop", 1), tok)


def test_trace_values_by_hand():
    assert trace_value([.9, .2, .8], "last") == .8 and trace_value([.9, .2, .8], "min") == .2
    assert trace_value([.9, .5], "prod") == pytest.approx(.45)
    assert trace_value([], "last") == 0.0 and trace_value([None, .7], "min") == .7  # cut off by max_length


class Context:
    def __init__(self, root, engine):
        self.round, self.stage, self.task, self.base_model = 1, "search_test", TASK, "model"
        self.out_dir, self._engine = root / "search_test", engine

    def seed(self, *parts):
        return derive_seed(*parts)

    def engine(self):
        return self._engine

    def weights(self, which):
        return Weights("model", "/prm/adapter") if which == "train_prm" else Weights("model")


STEPS = {"": [("7 + 8 = 15.", False), ("junk", False)],
         "7 + 8 = 15.\n": [("The answer is 425.", True), ("The answer is 7.", True)],
         "junk\n": [("The answer is 7.", True)]}


def test_the_generate_stage_searches_in_one_engine_call_per_depth_and_resumes(tmp_path, monkeypatch):
    """Three problems in chunks of 2, beam width 2, 2 steps per trace. Per problem: depth 1 keeps "7 + 8 = 15."
    (.9) and "junk" (.2); depth 2 has "...425." .8, "... 7." .3 under the first and "... 7." .3 under junk: the
    2 best are 425 and the first "7." (ties keep the earlier), both finished."""
    from selfimprove.stages.generate import Generate

    monkeypatch.setattr("selfimprove.stages.search.ProcessRewardModel", StepPRM)
    config = build(Generate.Config, {
        "problems": {"split": "test", "num_problems": 3, "shuffle": False}, "chunking": {"size": 2},
        "sampling": {"temperature": 1.0, "max_tokens": 5},
        "search": {"strategy": "beam", "weights": "train_prm", "expansions": 2, "width": 2, "keep": "all_finished"},
    }, "test")
    engine = StepEngine(STEPS)
    metrics = Generate(config, Context(tmp_path, engine)).run()
    rows = load_rows(tmp_path / "search_test" / "data")
    problems = TASK.problems("test")[:3]
    assert [r["problem_id"] for r in rows] == [p["problem_id"] for p in problems for _ in range(2)]
    assert [r["completion"] for r in rows[:2]] == ["7 + 8 = 15.\nThe answer is 425.", "7 + 8 = 15.\nThe answer is 7."]
    first = rows[0]
    assert first["finish_reason"] == "stop" and first["num_tokens"] == 6 and first["sample_id"].endswith("/0")
    assert first["prompt"] == TASK.prompt(problems[0]) and first["token_ids"] is None
    assert first["search"]["value"] == .8 and first["search"]["values"] == [.9, .8] and first["search"]["depth"] == 2
    # per problem: 2 steps at the root, 2 under each of its 2 beams: 6 steps of 3 tokens
    assert first["search"]["problem_tokens"] == 18 and first["search"]["expansions"] == 3
    # chunk 1 (2 problems): the root call, then one call for all 4 beams; chunk 2 (1 problem): 1 + 1
    assert [len(c["prompts"]) for c in engine.calls] == [2, 4, 1, 2]
    assert {(c["n"], tuple(c["stop"]), c["max_tokens"]) for c in engine.calls} == {(2, ("\n",), 5)}
    assert engine.calls[1]["prompts"][0] == Tokenizer().apply_chat_template(TASK.prompt(problems[0]), False, True) \
        + "7 + 8 = 15.\n"
    assert [c["seed"] for c in engine.calls] == [derive_seed("chunk", k, "call", j) for k in (0, 1) for j in (0, 1)]
    assert first["seed"] == derive_seed("chunk", 0)
    assert StepPRM.built[-1] == ("model", "/prm/adapter", 1024, "auto")
    assert metrics["search/engine_calls"] == 4 and metrics["search/tokens_per_problem"] == 18
    assert metrics["search/expansions_per_problem"] == 3 and metrics["search/finished_by_model"] == 1.0
    assert metrics["samples"] == 6 and metrics["search/seconds_per_problem"] >= 0
    assert Generate.report(metrics) == {"Search cost per problem": f"18 tokens, "
                                                                  f"{metrics['search/seconds_per_problem']:.1f} s"}
    # a rerun finds both shards: nothing is searched, the rows are the same
    again = StepEngine({})
    assert Generate(config, Context(tmp_path, again)).run() == metrics and again.calls == []
    assert load_rows(tmp_path / "search_test" / "data") == rows


def test_tree_search_keeps_the_best_finished_trace(tmp_path, monkeypatch):
    monkeypatch.setattr("selfimprove.stages.search.ProcessRewardModel", StepPRM)
    rows = search_problems(
        search=build(Search, {"strategy": "tree", "weights": "train_prm", "expansions": 2, "budget": 3}, "test"),
        engine=lambda: StepEngine(STEPS), task=TASK, problems=TASK.problems("test")[:1],
        sampling=SamplingConfig(temperature=1.0), weights=Weights("model"),
        prm_weights=lambda: Weights("model", "/prm/adapter"), chunking=Chunking(), shard_dir=tmp_path / "shards",
        seed=lambda *parts: 0, round_index=1, stage="s", hint=False)
    # 1: the root → 7+8 (.9), junk (.2); 2: 7+8 → 425 (.8), 7 (.3); 3: in 7+8, 425 (1.6) → finished: backup only
    [row] = rows
    assert row["completion"] == "7 + 8 = 15.\nThe answer is 425." and row["search"]["expansions"] == 2
    assert row["search"]["strategy"] == "tree" and row["search"]["chunk_calls"] == 2


@pytest.mark.parametrize("override, error", [
    ("stages.search_test.search.weights=generate", "not an earlier train_prm stage"),
    ("stages.search_test.sampling.n=2", "leave sampling.n at 1"),
    ("stages.search_test.sampling.stop=[x]", "sampling.stop must be empty"),
    ("stages.search_test.sampling.temperature=0", "copies of one step"),
    ("stages.search_test.search.strategy=greedy", "is not one of"),
    ("stages.search_test.search.width=0", "must be >= 1"),
    ("stages.search_test.search.beams=2", "beams"),
    ("stages.search_test.adapt.temperatures=[0.5]", "use one or the other"),
])
def test_config_errors_before_any_model_loads(override, error):
    from selfimprove.pipeline import load_pipeline

    with pytest.raises(ConfigError, match=error):
        load_pipeline(Path(__file__).parent / "pipelines" / "tiny_search.yaml", [override])


def test_the_shipped_pipeline_passes_check():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "selfimprove.cli", "run", "prm_search_arithmetic", "--check"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "ok (5 stages" in proc.stdout


def test_the_tiny_search_pipeline_end_to_end(engine, tmp_path):
    """generate → step_labels → train_prm → search_test (beam) → critique, and tree_test, on the tiny random model:
    the plumbing (continuations, the PRM adapter scoring traces, the rows the critique stage grades), not the
    search's quality. The random model's steps are mostly cut at the 6-token limit (ending the trace), so the
    searches are shallow: the scripted tests above cover depth."""
    from selfimprove.artifacts import read_json
    from selfimprove.pipeline import Runner, load_pipeline

    run = tmp_path / "run"
    Runner(load_pipeline(Path(__file__).parent / "pipelines" / "tiny_search.yaml"), run, engine=engine,
           log=lambda *_: None).run()
    for stage, strategy in (("search_test", "beam"), ("tree_test", "tree")):
        rows = load_rows(run / "round_001" / stage / "data")
        metrics = read_json(run / "round_001" / stage / "manifest.json")["metrics"]
        problems = list(dict.fromkeys(r["problem_id"] for r in rows))
        assert len(problems) == 3 and {r["search"]["strategy"] for r in rows} == {strategy}
        assert {r["weights"]["label"] for r in rows} == {"base"}  # the PRM is never the policy
        for r in rows:
            s = r["search"]
            assert 1 <= s["depth"] <= 3 and len(s["values"]) == s["depth"] and r["completion"]
            assert all(0 < v < 1 for v in s["values"]) and s["value"] == s["values"][-1]  # a leaf: its own value
            assert r["finish_reason"] in ("stop", "length") and 0 < r["num_tokens"] <= s["problem_tokens"]
        for p in problems:
            ranked = [r["search"]["value"] for r in rows if r["problem_id"] == p]
            assert ranked == sorted(ranked, reverse=True) and (strategy == "tree" or len(ranked) == 1)
        assert metrics["search/engine_calls"] >= (2 if strategy == "beam" else 1)  # chunks of 2 problems, or 1
        assert metrics["search/tokens_per_problem"] == sum(r["search"]["problem_tokens"] for r in
                                                           {r["problem_id"]: r for r in rows}.values()) / 3
    verdicts = load_rows(run / "round_001" / "critique" / "data")
    assert sorted(v["sample_id"] for v in verdicts) == sorted(
        r["sample_id"] for r in load_rows(run / "round_001" / "search_test" / "data"))


def test_the_newline_is_read_from_real_tokens(tiny_model):
    from selfimprove.prm import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    line = tokenizer.encode("7 + 8 = 15.\n", add_special_tokens=False)
    assert to_step(Completion("7 + 8 = 15.", "stop", len(line), line), tokenizer).final is False
    ended = tokenizer.encode("The answer is 425.", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert to_step(Completion("The answer is 425.", "stop", len(ended), ended), tokenizer).final is True
