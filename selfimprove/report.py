"""The run report: a per-round table and plots, built from the stage manifests and the RL stages' step records
(so it works on partial and finished runs, and `selfimprove report <run dir>` redraws it at any time).

    report.md            the table (only the columns some round has values for) and the plots below
    plots/accuracy.png   per round: accuracy (strict, flexible) and, for two-attempt evaluations, Acc@t1 and
                         Acc@t2, with their 95% bootstrap intervals as error bars
    plots/rl.png         per RL step, across rounds and stages: mean reward of each attempt and its KL to the base
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import yaml

from .artifacts import MANIFEST, read_json


def collect(run_dir: str | Path) -> dict[int, list[dict]]:
    """Round → the manifests of its finished stages, in the order they finished."""
    rounds: dict[int, list[dict]] = defaultdict(list)
    for manifest in Path(run_dir).glob(f"round_*/*/{MANIFEST}"):
        m = read_json(manifest)
        if m.get("done"):
            rounds[m["round"]].append(m)
    for stages in rounds.values():
        stages.sort(key=lambda m: m["finished_at"])
    return dict(sorted(rounds.items()))


def evaluations(stages: list[dict]) -> list[dict]:
    """The manifests of a round's evaluating stages (evaluate, evaluate_self_correction, a user's own)."""
    return [m for m in stages if m.get("evaluates", m["type"] == "evaluate")]


def _interval(m: dict, key: str, signed: bool = False) -> str:
    if key not in m:
        return "-"
    fmt = "+.1%" if signed else ".1%"
    low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    text = format(m[key], fmt)
    return f"{text} [{low:.1%}, {high:.1%}]" if low is not None and high is not None else text


def _rl_rewards(stages: list[dict]) -> str:
    """Per rl stage: the last attempt's mean reward at its first and last step, and over all steps."""
    parts = []
    for m in (s for s in stages if s["type"] == "rl"):
        keys = sorted(k[: -len("/mean")] for k in m["metrics"] if k.startswith("reward@") and k.endswith("/mean"))
        if keys:
            k = keys[-1]
            mm = m["metrics"]
            parts.append(f"{m['stage']} {k}: {mm[k + '/first']:.3f}→{mm[k + '/last']:.3f} (mean {mm[k + '/mean']:.3f})")
    return "; ".join(parts) or "-"


def _trained_on(stages: list[dict]) -> str:
    parts = []
    for m in stages:
        metrics = m["metrics"]
        if m["type"] == "rl":
            parts.append(f"{metrics['steps']} RL steps")
        elif m["type"] == "train":
            if not metrics.get("trained"):
                parts.append("nothing")
            else:
                parts.append(f"{metrics['pairs']} pairs" if "pairs" in metrics else f"{metrics.get('examples', 0)} examples")
    return ", ".join(parts) or "-"


def table(run_dir: str | Path) -> tuple[list[str], list[list[str]]]:
    columns = {
        "round": lambda r, s, ev: str(r),
        "weights": lambda r, s, ev: ev.get("weights", "-"),
        "accuracy [95% CI]": lambda r, s, ev: _interval(ev, "accuracy"),
        "flexible": lambda r, s, ev: f"{ev['accuracy_flexible']:.1%}" if "accuracy_flexible" in ev else "-",
        "Acc@t1 [95% CI]": lambda r, s, ev: _interval(ev, "accuracy@t1"),
        "Acc@t2 [95% CI]": lambda r, s, ev: _interval(ev, "accuracy@t2"),
        "Δ(t1,t2) [95% CI]": lambda r, s, ev: _interval(ev, "delta_t1_t2", signed=True),
        "Δi→c": lambda r, s, ev: _interval(ev, "delta_i_to_c"),
        "Δc→i": lambda r, s, ev: _interval(ev, "delta_c_to_i"),
        "kept": lambda r, s, ev: next((str(m["metrics"]["examples"]) for m in s if m["type"] == "filter"), "-"),
        "rationalized": lambda r, s, ev: next((str(m["metrics"]["rationalized"]) for m in s if m["type"] == "filter"), "-"),
        "trained on": lambda r, s, ev: _trained_on(s),
        "train loss": lambda r, s, ev: next((f"{m['metrics']['first_loss']:.3f}→{m['metrics']['final_loss']:.3f}"
                                             for m in s if m["type"] == "train"
                                             and m["metrics"].get("final_loss") is not None), "-"),
        "RL reward": lambda r, s, ev: _rl_rewards(s),
        "seconds per stage": lambda r, s, ev: " ".join(f"{m['stage']}={m['seconds']:.0f}" for m in s),
        "peak RSS MiB": lambda r, s, ev: f"{max(m.get('peak_rss_mib', 0) for m in s):.0f}",
    }
    rows = []
    for round_index, stages in collect(run_dir).items():
        evals = evaluations(stages)
        ev = evals[-1]["metrics"] if evals else {}
        rows.append([cell(round_index, stages, ev) for cell in columns.values()])
    keep = [i for i, name in enumerate(columns) if name == "round" or any(row[i] != "-" for row in rows)]
    return [list(columns)[i] for i in keep], [[row[i] for i in keep] for row in rows]


def render(run_dir: str | Path) -> str:
    header, rows = table(run_dir)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def rl_steps(run_dir: str | Path) -> list[dict]:
    """Every finished RL step of the run (also of a stage still running), in training order, with its round and
    stage: the records the rl stage writes as versions/<k>/step.json. Within a round, stages ran in the order
    the run's config.yaml lists them."""
    run_dir = Path(run_dir)
    order = list(yaml.safe_load((run_dir / "config.yaml").read_text())["stages"])
    return [{"round": int(round_dir.name.split("_")[1]), "stage": name, **read_json(path)}
            for round_dir in sorted(run_dir.glob("round_*")) for name in order
            for path in sorted((round_dir / name / "versions").glob("[0-9]*/step.json"))]


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
    for ax, prefix in ((top, "reward@"), (bottom, "kl/")):
        for key in sorted({k for s in steps for k in s if k.startswith(prefix)}):
            # a step without an update has no KL (None): a gap in the line, not a 0
            ax.plot(xs, [float("nan") if s.get(key) is None else s[key] for s in steps], marker=".",
                    label=f"mean {key}" if prefix == "reward@" else key)
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
    text = render(run_dir)
    images = "".join(f"\n![{p.stem}](plots/{p.name})\n" for p in plot(run_dir))
    (run_dir / "report.md").write_text(f"# {run_dir.name}\n\n{text}\n{images}")
    log(text)
    return [{"round": r, **m["metrics"]} for r, stages in collect(run_dir).items() for m in evaluations(stages)]
