"""Tests of drafts/run.py through the command line, against the fake ImageAPI on 127.0.0.1:
streaming with a bounded number of images alive (counted), duplicates requested once, the manifest,
and a real subprocess killed with SIGKILL, then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import weakref

import pytest
from comfyui_flux_schnell.api import answers as api_answers
from comfyui_flux_schnell.cli import main
from comfyui_flux_schnell.drafts import png_files as image_files
from comfyui_flux_schnell.drafts.manifest import read_manifest
from PIL import Image
from support import TEST_KEY
from support.cli_args import generate_args
from support.fake_imageapi import Reply, error_reply, request_image


def draft_args(prompts, out_dir, *extra) -> list[str]:
    return generate_args("--prompts-file", str(prompts), "--out-dir", str(out_dir), "--seed", "3", *extra)


class AliveImages:
    """Counts decoded images alive at once: each one the client decodes is watched until freed."""

    def __init__(self):
        self.alive = 0
        self.most = 0
        self.made = 0
        self._lock = threading.Lock()

    def watch(self, image) -> None:
        with self._lock:
            self.alive += 1
            self.made += 1
            self.most = max(self.most, self.alive)
        weakref.finalize(image, self._freed)

    def _freed(self) -> None:
        with self._lock:
            self.alive -= 1


def test_images_alive_at_once_are_bounded_by_the_concurrency(fake_api, tmp_path, monkeypatch):
    alive = AliveImages()
    real_open = api_answers.open_image

    def watched_open(*args, **kwargs):
        image, fmt = real_open(*args, **kwargs)
        alive.watch(image)
        return image, fmt

    monkeypatch.setattr(api_answers, "open_image", watched_open)
    written_at_request: list[int] = []  # requests the service had seen at each write
    real_write = image_files.save_png_bytes

    def slow_write(*args, **kwargs):  # a slow disk: the pool must wait, not pile images up
        written_at_request.append(fake_api.generate_calls)
        time.sleep(0.01)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(image_files, "save_png_bytes", slow_write)
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(60)))
    concurrency = 2
    assert main(draft_args(prompts, tmp_path / "o", "--concurrency", str(concurrency))) == 0
    assert alive.made == 60
    window = 2 * concurrency  # requests read and not yet written
    assert alive.most <= window + 1
    assert all(calls - written <= window + 1 for written, calls in enumerate(written_at_request))
    assert len(list((tmp_path / "o").glob("*.png"))) == 60


def test_duplicates_are_requested_once_written_once_and_counted(fake_api, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\na cat\n  a fox  \na fox\n")
    assert main(draft_args(prompts, tmp_path / "o")) == 0
    assert sorted(r.prompt for r in fake_api.requests) == ["a cat", "a fox"]
    assert len(list((tmp_path / "o").glob("*.png"))) == 2
    err = capsys.readouterr().err
    assert "done: 2, failed: 0, duplicates (requested once): 2" in err
    records = {r["line"]: r for r in read_manifest(tmp_path / "o" / "manifest.jsonl")}
    assert records[3]["status"] == records[4]["status"] == "duplicate"
    assert records[3]["duplicate_of"] == 1
    assert records[3]["file"] == records[1]["file"]
    assert (tmp_path / "o" / records[3]["file"]).is_file()

    assert main(draft_args(prompts, tmp_path / "o")) == 0  # a re-run pays for nothing
    assert fake_api.generate_calls == 2
    assert "skipped (already done): 2" in capsys.readouterr().err


def test_a_duplicate_of_a_failed_line_is_not_sent_either(fake_api, tmp_path):
    fake_api.set_default(error_reply(400, "refused"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a dog\na dog\n")
    assert main(draft_args(prompts, tmp_path / "o")) == 1
    assert fake_api.generate_calls == 1
    first, second = read_manifest(tmp_path / "o" / "manifest.jsonl")
    assert first["status"] == "failed"
    assert second["status"] == "duplicate"
    assert "same request as line 1, which failed" in second["error"]


def test_manifest_records_every_line(fake_api, send_seed, tmp_path):
    def answer(req, fake):
        if req.prompt == "bad":
            return error_reply(400, "no")
        return Reply.image(request_image(req), headers={"X-Request-Id": f"rid-{req.prompt}"})

    fake_api.set_default(answer)
    prompts = tmp_path / "p.txt"
    prompts.write_text("good\n# comment\nbad\n")
    assert main(draft_args(prompts, tmp_path / "o")) == 1
    done, failed = sorted(read_manifest(tmp_path / "o" / "manifest.jsonl"), key=lambda r: r["line"])
    assert done["line"] == 1
    assert done["prompt"] == "good"
    assert done["seed"] == 3
    assert done["status"] == "done"
    assert done["request_id"] == "rid-good"
    assert done["attempts"] == 1
    assert (done["paid_calls"], done["free_retries"]) == (1, 0)  # replaces billed_attempts (issue 15: 15)
    assert done["seconds"] > 0
    assert done["bytes"] == (tmp_path / "o" / done["file"]).stat().st_size
    assert failed["line"] == 3
    assert failed["status"] == "failed"
    assert "BadRequestError" in failed["error"]
    assert not (tmp_path / "o" / failed["file"]).exists()
    assert TEST_KEY not in (tmp_path / "o" / "manifest.jsonl").read_text()


def test_service_png_is_written_as_sent_with_text_chunks(fake_api, send_seed, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a lighthouse\n")
    sent = []

    def answer(req, fake):
        sent.append(request_image(req))
        return Reply.image(sent[-1])

    fake_api.set_default(answer)
    assert main(draft_args(prompts, tmp_path / "o")) == 0
    (path,) = (tmp_path / "o").glob("*.png")
    written = dict(image_files._chunks(path.read_bytes()))
    sent_chunks = dict(image_files._chunks(sent[0]))
    assert written[b"IDAT"] == sent_chunks[b"IDAT"]  # the service's image data, not re-encoded
    assert written[b"IHDR"] == sent_chunks[b"IHDR"]
    with Image.open(path) as image:
        assert image.info["prompt"] == "a lighthouse"
        assert image.info["seed"] == "3"


# --- kill -9 and resume -------------------------------------------------------------------------


def test_manifest_survives_sigkill_and_the_resume_pays_only_for_what_is_missing(fake_api, tmp_path):
    fake_api.set_default(lambda req, fake: Reply.image(request_image(req), delay_s=0.15))
    prompts = tmp_path / "p.txt"
    total = 24
    prompts.write_text("".join(f"drawing {i}\n" for i in range(total)))
    out = tmp_path / "o"
    args = draft_args(prompts, out, "--concurrency", "2")
    process = subprocess.Popen(
        [sys.executable, "-m", "comfyui_flux_schnell", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.exists() and manifest.read_bytes().count(b"\n") >= 6:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)

    with manifest.open("ab") as f:
        f.write(b'{"line": 7, "status": "do')  # as if the kill had cut a write in half
    records = list(read_manifest(manifest))
    assert len(records) >= 6
    assert all(r["status"] == "done" for r in records)
    for record in records:  # every recorded image is there, whole
        assert image_files.is_complete_png(out / record["file"])
    complete = [p for p in out.glob("*.png") if image_files.is_complete_png(p)]
    assert len(complete) == len(list(out.glob("*.png")))  # nothing half-written under a real name
    calls_before = fake_api.generate_calls

    fake_api.set_default(lambda req, fake: Reply.image(request_image(req)))
    assert main(args) == 0
    assert fake_api.generate_calls - calls_before == total - len(complete)  # only what is missing
    assert not list(out.glob(".*.part"))
    assert not list((out / "thumbs").glob(".*.part"))
    latest = {r["line"]: r["status"] for r in read_manifest(manifest)}
    assert latest == {i + 1: "done" for i in range(total)}
    assert len(list(out.glob("*.png"))) == total


def test_a_file_written_but_not_recorded_is_not_bought_again(fake_api, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    out = tmp_path / "o"
    assert main(draft_args(prompts, out)) == 0
    manifest = out / "manifest.jsonl"
    # the kill came between writing "two" and recording it (the lines finish in either order)
    one = next(line for line in manifest.read_text().splitlines() if json.loads(line)["prompt"] == "one")
    manifest.write_text(one + "\n")
    assert main(draft_args(prompts, out)) == 0
    assert fake_api.generate_calls == 2
    found = [r for r in read_manifest(manifest) if r.get("found_on_disk")]
    assert [r["prompt"] for r in found] == ["two"]


def test_a_damaged_file_is_made_again(fake_api, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\n")
    out = tmp_path / "o"
    assert main(draft_args(prompts, out)) == 0
    (path,) = out.glob("*.png")
    path.write_bytes(path.read_bytes()[:-40])
    assert main(draft_args(prompts, out)) == 0
    assert fake_api.generate_calls == 2
    assert image_files.is_complete_png(path)


def test_stale_part_files_are_removed_by_the_next_run(fake_api, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\n")
    out = tmp_path / "o"
    out.mkdir()
    (out / ".one-abc.png.999999999-deadbeef.part").write_bytes(b"half an image")
    (out / "notes.txt").write_text("mine")
    assert main(draft_args(prompts, out)) == 0
    assert not list(out.glob("*.part"))
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("steps", ["1", "2"])
def test_manifest_line_numbers_with_batches(fake_api, send_seed, tmp_path, steps):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n\nthird line\n")
    assert main(draft_args(prompts, tmp_path / "o", "--batch-size", "2", "--steps", steps)) == 0
    records = list(read_manifest(tmp_path / "o" / "manifest.jsonl"))
    assert sorted((r["line"], r["seed"]) for r in records) == [(3, 3), (3, 4)]
    assert json.loads(json.dumps(records))  # plain JSON
