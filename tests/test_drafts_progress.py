"""Tests of drafts/progress.py: a live bar on a terminal, a summary line every few seconds otherwise
(never a line per image), and log lines printed above the bar."""

from __future__ import annotations

import io
import logging

from comfyui_flux_schnell.drafts.progress import ProgressLogHandler, TerminalProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_no_line_per_image():
    out = io.StringIO()
    progress = TerminalProgress(1000, stream=out, every_s=3600)
    for i in range(1000):
        progress.advance(failed=i % 100 == 0, duplicate=i % 250 == 1)
    progress.close()
    (line,) = out.getvalue().splitlines()  # the final summary only
    assert line.startswith("progress: 1000/1000, done 986, failed 10, duplicates 4, ")
    assert line.endswith(" img/s")


def test_without_a_terminal_a_summary_line_every_few_seconds(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("comfyui_flux_schnell.drafts.progress.time.monotonic", lambda: now[0])
    out = io.StringIO()
    progress = TerminalProgress(100, stream=out, every_s=10)
    for _ in range(100):  # one image every 0.5 s: 50 s in all
        now[0] += 0.5
        progress.advance()
    assert len(out.getvalue().splitlines()) == 5  # at 10, 20, 30, 40 and 50 s
    assert "~" in out.getvalue().splitlines()[0]  # time left


def test_on_a_terminal_one_line_redrawn_and_log_lines_above_it():
    out = Terminal()
    progress = TerminalProgress(3, stream=out)
    handler = ProgressLogHandler(out)
    handler.progress = progress
    logger = logging.getLogger("flux_schnell.test_progress")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        progress.advance()
        progress.waiting_on("line 2 -> b.png", "rate limited")
        logger.warning("ImageAPI line 2 -> b.png, attempt 1 failed (HTTP 429)")
        progress.advance()
        progress.advance(skipped=True)
        progress.close()
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert "\n" not in text.split("ImageAPI line 2")[0]  # the bar so far: redrawn in place
    assert "\r\x1b[KImageAPI line 2 -> b.png, attempt 1 failed (HTTP 429)\n" in text  # bar cleared first
    assert "waiting 1 (rate limit/retry)" in text
    last = text.rsplit("\r", 1)[1]
    assert last.startswith("[########################] 3/3, done 2, failed 0, already done 1, ")
    assert last.endswith("\n")
