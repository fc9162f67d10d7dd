"""Node progress inside ComfyUI: the progress bar, the status text under the node, interrupts,
and blocking calls run in a worker thread while an async node waits.

Async nodes: ComfyUI (0.3.45 and later) awaits a node function that is `async def` as a task, so
independent nodes of one graph overlap (https://github.com/comfyanonymous/ComfyUI/pull/8830).
`run_in_thread` runs a blocking call (the API client's batch) in a worker thread meanwhile, and
`Progress.status_text` shows elapsed seconds and what the run is doing on the node while it waits.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

from ..errors import GenerationInterrupted
from .imports import comfy_module

T = TypeVar("T")
STATUS_INTERVAL_S = 1.0


class Progress:
    """Progress, interruption and the node's status text for one run.

    `advance(n, preview=None)` moves ComfyUI's bar (whose update also raises ComfyUI's interrupt
    exception when the user pressed Cancel); `should_stop()` can be polled while waiting, from any
    thread; `raise_if_interrupted()` raises ComfyUI's own exception inside ComfyUI (so the queue
    treats it as a cancel, not an error) and `GenerationInterrupted` outside it (`stop_flag` set,
    e.g. by Ctrl-C in the command line, or `stop()` called when the awaiting task was cancelled).

    ComfyUI clears its interrupt flag when its `throw_exception_if_processing_interrupted` raises;
    with several nodes awaiting at once the first would then hide the Cancel from the others. So a
    stop seen here is remembered, and `raise_if_interrupted` raises ComfyUI's exception itself,
    leaving the flag for the other nodes (ComfyUI resets it when the next prompt starts).
    """

    def __init__(
        self,
        total: int,
        bar=None,
        management: ModuleType | None = None,
        stop_flag: threading.Event | None = None,
        *,
        node_id: str | None = None,
        text: Callable[[str], None] | None = None,
        unit: str = "step",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total = total
        self._bar = bar
        self._mm = management
        self._stop = stop_flag if stop_flag is not None else threading.Event()
        self._interrupted = False
        self._text = text
        self.node_id = node_id
        self.unit = unit
        self.clock = clock
        self.started = clock()
        self.done = 0
        self.status = ""
        self._lock = threading.Lock()

    def advance(self, n: int = 1, preview=None) -> None:
        if self._mm is not None and self._mm.processing_interrupted():
            self._interrupted = True  # raised here, before ComfyUI's bar would clear the flag
            raise self._mm.InterruptProcessingException()
        with self._lock:
            self.done += n
            done = self.done
        if self._bar is not None:
            if preview is None:
                self._bar.update(n)
            else:
                self._bar.update_absolute(done, self.total, preview)

    def stop(self) -> None:
        """Ask the run to stop (from any thread): `should_stop()` is true from now on."""
        self._stop.set()

    def should_stop(self) -> bool:
        if self._stop.is_set():
            return True
        if self._mm is not None and self._mm.processing_interrupted():
            self._interrupted = True
            return True
        return False

    def raise_if_interrupted(self) -> None:
        if self._mm is not None and (self._interrupted or self._mm.processing_interrupted()):
            self._interrupted = True
            raise self._mm.InterruptProcessingException()
        if self.should_stop():
            raise GenerationInterrupted("interrupted by the user")

    # the text on the node

    def set_status(self, status: str) -> None:
        """What the run is doing now ("waiting for the service", ...); shown at once."""
        self.status = status
        self.show()

    def line(self) -> str:
        """The node's status text: what is happening, the seconds so far, the count finished."""
        seconds = self.clock() - self.started
        plural = "" if self.total == 1 else "s"
        count = f"{self.done} of {self.total} {self.unit}{plural} done"
        return f"{self.status}: {seconds:.0f} s\n{count}" if self.status else f"{count} in {seconds:.1f} s"

    def show(self) -> None:
        if self._text is not None:
            self._text(self.line())

    def status_text(self, status: str, interval_s: float | None = None) -> _StatusTicker:
        """A `with` block during which the node shows `status` and the seconds, once a second (from
        a thread of its own, so a long local run in the event loop does not freeze it)."""
        return _StatusTicker(self, status, interval_s or STATUS_INTERVAL_S)


class _StatusTicker:
    def __init__(self, progress: Progress, status: str, interval_s: float):
        self.progress, self.status, self.interval_s = progress, status, interval_s
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        self.progress.set_status(self.status)
        if self.progress._text is not None:
            self._thread = threading.Thread(target=self._tick, name="flux-schnell-status", daemon=True)
            self._thread.start()
        return self.progress

    def _tick(self) -> None:
        while not self._done.wait(self.interval_s):
            self.progress.show()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        progress = self.progress
        progress.status = ""
        if exc_type is None:
            progress.show()  # "N of M images done in S s"
        elif progress._text is not None:
            seconds = progress.clock() - progress.started
            stopped = (
                progress._interrupted
                or progress._stop.is_set()
                or issubclass(exc_type, GenerationInterrupted)
            )
            progress._text(f"{'cancelled' if stopped else 'failed'} after {seconds:.1f} s")


def _prompt_server():
    """ComfyUI's PromptServer instance, when this process is ComfyUI (its `server` module is loaded)."""
    module = sys.modules.get("server")
    server_class = getattr(module, "PromptServer", None)
    return getattr(server_class, "instance", None)


def progress_text(text: str, node_id: str | None) -> None:
    """Show `text` under the node's title (ComfyUI's progress text); nothing outside ComfyUI."""
    server = _prompt_server()
    if server is None or node_id is None or not hasattr(server, "send_progress_text"):
        return
    server.send_progress_text(text, node_id)


def progress_for(total: int, node_id: str | None = None, unit: str = "step") -> Progress:
    """A `Progress` wired to ComfyUI when it is present (bar, interrupt, the node's text), else a
    silent one. `node_id` is the node's UNIQUE_ID: with several nodes running at once it says which
    node's bar and text to move."""
    utils = comfy_module("comfy.utils")
    bar = None
    if utils is not None:
        takes_node = "node_id" in inspect.signature(utils.ProgressBar).parameters
        bar = utils.ProgressBar(total, node_id=node_id) if takes_node else utils.ProgressBar(total)
    text = None
    if node_id is not None and _prompt_server() is not None:

        def text(line: str) -> None:
            progress_text(line, node_id)

    return Progress(total, bar, comfy_module("comfy.model_management"), node_id=node_id, text=text, unit=unit)


async def run_in_thread(call: Callable[..., T], *args, progress: Progress) -> T:
    """`call(*args)` in a worker thread, awaited, so other nodes' tasks run meanwhile.

    When the awaiting task is cancelled (ComfyUI ends a prompt another node interrupted or failed)
    the call is told to stop through `progress`, so it sends nothing more.
    """
    try:
        return await asyncio.to_thread(call, *args)
    except asyncio.CancelledError:
        progress.stop()
        raise
