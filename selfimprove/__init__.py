"""selfimprove: LLM self-improvement experiments — generate, critique, select, train, evaluate, for N rounds."""

__version__ = "0.1.0"

import os as _os

# Nothing in selfimprove downloads at run time: models come from the registry's local sources (configs/models/),
# data from seeds/ or local files. Set before huggingface_hub is first imported, which reads it once.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
