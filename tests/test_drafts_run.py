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


# --- a re-run collects the async job an earlier run paid for ---------------------------------------


def job_config(tmp_path, deadline_s: float) -> None:
    """The fake's config file: `deadline_s` short enough to cut off a job (status polls: 1 s apart)."""
    config = tmp_path / "flux_schnell_config.json"
    config.write_text(json.dumps({"deadline_s": deadline_s}))
    config.chmod(0o600)


def cut_off_jobs(fake_api, tmp_path, prompts_text: str = "a fox\n"):
    """A first run whose jobs pass deadline_s: each line is paid for, failed, with its poll URL."""
    from support.fake_imageapi import ScriptedJobs

    jobs = ScriptedJobs(fake_api)
    fake_api.set_default(jobs.start)
    job_config(tmp_path, 1.0)
    prompts = tmp_path / "p.txt"
    prompts.write_text(prompts_text)
    out = tmp_path / "o"
    assert main(draft_args(prompts, out, "--concurrency", "2")) == 1
    records = list(read_manifest(out / "manifest.jsonl"))
    assert [r["status"] for r in records] == ["failed"] * len(records)
    assert all(r["paid_calls"] == 1 and r["poll_url"].startswith(fake_api.base_url) for r in records)
    return jobs, prompts, out


def test_a_rerun_collects_the_job_that_passed_deadline_s_without_a_post(fake_api, tmp_path, capsys):
    from comfyui_flux_schnell.drafts.report import read_report

    jobs, prompts, out = cut_off_jobs(fake_api, tmp_path)
    posts, polls = fake_api.generate_calls, jobs.polls()
    assert posts == 1
    poll_url = next(read_manifest(out / "manifest.jsonl"))["poll_url"]
    jobs.state = "done"
    job_config(tmp_path, 10.0)
    capsys.readouterr()

    assert main(draft_args(prompts, out)) == 0
    assert fake_api.generate_calls == posts  # no POST: the job is collected
    assert jobs.polls() > polls
    err = capsys.readouterr().err
    assert "collected: 1" in err
    (png,) = out.glob("*.png")
    assert image_files.is_complete_png(png)
    last = list(read_manifest(out / "manifest.jsonl"))[-1]
    assert last["status"] == "done"
    assert last["collected_from"] == poll_url
    assert last["paid_calls"] == 0
    assert "poll_url" not in last
    report = read_report(out)  # the image was paid for once, and delivered
    assert (report.delivered, report.collected, report.paid_calls) == (1, 1, 1)
    assert (report.paid_without_image, report.failures) == (0, 0)

    assert main(draft_args(prompts, out)) == 0  # done now: a third run neither posts nor polls
    assert (fake_api.generate_calls, jobs.polls()) == (posts, jobs.polls())


def test_a_job_still_running_is_left_for_a_later_run_not_bought_again(fake_api, tmp_path, capsys):
    from support import TEST_KEY

    jobs, prompts, out = cut_off_jobs(fake_api, tmp_path)
    posts, polls = fake_api.generate_calls, jobs.polls()
    capsys.readouterr()

    assert main(draft_args(prompts, out)) == 1  # still pending: 1 s deadline again
    assert fake_api.generate_calls == posts
    assert jobs.polls() > polls
    err = capsys.readouterr().err
    assert "line 1" in err
    assert "not finished yet" in err
    assert "run the same command again later" in err
    assert f"127.0.0.1:{fake_api.port}" in err
    assert TEST_KEY not in err
    records = list(read_manifest(out / "manifest.jsonl"))
    assert records[-1]["status"] == "failed"
    assert records[-1]["paid_calls"] == 0  # nothing paid by the re-run
    assert records[-1]["poll_url"] == records[0]["poll_url"]  # kept for the next run

    jobs.state = "done"  # it finishes: the next run collects it
    job_config(tmp_path, 10.0)
    assert main(draft_args(prompts, out)) == 0
    assert fake_api.generate_calls == posts
    assert list(read_manifest(out / "manifest.jsonl"))[-1]["collected_from"] == records[0]["poll_url"]


@pytest.mark.parametrize("state", ["expired", "failed"])
def test_a_job_the_service_lost_is_bought_again_only_with_rebuy_expired(fake_api, tmp_path, capsys, state):
    from comfyui_flux_schnell.drafts.report import read_report

    jobs, prompts, out = cut_off_jobs(fake_api, tmp_path)
    posts = fake_api.generate_calls
    jobs.state = state
    job_config(tmp_path, 10.0)
    capsys.readouterr()

    assert main(draft_args(prompts, out)) == 1
    assert fake_api.generate_calls == posts  # not bought again without the opt-in
    err = capsys.readouterr().err
    assert "line 1" in err
    assert "--rebuy-expired" in err
    assert f"127.0.0.1:{fake_api.port}" in err
    assert not list(out.glob("*.png"))
    last = list(read_manifest(out / "manifest.jsonl"))[-1]
    assert (last["status"], last["paid_calls"]) == ("failed", 0)
    assert "poll_url" in last  # a later plain run still does not buy it

    fake_api.set_default(lambda req, fake: Reply.image(request_image(req)))
    assert main(draft_args(prompts, out, "--rebuy-expired")) == 0
    assert fake_api.generate_calls == posts + 1
    assert len(list(out.glob("*.png"))) == 1
    assert read_report(out).paid_calls == 2  # the lost job and the one bought again


def test_dry_run_and_spend_guard_count_jobs_to_collect_as_not_paid(fake_api, tmp_path, capsys):
    jobs, prompts, out = cut_off_jobs(fake_api, tmp_path, "a fox\nan owl\n")
    posts = fake_api.generate_calls
    assert posts == 2
    prompts.write_text("a fox\nan owl\na hare\n")
    capsys.readouterr()

    assert main(draft_args(prompts, out, "--dry-run")) == 0
    printed = capsys.readouterr().out
    assert "to collect:          2" in printed
    assert "to request:          1" in printed
    # with the opt-in both jobs may be bought again: 3 paid requests > 1
    assert main(draft_args(prompts, out, "--max-images", "1", "--rebuy-expired")) == 2
    assert "--max-images" in capsys.readouterr().err
    assert fake_api.generate_calls == posts

    jobs.state = "done"
    job_config(tmp_path, 10.0)
    assert main(draft_args(prompts, out, "--max-images", "1")) == 0  # one paid request: allowed
    assert fake_api.generate_calls == posts + 1
    assert len(list(out.glob("*.png"))) == 3


def test_rebuy_expired_needs_a_draft_folder_on_the_api(fake_api, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["generate", "--prompt", "x", "--out", str(tmp_path / "x.png"), "--rebuy-expired"])
    assert refused.value.code == 2
    assert "--rebuy-expired goes with --prompts-file and --out-dir" in capsys.readouterr().err
    assert fake_api.generate_calls == 0
