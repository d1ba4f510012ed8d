"""Per-call time limits that nest: a critic's per-sample limit around a grader's per-expression limit.

`call_with_timeout(seconds, fn, ...)` runs `fn` and raises `TimedOut` if it is still running after `seconds`.
It interrupts with SIGALRM (an interval timer), so it works in the main thread of a POSIX process; elsewhere
(a worker thread, Windows) it runs `fn` without a limit. Stages run in the main thread.

Why not math-verify's own `timeout` decorator: it uses `signal.alarm` and cancels it on exit, so an inner
math-verify call would silently disarm an enclosing per-sample limit. Here limits keep a stack: the timer is
always armed for the earliest expiry, and when it fires, the *outermost* expired call unwinds (the exception
is a BaseException, so the `except Exception` blocks inside sympy and math-verify cannot swallow it) and
only that call turns it into `TimedOut`.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable

_active: list[tuple[float, object]] = []  # (expiry on the monotonic clock, token), outermost first
_saved_handler: Any = None


class TimedOut(Exception):
    """A call ran past its time limit."""


class _Expired(BaseException):
    def __init__(self, token: object):
        super().__init__("time limit reached")
        self.token = token


def _on_alarm(signum, frame) -> None:
    now = time.monotonic()
    for expiry, token in _active:  # outermost first: everything inside it unwinds too
        if expiry <= now + 1e-3:
            raise _Expired(token)
    _arm()  # woke early (clock granularity): re-arm for the earliest expiry


def _arm() -> None:
    delay = max(min(expiry for expiry, _ in _active) - time.monotonic(), 1e-4) if _active else 0
    signal.setitimer(signal.ITIMER_REAL, delay)


def call_with_timeout(seconds: float | None, fn: Callable, *args, **kwargs):
    """`fn(*args, **kwargs)`, or `TimedOut` after `seconds` (None or <= 0: no limit)."""
    global _saved_handler
    if (seconds is None or seconds <= 0 or not hasattr(signal, "setitimer")
            or threading.current_thread() is not threading.main_thread()):
        return fn(*args, **kwargs)
    token = object()
    if not _active:
        _saved_handler = signal.signal(signal.SIGALRM, _on_alarm)
    _active.append((time.monotonic() + seconds, token))
    _arm()
    try:
        return fn(*args, **kwargs)
    except _Expired as expired:
        if expired.token is not token:
            raise
        raise TimedOut(f"{getattr(fn, '__qualname__', fn)} ran past {seconds:g}s") from None
    finally:
        # Drop this call's entry and any inner one an interrupted cleanup left behind.
        index = next((i for i, (_, t) in enumerate(_active) if t is token), None)
        if index is not None:
            del _active[index:]
        _arm()
        if not _active:
            signal.signal(signal.SIGALRM, _saved_handler or signal.SIG_DFL)
            _saved_handler = None
