"""Helper threads whose failures fail the test.

An exception (a failed assert included) in a plain thread only ends that thread: under pytest
it becomes a warning, outside pytest a traceback on stderr, and the main thread goes on as if
nothing happened. A Worker keeps the exception, and join_all() raises it in the main thread.
(pyproject.toml also turns pytest's PytestUnhandledThreadExceptionWarning into an error, for any
thread that is not a Worker; tests/test_thread_failures.py proves both.)
"""
from __future__ import annotations

import threading
import time


class Worker(threading.Thread):
    def __init__(self, target=None, args=(), name: str | None = None):
        super().__init__(target=target, args=args, name=name, daemon=True)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            super().run()
        except BaseException as e:  # noqa: BLE001 - kept for the main thread to raise
            self.error = e


def first_error(threads) -> BaseException | None:
    return next((t.error for t in threads if getattr(t, "error", None) is not None), None)


def raise_first_error(threads) -> None:
    """Raise, in the calling thread, the first exception a Worker died of (if any)."""
    error = first_error(threads)
    if error is not None:
        raise error


def join_all(threads, timeout: float = 60.0) -> None:
    """Join every thread within one deadline; raise the first exception any of them died of,
    or an AssertionError naming those still running."""
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    raise_first_error(threads)
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still running {timeout:g}s after being told to stop: {alive}"
