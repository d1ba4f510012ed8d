"""Compare finished runs (`selfimprove compare RUN_A RUN_B ...`): accuracy per round side by side, the config keys
that differ, whether the final rounds differ by more than chance, and each run's lift over its own base model.

Two runs' intervals can overlap while one run is still better on the same problems, so final rounds are compared
with a paired test on the problems both evaluated (metrics.paired_difference: the difference of first-sample
accuracy with Newcombe's 95% interval and the exact McNemar p-value): each run against the first run (the
baseline), and each run's final round against its own round 0. A large p is not evidence of no difference: the
interval says which differences the data cannot rule out. The two procedures can disagree near the 5% boundary
(the exact test is the more conservative), so both are reported.

Each run is read from its `config.yaml` (flattened to dotted keys; lists compared whole) and, per round, its last
evaluating stage with an `accuracy` (report.evaluations) and that stage's graded rows.
"""

from __future__ import annotations

import html
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .artifacts import load_rows
from .config import flatten
from .metrics import PairedDifference, interval, paired_difference
from .render import accuracy_plot, html_table, image, page, text_table
from .report import collect, evaluations

IGNORED_KEYS = ("name", "runs_dir")
ABSENT = "(absent)"  # the value shown for a key one run's config does not have


@dataclass
class Run:
    path: Path
    label: str
    config: dict
    rounds: list[dict]  # per evaluated round, the manifest of its last evaluating stage with `accuracy`
    final: dict[str, bool]  # problem id → first sample's correctness in the final round's evaluation
    base: dict[str, bool]  # the same for round 0 (the base model), when it was evaluated and is not the final round

    @property
    def final_round(self) -> int | None:
        return self.rounds[-1]["round"] if self.rounds else None


@dataclass
class PairedTest(PairedDifference):
    """`other` − `baseline`: the baseline is `first` (`first_only`: problems only the baseline got right)."""

    baseline: str
    other: str


@dataclass
class Comparison:
    runs: list[Run]
    differing: dict[str, list[Any]]  # dotted key → its value in each run (ABSENT where missing)
    tests: list[PairedTest]  # every run after the first against the first
    lifts: list[PairedTest]  # every run's final round against its own round 0, for the runs that have both


def compare(run_dirs: list[str | Path]) -> Comparison:
    if len(run_dirs) < 2:
        raise ValueError(f"compare needs at least two run directories, got {len(run_dirs)}")
    paths = [Path(d) for d in run_dirs]
    labels = [p.name for p in paths]
    if len(set(labels)) < len(labels):  # same folder name under different parents: show the paths
        labels = [str(p) for p in paths]
    runs = [load_run(p, label) for p, label in zip(paths, labels)]
    tests = [paired_test(runs[0].label, runs[0].final, run.label, run.final) for run in runs[1:]]
    lifts = [paired_test(f"{run.label} round 0", run.base, f"{run.label} round {run.final_round}", run.final)
             for run in runs if run.base]
    return Comparison(runs, differing_keys([r.config for r in runs]), tests, lifts)


def load_run(run_dir: Path, label: str) -> Run:
    """A run's config, its accuracy per round, and its final round's per-problem first-sample correctness."""
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise FileNotFoundError(f"{run_dir}: no config.yaml; is this a run directory?")
    config = yaml.safe_load(config_path.read_text()) or {}
    scored = [[m for m in evaluations(stages) if "accuracy" in m["metrics"]] for stages in collect(run_dir).values()]
    rounds = [s[-1] for s in scored if s]
    final = _first_samples(run_dir, rounds[-1]) if rounds else {}
    base = _first_samples(run_dir, rounds[0]) if len(rounds) > 1 and rounds[0]["round"] == 0 else {}
    return Run(run_dir, label, config, rounds, final, base)


def _first_samples(run_dir: Path, evaluation: dict) -> dict[str, bool]:
    data = run_dir / f"round_{evaluation['round']:03d}" / evaluation["stage"] / "data"
    return first_sample_correct(load_rows(data)) if data.exists() else {}


def first_sample_correct(rows: list[dict]) -> dict[str, bool]:
    """Problem id → whether the problem's first sample (lowest `index`) is correct."""
    # the lowest index is written last
    return {row["problem_id"]: bool(row["correct"]) for row in sorted(rows, key=lambda row: row["index"], reverse=True)}


def differing_keys(configs: list[dict]) -> dict[str, list[Any]]:
    """Dotted key → per-config value, for the keys whose values are not all equal (name, runs_dir ignored)."""
    flat = [flatten({k: v for k, v in c.items() if k not in IGNORED_KEYS}) for c in configs]
    values = {key: [f.get(key, ABSENT) for f in flat] for key in sorted(set().union(*flat))}
    return {key: v for key, v in values.items() if any(x != v[0] for x in v[1:])}


def paired_test(baseline: str, first: dict[str, bool], other: str, second: dict[str, bool]) -> PairedTest:
    """`other` − `baseline` on the problems both evaluated (problem id → first-sample correctness)."""
    shared = sorted(set(first) & set(second))
    d = paired_difference([first[p] for p in shared], [second[p] for p in shared])
    return PairedTest(**vars(d), baseline=baseline, other=other)


# -- rendering ----------------------------------------------------------------------------------------------
def accuracy_table(c: Comparison) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per round any run evaluated, one column per run (accuracy [95% CI])."""
    by_run = [{m["round"]: m["metrics"] for m in run.rounds} for run in c.runs]
    rounds = sorted(set().union(*by_run))
    return (["round", *(run.label for run in c.runs)],
            [[str(r), *(interval(b.get(r, {}), "accuracy") for b in by_run)] for r in rounds])


def config_table(c: Comparison) -> tuple[list[str], list[list[str]]]:
    return (["config key", *(run.label for run in c.runs)],
            [[key, *(v if isinstance(v, str) else json.dumps(v, default=str) for v in values)]
             for key, values in c.differing.items()])


def paired_table(tests: list[PairedTest], rounds: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """One row per paired test; `rounds` (each test's "final rounds" cell) adds that column."""
    header = ["difference", *(["final rounds"] if rounds else []), "problems", "only baseline / only other right",
              "mean", "95% CI (Newcombe, paired)", "p (exact McNemar)"]
    rows = []
    for i, t in enumerate(tests):
        stats = [f"{t.first_only} / {t.second_only}", f"{t.difference:+.1%}", f"[{t.ci_low:+.1%}, {t.ci_high:+.1%}]",
                 f"{t.p_value:.3f}"] if t.problems else ["-"] * 4
        rows.append([f"{t.other} − {t.baseline}", *([rounds[i]] if rounds else []), str(t.problems), *stats])
    return header, rows


NOT_NO_DIFFERENCE = ("A p-value above 0.05 does not show that there is no difference: the interval is the range of "
                     "differences the data cannot rule out.")


def sections(c: Comparison) -> list[tuple[str, tuple[list[str], list[list[str]]], str]]:
    """(title, table, what the table shows) for each part of the comparison, as both views show it."""
    final_rounds = [f"{run.final_round} vs {c.runs[0].final_round}" for run in c.runs[1:]]  # aligned with c.tests
    out = [("Accuracy per round", accuracy_table(c),
            "first-sample accuracy with the 95% interval over problems that each round's evaluating stage reported"),
           ("Config keys that differ", config_table(c), "name and runs_dir left out"),
           ("Paired test of the final rounds", paired_table(c.tests, final_rounds),
            "later run minus the first run in first-sample accuracy, on the problems both evaluated: the problems "
            "only one side got right, Newcombe's 95% interval for a paired difference of proportions (method 10), "
            "the exact McNemar p-value")]
    if c.lifts:
        out.append(("Lift over the base model", paired_table(c.lifts),
                    "each run's final round minus its own round 0 (the base model), paired the same way"))
    return out


def render_text(c: Comparison) -> str:
    parts = [f"{title}: {note}.\n{text_table(*table) if table[1] else '(none)'}" for title, table, note in sections(c)]
    return "\n\n".join([*parts, NOT_NO_DIFFERENCE])


def plot_png(c: Comparison) -> bytes:
    """Accuracy per round of every run on one axes, 95% intervals as error bars; PNG bytes. Runs are shifted a little
    along x so that error bars of the same round do not hide each other."""
    middle = (len(c.runs) - 1) / 2
    series = [(run.label, "accuracy", [(m["round"] + (i - middle) * 0.08, m["metrics"]) for m in run.rounds])
              for i, run in enumerate(c.runs) if run.rounds]
    return accuracy_plot(series, "evaluation accuracy per round")


def render_html(c: Comparison) -> str:
    """One self-contained page (render.page): the plot and the tables."""
    runs = "".join(f"<li><b>{html.escape(r.label)}</b>: {html.escape(str(r.path))}</li>" for r in c.runs)
    parts = [f'<h2>{html.escape(title)}</h2><p class="note">{html.escape(note[:1].upper() + note[1:])}.</p>'
             f"{html_table(*table) if table[1] else '<p>(none)</p>'}" for title, table, note in sections(c)]
    plot = image(plot_png(c), "accuracy per round of every run, with 95% intervals")
    return page(f"comparison of {len(c.runs)} runs", f"<h1>Comparison of {len(c.runs)} runs</h1><ul>{runs}</ul>"
                f"{plot}{''.join(parts)}<p class=\"note\">{NOT_NO_DIFFERENCE}</p>")


def main(run_dirs: list[str], out: str | None) -> int:
    """`selfimprove compare RUN_A RUN_B ... [--out page.html]`: print the comparison; write the HTML page to `out`
    when given. Returns 2 (with the reason on stderr) for fewer than two runs or a folder that is not a run."""
    try:
        comparison = compare(run_dirs)
    except (ValueError, FileNotFoundError) as err:
        print(f"compare: {err}", file=sys.stderr)
        return 2
    print(render_text(comparison))
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_html(comparison))
        print(f"\nwrote {path}")
    return 0
