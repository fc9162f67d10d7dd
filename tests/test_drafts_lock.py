"""One folder, one run (drafts/lock.py): real processes into one --out-dir against the fake service."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from comfyui_flux_schnell.drafts.lock import FolderLock, lock_name, read_holder
from comfyui_flux_schnell.errors import FolderLockedError
from support import TEST_KEY


def start_run(prompts, out_dir, *extra):
    argv = [sys.executable, "-m", "comfyui_flux_schnell", "generate", "--prompts-file", str(prompts)]
    argv += ["--out-dir", str(out_dir), "--width", "256", "--height", "256", "--concurrency", "1", *extra]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ)
    )


def finish(process, timeout=120):
    out, err = process.communicate(timeout=timeout)
    assert TEST_KEY not in out + err
    return process.returncode, err


def wait_for(condition, timeout=30.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "the first run never started"
        time.sleep(0.02)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"prompt number {i}\n" for i in range(4)), encoding="utf-8")
    return path


def test_a_second_run_into_the_folder_exits_2_naming_the_first_and_nothing_is_paid_twice(
    fake_api, prompts, tmp_path
):
    fake_api.delay_s = 0.4  # the first run holds the folder for about 1.6 s
    out_dir = tmp_path / "drafts"
    first = start_run(prompts, out_dir)
    wait_for(lambda: fake_api.generate_calls >= 1)  # the first run is paying
    second = start_run(prompts, out_dir)
    code, err = finish(second)
    assert code == 2, err
    assert f"pid {first.pid}" in err
    assert socket.gethostname() in err
    assert "since" in err
    code, err = finish(first)
    assert code == 0, err
    assert fake_api.generate_calls == 4  # every image paid once
    assert not (out_dir / ".lock").exists()  # released at the end
    again = start_run(prompts, out_dir)
    code, err = finish(again)
    assert code == 0, err
    assert fake_api.generate_calls == 4  # the re-run, with the lock free, pays nothing


def test_the_lock_of_a_dead_process_on_this_host_is_taken_over_with_a_note(fake_api, prompts, tmp_path):
    out_dir = tmp_path / "drafts"
    out_dir.mkdir()
    pid = dead_pid()
    (out_dir / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": 1.0}))
    code, err = finish(start_run(prompts, out_dir))
    assert code == 0, err
    assert "took over the lock" in err
    assert f"pid {pid}" in err
    assert fake_api.generate_calls == 4
    assert not (out_dir / ".lock").exists()


def test_a_lock_from_another_host_is_respected_and_named(fake_api, prompts, tmp_path):
    out_dir = tmp_path / "drafts"
    out_dir.mkdir()
    lock = out_dir / ".lock"
    lock.write_text(json.dumps({"pid": dead_pid(), "host": "gpu-node-17", "since": time.time()}))
    code, err = finish(start_run(prompts, out_dir))
    assert code == 2
    assert "gpu-node-17" in err
    assert str(lock) in err
    assert fake_api.generate_calls == 0
    assert lock.exists()


def test_one_process_cannot_take_a_lock_twice_and_release_keeps_another_runs_lock(tmp_path):
    with FolderLock(tmp_path), pytest.raises(FolderLockedError, match=f"pid {os.getpid()}"):
        FolderLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()
    mine = FolderLock(tmp_path)
    mine.acquire()
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": 2.0}))
    mine.release()  # the file is no longer ours: left alone
    assert read_holder(tmp_path / ".lock").host == "elsewhere"


def test_an_empty_lock_file_is_held_for_a_while_then_taken_over(tmp_path):
    lock = tmp_path / ".lock"
    lock.write_bytes(b"")
    with pytest.raises(FolderLockedError):
        FolderLock(tmp_path).acquire()
    old = time.time() - 60
    os.utime(lock, (old, old))
    with FolderLock(tmp_path):
        assert read_holder(lock).pid == os.getpid()


def test_shards_lock_their_own_files():
    assert lock_name() == ".lock"
    assert lock_name((2, 3)) == ".lock-2-of-3"
