"""FLUX Schnell Generate with backend 'api', run exactly as ComfyUI calls it, against a loopback fake."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import pytest
from support import TEST_KEY
from support.fake_imageapi import Reply, error_reply, request_image


def run(node, *args, **kwargs):
    """The node's function the way ComfyUI's executor calls it: awaited in an event loop."""
    return asyncio.run(node.generate(*args, **kwargs))


@pytest.fixture
def send_seed(fake_api, monkeypatch, tmp_path):
    config = tmp_path / "seed_config.json"
    config.write_text(json.dumps({"send_seed": True}))
    monkeypatch.setenv("IMAGEAPI_CONFIG", str(config))


def fail_seeds(seeds: set[int], status: int = 400):
    def responder(req, fake):
        if req.json.get("seed") in seeds:
            return error_reply(status, f"seed {req.json['seed']} refused", request_id=None)
        return Reply.image(request_image(req))

    return responder


def test_batch_makes_one_request_per_image(comfy, node, fake_api):
    images, info = run(node, "a red fox", "api", 512, 768, 4, 42, 3)
    assert images.shape == (3, 768, 512, 3)
    assert images.dtype.is_floating_point
    assert 0 <= images.min() <= images.max() <= 1
    assert fake_api.generate_calls == 3
    bodies = [r.json for r in fake_api.requests]
    assert all(
        b
        == {
            "prompt": "a red fox",
            "model": "flux-schnell",
            "width": 512,
            "height": 768,
            "num_inference_steps": 4,
        }
        for b in bodies
    )
    data = json.loads(info)
    assert data["backend"] == "api"
    assert data["seeds"] == [42, 43, 44]
    assert data["seed_sent"] is False
    assert (data["width"], data["height"], data["steps"]) == (512, 768, 4)
    assert len(data["request_ids"]) == 3
    assert [u[0] for u in comfy.updates] == [1, 2, 3]  # the bar advanced per finished image
    assert TEST_KEY not in info
    auth = {r.header("authorization") for r in fake_api.requests}
    assert auth == {f"Bearer {TEST_KEY}"}


def test_images_keep_seed_order(comfy, node, fake_api, send_seed):
    def slow_first(req, fake):
        if req.json["seed"] == 10:
            time.sleep(0.3)  # the first image finishes last
        return Reply.image(request_image(req))

    fake_api.set_default(slow_first)
    images, info = run(node, "order", "api", 256, 256, 4, 10, 3)
    from support.fake_imageapi import color_for

    for i, seed in enumerate([10, 11, 12]):
        expected = [c / 255 for c in color_for("order", seed)]
        assert images[i, 0, 0].tolist() == pytest.approx(expected, abs=1e-6)
    assert json.loads(info)["seed_sent"] is True


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_inference_steps": 9}, "num_inference_steps must be between 1 and 8"),
        ({"prompt": ""}, "prompt is empty"),
        ({"width": 1000}, "width must be a multiple of 16"),
        ({"prompt": "w" * 2001}, "prompt is 2,001 characters long; at most 2,000"),
    ],
)
def test_bad_inputs_are_refused_before_any_request(node, fake_api, change, message):
    args = {
        "prompt": "p",
        "backend": "api",
        "width": 1024,
        "height": 1024,
        "num_inference_steps": 4,
        "seed": 0,
        "batch_size": 1,
        **change,
    }
    with pytest.raises(ValueError, match=message):
        run(node, **args)
    assert fake_api.generate_calls == 0


def test_partial_failure_names_images_and_requeue_pays_only_for_failed(
    comfy_package, node, fake_api, send_seed
):
    fake_api.set_default(fail_seeds({101, 103}))
    with pytest.raises(comfy_package.errors.BatchFailedError) as info:
        run(node, "drafts", "api", 256, 256, 4, 100, 4)
    message = str(info.value)
    assert "2 of 4 images failed" in message
    assert "image 2 (seed 101)" in message
    assert "image 4 (seed 103)" in message
    assert "seed 101 refused" in message  # the service's own words
    assert "finished image(s) are kept" in message
    assert fake_api.generate_calls == 4

    fake_api.set_default(fail_seeds(set()))
    images, data = run(node, "drafts", "api", 256, 256, 4, 100, 4)
    assert images.shape[0] == 4
    assert fake_api.generate_calls == 6  # only the two failed ones again
    assert sorted(r.json["seed"] for r in fake_api.requests[4:]) == [101, 103]
    assert json.loads(data)["seeds"] == [100, 101, 102, 103]


def test_refused_key_is_one_clear_error_without_the_key(comfy_package, node, fake_api, caplog):
    fake_api.set_default(error_reply(401, "invalid api key"))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(comfy_package.errors.AuthenticationError) as info:
        run(node, "p", "api", 256, 256, 4, 0, 4)
    message = str(info.value)
    assert "IMAGEAPI_API_KEY" in message  # where the key came from
    assert TEST_KEY not in message
    assert TEST_KEY not in caplog.text
    assert fake_api.generate_calls <= 4


def test_missing_key_says_how_to_set_one(comfy_package, node, fake_api, monkeypatch):
    monkeypatch.delenv("IMAGEAPI_API_KEY")
    with pytest.raises(comfy_package.errors.ConfigurationError) as info:
        run(node, "p", "api", 256, 256, 4, 0, 1)
    message = str(info.value)
    assert "IMAGEAPI_API_KEY" in message
    assert "flux-schnell set-key" in message
    assert fake_api.generate_calls == 0


@pytest.mark.slow  # over 3 s: it waits on a slow service on purpose
def test_interrupt_stops_waiting_at_once(comfy, node, fake_api):
    fake_api.set_default(lambda req, fake: Reply.image(request_image(req), delay_s=30))
    threading.Timer(0.3, comfy.interrupt).start()
    started = time.monotonic()
    with pytest.raises(comfy.mm.InterruptProcessingException):
        run(node, "slow", "api", 256, 256, 4, 0, 2)
    assert time.monotonic() - started < 10.0  # not the 30 s answers: the interrupt ended the wait


def test_queue_keeps_working_after_an_error(comfy_package, node, fake_api):
    fake_api.script(error_reply(400, "prompt rejected by the moderation filter"))
    with pytest.raises(comfy_package.errors.BadRequestError, match="moderation filter"):
        run(node, "p", "api", 256, 256, 4, 0, 1)
    images, _ = run(node, "p", "api", 256, 256, 4, 0, 1)
    assert images.shape == (1, 256, 256, 3)


def test_other_size_from_the_service_is_kept_and_noted(node, fake_api):
    from support.fake_imageapi import solid_image

    fake_api.set_default(Reply.image(solid_image(320, 320, (1, 2, 3))))
    images, info = run(node, "p", "api", 256, 512, 4, 0, 2)
    assert images.shape == (2, 320, 320, 3)
    assert "instead of the requested 256x512" in json.loads(info)["notes"][0]


def test_kept_images_survive_a_cancel_before_the_requeue_finishes(
    comfy, comfy_package, node, fake_api, send_seed
):
    fake_api.set_default(fail_seeds({201}))
    with pytest.raises(comfy_package.errors.BatchFailedError, match="seed 200"):
        run(node, "keep", "api", 256, 256, 4, 200, 2)
    assert fake_api.generate_calls == 2
    comfy.interrupt()  # Cancel pressed as the re-queue starts
    with pytest.raises(comfy.mm.InterruptProcessingException):
        run(node, "keep", "api", 256, 256, 4, 200, 2)
    comfy.next_prompt()
    fake_api.set_default(fail_seeds(set()))
    images, _ = run(node, "keep", "api", 256, 256, 4, 200, 2)
    assert images.shape[0] == 2
    assert [r.json["seed"] for r in fake_api.requests[2:]] == [201]  # seed 200 was not bought again
