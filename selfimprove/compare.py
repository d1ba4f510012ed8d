"""Compare finished runs: accuracy per round side by side, the config keys that differ, whether the final
rounds differ by more than chance, and each run's lift over its own base model
(`selfimprove compare RUN_A RUN_B ...`).

Two runs' intervals can overlap while one run is still better on the same problems, so the final rounds are
compared with a paired test on the problems both evaluated, not by eyeballing their separate intervals.

What is read from each run directory:
- `config.yaml` (the resolved config), flattened to dotted keys (`stages.generate.sampling.n`); lists are
  compared whole. `name` and `runs_dir` are left out: they differ between any two runs by construction;
- per round, the last finished evaluating stage (`"evaluates": true` in its manifest) whose metrics have
  `accuracy`: its `accuracy`, `accuracy_ci_low`, `accuracy_ci_high` (report.collect / report.evaluations);
- for the final round (the highest round with such an evaluation) and for round 0 (the base model), that
  stage's graded rows (`data/`): per problem, the `correct` of its first sample (lowest `index`), the sample
  `accuracy` is computed from.

The paired tests (metrics.paired_difference), on the problems both sides evaluated: each run's final round
against the first run's (the baseline), and each run's final round against its own round 0 (its lift over the
base model). With b the problems only the earlier side (baseline, or base) got right and c those only the other
got right, the reported difference is (c − b) / problems, its 95% interval is Newcombe's square-and-add interval
for paired proportions (method 10), and its p-value the exact McNemar test (two-sided binomial test of c against
b + c discordant problems at 1/2). A large p is not evidence of no difference: the interval says which
differences the data cannot rule out, and that interval is what the tables report. The two are separate
procedures and can disagree near the 5% boundary (the exact test is the more conservative): with few discordant
problems an interval that just excludes 0 can sit beside a p above 0.05, so report both.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .artifacts import load_rows
from .metrics import paired_difference
from .report import collect, evaluations

IGNORED_KEYS = ("name", "runs_dir")
ABSENT = "(absent)"  # the value shown for a key one run's config does not have


@dataclass
class RoundAccuracy:
    round: int
    stage: str
    accuracy: float
    ci_low: float | None
    ci_high: float | None


@dataclass
class Run:
    path: Path
    label: str
    config: dict
    rounds: list[RoundAccuracy]
    final: dict[str, float]  # problem id → first sample's correctness (0.0 / 1.0) in the final round's evaluation
    base: dict[str, float]  # the same for round 0 (the base model), when it was evaluated and is not the final round

    @property
    def final_round(self) -> int | None:
        return self.rounds[-1].round if self.rounds else None


@dataclass
class PairedTest:
    baseline: str
    other: str
    problems: int  # problems both sides evaluated
    baseline_only: int  # problems only the baseline got right (b)
    other_only: int  # problems only the other got right (c)
    difference: float  # (c − b) / problems: other − baseline; NaN with no shared problem
    ci_low: float  # Newcombe's paired interval
    ci_high: float
    p_value: float  # exact McNemar


@dataclass
class Comparison:
    runs: list[Run]
    differing: dict[str, list[Any]]  # dotted key → its value in each run (ABSENT where missing)
    tests: list[PairedTest]  # every run after the first against the first
    lifts: list[PairedTest]  # every run's final round against its own round 0, for the runs that have both


def compare(run_dirs: list[str | Path]) -> Comparison:
    """Read the runs and compare them (module docstring)."""
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
    rounds: list[RoundAccuracy] = []
    for round_index, stages in collect(run_dir).items():
        scored = [m for m in evaluations(stages) if "accuracy" in m["metrics"]]
        if scored:
            m = scored[-1]
            rounds.append(RoundAccuracy(round_index, m["stage"], m["metrics"]["accuracy"],
                                        m["metrics"].get("accuracy_ci_low"), m["metrics"].get("accuracy_ci_high")))
    final = _first_samples(run_dir, rounds[-1]) if rounds else {}
    base = _first_samples(run_dir, rounds[0]) if len(rounds) > 1 and rounds[0].round == 0 else {}
    return Run(run_dir, label, config, rounds, final, base)


def _first_samples(run_dir: Path, evaluation: RoundAccuracy) -> dict[str, float]:
    data = run_dir / f"round_{evaluation.round:03d}" / evaluation.stage / "data"
    return first_sample_correct(load_rows(data)) if data.exists() else {}


def first_sample_correct(rows: list[dict]) -> dict[str, float]:
    """Problem id → 1.0 / 0.0: whether the problem's first sample (lowest `index`) is correct."""
    first: dict[str, dict] = {}
    for row in rows:
        pid = row["problem_id"]
        if pid not in first or row["index"] < first[pid]["index"]:
            first[pid] = row
    return {pid: float(bool(row["correct"])) for pid, row in first.items()}


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys: {"a": {"b": 1}} → {"a.b": 1}; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def differing_keys(configs: list[dict]) -> dict[str, list[Any]]:
    """Dotted key → per-config value, for the keys whose values are not all equal (name, runs_dir ignored)."""
    flat = [flatten({k: v for k, v in c.items() if k not in IGNORED_KEYS}) for c in configs]
    keys = sorted(set().union(*flat))
    out = {}
    for key in keys:
        values = [f.get(key, ABSENT) for f in flat]
        if any(v != values[0] for v in values[1:]):
            out[key] = values
    return out


def paired_test(baseline: str, first: dict[str, float], other: str, second: dict[str, float]) -> PairedTest:
    """`other` − `baseline` on the problems both evaluated (problem id → first-sample correctness; module
    docstring)."""
    shared = sorted(set(first) & set(second))
    d = paired_difference([bool(first[p]) for p in shared], [bool(second[p]) for p in shared])
    return PairedTest(baseline, other, d.problems, d.first_only, d.second_only, d.difference, d.ci_low, d.ci_high,
                      d.p_value)


# -- rendering ----------------------------------------------------------------------------------------------
def _percent_interval(r: RoundAccuracy | None) -> str:
    if r is None:
        return "-"
    if r.ci_low is None or r.ci_high is None:
        return f"{r.accuracy:.1%}"
    return f"{r.accuracy:.1%} [{r.ci_low:.1%}, {r.ci_high:.1%}]"


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def accuracy_table(c: Comparison) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per round any run evaluated, one column per run (accuracy [95% CI])."""
    by_run = [{r.round: r for r in run.rounds} for run in c.runs]
    rounds = sorted(set().union(*by_run))
    return (["round", *(run.label for run in c.runs)],
            [[str(r), *(_percent_interval(b.get(r)) for b in by_run)] for r in rounds])


def config_table(c: Comparison) -> tuple[list[str], list[list[str]]]:
    return (["config key", *(run.label for run in c.runs)],
            [[key, *(_value(v) for v in values)] for key, values in c.differing.items()])


def paired_table(tests: list[PairedTest], rounds: dict[str, str] | None = None) -> tuple[list[str], list[list[str]]]:
    """One row per paired test; `rounds` (test label → "final rounds" cell) adds that column."""
    header = ["difference", *(["final rounds"] if rounds else []), "problems", "only baseline / only other right",
              "mean", "95% CI (Newcombe, paired)", "p (exact McNemar)"]
    rows = []
    for t in tests:
        label = f"{t.other} − {t.baseline}"
        cells = [label, *([rounds[label]] if rounds else []), str(t.problems)]
        if t.problems == 0:
            rows.append([*cells, "-", "-", "-", "-"])
        else:
            rows.append([*cells, f"{t.baseline_only} / {t.other_only}", f"{t.difference:+.1%}",
                         f"[{t.ci_low:+.1%}, {t.ci_high:+.1%}]", f"{t.p_value:.3f}"])
    return header, rows


def _final_rounds(c: Comparison) -> dict[str, str]:
    runs = {run.label: run for run in c.runs}
    return {f"{t.other} − {t.baseline}": f"{runs[t.other].final_round} vs {runs[t.baseline].final_round}"
            for t in c.tests}


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


def render_text(c: Comparison) -> str:
    """The terminal view: accuracy per round, differing config keys, paired tests."""
    parts = ["Accuracy per round (first sample per problem, 95% interval as each evaluation reported it):",
             _text_table(*accuracy_table(c))]
    header, rows = config_table(c)
    parts += ["", "Config keys that differ:", _text_table(header, rows) if rows else "(none)"]
    parts += ["", "Paired test of the final rounds (per-problem first-sample correctness on the problems both "
                  "evaluated):", _text_table(*paired_table(c.tests, _final_rounds(c)))]
    if c.lifts:
        parts += ["", "Lift over the base model (final round − round 0 of the same run, paired):",
                  _text_table(*paired_table(c.lifts))]
    parts += ["", "A p-value above 0.05 does not show that there is no difference: the interval is the range of "
                  "differences the data cannot rule out."]
    return "\n".join(parts)


def plot_png(c: Comparison) -> bytes:
    """Accuracy per round of every run on one axes, 95% intervals as error bars; PNG bytes (matplotlib Agg).

    Runs are shifted a little along x so that error bars of the same round do not hide each other."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.08
    for i, run in enumerate(c.runs):
        if not run.rounds:
            continue
        shift = (i - (len(c.runs) - 1) / 2) * width
        ys = [r.accuracy for r in run.rounds]
        low = [r.accuracy - (r.ci_low if r.ci_low is not None else r.accuracy) for r in run.rounds]
        high = [(r.ci_high if r.ci_high is not None else r.accuracy) - r.accuracy for r in run.rounds]
        ax.errorbar([r.round + shift for r in run.rounds], ys, yerr=[low, high], marker="o", capsize=3, label=run.label)
    ax.set(xlabel="round (0 = base model)", ylabel="accuracy", title="evaluation accuracy per round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    if any(run.rounds for run in c.runs):
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td { font-family: ui-monospace, monospace; }
p.note { color: #555; font-size: 0.9em; max-width: 60em; }
"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(c: Comparison) -> str:
    """One self-contained page: inline CSS, the plot as an inline base64 PNG, the three tables."""
    image = base64.b64encode(plot_png(c)).decode("ascii")
    runs = "".join(f"<li><b>{html.escape(r.label)}</b>: {html.escape(str(r.path))}</li>" for r in c.runs)
    header, rows = config_table(c)
    config = _html_table(header, rows) if rows else "<p>No config key differs (name and runs_dir ignored).</p>"
    lifts = (f"<h2>Lift over the base model</h2>{_html_table(*paired_table(c.lifts))}" if c.lifts else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>selfimprove: comparison of {len(c.runs)} runs</title>
<style>{_CSS}</style></head>
<body>
<h1>Comparison of {len(c.runs)} runs</h1>
<ul>{runs}</ul>
<h2>Accuracy per round</h2>
<img src="data:image/png;base64,{image}" alt="accuracy per round of every run, with 95% intervals">
{_html_table(*accuracy_table(c))}
<p class="note">Accuracy of the first sample per problem, with its 95% interval over problems as each round's
evaluating stage reported it.</p>
<h2>Config keys that differ</h2>
{config}
<h2>Paired test of the final rounds</h2>
{_html_table(*paired_table(c.tests, _final_rounds(c)))}
{lifts}
<p class="note">On the problems both sides evaluated: the difference in first-sample accuracy (later run minus the
first run; a run's final round minus its round 0), the problems only one side got right, Newcombe's 95%
interval for a paired difference of proportions (method 10), and the exact McNemar p-value. A p-value above 0.05
does not show that there is no difference: the interval is the range of differences the data cannot rule
out.</p>
</body></html>
"""


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
