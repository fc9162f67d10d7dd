"""The money rules of the ImageAPI client: which failed calls are sent again, after how long, and the
deadline that bounds it all; and the clock every wait goes through.

A call that may already have been billed (`BILLED`) is retried at most `max_billed_retries` times, a
call that certainly did no work (`FREE`) up to `max_free_retries` times. The wait is the service's
`Retry-After` when it gave one, else exponential backoff with jitter. A retry is only sent while
the image's deadline leaves it `min_call_s` (at most `request_timeout_s`) after the wait, so no
paid call goes out too late to be answered. Every wait goes through a `Clock`, which wakes up every
`SLEEP_SLICE_S` to look at the stop event; tests pass their own clock to count (or skip) waits.
Follows the retry habits of ComfyUI's API nodes (backoff, `Retry-After`, a monotonic deadline:
https://github.com/comfyanonymous/ComfyUI, `comfy_api_nodes/util/client.py`), with the service's
billing as the limit (https://imageapi.org).
"""

from __future__ import annotations

import random
import threading
import time

from ..errors import GenerationInterrupted
from .failures import BILLED, FREE, Failure
from .settings import ApiSettings

SLEEP_SLICE_S = 0.05  # waits (backoff, Retry-After, polling) wake this often to check the stop


class Clock:
    """Monotonic time and interruptible waits. Tests subclass it to count or skip the waits."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float, stop: threading.Event) -> None:
        """Wait in short slices; raise `GenerationInterrupted` as soon as `stop` is set."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if stop.wait(min(SLEEP_SLICE_S, left)):
                raise GenerationInterrupted("stopped")
        if stop.is_set():
            raise GenerationInterrupted("stopped")


SYSTEM_CLOCK = Clock()


class RetryPolicy:
    """Decides, from the settings, whether and when a failed call is sent again."""

    def __init__(self, settings: ApiSettings, clock: Clock = SYSTEM_CLOCK, rng: random.Random | None = None):
        self.settings = settings
        self.clock = clock
        self._random = rng or random.Random()

    def wait_before_retry(
        self, failure: Failure, free: int, billed: int, deadline: float
    ) -> tuple[float | None, str]:
        """Seconds to wait before retrying after `free` free and `billed` billed retries so far,
        or None and a note saying why not (empty when the failure allows no retry at all)."""
        settings = self.settings
        if failure.retry == FREE:
            used, limit = free, settings.max_free_retries
        elif failure.retry == BILLED:
            used, limit = billed, settings.max_billed_retries
        else:
            return None, ""
        if used >= limit:
            return None, ""
        wait = self.backoff(failure, used)
        left = deadline - self.clock.monotonic()
        # The retry must still have min_call_s after its wait (and the wait's wake-up slice).
        if wait + self.min_call_s + SLEEP_SLICE_S > left:
            return None, self.no_time_note(left, wait)
        return wait, ""

    def backoff(self, failure: Failure, used: int) -> float:
        """The wait before asking again: the server's Retry-After, else exponential with jitter."""
        if failure.retry_after is not None:
            return failure.retry_after
        settings = self.settings
        backoff = min(settings.backoff_max_s, settings.backoff_base_s * 2**used)
        return backoff * (0.5 + 0.5 * self._random.random())

    @property
    def min_call_s(self) -> float:
        """Least time a retried call is sent with: less, and it is billed but cut off unanswered."""
        return min(self.settings.min_call_s, self.settings.request_timeout_s)

    def too_late(self, deadline: float) -> bool:
        """Whether a call now would leave less than `min_call_s` before the deadline."""
        return deadline - self.clock.monotonic() < self.min_call_s

    def no_time_note(self, left: float, wait: float | None) -> str:
        waiting = f"waiting {wait:.1f} s and then " if wait is not None else ""
        return (
            f" (not retried: the deadline of {self.settings.deadline_s:g} s per image "
            f"(deadline_s) leaves {max(left, 0.0):.1f} s, no time for another attempt: "
            f"{waiting}a call needs {self.min_call_s:g} s (min_call_s, at most "
            "request_timeout_s))"
        )

    def retry_kind(self, failure: Failure, free: int, billed: int) -> str:
        """How a retry log line describes the retry (`free`/`billed`: counts including it)."""
        settings = self.settings
        if failure.retry == FREE:
            return f"free retry {free} of {settings.max_free_retries}: the call did no work"
        return (
            f"billed retry {billed} of {settings.max_billed_retries}: the failed call "
            "may already have been billed, so this retry may cost a second image"
        )
