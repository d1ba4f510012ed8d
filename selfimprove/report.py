"""The per-round table of a run, built from its stage manifests (so it works on partial and finished runs)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

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


def table(run_dir: str | Path) -> tuple[list[str], list[list[str]]]:
    header = ["round", "weights", "accuracy [95% CI]", "flexible", "kept", "rationalized", "trained on", "train loss",
              "seconds per stage", "peak RSS MiB"]
    rows = []
    for round_index, stages in collect(run_dir).items():
        evals = [m for m in stages if m["type"] == "evaluate"]
        filt = next((m for m in stages if m["type"] == "filter"), None)
        train = next((m for m in stages if m["type"] == "train"), None)
        ev = evals[-1]["metrics"] if evals else {}
        acc = (f"{ev['accuracy']:.1%} [{ev['accuracy_ci_low']:.1%}, {ev['accuracy_ci_high']:.1%}]"
               if "accuracy" in ev else "-")
        loss = "-"
        if train and train["metrics"].get("final_loss") is not None:
            loss = f"{train['metrics']['first_loss']:.3f}→{train['metrics']['final_loss']:.3f}"
        rows.append([
            str(round_index), ev.get("weights", "-"), acc,
            f"{ev['accuracy_flexible']:.1%}" if "accuracy_flexible" in ev else "-",
            str(filt["metrics"]["examples"]) if filt else "-",
            str(filt["metrics"]["rationalized"]) if filt else "-",
            _trained_on(train["metrics"]) if train else "-",
            loss,
            " ".join(f"{m['stage']}={m['seconds']:.0f}" for m in stages),
            f"{max(m.get('peak_rss_mib', 0) for m in stages):.0f}",
        ])
    return header, rows


def _trained_on(metrics: dict) -> str:
    if not metrics.get("trained"):
        return "nothing"
    return f"{metrics['pairs']} pairs" if "pairs" in metrics else f"{metrics.get('examples', 0)} examples"


def render(run_dir: str | Path) -> str:
    header, rows = table(run_dir)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def write_report(run_dir: str | Path, log=print) -> list[dict]:
    """Write `report.md`, print the table, and return the evaluate metrics per round."""
    run_dir = Path(run_dir)
    text = render(run_dir)
    (run_dir / "report.md").write_text(f"# {run_dir.name}\n\n{text}\n")
    log(text)
    return [
        {"round": r, **m["metrics"]} for r, stages in collect(run_dir).items() for m in stages if m["type"] == "evaluate"
    ]
