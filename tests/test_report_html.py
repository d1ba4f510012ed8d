"""report.html and `trace` on a real run: one round of tiny STaR (real vLLM and TRL on the tiny random model).

The page is checked twice: as text (every section the run has data for, none it has not, decodable images,
escaped samples) and in headless Chromium (no console error, no failed load, every plot decoded to a non-empty
image, the tables laid out), since a page can be well-formed text and still show nothing. Chromium is the
system's, driven by Playwright, which sees console errors, failed loads and Content-Security-Policy violations as
they happen.
"""

from __future__ import annotations

import base64
import html
import re
import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest

from selfimprove.artifacts import load_rows, read_json
from selfimprove.pipeline import Runner, load_pipeline
from selfimprove.report import table
from selfimprove.report_html import transitions
from selfimprove.trace import UnknownSample, main, trace

REPO = Path(__file__).resolve().parents[1]
TINY_STAR = REPO / "tests" / "pipelines" / "tiny_star.yaml"
CRITIC = "tests.plugins:accept_even_problems"  # labels a sample correct iff its problem id ends in an even digit


@pytest.fixture(scope="module")
def star_run(engine, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("report_html") / "run"
    Runner(load_pipeline(TINY_STAR, ["rounds=1"]), run_dir, engine=engine, log=lambda *_: None).run()
    return run_dir


@pytest.fixture(scope="module")
def page(star_run) -> str:
    return (star_run / "report.html").read_text()  # the run wrote it


class _Page(HTMLParser):
    """Section ids, image sources, and the example table's cells (text per cell, rows in order)."""

    def __init__(self):
        super().__init__()
        self.sections, self.images, self.example_rows = [], [], []
        self._section = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self._section = attrs["id"]
            self.sections.append(self._section)
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "tr" and self._section == "examples":
            self.example_rows.append([])
        elif tag == "td" and self._section == "examples":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.example_rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_page_has_every_section_with_data_and_no_other(star_run, page):
    parsed = _Page()
    parsed.feed(page)
    # tiny STaR has no RL stage and no two-attempt evaluation: those sections must not appear
    assert parsed.sections == ["table", "accuracy", "bstar", "selection", "critics", "examples"]
    # accuracy (report.plot's), B-STaR rates and diversity, training examples, critic quality
    assert len(parsed.images) == 5
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        width, height = _png_size(base64.b64decode(src.split(",", 1)[1]))
        assert width >= 300 and height >= 200
    # no request can leave the page: every URL is inline data or an in-page anchor, and the CSP forbids the rest
    assert "default-src 'none'" in page
    assert all(u.startswith(("data:", "#")) for u in re.findall(r'(?:src|href)="([^"]*)"', page))
    # the per-round table is report.table's, header and cells
    header, rows = table(star_run)
    for cell in header + [c for row in rows for c in row]:
        assert f">{html.escape(cell)}<" in page
    # the numbers of the other sections come from the manifests
    critique = read_json(star_run / "round_001" / "critique" / "manifest.json")["metrics"]
    filt = read_json(star_run / "round_001" / "filter" / "manifest.json")["metrics"]
    assert (f"<td>{CRITIC}</td><td>{critique[f'{CRITIC}/quality_n']}</td>"
            f"<td>{critique[f'{CRITIC}/invalid']} ({critique[f'{CRITIC}/timeouts']})</td>") in page
    assert f"<td>filter</td><td>{filt['examples']}</td><td>{filt['rationalized']}</td><td>-</td>" in page
    assert f"<td>{filt['bstar/distinct_completions']:.3f}</td>" in page


def test_examples_show_samples_with_their_verdicts(star_run, page):
    parsed = _Page()
    parsed.feed(page)
    samples = {s["sample_id"]: s for s in load_rows(star_run / "round_001" / "generate" / "data")}
    shown = [row for row in parsed.example_rows if row and row[0] in samples]
    assert len(shown) == 4
    labels = []
    for sample_id, prompt, completion, verdict in shown:
        sample = samples[sample_id]
        assert prompt == sample["prompt"][-1]["content"]  # unescaped by the parser: escaping round-trips
        assert completion == sample["completion"] if sample["completion"].strip() else "whitespace only" in completion
        labels.append(int(sample["problem_id"][-1]) % 2 == 0)
        assert verdict.startswith(f"{CRITIC}: {'correct' if labels[-1] else 'incorrect'}, score ")
        assert f"gold answer: {sample['answer']}" in verdict
    assert labels == [True, False, True, False]  # accepted and rejected samples, alternating
    # round 0 has no critique stage: its examples are the base model's graded evaluation samples
    assert any(row and row[0].startswith("r000/evaluate/") for row in parsed.example_rows)


def test_transition_counts():
    rows = [{"attempts": [{"correct": a}, {"correct": b}]}
            for a, b in [(True, True), (True, False), (False, True), (False, True), (False, False)]]
    assert transitions(rows) == {"c→c": 1, "c→i": 1, "i→c": 2, "i→i": 1}


# -- in a browser ---------------------------------------------------------------------------------------------
@pytest.fixture
def browser():
    """A headless Chromium tab (Playwright on the system's Chromium), and the list of what it reported as an
    error: uncaught exceptions, console errors (Content-Security-Policy violations among them), failed loads."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium); the page is not loaded in a browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium)
        tab = instance.new_page(viewport={"width": 1200, "height": 2000})
        errors: list[str] = []
        tab.on("console", lambda message: errors.append(message.text) if message.type in ("error", "assert") else None)
        tab.on("pageerror", lambda error: errors.append(str(error)))
        tab.on("requestfailed", lambda request: errors.append(f"{request.url}: {request.failure}"))
        yield tab, errors
        instance.close()


IMAGES = "[...document.images].map(i => ({width: i.naturalWidth, height: i.naturalHeight, complete: i.complete}))"


def test_page_renders_in_chromium_without_errors(star_run, browser):
    tab, errors = browser
    tab.goto((star_run / "report.html").as_uri())
    images = tab.evaluate(IMAGES)
    assert len(images) == 5 and all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in images), images
    assert errors == []
    sections = tab.locator("section h2").all_text_contents()
    assert sections[0] == "Per-round table" and sections[-1] == "Example samples"
    # the per-round table is laid out with report.table's columns and rows
    header, rows = table(star_run)
    assert tab.locator("#table th").all_text_contents() == header
    assert tab.locator("#table tbody tr").count() == len(rows)
    assert tab.locator("#table table").bounding_box()["height"] > 0
    shot = tab.screenshot(path=star_run / "report-screenshot.png", full_page=True)
    width, height = _png_size(shot)
    assert width >= 1000 and height > 2000  # the whole page, not one window of it


def test_browser_check_sees_a_blocked_request(star_run, page, browser, tmp_path):
    """The check above can fail: a page that tries to fetch anything is caught (its CSP blocks the request and
    the browser reports it), and an image that does not decode has no natural width."""
    tab, errors = browser
    bad = tmp_path / "bad.html"
    bad.write_text(page.replace("</body>", '<img src="https://example.invalid/x.png"><img src="data:image/png;'
                                           'base64,AAAA"></body>'))
    tab.goto(bad.as_uri())
    images = tab.evaluate(IMAGES)
    assert [i["width"] for i in images[-2:]] == [0, 0]
    assert any("example.invalid" in e for e in errors)


# -- trace -----------------------------------------------------------------------------------------------------
def test_trace_follows_a_kept_and_a_rejected_sample(star_run, capsys):
    samples = load_rows(star_run / "round_001" / "generate" / "data")
    kept = next(s for s in samples if int(s["problem_id"][-1]) % 2 == 0)
    rejected = next(s for s in samples if int(s["problem_id"][-1]) % 2 == 1)
    train = load_rows(star_run / "round_001" / "filter" / "data")
    row = next(i for i, t in enumerate(train) if kept["sample_id"] in t["sample_ids"])

    t = trace(star_run, kept["sample_id"])
    assert (t["round"], t["stage"], t["type"], t["problem_id"]) == (1, "generate", "generate", kept["problem_id"])
    assert t["prompt"] == kept["prompt"] and t["completion"] == kept["completion"] and t["seed"] == kept["seed"]
    assert t["weights"] == {"base": kept["weights"]["base"], "adapter": None, "label": "base", "adapter_hash": None}
    assert t["sampling"] == {"temperature": 1.0, "top_p": 1.0, "max_tokens": 24, "hint": False}
    verdicts = [(v["stage"], v["critic"], v["label"], v["score"]) for v in t["verdicts"]]
    assert verdicts == [("critique", CRITIC, True, 1.0)]
    assert t["used_in"] == [{"stage": "filter", "how": "training row", "row": row, "trained_by": ["train"]}]

    t = trace(star_run, rejected["sample_id"])
    assert [(v["critic"], v["label"]) for v in t["verdicts"]] == [(CRITIC, False)] and t["used_in"] == []

    # a rationalization: its hint is on record, and the other critique stage judged it
    hinted = load_rows(star_run / "round_001" / "rationalize" / "data")[0]
    t = trace(star_run, hinted["sample_id"])
    assert t["sampling"]["hint"] is True and [v["stage"] for v in t["verdicts"]] == ["critique_rationalize"]
    assert [u["stage"] for u in t["used_in"]] == ["filter"]

    assert main(str(star_run), kept["sample_id"]) == 0
    out = capsys.readouterr().out
    assert kept["sample_id"] in out and f"critique / {CRITIC}: correct" in out and f"filter: training row {row}" in out


def test_trace_of_an_unknown_id_lists_real_ones(star_run, capsys):
    assert main(str(star_run), "r001/generate/no-such-problem/0") == 2
    err = capsys.readouterr().err
    listed = err.split("sample ids look like: ")[1].strip().split(", ")
    assert "no-such-problem" in err and len(listed) >= 3
    for sample_id in listed:  # every id offered exists
        assert trace(star_run, sample_id)["sample_id"] == sample_id
    with pytest.raises(UnknownSample):
        trace(star_run, "nope")
    assert main(str(star_run / "round_001"), "x") == 2  # not a run directory
