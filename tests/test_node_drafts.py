"""FLUX Schnell Drafts, run as ComfyUI calls it (stand-ins), against the loopback fake service."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import weakref

import pytest
from support.fake_imageapi import Reply, request_image

PROMPTS = "\n".join(["# fifty drafts"] + [f"draft number {i}" for i in range(50)] + ["draft number 0"])


def run(node, prompts=PROMPTS, **kwargs):
    args = dict(backend="api", width=256, height=256, num_inference_steps=4, seed=7, concurrency=8)
    args.update(folder="drafts/foxes", prompt={"1": {"class_type": "FluxSchnellDrafts"}})
    args.update(extra_pnginfo={"workflow": {"nodes": []}}, unique_id="9")
    args.update(kwargs)
    return asyncio.run(node.draft(prompts, **args))


@pytest.fixture
def make_node(comfy_package):
    return comfy_package.NODE_CLASS_MAPPINGS["FluxSchnellDrafts"]


def test_fifty_prompts_at_concurrency_8_stream_into_the_folder(comfy, make_node, fake_api, monkeypatch):
    from comfyui_flux_schnell.drafts import run as drafts_run

    alive: weakref.WeakSet = weakref.WeakSet()
    peak = [0]
    write = drafts_run.DraftRun._write
    lock = threading.Lock()

    def counting_write(self, p, result):
        with lock:
            alive.add(result.image)
            gc.collect()
            peak[0] = max(peak[0], len(alive))
        write(self, p, result)

    monkeypatch.setattr(drafts_run.DraftRun, "_write", counting_write)
    out = run(make_node())
    assert fake_api.generate_calls == 50  # the repeated last line is requested once
    assert peak[0] <= 8 + 2  # images alive at once: bounded by the concurrency, not by N
    folder = comfy.output_dir / "drafts" / "foxes"
    assert len(list(folder.glob("*.png"))) == 50
    records = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in records).count("done") == 50
    assert (folder / "index.html").is_file()
    images = out["ui"]["images"]
    assert len(images) == 50
    assert {i["type"] for i in images} == {"output"}
    assert {i["subfolder"] for i in images} == {"drafts/foxes"}
    sheet, path = out["result"]
    assert path == str(folder)
    assert sheet.shape[0] == 1
    assert sheet.shape[1] <= 8 * 144
    assert sheet.shape[2] <= 8 * 128
    from comfyui_flux_schnell.drafts.png_files import read_png_text

    text = read_png_text(folder / images[0]["filename"])
    assert json.loads(text["workflow"]) == {"nodes": []}  # ComfyUI's metadata, as SaveImage writes it
    assert json.loads(text["prompt"]) == {"1": {"class_type": "FluxSchnellDrafts"}}
    assert text["flux_prompt"].startswith("draft number")
    assert any("of 51 images done" in t for _, t in comfy.texts)  # "k of N" on the node


def test_queueing_again_after_a_restart_requests_only_what_is_missing(comfy, make_node, fake_api):
    run(make_node(), prompts="\n".join(f"p {i}" for i in range(5)))
    assert fake_api.generate_calls == 5
    out = run(make_node(), prompts="\n".join(f"p {i}" for i in range(7)))  # a new instance: a restart
    assert fake_api.generate_calls == 7
    assert len(out["ui"]["images"]) == 7


def test_cancel_keeps_what_was_paid(comfy, make_node, fake_api):
    from support.comfy_stand_in import InterruptProcessingException

    def slow(req, fake):
        if req.json["prompt"] == "p 2":
            comfy.interrupt()  # Cancel while this call is in flight
        return Reply.image(request_image(req), delay_s=0.3)

    fake_api.set_default(slow)
    prompts = "\n".join(f"p {i}" for i in range(20))
    with pytest.raises(InterruptProcessingException):
        run(make_node(), prompts=prompts, concurrency=2)
    paid = fake_api.generate_calls
    assert paid < 20  # sending stopped
    folder = comfy.output_dir / "drafts" / "foxes"
    kept = len(list(folder.glob("*.png")))
    records = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]
    assert sum(r["status"] == "done" for r in records) == kept >= 1  # what arrived is saved and recorded
    assert (folder / "index.html").is_file()
    comfy.next_prompt()
    fake_api.set_default(lambda req, fake: Reply.image(request_image(req)))
    run(make_node(), prompts=prompts, concurrency=2)
    assert fake_api.generate_calls == paid + 20 - kept  # the re-queue requests only what is missing


def test_cancel_keeps_the_answers_in_flight(comfy, make_node, fake_api):
    from support.comfy_stand_in import InterruptProcessingException

    def slow(req, fake):
        if req.json["prompt"] == "p 2":
            comfy.interrupt()
        return Reply.image(request_image(req), delay_s=0.3)

    fake_api.set_default(slow)
    with pytest.raises(InterruptProcessingException):
        run(make_node(), prompts="\n".join(f"p {i}" for i in range(20)), concurrency=2)
    assert len(list((comfy.output_dir / "drafts" / "foxes").glob("*.png"))) == fake_api.generate_calls


def test_a_folder_outside_the_output_folder_is_refused(comfy, make_node, fake_api):
    with pytest.raises(ValueError, match="under ComfyUI's output folder"):  # an InvalidInputError
        run(make_node(), folder="../elsewhere")
    assert fake_api.generate_calls == 0


def test_queueing_again_collects_the_job_that_passed_deadline_s(comfy, make_node, fake_api, tmp_path):
    from support.fake_imageapi import ScriptedJobs

    config = tmp_path / "flux_schnell_config.json"
    config.write_text(json.dumps({"deadline_s": 1.0}))
    config.chmod(0o600)
    jobs = ScriptedJobs(fake_api)
    fake_api.set_default(jobs.start)
    run(make_node(), prompts="a fox")
    folder = comfy.output_dir / "drafts" / "foxes"
    assert not list(folder.glob("*.png"))
    assert fake_api.generate_calls == 1
    polls = jobs.polls()

    jobs.state = "done"
    config.write_text(json.dumps({"deadline_s": 10.0}))
    comfy.next_prompt()
    out = run(make_node(), prompts="a fox")
    assert fake_api.generate_calls == 1  # collected, not bought again
    assert jobs.polls() > polls
    assert len(out["ui"]["images"]) == 1
    records = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]
    assert records[-1]["status"] == "done"
    assert records[-1]["collected_from"] == records[0]["poll_url"]
