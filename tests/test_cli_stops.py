"""Ctrl-C and SIGTERM keep paid work (issue 15, item 1 and build 2): real subprocesses, real
signals, a fake service that counts POSTs and holds its answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from comfyui_flux_schnell.cli import main
from comfyui_flux_schnell.drafts.manifest import read_manifest
from support.fake_imageapi import Reply, request_image

LINES = 6


def _start(fake_api, tmp_path, hold: threading.Event):
    def answer(req, fake):
        hold.wait(30)  # the answers are held until the test lets them go
        return Reply.image(request_image(req))

    fake_api.set_default(answer)
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"drawing {i}\n" for i in range(LINES)))
    out = tmp_path / "o"
    args = ["generate", "--prompts-file", str(prompts), "--out-dir", str(out), "--concurrency", "2"]
    args += ["--width", "256", "--height", "256"]
    process = subprocess.Popen(
        [sys.executable, "-m", "comfyui_flux_schnell", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while fake_api.generate_calls < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert fake_api.generate_calls == 2, "the run did not send its first two requests"
    return process, args, out


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM])
def test_the_first_stop_waits_for_the_paid_answers_and_writes_them(fake_api, tmp_path, first):
    hold = threading.Event()
    process, args, out = _start(fake_api, tmp_path, hold)
    os.kill(process.pid, first)
    time.sleep(0.5)  # the stop is in: nothing new may go out while the two answers are held
    assert fake_api.generate_calls == 2
    hold.set()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "stopping: waiting for 2 answer(s) already paid for" in err
    assert fake_api.generate_calls == 2  # nothing was sent after the stop
    done = [r for r in read_manifest(out / "manifest.jsonl") if r["status"] == "done"]
    assert len(done) == 2  # both paid answers were written and recorded
    assert len(list(out.glob("*.png"))) == 2
    # The re-run pays only for the rest: every image paid once.
    assert main(args) == 0
    assert fake_api.generate_calls == LINES


def test_a_second_ctrl_c_abandons_the_answers_and_says_they_may_be_billed(fake_api, tmp_path):
    hold = threading.Event()
    process, _args, _out = _start(fake_api, tmp_path, hold)
    os.kill(process.pid, signal.SIGINT)
    time.sleep(0.5)
    os.kill(process.pid, signal.SIGINT)
    try:
        _, err = process.communicate(timeout=60)
    finally:
        hold.set()
    assert process.returncode == 130, err
    assert "2 image(s) with a call in flight were abandoned" in err
    assert fake_api.generate_calls == 2
