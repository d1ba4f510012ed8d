"""What the run report (report.py, report_html.py) and the run comparison (compare.py) draw alike: tables as text
and HTML, figures as PNG bytes, the accuracy-per-round plot, and the page around them.

A page is self-contained (inline CSS, images as base64 `data:` URLs, a Content-Security-Policy that forbids any
request) so that it opens offline, from a copied run folder or an e-mail attachment, and shows the run as it was.
Figures are drawn on `matplotlib.figure.Figure` objects, not pyplot: no global state, no display needed.
"""

from __future__ import annotations

import base64
import html
import io

# Nothing may be fetched: data: images and the inline stylesheet only (no script runs).
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.8em; } h3 { font-size: 1em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td { font-family: ui-monospace, monospace; }
p.note { color: #555; font-size: 0.9em; max-width: 60em; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font-size: 0.9em; max-width: 38em; }
nav a { margin-right: 1em; }
"""


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with padded columns (report.md, the terminal)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


def html_table(header: list[str], rows: list[list[str]]) -> str:
    """Every cell escaped, in plain <th>/<td> (tests/fault_inject.py reads report.html's tables by them)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>selfimprove: {html.escape(title)}</title>
<style>{CSS}</style></head>
<body>{body}</body></html>
"""


def image(png: bytes | None, alt: str) -> str:
    """An <img> with the PNG inline; "" without one."""
    if not png:
        return ""
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{html.escape(alt)}">'


def figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="tight")


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def accuracy_plot(series: list[tuple[str, str, list[tuple[float, dict]]]], title: str) -> bytes:
    """Per round, each series' metric with its 95% interval as error bars; PNG bytes. A series is (label, metric
    key, [(round, metrics)]); the interval is `{key}_ci_low`, `{key}_ci_high` (no bar where the metrics have none)."""
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    def bound(m: dict, key: str, end: str) -> float:  # no interval: a bar of length 0
        return m[key] if m.get(f"{key}_ci_{end}") is None else m[f"{key}_ci_{end}"]

    fig = figure(7, 4.2)
    ax = fig.add_subplot()
    for label, key, points in series:
        yerr = [[m[key] - bound(m, key, "low") for _, m in points], [bound(m, key, "high") - m[key] for _, m in points]]
        ax.errorbar([x for x, _ in points], [m[key] for _, m in points], yerr=yerr, marker="o", capsize=3, label=label)
    ax.set(xlabel="round (0 = base model)", ylabel="accuracy", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    return png(fig)
