"""selfimprove: LLM self-improvement experiments — generate, critique, select, train, evaluate, for N rounds."""

__version__ = "0.1.0"
