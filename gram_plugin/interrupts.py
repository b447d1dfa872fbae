"""Ctrl-C during a training loop: the first asks the loop to stop after the step in progress (so what it saves
is the state after a whole step), a second stops it at once. Used by meta-training and tuning."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class StopRequest:
    """Whether Ctrl-C asked the loop to stop: ``requested`` (set by :func:`stop_after_step`'s handler)."""

    requested: bool = False


@contextlib.contextmanager
def stop_after_step(enabled: bool = True) -> Iterator[StopRequest]:
    """While open, a first Ctrl-C (SIGINT) sets ``requested`` on the yielded :class:`StopRequest` (the loop checks
    it after each step and stops); a second raises ``KeyboardInterrupt`` at once. The previous handler is put
    back on exit. Only in the main thread (signals go there) and where ``enabled`` (the ranks of a distributed
    run could stop at different steps); elsewhere Ctrl-C raises ``KeyboardInterrupt`` as usual."""
    stop = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request_stop(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt  # asked twice: do not wait for the step
        stop.requested = True

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
