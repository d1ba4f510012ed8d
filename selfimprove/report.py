"""The run report: a per-round table and plots, built from the stage manifests alone (so it works on partial
and finished runs, for any stage a user writes, and `selfimprove report <run dir>` redraws it at any time).

Each stage's manifest carries the cells the stage contributes to its round's row (`report`, from the stage's
`report(metrics)`), its metrics, whether it evaluates, and the outputs it wrote; stages are read in the order
the run's config.yaml lists them.

    report.md            the table (only the columns some round has values for) and the plots below
    report.html          one self-contained page: the table, every plot, B-STaR, critic quality, examples
                         (report_html.py)
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

# The columns in the order they are shown; a stage's cells for other columns are appended after these.
COLUMNS = ["round", "weights", "accuracy [95% CI]", "flexible", "Acc@t1 [95% CI]", "Acc@t2 [95% CI]",
           "Δ(t1,t2) [95% CI]", "Δi→c", "Δc→i", "B-STaR choice", "kept", "rationalized", "B-STaR pass@k / balance",
           "trained on",
           "train loss", "RL reward", "seconds per stage", "peak RSS MiB", "peak memory MiB, all processes"]


def stage_order(run_dir: str | Path) -> list[str]:
    """The stages of the run, in the order its config.yaml lists them (the order they run in a round)."""
    return list(yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["stages"])


def collect(run_dir: str | Path) -> dict[int, list[dict]]:
    """Round → the manifests of its finished stages, in config order."""
    run_dir = Path(run_dir)
    rounds: dict[int, list[dict]] = defaultdict(list)
    order = stage_order(run_dir)
    for round_dir in sorted(run_dir.glob("round_*")):
        for name in order:
            path = round_dir / name / MANIFEST
            if path.exists():
                m = read_json(path)
                if m.get("done"):
                    rounds[m["round"]].append(m)
    return dict(sorted(rounds.items()))


def evaluations(stages: list[dict]) -> list[dict]:
    """The manifests of a round's evaluating stages (evaluate, evaluate_self_correction, a user's own)."""
    return [m for m in stages if m.get("evaluates")]


def _joined(cells: list[dict], column: str) -> str:
    values = [c[column] for c in cells if column in c]
    return ", ".join(values) if values else "-"


def table(run_dir: str | Path) -> tuple[list[str], list[list[str]]]:
    rows: list[dict[str, str]] = []
    for round_index, stages in collect(run_dir).items():
        evals = evaluations(stages)
        others = [m.get("report", {}) for m in stages if not m.get("evaluates")]
        row = {"round": str(round_index)}
        if evals:
            row.update(evals[-1].get("report", {}))
        for column in {k for cells in others for k in cells}:
            row[column] = _joined(others, column)
        row["seconds per stage"] = " ".join(f"{m['stage']}={m['seconds']:.0f}" for m in stages)
        row["peak RSS MiB"] = f"{max(m.get('peak_rss_mib') or 0 for m in stages):.0f}"
        totals = [m["peak_memory_mib"] for m in stages if m.get("peak_memory_mib")]
        if totals:  # the run's processes together (the engine's subprocesses included)
            row["peak memory MiB, all processes"] = f"{max(totals):.0f}"
        failover = [(m["stage"], m["metrics"]) for m in stages if m.get("metrics", {}).get("failover_requests_moved")
                    or m.get("metrics", {}).get("failover_servers_lost")]
        if failover:  # a served engine lost servers: per stage, servers lost / requests moved / seconds lost
            row["failover (lost/moved/s)"] = " ".join(
                f"{stage}={f['failover_servers_lost']:g}/{f['failover_requests_moved']:g}/{f['failover_seconds_lost']:.0f}"
                for stage, f in failover)
        rows.append(row)
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    header = [c for c in COLUMNS + extra if c == "round" or any(r.get(c, "-") != "-" for r in rows)]
    return header, [[r.get(c, "-") for c in header] for r in rows]


def markdown_table(run_dir: str | Path) -> str:
    header, rows = table(run_dir)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


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


def plot(run_dir: str | Path) -> list[Path]:
    """Draw plots/accuracy.png and plots/rl.png (when the run has the data for them); returns what was written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    run_dir = Path(run_dir)
    return [p for p in (_plot_accuracy(run_dir), _plot_rl(run_dir)) if p is not None]


def _plot_accuracy(run_dir: Path) -> Path | None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    per_round = [(r, evaluations(stages)[-1]["metrics"]) for r, stages in collect(run_dir).items() if evaluations(stages)]
    series = [(k, label) for k, label in (("accuracy", "accuracy (strict)"), ("accuracy_flexible", "accuracy (flexible)"),
                                          ("accuracy@t1", "Acc@t1"), ("accuracy@t2", "Acc@t2"))
              if any(k in m for _, m in per_round)]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in series:
        points = [(r, m) for r, m in per_round if key in m]
        low = [m[key] - m.get(f"{key}_ci_low", m[key]) for _, m in points]
        high = [m.get(f"{key}_ci_high", m[key]) - m[key] for _, m in points]
        ax.errorbar([r for r, _ in points], [m[key] for _, m in points], yerr=[low, high], marker="o", capsize=3,
                    label=label)
    ax.set(xlabel="round (0 = base model)", ylabel="accuracy", title=f"{run_dir.name}: evaluation per round")
    ax.set_xticks(sorted({r for r, _ in per_round}))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    return _save(fig, [ax], run_dir / "plots" / "accuracy.png")


def _plot_rl(run_dir: Path) -> Path | None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = rl_steps(run_dir)
    if not steps:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    xs = list(range(1, len(steps) + 1))
    for ax, prefix in ((top, "reward/"), (bottom, "kl/")):
        for key in sorted({k for s in steps for k in s if k.startswith(prefix)}):
            # a step without an update has no KL (None): a gap in the line, not a 0
            ax.plot(xs, [float("nan") if s.get(key) is None else s[key] for s in steps], marker=".",
                    label=f"mean {key}" if prefix == "reward/" else key)
    for i in range(1, len(steps)):
        if (steps[i]["round"], steps[i]["stage"]) != (steps[i - 1]["round"], steps[i - 1]["stage"]):
            for ax in (top, bottom):
                ax.axvline(i + 0.5, color="grey", linestyle="--", linewidth=0.8)
    top.set(ylabel="reward", title=f"{run_dir.name}: RL steps ({', '.join(_stage_spans(steps))})")
    bottom.set(xlabel="RL step (all rounds and stages, in order)", ylabel="KL to base (k3)")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, [top, bottom], run_dir / "plots" / "rl.png")


def _save(fig, axes, path: Path) -> Path:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _stage_spans(steps: list[dict]) -> list[str]:
    spans: list[str] = []
    previous = None
    for s in steps:
        key = (s["round"], s["stage"])
        if key != previous:
            spans.append(f"r{s['round']} {s['stage']}")
            previous = key
    return spans


def write_report(run_dir: str | Path, log=print) -> list[dict]:
    """Write `report.md` and its plots, print the table, and return the evaluating stages' metrics per round."""
    run_dir = Path(run_dir)
    text = markdown_table(run_dir)
    plots = plot(run_dir)
    images = "".join(f"\n![{p.stem}](plots/{p.name})\n" for p in plots)
    (run_dir / "report.md").write_text(f"# {run_dir.name}\n\n{text}\n{images}")
    from .report_html import write_html  # here, not at the top: report_html imports this module

    write_html(run_dir, plots)
    log(text)
    return [{"round": r, **m["metrics"]} for r, stages in collect(run_dir).items() for m in evaluations(stages)]
