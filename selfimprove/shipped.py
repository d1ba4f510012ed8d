"""The files that ship inside the package, and how a name finds them.

`selfimprove/` holds, beside the code, `pipelines/` (the experiment YAMLs), `configs/` (model descriptions,
engine and trainer component files, accelerate configs) and `seeds/` (the GSM8K and MATH data the tasks read).
They are found with `importlib.resources`, never relative to a repository, so an installed wheel runs as a
checkout does.

One rule names a file wherever a pipeline, an `include:` or a launch config is given:
1. a path, read relative to where it is given (the working directory on the command line and for a launch
   config, the including file's folder for `include:`), when a file is there;
2. otherwise, a relative path is looked up among the shipped files, which keep the package's layout:
   `pipelines/star_arithmetic.yaml`, `configs/accelerate/ddp.yaml`;
3. and a bare name (no folder, no suffix) is a shipped pipeline: `star_arithmetic`, `tiny_spin`.
So `selfimprove run pipelines/star_arithmetic.yaml` works in a checkout and anywhere else, and a pipeline in
your own folder can `include: pipelines/star_arithmetic.yaml`. A file of your own with that path wins.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def root() -> Path:
    """The package folder. Setuptools installs selfimprove as plain files (never zipped), so this is a real
    folder that YAML includes, `open` and the subprocesses given these paths can all read."""
    folder = files("selfimprove")
    if not isinstance(folder, Path):  # a zip import or a namespace package split over several folders
        raise RuntimeError(f"selfimprove is imported from {folder!r}, not a folder; install it with pip")
    return folder


def pipeline_names() -> list[str]:
    return sorted(p.stem for p in (root() / "pipelines").glob("*.yaml"))


def find(ref: str | Path, base: Path | None = None) -> Path:
    """The file `ref` names by the rule above, relative to `base` (default: the working directory). When neither
    the path nor a shipped file exists, the path as given, for the caller's "no such file" error."""
    given = Path(base) / ref if base is not None else Path(ref)
    if given.is_file():  # a folder is never a config: `run tiny_spin --run-dir tiny_spin` must resume
        return given
    ref = Path(ref)
    if ref.is_absolute() or ".." in ref.parts:
        return given
    shipped = root() / (Path("pipelines") / f"{ref}.yaml" if len(ref.parts) == 1 and not ref.suffix else ref)
    return shipped if shipped.is_file() else given


def describe() -> str:
    """What a missing name could have been, for error messages."""
    return f"shipped pipelines: {', '.join(pipeline_names())}"
