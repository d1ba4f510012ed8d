"""Atomic reads and writes of the things a run directory holds.

Everything is written to a temporary sibling and renamed into place, so a crash or kill leaves either the
old state or the new one, never half a file. A stage folder is finished exactly when its `manifest.json`
says `done: true`; the manifest is the last thing a stage writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

MANIFEST = "manifest.json"
EMPTY_MARKER = "empty.json"


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_rows(rows: list[dict], path: str | Path) -> None:
    """Save rows as a Hugging Face dataset folder, atomically. `datasets` cannot write (or read back) a dataset
    with no rows and no schema, so an empty one is a folder holding only `EMPTY_MARKER`."""
    path = Path(path)
    if rows:
        from datasets import Dataset

        dataset = Dataset.from_list(rows)  # before the temporary folder: rows it refuses leave nothing behind
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    if rows:
        dataset.save_to_disk(str(tmp))
    else:
        write_json(tmp / EMPTY_MARKER, {"rows": 0})
    replace_dir(tmp, path)


def load_rows(path: str | Path) -> list[dict]:
    from datasets import load_from_disk

    if (Path(path) / EMPTY_MARKER).exists():
        return []
    return load_from_disk(str(path)).to_list()


def replace_dir(tmp: Path, path: Path) -> None:
    """Move folder `tmp` to `path`, replacing whatever is there."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def checksum_dir(path: str | Path) -> str:
    """sha256 over the relative names and bytes of every file under `path`, in sorted order."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def checksum_files(paths: Iterable[str | Path]) -> dict[str, str]:
    return {p.name: checksum_dir(p) if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in map(Path, paths)}


def is_done(stage_dir: str | Path) -> bool:
    manifest = Path(stage_dir) / MANIFEST
    return manifest.exists() and read_json(manifest).get("done", False)
