"""Compare finished runs: accuracy per round side by side, the config keys that differ, and whether the final
rounds differ by more than chance (`selfimprove compare RUN_A RUN_B ...`).

Two runs' intervals can overlap while one run is still better on the same problems, so the final rounds are
compared with a paired test on the problems both evaluated, not by eyeballing their separate intervals.

What is read from each run directory:
- `config.yaml` (the resolved config), flattened to dotted keys (`stages.generate.sampling.n`); lists are
  compared whole. `name` and `runs_dir` are left out: they differ between any two runs by construction;
- per round, the last finished evaluating stage (`"evaluates": true` in its manifest) whose metrics have
  `accuracy`: its `accuracy`, `accuracy_ci_low`, `accuracy_ci_high` (report.collect / report.evaluations);
- for the final round (the highest round with such an evaluation), that stage's graded rows (`data/`): per
  problem, the `correct` of its first sample (lowest `index`), the sample `accuracy` is computed from.

The paired test (each run against the first run given, the baseline): on the problems both final rounds
evaluated, sorted by id, d_j = correct_other(j) − correct_baseline(j) ∈ {−1, 0, 1}. The reported difference is
mean(d). Its 95% interval is the percentile bootstrap of metrics.bootstrap_ci: `resamples` resamples of the
problems with replacement (a problem's two outcomes move together, which is what makes it paired), drawn from
random.Random(seed) exactly as bootstrap_ci draws, so the interval equals bootstrap_ci(d). The p-value is the
two-sided bootstrap p-value of the null "mean difference 0" by shifting the resampled means to that null
(Efron & Tibshirani 1993, §16.4): p = (1 + #{b : |m*_b − mean(d)| >= |mean(d)|}) / (resamples + 1), with m*_b the
b-th resample's mean; the +1s (Davison & Hinkley 1997) keep p above 0, since a finite number of resamples cannot
show a probability of 0.
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .artifacts import load_rows
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

    @property
    def final_round(self) -> int | None:
        return self.rounds[-1].round if self.rounds else None


@dataclass
class PairedTest:
    baseline: str
    other: str
    problems: int  # problems both final rounds evaluated
    difference: float  # mean of other − baseline; NaN with no shared problem
    ci_low: float
    ci_high: float
    p_value: float


@dataclass
class Comparison:
    runs: list[Run]
    differing: dict[str, list[Any]]  # dotted key → its value in each run (ABSENT where missing)
    tests: list[PairedTest]  # every run after the first against the first


def compare(run_dirs: list[str | Path], seed: int = 0, resamples: int = 1000) -> Comparison:
    """Read the runs and compare them (module docstring)."""
    if len(run_dirs) < 2:
        raise ValueError(f"compare needs at least two run directories, got {len(run_dirs)}")
    paths = [Path(d) for d in run_dirs]
    labels = [p.name for p in paths]
    if len(set(labels)) < len(labels):  # same folder name under different parents: show the paths
        labels = [str(p) for p in paths]
    runs = [load_run(p, label) for p, label in zip(paths, labels)]
    tests = [paired_test(runs[0], run, seed, resamples) for run in runs[1:]]
    return Comparison(runs, differing_keys([r.config for r in runs]), tests)


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
    final: dict[str, float] = {}
    if rounds:
        data = run_dir / f"round_{rounds[-1].round:03d}" / rounds[-1].stage / "data"
        if data.exists():
            final = first_sample_correct(load_rows(data))
    return Run(run_dir, label, config, rounds, final)


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


def paired_test(baseline: Run, other: Run, seed: int = 0, resamples: int = 1000) -> PairedTest:
    """`other` − `baseline` on their final rounds' shared problems (module docstring)."""
    shared = sorted(set(baseline.final) & set(other.final))
    diffs = [other.final[p] - baseline.final[p] for p in shared]
    return PairedTest(baseline.label, other.label, len(shared), *paired_bootstrap(diffs, seed, resamples))


def paired_bootstrap(diffs: list[float], seed: int = 0, resamples: int = 1000,
                     level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, interval low, interval high, two-sided p) of paired differences, one per problem.

    Resamples are drawn as metrics.bootstrap_ci draws them, so (low, high) == bootstrap_ci(diffs, seed, ...)."""
    if not diffs:
        nan = float("nan")
        return nan, nan, nan, nan
    rng = random.Random(seed)
    n = len(diffs)
    mean = sum(diffs) / n
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    low = means[int((1 - level) / 2 * resamples)]
    high = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    # |m* − mean| >= |mean|, with a tolerance so that equal sums of 0/±1 values compare equal after division
    extreme = sum(abs(m - mean) >= abs(mean) - 1e-12 for m in means)
    return mean, low, high, (1 + extreme) / (resamples + 1)


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


def paired_table(c: Comparison) -> tuple[list[str], list[list[str]]]:
    runs = {run.label: run for run in c.runs}
    rows = []
    for t in c.tests:
        rounds = f"{runs[t.other].final_round} vs {runs[t.baseline].final_round}"
        if t.problems == 0:
            rows.append([f"{t.other} − {t.baseline}", rounds, "0", "-", "-", "-"])
        else:
            rows.append([f"{t.other} − {t.baseline}", rounds, str(t.problems), f"{t.difference:+.1%}",
                         f"[{t.ci_low:+.1%}, {t.ci_high:+.1%}]", f"{t.p_value:.3f}"])
    return ["difference", "final rounds", "problems", "mean", "95% CI", "p (two-sided)"], rows


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


def render_text(c: Comparison) -> str:
    """The terminal view: accuracy per round, differing config keys, paired tests."""
    parts = ["Accuracy per round (first sample per problem, 95% bootstrap interval):", _text_table(*accuracy_table(c))]
    header, rows = config_table(c)
    parts += ["", "Config keys that differ:", _text_table(header, rows) if rows else "(none)"]
    parts += ["", "Paired bootstrap test of the final rounds (per-problem first-sample correctness, problems "
                  "resampled jointly):", _text_table(*paired_table(c))]
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
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>selfimprove: comparison of {len(c.runs)} runs</title>
<style>{_CSS}</style></head>
<body>
<h1>Comparison of {len(c.runs)} runs</h1>
<ul>{runs}</ul>
<h2>Accuracy per round</h2>
<img src="data:image/png;base64,{image}" alt="accuracy per round of every run, with 95% intervals">
{_html_table(*accuracy_table(c))}
<p class="note">Accuracy of the first sample per problem, with its 95% percentile-bootstrap interval over problems,
from each round's evaluating stage.</p>
<h2>Config keys that differ</h2>
{config}
<h2>Paired test of the final rounds</h2>
{_html_table(*paired_table(c))}
<p class="note">On the problems both final rounds evaluated: the mean of the per-problem difference in first-sample
correctness (later run minus the first run), its 95% percentile-bootstrap interval (problems resampled jointly),
and the two-sided bootstrap p-value of a zero difference (resampled means shifted to the null).</p>
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
