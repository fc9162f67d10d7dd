"""Run control for the hosted-API worker pool: a graceful stop and a hard one, as one small object.

`StopRequest.drain()` (the first Ctrl-C, SIGTERM, ComfyUI's Cancel): nothing new is sent, not even
a retry; the calls already in flight finish (each within its own timeout) and their results are
given back, since they may have been paid for. `StopRequest.abandon()` (the second Ctrl-C): the
stream raises `GenerationInterrupted` at once and the calls in flight are abandoned; afterwards
`abandoned_in_flight` says how many images had a call out that may have been billed without an
image. `request()` does the next of the two, for a signal handler. Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

RUNNING, DRAINING, ABANDONED = "running", "draining", "abandoned"


class StopRequest:
    """How far a stop has gone: running, draining (send nothing new) or abandoned."""

    def __init__(
        self, drain_when: Callable[[], bool] | None = None, abandon_after_s: float | None = None
    ) -> None:
        """`drain_when()` (read by `poll()`, in the stream's thread: ComfyUI's Cancel) starts a
        drain; `abandon_after_s` after a drain began, `poll()` abandons what is still in flight."""
        self._lock = threading.Lock()
        self._state = RUNNING
        self._drain_when = drain_when
        self._abandon_after_s = abandon_after_s
        self._drain_started: float | None = None
        self.abandoned_in_flight = 0  # set by the stream when it abandons calls in flight
        self.not_sent = 0  # images read from the input but never sent, set by the stream
        self.count_in_flight: Callable[[], int] = lambda: 0  # set by the stream: calls out now

    @property
    def state(self) -> str:
        return self._state

    @property
    def draining(self) -> bool:
        """Whether new calls are refused (a drain or an abandon was asked for)."""
        return self._state != RUNNING

    @property
    def abandoned(self) -> bool:
        return self._state == ABANDONED

    def drain(self) -> None:
        """Send nothing new; deliver the results of the calls in flight."""
        with self._lock:
            if self._state == RUNNING:
                self._state = DRAINING
                self._drain_started = time.monotonic()

    def poll(self) -> None:
        """Called by the stream every poll interval: applies `drain_when` and `abandon_after_s`."""
        if self._state == RUNNING and self._drain_when is not None and self._drain_when():
            self.drain()
        started = self._drain_started
        if (
            self._state == DRAINING
            and self._abandon_after_s is not None
            and started is not None
            and time.monotonic() - started > self._abandon_after_s
        ):
            self.abandon()

    def abandon(self) -> None:
        """Stop at once; the calls in flight are abandoned (and counted)."""
        with self._lock:
            self._state = ABANDONED

    def request(self) -> str:
        """The next stop: a drain the first time, an abandon after. Returns the new state."""
        with self._lock:
            if self._state == RUNNING:
                self._state = DRAINING
                self._drain_started = time.monotonic()
            else:
                self._state = ABANDONED
            return self._state
