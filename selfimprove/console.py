"""What a run prints: its own progress, one line per finished stage and the table per round. Libraries' logs
(vLLM's engine start-up, transformers and datasets notices, Python warnings) go to `logs/libraries.log` in the
run directory; only their errors still reach the console. Each engine start otherwise prints a dozen lines a user
cannot act on (Triton missing, "Failed to load weights" for layers an in-place reload skips on purpose, ...) that
read like failures.

vLLM configures logging in every process it starts from `VLLM_LOGGING_CONFIG_PATH`, so its subprocesses write to
the same file; Python warnings raised in them cannot be routed there and are ignored instead. transformers'
"Loading weights" bars are switched off (vLLM's by the engine), and the Trainer's training bar stays but writes
its loss dicts to the log (`quiet_training_logs`; the metrics reach the trackers and the manifest either way).
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager, suppress
from pathlib import Path

LIBRARIES = ("vllm", "transformers", "datasets", "trl", "peft", "torch", "accelerate", "httpx", "py.warnings")
FORMAT = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"


@contextmanager
def library_logs(run_dir: Path):
    """Route library logs to `run_dir/logs/libraries.log` while the run lasts (errors still reach stderr)."""
    log_dir = Path(run_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / "libraries.log"
    config = log_dir / "vllm-logging.json"
    config.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"plain": {"format": FORMAT}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(log_file), "formatter": "plain"},
                     "console": {"class": "logging.StreamHandler", "level": "ERROR", "formatter": "plain",
                                 "stream": "ext://sys.stderr"}},
        "loggers": {"vllm": {"handlers": ["file", "console"], "level": "INFO", "propagate": False}},
    }, indent=2))
    saved_env = {k: os.environ.get(k) for k in ("VLLM_LOGGING_CONFIG_PATH", "VLLM_CONFIGURE_LOGGING", "PYTHONWARNINGS")}
    os.environ.update(VLLM_LOGGING_CONFIG_PATH=str(config), VLLM_CONFIGURE_LOGGING="1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # subprocesses only: this process has started already

    # torch installs its own console handler when it is first imported: let that happen before it is tamed
    with suppress(ImportError):
        import torch  # noqa: F401
    file_handler = logging.FileHandler(log_file)
    file_handler.setFormatter(logging.Formatter(FORMAT))
    console = logging.StreamHandler()
    console.setLevel(logging.ERROR)
    saved = {}
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], [h.level for h in logger.handlers], logger.level, logger.propagate)
        # Keep a library's own console handlers for its errors only; everything at INFO and above to the file.
        for handler in logger.handlers:
            handler.setLevel(max(handler.level, logging.ERROR))
        logger.addHandler(file_handler)
        if not logger.handlers[:-1]:
            logger.addHandler(console)
        # torch's artifact loggers (`torch.__aot_graphs`, ...) have stderr handlers of their own and inherit the
        # "torch" logger's level: at INFO they would print every compiled graph, so torch stays at WARNING.
        logger.setLevel(logging.WARNING if name == "torch" else logging.INFO)
        logger.propagate = False
    _transformers_default_handler(False)
    logging.captureWarnings(True)
    try:
        yield log_file
    finally:
        logging.captureWarnings(False)
        _transformers_default_handler(True)
        for name, (handlers, levels, level, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            for handler, handler_level in zip(handlers, levels):
                handler.setLevel(handler_level)
            logger.setLevel(level)
            logger.propagate = propagate
        file_handler.close()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _transformers_default_handler(on: bool) -> None:
    """transformers prints through a handler of its own on its root logger; the file handler replaces it. Its
    progress bars (one per checkpoint shard, "Loading weights") go with it."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    (hf_logging.enable_default_handler if on else hf_logging.disable_default_handler)()
    (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()


def quiet_training_logs(trainer) -> None:
    """Keep a transformers Trainer's training bar, but send the dict it prints under the bar at every logging step
    (`{'loss': '2.31', 'grad_norm': ...}`) to the library log instead of the console, when this process has one."""
    from transformers.trainer_callback import ProgressCallback

    class ProgressToLog(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                # trl's logger, not transformers': the Trainer resets transformers' log level to its own
                logging.getLogger("trl.training").info("step %d: %s", state.global_step, logs)

    if not logging.getLogger("trl").handlers:
        # no library log in this process (a rank started by `launch:` writes its console to the launch log): the
        # dicts stay where they were, the only record of the loss there
        return
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressToLog())
