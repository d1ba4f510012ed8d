"""What the run report shows, read from the stage manifests alone (so it works on partial and finished runs, for
any stage a user writes, and `selfimprove report <run dir>` redraws it at any time): the per-round table and the
plots. report_html.py writes them out, as report.md and report.html.

Each stage's manifest carries the cells the stage contributes to its round's row (`report`, from the stage's
`report(metrics)`), its metrics, whether it evaluates, and the outputs it wrote; stages are read in the order
the run's config.yaml lists them.

    plots/accuracy.png   per round: accuracy (strict, flexible) and, for two-attempt evaluations, Acc@t1 and
                         Acc@t2, with their 95% intervals as error bars (Wilson for proportions, metrics.py)
    plots/rl.png         per RL step, across rounds and stages: mean reward of each attempt and its KL to the base
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import yaml

from .artifacts import MANIFEST, read_json
from .render import accuracy_plot, figure, png, text_table

# The columns in the order they are shown; a stage's cells for other columns are appended after these.
COLUMNS = ["round", "weights", "accuracy [95% CI]", "flexible", "Acc@t1 [95% CI]", "Acc@t2 [95% CI]",
           "Δ(t1,t2) [95% CI]", "Δi→c", "Δc→i", "B-STaR choice", "kept", "rationalized", "B-STaR pass@k / balance",
           "trained on", "train loss", "RL reward", "seconds per stage", "peak RSS MiB",
           "peak memory MiB, all processes"]


def collect(run_dir: str | Path) -> dict[int, list[dict]]:
    """Round → the manifests of its finished stages, in the order the run's config.yaml lists them (the order they
    run in a round)."""
    run_dir = Path(run_dir)
    rounds: dict[int, list[dict]] = defaultdict(list)
    order = list(yaml.safe_load((run_dir / "config.yaml").read_text())["stages"])
    paths = [round_dir / name / MANIFEST for round_dir in sorted(run_dir.glob("round_*")) for name in order]
    for m in [read_json(path) for path in paths if path.exists()]:
        if m.get("done"):
            rounds[m["round"]].append(m)
    return dict(sorted(rounds.items()))


def evaluations(stages: list[dict]) -> list[dict]:
    """The manifests of a round's evaluating stages (evaluate, evaluate_self_correction, a user's own)."""
    return [m for m in stages if m.get("evaluates")]


def table(run_dir: str | Path) -> tuple[list[str], list[list[str]]]:
    rows: list[dict[str, str]] = []
    for round_index, stages in collect(run_dir).items():
        evals = evaluations(stages)
        others = [m.get("report", {}) for m in stages if not m.get("evaluates")]
        row = {"round": str(round_index), **(evals[-1].get("report", {}) if evals else {})}
        for column in {k for cells in others for k in cells}:  # several stages' cells for one column: all of them
            row[column] = ", ".join(cells[column] for cells in others if column in cells)
        row["seconds per stage"] = " ".join(f"{m['stage']}={m['seconds']:.0f}" for m in stages)
        row["peak RSS MiB"] = f"{max(m.get('peak_rss_mib') or 0 for m in stages):.0f}"
        totals = [m["peak_memory_mib"] for m in stages if m.get("peak_memory_mib")]
        if totals:  # the run's processes together (the engine's subprocesses included)
            row["peak memory MiB, all processes"] = f"{max(totals):.0f}"
        failover = [(m["stage"], m["metrics"]) for m in stages
                    if m["metrics"].get("failover_requests_moved") or m["metrics"].get("failover_servers_lost")]
        if failover:  # a served engine lost servers: per stage, servers lost / requests moved / seconds lost
            row["failover (lost/moved/s)"] = " ".join(
                f"{stage}={f['failover_servers_lost']:g}/{f['failover_requests_moved']:g}/{f['failover_seconds_lost']:.0f}"
                for stage, f in failover)
        rows.append(row)
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    header = [c for c in COLUMNS + extra if c == "round" or any(r.get(c, "-") != "-" for r in rows)]
    return header, [[r.get(c, "-") for c in header] for r in rows]


def markdown_table(run_dir: str | Path) -> str:
    return text_table(*table(run_dir))


def rl_steps(run_dir: str | Path) -> list[dict]:
    """Every RL step of the run's finished rl stages, in training order, with its round and stage: the
    `steps.jsonl` each such stage lists among its outputs."""
    run_dir = Path(run_dir)
    out = []
    for round_index, stages in collect(run_dir).items():
        for m in stages:
            if "steps.jsonl" in m.get("outputs", []):
                path = run_dir / f"round_{round_index:03d}" / m["stage"] / "steps.jsonl"
                out += [{"round": round_index, "stage": m["stage"], **json.loads(line)}
                        for line in path.read_text().splitlines() if line.strip()]
    return out


def plot(run_dir: str | Path) -> dict[str, bytes]:
    """Draw plots/accuracy.png and plots/rl.png (when the run has the data for them); returns name → PNG."""
    run_dir = Path(run_dir)
    drawn = {name: data for name, data in (("accuracy", _plot_accuracy(run_dir)), ("rl", _plot_rl(run_dir))) if data}
    for name, data in drawn.items():
        (run_dir / "plots").mkdir(exist_ok=True)
        (run_dir / "plots" / f"{name}.png").write_bytes(data)
    return drawn


def _plot_accuracy(run_dir: Path) -> bytes | None:
    per_round = [(r, evaluations(stages)[-1]["metrics"]) for r, stages in collect(run_dir).items() if evaluations(stages)]
    series = [(label, key, [(r, m) for r, m in per_round if key in m])
              for key, label in (("accuracy", "accuracy (strict)"), ("accuracy_flexible", "accuracy (flexible)"),
                                 ("accuracy@t1", "Acc@t1"), ("accuracy@t2", "Acc@t2"))]
    series = [s for s in series if s[2]]
    return accuracy_plot(series, f"{run_dir.name}: evaluation per round") if series else None


def _plot_rl(run_dir: Path) -> bytes | None:
    from matplotlib.ticker import MaxNLocator

    steps = rl_steps(run_dir)
    if not steps:
        return None
    fig = figure(7, 6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    xs = list(range(1, len(steps) + 1))
    for ax, prefix in ((top, "reward/"), (bottom, "kl/")):
        for key in sorted({k for s in steps for k in s if k.startswith(prefix)}):
            # a step without an update has no KL (None): a gap in the line, not a 0
            ax.plot(xs, [float("nan") if s.get(key) is None else s[key] for s in steps], marker=".",
                    label=f"mean {key}" if prefix == "reward/" else key)
    # the first step of each (round, stage): a dashed line before it, its name in the title
    starts = [i for i in range(len(steps)) if i == 0 or
              (steps[i]["round"], steps[i]["stage"]) != (steps[i - 1]["round"], steps[i - 1]["stage"])]
    for ax in (top, bottom):
        for i in starts[1:]:
            ax.axvline(i + 0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.grid(alpha=0.3)
        ax.legend()
    spans = ", ".join(f"r{steps[i]['round']} {steps[i]['stage']}" for i in starts)
    top.set(ylabel="reward", title=f"{run_dir.name}: RL steps ({spans})")
    bottom.set(xlabel="RL step (all rounds and stages, in order)", ylabel="KL to base (k3)")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    return png(fig)
