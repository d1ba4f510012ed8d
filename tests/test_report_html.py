"""report.html and `trace` on a real run: one round of tiny STaR (real vLLM and TRL on the tiny random model).

The page is checked twice: as text (every section the run has data for, none it has not, decodable images,
escaped samples) and in headless Chromium (no console error, every plot decoded to a non-empty image), since a
page can be well-formed text and still show nothing. Chromium is driven over `--remote-debugging-pipe` (the
DevTools protocol, NUL-separated JSON on file descriptors 3 and 4), which sees console errors, failed loads and
Content-Security-Policy violations as they happen.
"""

from __future__ import annotations

import base64
import fcntl
import html
import json
import os
import re
import select
import shutil
import struct
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from selfimprove.artifacts import load_rows, read_json
from selfimprove.pipeline import Runner, load_pipeline
from selfimprove.report import table
from selfimprove.report_html import transitions, write_html
from selfimprove.trace import UnknownSample, main, trace

REPO = Path(__file__).resolve().parents[1]
TINY_STAR = REPO / "tests" / "pipelines" / "tiny_star.yaml"
CHROMIUM = Path("/usr/bin/chromium")
CRITIC = "tests.plugins:accept_even_problems"  # labels a sample correct iff its problem id ends in an even digit


@pytest.fixture(scope="module")
def star_run(engine, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("report_html") / "run"
    Runner(load_pipeline(TINY_STAR, ["rounds=1"]), run_dir, engine=engine, log=lambda *_: None).run()
    return run_dir


@pytest.fixture(scope="module")
def page(star_run) -> str:
    path = write_html(star_run)
    assert path == star_run / "report.html"
    return path.read_text()


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


# -- in a browser ----------------------------------------------------------------------------------------------
class Chromium:
    """Headless Chromium over the DevTools pipe: navigate, evaluate, collect errors, take screenshots."""

    def __init__(self, timeout: float = 30.0):
        self.deadline = time.time() + timeout
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_child, self._to_browser = os.pipe()
        self._from_browser, from_child = os.pipe()

        def onto_3_and_4():  # the pipe's fixed descriptors; duplicated high first so that neither overwrites the other
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "--window-size=1200,2000", "about:blank"],
            preexec_fn=onto_3_and_4, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self.events: list[dict] = []
        self._buffer = b""
        self._id = 0
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                self.call(f"{domain}.enable", session=self.session)
        except BaseException:
            self.close()
            raise

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return reply["result"]
            self.events.append(reply)

    def _receive(self) -> dict:
        while b"\0" not in self._buffer:
            remaining = self.deadline - time.time()
            if remaining <= 0 or not select.select([self._from_browser], [], [], remaining)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise EOFError("chromium closed the DevTools pipe")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(line)

    def load(self, url: str) -> None:
        self.call("Page.navigate", session=self.session, url=url)
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._receive())

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", session=self.session, expression=expression, returnByValue=True,
                         awaitPromise=True)["result"]["value"]

    def errors(self) -> list[dict]:
        """Uncaught exceptions, console.error calls and browser-logged errors (failed loads, CSP violations)."""
        return [e for e in self.events
                if e.get("method") == "Runtime.exceptionThrown"
                or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
                or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]

    def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode(self.call("Page.captureScreenshot", session=self.session, format="png",
                                          captureBeyondViewport=True)["data"])
        path.write_bytes(data)
        return data

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (EOFError, OSError, TimeoutError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install -y chromium); the page is not loaded in a browser")
    chromium = Chromium()
    yield chromium
    chromium.close()


IMAGES = "[...document.images].map(i => ({width: i.naturalWidth, height: i.naturalHeight, complete: i.complete}))"


def test_page_renders_in_chromium_without_errors(star_run, page, browser):
    browser.load((star_run / "report.html").as_uri())
    images = browser.evaluate(IMAGES)
    assert len(images) == 5 and all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in images), images
    assert browser.errors() == []
    sections = browser.evaluate("[...document.querySelectorAll('section h2')].map(h => h.textContent)")
    assert sections[0] == "Per-round table" and sections[-1] == "Example samples"
    shot = browser.screenshot(star_run / "report-screenshot.png")
    width, height = _png_size(shot)
    assert width >= 1000 and height > 2000  # the whole page, not one window of it


def test_browser_check_sees_a_blocked_request(star_run, page, browser, tmp_path):
    """The check above can fail: a page that tries to fetch anything is caught (its CSP blocks the request and
    the browser logs an error), and an image that does not decode has no natural width."""
    bad = tmp_path / "bad.html"
    bad.write_text(page.replace("</body>", '<img src="https://example.invalid/x.png"><img src="data:image/png;'
                                           'base64,AAAA"></body>'))
    browser.load(bad.as_uri())
    images = browser.evaluate(IMAGES)
    assert [i["width"] for i in images[-2:]] == [0, 0]
    assert any("example.invalid" in json.dumps(e) for e in browser.errors())


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
