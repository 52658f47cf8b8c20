"""Interruption (SIGINT, SIGTERM) that long-running writers turn into a clean stop.

A KeyboardInterrupt raised at an arbitrary bytecode can land in a garbage-collector callback or a
finalizer, where Python prints and swallows it (the run then carries on and even succeeds), or in
the middle of a library's thread hand-off. So a command-line tool calls `install()`; a writer then
runs its work inside `deferred()`, where a signal only sets a flag, and calls `check()` at points where
stopping is safe (between tensors, before publishing its output), which raises `Interrupted`. Outside
`deferred()` the first signal raises `Interrupted` at once (nothing is being written then). A second
signal during the cleanup is ignored; a third exits at once (128 + signal number), leaving temporary
directories that the next run removes (see atomic.clean_stale_temp_dirs).

Without `install()` (library use), `check()` and `deferred()` change nothing: Ctrl-C raises
KeyboardInterrupt as usual and the writers' `finally` blocks clean up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM asked the run to stop; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


_state = {"signum": None, "count": 0, "deferred": 0}  # touched only by the main thread


def _handler(signum, frame):
    _state["count"] += 1
    if _state["signum"] is None:
        _state["signum"] = signum
    if _state["count"] >= 3:
        os.write(2, f"interrupted by {signal.Signals(signum).name} three times; exiting without cleanup\n".encode())
        os._exit(128 + signum)
    if _state["count"] == 1 and not _state["deferred"]:
        raise Interrupted(signum)


def install(already: int | None = None) -> None:
    """Handle SIGINT and SIGTERM as described above (call from the main thread of a CLI).

    `already`: a signal received before this call (by an earlier handler) that `check()` should report.
    """
    _state.update(signum=already, count=int(already is not None), deferred=0)
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def reset() -> None:
    """Forget a noted signal (a CLI's `main` calls this when it returns, so a later run in the same
    process, e.g. a test, does not see it). Signal handlers are the caller's to restore."""
    _state.update(signum=None, count=0, deferred=0)


def requested() -> int | None:
    """The signal number of a pending interruption, or None."""
    return _state["signum"]


def check() -> None:
    """Raise Interrupted if a signal has arrived (only with `install()`; called from the main thread)."""
    if _state["signum"] is not None and threading.current_thread() is threading.main_thread():
        raise Interrupted(_state["signum"])


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside, a handled signal only sets the flag that `check()` raises on. Entering checks first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["deferred"] += 1
    try:
        check()
        yield
    finally:
        _state["deferred"] -= 1
