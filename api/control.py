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

RUNNING, DRAINING, ABANDONED = "running", "draining", "abandoned"


class StopRequest:
    """How far a stop has gone: running, draining (send nothing new) or abandoned."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = RUNNING
        self.abandoned_in_flight = 0  # set by the stream when it abandons calls in flight
        self.not_sent = 0  # images read from the input but never sent, set by the stream

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

    def abandon(self) -> None:
        """Stop at once; the calls in flight are abandoned (and counted)."""
        with self._lock:
            self._state = ABANDONED

    def request(self) -> str:
        """The next stop: a drain the first time, an abandon after. Returns the new state."""
        with self._lock:
            self._state = DRAINING if self._state == RUNNING else ABANDONED
            return self._state
