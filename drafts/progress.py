"""What a command-line run shows while it works: a live bar on a terminal, summary lines otherwise.

On a terminal one line is redrawn in place (done, failed, duplicates, rate, time left, what is
waiting on a rate limit); log records are printed above it (`ProgressLogHandler` clears the bar
first). Without a terminal (a pipe, a CI log, `nohup`) a summary line is printed every
`EVERY_S` seconds and at the end, never a line per image.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

EVERY_S = 10.0  # without a terminal: one summary line this often
BAR_WIDTH = 24


class TerminalProgress:
    """Counts of a run and their display on `stream` (standard error by default)."""

    def __init__(self, total: int, stream: TextIO | None = None, every_s: float = EVERY_S):
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self.done = self.failed = self.duplicates = self.skipped = 0
        self.waiting: dict[str, str] = {}  # label -> why it waits (rate limit, retry)
        self.started = time.monotonic()
        self._last_line = self.started
        self._shown = False
        self._lock = threading.RLock()

    # counts

    def advance(self, *, failed: bool = False, duplicate: bool = False, skipped: bool = False) -> None:
        with self._lock:
            if skipped:
                self.skipped += 1
            elif duplicate:
                self.duplicates += 1
            elif failed:
                self.failed += 1
            else:
                self.done += 1
            self._show()

    def waiting_on(self, label: str, why: str | None) -> None:
        """`label` waits for `why` (None: no longer waits)."""
        with self._lock:
            if why is None:
                self.waiting.pop(label, None)
            else:
                self.waiting[label] = why
            if self.tty:
                self._show()

    def note(self, text: str) -> None:
        """A line of its own (a failure, a warning), printed above the bar."""
        with self._lock:
            self.clear()
            self.stream.write(text + "\n")
            self.stream.flush()
            self.redraw()

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.duplicates + self.skipped

    # display

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        made = self.done + self.failed
        rate = made / elapsed if elapsed > 0 else 0.0
        left = self.total - self.finished
        eta = f"~{_duration(left / rate)} left" if rate > 0 and left > 0 else ""
        parts = [f"{self.finished}/{self.total}", f"done {self.done}", f"failed {self.failed}"]
        if self.duplicates:
            parts.append(f"duplicates {self.duplicates}")
        if self.skipped:
            parts.append(f"already done {self.skipped}")
        parts.append(f"{rate:.1f} img/s")
        if eta:
            parts.append(eta)
        if self.waiting:
            parts.append(f"waiting {len(self.waiting)} (rate limit/retry)")
        return ", ".join(parts)

    def _show(self) -> None:
        now = time.monotonic()
        if self.tty:
            filled = int(BAR_WIDTH * self.finished / max(self.total, 1))
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            self.stream.write(f"\r[{bar}] {self.line()}\x1b[K")
            self.stream.flush()
            self._shown = True
        elif now - self._last_line >= self.every_s:
            self._last_line = now
            self.stream.write(f"progress: {self.line()}\n")
            self.stream.flush()

    def clear(self) -> None:
        """Take the bar off its line (before other output)."""
        with self._lock:
            if self.tty and self._shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._shown = False

    def redraw(self) -> None:
        with self._lock:
            if self.tty:
                self._show()

    def close(self) -> None:
        with self._lock:
            if self.tty:
                if self._shown:
                    self.stream.write("\n")
            elif self.finished:
                self.stream.write(f"progress: {self.line()}\n")
            self.stream.flush()


class ProgressLogHandler(logging.StreamHandler):
    """A log handler that prints above the progress bar instead of through it."""

    def __init__(self, stream: TextIO | None = None):
        super().__init__(stream or sys.stderr)
        self.progress: TerminalProgress | None = None

    def emit(self, record: logging.LogRecord) -> None:
        progress = self.progress
        if progress is None:
            super().emit(record)
            return
        with progress._lock:
            progress.clear()
            super().emit(record)
            progress.redraw()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
