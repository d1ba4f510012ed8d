"""The run report written out (write_report): `report.md`, the per-round table and the plots of report.py, and
`report.html`, one self-contained page (render.page) with what the table cannot show — how exploration,
selection, the critics and RL moved round by round, and what the samples actually look like.

Everything on the page is read from the stage manifests (report.collect) and from the datasets they list as
outputs, in the order the run's config lists its stages; a section (write_html lists them) appears only when the
run has its data: B-STaR's `bstar/*` metrics of the filter stages (monitor.py), the critique stages'
`<critic>/precision`, `/recall`, `/auroc` (critics/quality.py), the rl stages' steps (report.rl_steps). Example
samples show their ids: `selfimprove trace RUN_DIR SAMPLE_ID` follows one further.
"""

from __future__ import annotations

import html
import math
from collections import Counter, defaultdict
from itertools import zip_longest
from pathlib import Path

import yaml

from .artifacts import load_rows
from .metrics import interval
from .render import figure, html_table, image, page, png
from .report import collect, evaluations, markdown_table, plot, table

EXAMPLES_PER_ROUND = 4
CLIP = 600  # characters of a prompt or completion shown in the examples


def write_report(run_dir: str | Path, log=print) -> list[dict]:
    """Write report.md with its plots and report.html, print the table, return each evaluation's metrics."""
    run_dir = Path(run_dir)
    text = markdown_table(run_dir)
    figures = plot(run_dir)
    images = "".join(f"\n![{name}](plots/{name}.png)\n" for name in figures)
    (run_dir / "report.md").write_text(f"# {run_dir.name}\n\n{text}\n{images}")
    write_html(run_dir, figures)
    log(text)
    return [{"round": r, **m["metrics"]} for r, stages in collect(run_dir).items() for m in evaluations(stages)]


def write_html(run_dir: Path, figures: dict[str, bytes]) -> None:
    """Write `report.html` (module docstring) atomically; `figures`: report.plot's."""
    rounds = collect(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    sections = [
        ("table", "Per-round table", html_table(*table(run_dir)) if rounds else ""),
        ("accuracy", "Accuracy per round", _accuracy(rounds, figures.get("accuracy"))),
        ("bstar", "B-STaR: exploration and exploitation", _bstar(rounds)),
        ("selection", "Examples kept, rationalized and paired", _selection(rounds)),
        ("critics", "Critic quality against the task's grading", _critics(rounds)),
        ("rl", "RL reward and KL per step", image(figures.get("rl"), "RL reward and KL per step")),
        ("transitions", "Self-correction: attempt 1 → attempt 2", _transitions(run_dir, rounds)),
        ("examples", "Example samples", _examples(run_dir, rounds, config)),
    ]
    sections = [s for s in sections if s[2]]
    name = str(config.get("name") or run_dir.name)
    about = ", ".join(f"{k}: {config[k]}" for k in ("model", "rounds", "seed") if k in config)
    task = (config.get("task") or {}).get("name", "")
    body = f"""<h1>{html.escape(name)}</h1>
<p class="note">{html.escape(str(config.get("description", "")))}<br>task: {html.escape(task)}, {html.escape(about)},
stages: {html.escape(" → ".join(config.get("stages", {})))}</p>
<nav>{"".join(f'<a href="#{key}">{html.escape(title)}</a>' for key, title, _ in sections)}</nav>
{"".join(f'<section id="{key}"><h2>{html.escape(title)}</h2>{text}</section>' for key, title, text in sections)}"""
    tmp = run_dir / ".report.html.tmp"
    tmp.write_text(page(name, body))
    tmp.replace(run_dir / "report.html")


# -- sections: each returns its HTML, or "" when the run has no data for it -----------------------------------
def _accuracy(rounds: dict[int, list[dict]], plot_png: bytes | None) -> str:
    """report.md's accuracy plot and, per round, every metric of the last evaluation that has an interval."""
    per_round = {r: evaluations(stages)[-1] for r, stages in rounds.items() if evaluations(stages)}
    keys = list(dict.fromkeys(k[: -len("_ci_low")] for m in per_round.values() for k in m["metrics"]
                              if k.endswith("_ci_low")))
    if not keys:
        return image(plot_png, "accuracy per round")
    rows = [[str(r), m["stage"], *(interval(m["metrics"], k, signed=k.startswith("delta_t1")) for k in keys)]
            for r, m in per_round.items()]
    return (image(plot_png, "accuracy per round with 95% intervals") + html_table(["round", "stage", *keys], rows)
            + '<p class="note">Each value with its 95% interval over problems: Wilson score for proportions of '
              'problems, Newcombe\'s paired interval for Δ(t1,t2) with one sample per problem, the percentile '
              'bootstrap otherwise (selfimprove/metrics.py).</p>')


BSTAR_RATES = ["bstar/pass@k", "bstar/precision", "bstar/balance"]
BSTAR_COUNTS = ["bstar/distinct_correct_answers", "bstar/distinct_correct_completions", "bstar/distinct_completions"]


def _bstar(rounds: dict[int, list[dict]]) -> str:
    points = [(r, m) for r, stages in rounds.items() for m in stages if "bstar/kept" in m["metrics"]]
    if not points:
        return ""
    several = len({m["stage"] for _, m in points}) > 1  # name the stage only when there is a choice
    rates, counts = defaultdict(list), defaultdict(list)
    for r, m in points:
        for keys, out in ((BSTAR_RATES, rates), (BSTAR_COUNTS, counts)):
            for k in keys:
                out[(f"{m['stage']}: " if several else "") + k[len("bstar/"):]].append((r, m["metrics"].get(k)))
    keys = BSTAR_RATES + BSTAR_COUNTS + ["bstar/k", "bstar/kept"]
    rows = [[str(r), m["stage"], *(_number(m["metrics"].get(k)) for k in keys)] for r, m in points]
    return (_lines(rates, "B-STaR rates per round", "share", unit_interval=True)
            + _lines(counts, "B-STaR diversity per round", "per prompt (mean)")
            + html_table(["round", "stage", *(k[len("bstar/"):].replace("_", " ") for k in keys)], rows)
            + '<p class="note">On each round\'s own samples, graded by the task: pass@k (exploration), distinct '
              'correct answers and completions per prompt (diversity), precision of what selection kept and the '
              'balance score (exploitation).</p>')


def _selection(rounds: dict[int, list[dict]]) -> str:
    rows, series = [], defaultdict(list)
    for r, stages in rounds.items():
        for m in stages:
            get = m["metrics"].get
            values = {"filter": {"kept": get("examples"), "rationalized": get("rationalized")},
                      "pairs": {"pairs": get("pairs")}, "spin_pairs": {"pairs": get("pairs")}}.get(m["type"])
            if values:
                rows.append([str(r), m["stage"], *(_number(values.get(k)) for k in ("kept", "rationalized", "pairs"))])
                for k, v in values.items():
                    series[k if m["stage"] == k else f"{m['stage']}: {k}"].append((r, v))
    if not rows:
        return ""
    return (_lines(series, "training examples per round", "count")
            + html_table(["round", "stage", "kept", "rationalized", "pairs"], rows))


def _critics(rounds: dict[int, list[dict]]) -> str:
    rows, series = [], defaultdict(list)
    for r, stages in rounds.items():
        for m in stages:
            for critic in [k[: -len("/positive")] for k in m["metrics"] if k.endswith("/positive")]:
                values = [m["metrics"].get(f"{critic}/{q}") for q in ("precision", "recall", "auroc")]
                low, high = (m["metrics"].get(f"{critic}/auroc_ci_{end}") for end in ("low", "high"))
                invalid = m["metrics"].get(f"{critic}/invalid", m["metrics"].get(f"{critic}/errors"))  # older runs
                rows.append([str(r), m["stage"], critic, _number(m["metrics"].get(f"{critic}/quality_n")),
                             f"{_number(invalid)} ({_number(m['metrics'].get(f'{critic}/timeouts'))})",
                             *map(_number, values[:2]), _number(values[2]) + (
                                 f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")])
                for q, v in zip(("precision", "recall", "AUROC"), values):
                    series[f"{m['stage']}: {critic} {q}"].append((r, v))
    if not rows:
        return ""
    return (_lines(series, "critic quality per round", "against the task's grading", unit_interval=True)
            + html_table(["round", "stage", "critic", "samples", "invalid (timeouts)", "precision", "recall",
                           "AUROC"], rows)
            + '<p class="note">Invalid: verdicts the critic failed to give (raised, timed out, unparseable or off '
              'its scale), left out of selection, pairs and RL. Precision and recall of each critic\'s label and '
              'AUROC of its score with its 95% DeLong interval, on the samples the task could grade; "-" where '
              'undefined (no sample labelled correct, none correct, or all equal).</p>')


def transitions(rows: list[dict]) -> dict[str, int]:
    """Counts of attempt 1 → attempt 2 outcomes (c = correct, i = incorrect) over two-attempt sample rows."""
    counts = Counter("→".join("ci"[not a["correct"]] for a in row["attempts"][:2]) for row in rows)
    return {key: counts[key] for key in ("c→c", "c→i", "i→c", "i→i")}


def _transitions(run_dir: Path, rounds: dict[int, list[dict]]) -> str:
    rows = []
    for r, stages in rounds.items():
        for m in evaluations(stages):
            if "accuracy@t2" in m["metrics"] and "data" in m.get("outputs", []):
                counts = transitions(_data(run_dir, m))
                rows.append([str(r), m["stage"], *map(str, counts.values()), str(sum(counts.values()))])
    if not rows:
        return ""
    return (html_table(["round", "stage", "c→c", "c→i", "i→c", "i→i", "samples"], rows)
            + '<p class="note">Attempt 1 → attempt 2 of each evaluated sample (c = correct, i = incorrect): i→c is '
              'what self-correction fixed, c→i what it broke.</p>')


def _examples(run_dir: Path, rounds: dict[int, list[dict]], config: dict) -> str:
    """Per round, a few samples of the first critique stage with every verdict on them (half labelled correct
    where there are such), or, in a round without one, of its evaluation with the task's grade."""
    stage_configs = config.get("stages", {})
    parts = []
    for r, stages in rounds.items():
        critique = next((m for m in stages if m["type"] == "critique" and "data" in m.get("outputs", [])), None)
        source = next((m for m in stages if critique and m["stage"] == stage_configs[critique["stage"]].get("samples")),
                      None)
        if critique and source:
            verdicts = defaultdict(list)
            for v in _data(run_dir, critique):
                verdicts[v["sample_id"]].append(v)
            samples = _data(run_dir, source)
            good = [s for s in samples if any(v["label"] for v in verdicts[s["sample_id"]])]
            bad = [s for s in samples if not any(v["label"] for v in verdicts[s["sample_id"]])]
            chosen = [s for pair in zip_longest(good, bad) for s in pair if s is not None][:EXAMPLES_PER_ROUND]
            judged = [(s, "<br>".join(_verdict(v) for v in verdicts[s["sample_id"]]) or "-") for s in chosen]
            title = f"round {r}: {source['stage']}, judged by {critique['stage']}"
        else:
            evaluation = (evaluations(stages) or [None])[-1]
            if evaluation is None or "data" not in evaluation.get("outputs", []):
                continue
            judged = [(s, _grade(s)) for s in _data(run_dir, evaluation)[:EXAMPLES_PER_ROUND]]
            title = f"round {r}: {evaluation['stage']}, graded by the task"
        rows = "".join(f"<tr><td><pre>{html.escape(s['sample_id'])}</pre></td><td><pre>{_text(_prompt(s['prompt']))}"
                       f"</pre></td><td>{_completion(s)}</td><td>{verdict}{_gold(s)}</td></tr>"
                       for s, verdict in judged)
        parts.append(f"<h3>{html.escape(title)}</h3><table><thead><tr><th>sample id</th><th>prompt (last turn)</th>"
                     f"<th>completion</th><th>verdict</th></tr></thead><tbody>{rows}</tbody></table>")
    if not parts:
        return ""
    return "".join(parts) + ('<p class="note">Texts cut at {} characters. <code>selfimprove trace RUN_DIR SAMPLE_ID'
                             '</code> shows a sample whole, with its weights, seed, verdicts and where it was used.'
                             '</p>').format(CLIP)


# -- helpers ---------------------------------------------------------------------------------------------------
def _data(run_dir: Path, manifest: dict) -> list[dict]:
    return load_rows(run_dir / f"round_{manifest['round']:03d}" / manifest["stage"] / "data")


def _prompt(prompt) -> str:
    """A prompt's last turn: the question (chat messages) or the whole text (a raw prompt)."""
    return prompt if isinstance(prompt, str) else (prompt[-1]["content"] if prompt else "")


def _completion(sample: dict) -> str:
    """The completion, or each attempt's for a multi-attempt sample (its `completion` is only the last)."""
    attempts = sample.get("attempts") or [sample]
    if len(attempts) == 1:
        return f"<pre>{_text(sample['completion'])}</pre>"
    return "".join(f"<b>attempt {t}</b><pre>{_text(a['completion'])}</pre>" for t, a in enumerate(attempts, start=1))


def _gold(sample: dict) -> str:
    return f"<br>gold answer: <code>{html.escape(str(sample['answer']))}</code>" if sample.get("answer") else ""


def _text(text: str) -> str:
    if not text.strip():  # a run of newlines would show as a tall empty cell
        return f"(whitespace only: {html.escape(repr(text))})" if len(text) <= 40 else \
            f"(whitespace only, {len(text)} characters)"
    return html.escape(text if len(text) <= CLIP else text[:CLIP] + " …")


def _verdict(v: dict) -> str:
    if v.get("error"):
        return f"<b>{html.escape(v['critic'])}</b>: failed ({html.escape(str(v['error']))})"
    label = "no label" if v["label"] is None else ("correct" if v["label"] else "incorrect")
    rationale = f" — {html.escape(str(v['rationale']))}" if v.get("rationale") else ""
    return f"<b>{html.escape(v['critic'])}</b>: {label}, score {_number(v['score'])}{rationale}"


def _grade(sample: dict) -> str:
    if sample.get("attempts") and "correct" in sample["attempts"][0]:
        return " → ".join("correct" if a["correct"] else "incorrect" for a in sample["attempts"])
    return {True: "correct", False: "incorrect"}.get(sample.get("correct"), "-")


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _lines(series: dict[str, list[tuple[int, float | None]]], title: str, ylabel: str,
           unit_interval: bool = False) -> str:
    """One line per series over rounds (None: a gap); "" when no series has a value."""
    series = {k: v for k, v in series.items() if any(y is not None for _, y in v)}
    if not series:
        return ""
    fig = figure(7, 3.6)
    ax = fig.add_subplot()
    for label, points in series.items():
        ax.plot([x for x, _ in points], [math.nan if y is None else y for _, y in points], marker="o", label=label)
    ax.set(xlabel="round", ylabel=ylabel, title=title)
    if unit_interval:
        ax.set_ylim(-0.05, 1.05)
    ax.set_xticks(sorted({x for points in series.values() for x, _ in points}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return image(png(fig), title)
