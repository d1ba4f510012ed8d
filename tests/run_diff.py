"""What differs between two finished run directories, wall-clock measurements aside: the check that a killed and
resumed run ended exactly where an uninterrupted one ends (tests/fault_inject.py, test_fault_injection.py).

Every file is compared, as a value: datasets by their rows, adapter weights by `adapter_hash`, JSON and JSON
lines with the timing keys dropped, reports with their table replaced by the table of the run's manifests (so a
report written from a half-finished run still differs), everything else by its bytes. Each manifest's checksums
are also checked against the files on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

from selfimprove.artifacts import EMPTY_MARKER, MANIFEST, checksum_files, load_rows, read_json
from selfimprove.render import html_table
from selfimprove.lifecycle import LOCK_FILE, MEMORY_FILE, PROCESS_FILE
from selfimprove.records import adapter_hash
from selfimprove.report import markdown_table, table

# Not results: the last writer's lock and processes, the watchdog's memory samples, the environment the last
# process started in, and what the processes printed (a killed process's log is cut short).
IGNORED = {LOCK_FILE, PROCESS_FILE, MEMORY_FILE, "versions.json"}
IGNORED_FOLDERS = ("logs/",)
# Keys that measure the machine or the kill, not the result: every "...seconds..." (stage, step, training, RL
# phase, failover wall times), and these. `resumed_from_step` is 0 in an uninterrupted run and the checkpoint's
# step after a kill; peak memory depends on what the process that finished a stage had done before.
TIMING = {"finished_at", "peak_rss_mib", "peak_memory_mib", "resumed_from_step"}
TIMING_COLUMNS = {"seconds per stage", "peak RSS MiB", "peak memory MiB, all processes"}
JSON_LINES = {"metrics.jsonl", "steps.jsonl"}


def run_differences(reference: Path, trial: Path) -> list[str]:
    """One line per difference: the file, and the key, row or field that differs (at most 5 a file)."""
    a, b = _values(Path(reference)), _values(Path(trial))
    out = [f"{p}: missing" for p in sorted(a.keys() - b.keys())]
    out += [f"{p}: only in the killed run" for p in sorted(b.keys() - a.keys())]
    for path in sorted(a.keys() & b.keys()):
        out += [f"{path}: {d}" for d in _differences(a[path], b[path])[:5]]
    return out + _stale_checksums(Path(trial))


def _values(run_dir: Path) -> dict[str, object]:
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir} is not a run directory (no config.yaml)")
    files = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    files = [f for f in files if f.rsplit("/", 1)[-1] not in IGNORED and not f.startswith(IGNORED_FOLDERS)
             and not any(part.startswith(".") for part in f.split("/"))]  # temporaries of atomic writes
    datasets = sorted({f.rsplit("/", 1)[0] for f in files if f.endswith(("/dataset_info.json", "/" + EMPTY_MARKER))})
    values: dict[str, object] = {folder: load_rows(run_dir / folder) for folder in datasets}
    for f in files:
        path, name = run_dir / f, f.rsplit("/", 1)[-1]
        if f.startswith(tuple(d + "/" for d in datasets)):
            continue
        if name == "adapter_model.safetensors":
            values[f] = {"adapter_hash": adapter_hash(path.parent)}
        elif name in JSON_LINES:
            values[f] = [_untimed(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
        elif name.endswith(".json"):
            values[f] = _untimed(read_json(path))
        elif f in ("report.md", "report.html"):
            values[f] = _report(run_dir, path)
        else:
            values[f] = path.read_bytes()
    return values


def _untimed(value):
    """`value` without timing keys, and without the checksums of JSON-lines files (compared without theirs)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items()
                if "seconds" not in k and k not in TIMING and k not in JSON_LINES}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _report(run_dir: Path, path: Path) -> dict:
    """A report with its table cut out (its widths and timing cells vary), and the table without timing columns."""
    header, rows = table(run_dir)
    rendered = markdown_table(run_dir) if path.suffix == ".md" else html_table(header, rows)
    keep = [i for i, h in enumerate(header) if h not in TIMING_COLUMNS]
    return {"text": path.read_text().replace(rendered, "<the run's table>"),
            "table": [[h for i, h in enumerate(header) if i in keep]] + [[r[i] for i in keep] for r in rows]}


def _differences(a, b, where: str = "") -> list[str]:
    """Every differing key, item or value of two values, by where it is."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in [*a, *(k for k in b if k not in a)]
                for d in _differences(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    if a == b:
        return []
    if isinstance(a, bytes) or isinstance(b, bytes):
        return [f"{where or 'bytes'} differ"]
    if isinstance(a, str) and isinstance(b, str) and max(len(a), len(b)) > 120:  # long texts: where they part
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return [f"{where or 'text'}: from character {i}: reference {_short(a[i:])} vs {_short(b[i:])}"]
    return [f"{where or 'value'}: reference {_short(a)} vs {_short(b)}"]


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _stale_checksums(run_dir: Path) -> list[str]:
    out = []
    for manifest in sorted(run_dir.glob(f"round_*/*/{MANIFEST}")):
        m = read_json(manifest)
        outputs = [manifest.parent / o for o in m.get("outputs", []) if (manifest.parent / o).exists()]
        if checksum_files(outputs) != m.get("checksums", {}):
            out.append(f"{manifest.relative_to(run_dir)}: its checksums do not match the files on disk")
    return out
