"""Helpers shared by the tests of the hosted-API client (api_*.py): settings that fail fast, a
clock that counts (or skips) waits, and small probes (free ports, retry log lines, exception chains).

The fixtures built on them (`fake`, `other_host`, `make_client`, `client`) are in tests/conftest.py.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from comfyui_flux_schnell.api.retry import Clock
from comfyui_flux_schnell.api.settings import ApiSettings
from comfyui_flux_schnell.api.types import ApiImageRequest
from comfyui_flux_schnell.errors import GenerationInterrupted

from .fake_imageapi import color_for

KEY = "sk_test_KEY123"
LEAK_KEY = "sk_leakcheck_ABC123"
REQ = ApiImageRequest("a red fox in snow", 64, 48, 4, seed=7)
FAST = {
    "request_timeout_s": 5.0,
    "deadline_s": 10.0,
    "connect_timeout_s": 2.0,
    "download_timeout_s": 5.0,
    "backoff_base_s": 0.01,
    "backoff_max_s": 0.05,
    "poll_interval_s": 0.02,
    "max_free_retries": 2,
    "max_billed_retries": 1,
}


def make_settings(base_url: str, key: str = KEY, **overrides) -> ApiSettings:
    return ApiSettings(base_url=base_url, api_key=key, key_source="test settings", **{**FAST, **overrides})


class RecordingClock(Clock):
    """The real clock, with every wait recorded (`sleeps`: the seconds asked for, in order;
    `interrupted`: waits a stop ended). With `skip=True` waits take no time: the clock jumps
    ahead instead, so a 60 s Retry-After is seen by the deadline but costs the test nothing.
    `overrun` is added to every wait, as a loaded machine wakes up late."""

    def __init__(self, skip: bool = False, overrun: float = 0.0):
        self.skip = skip
        self.overrun = overrun
        self.sleeps: list[float] = []
        self.interrupted = 0
        self._offset = 0.0
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        return time.monotonic() + self._offset

    def sleep(self, seconds: float, stop: threading.Event) -> None:
        with self._lock:
            self.sleeps.append(seconds)
        try:
            if self.skip:
                if stop.is_set():
                    raise GenerationInterrupted("stopped")
                with self._lock:
                    self._offset += seconds + self.overrun
            else:
                super().sleep(seconds + self.overrun, stop)
        except GenerationInterrupted:
            with self._lock:
                self.interrupted += 1
            raise


def expected_color(req: ApiImageRequest, send_seed: bool = False):
    return color_for(req.prompt, req.seed if send_seed else None)


def close_to(a, b, tolerance=4) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def retry_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "flux_schnell.api" and r.levelno == logging.WARNING
    ]


def stop_after(seconds: float) -> threading.Event:
    flag = threading.Event()
    timer = threading.Timer(seconds, flag.set)
    timer.daemon = True
    timer.start()
    return flag


def api_threads_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("flux-schnell-api")]


def exception_texts(exc: BaseException) -> list[str]:
    """Every text an exception and its chain (`__cause__`, `__context__`) can show."""
    texts, todo, seen = [], [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        texts += [str(e), repr(e), *(repr(a) for a in e.args)]
        texts += [repr(v) for v in vars(e).values()] if hasattr(e, "__dict__") else []
        todo += [e.__cause__, e.__context__]
    return texts
