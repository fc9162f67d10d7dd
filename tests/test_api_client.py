"""Tests of api_client.py's public functions for the command line and the node's status line:
requests per seed with labels, a stream that ends after a refused key, progress events."""

from __future__ import annotations

from comfyui_flux_schnell import api_client as api_backend
from comfyui_flux_schnell.api.settings import load_settings
from comfyui_flux_schnell.api.types import ApiImageRequest
from comfyui_flux_schnell.comfy_bridge import Progress
from comfyui_flux_schnell.errors import AuthenticationError
from comfyui_flux_schnell.generation import FinishedImage, GenerationRequest
from support.fake_imageapi import Reply, error_reply, request_image, solid_image


def test_image_requests_one_per_seed_with_labels():
    request = GenerationRequest("a fox", 512, 256, 4, seed=9, batch_size=3)
    reqs = api_backend.image_requests(request, ["line 1 -> a.png", "line 1 -> b.png"])
    assert [(r.seed, r.label) for r in reqs] == [(9, "line 1 -> a.png"), (10, "line 1 -> b.png"), (11, "")]
    assert reqs[2].name(2) == "image 3"
    assert {(r.width, r.height, r.num_inference_steps, r.model) for r in reqs} == {
        (512, 256, 4, "flux-schnell")
    }


def test_the_stream_ends_after_a_refused_key(fake_api):
    fake_api.set_default(error_reply(401, "bad key"))
    requests_in = (ApiImageRequest(f"p{i}", 256, 256, 1) for i in range(50))
    results = list(api_backend.stream_api_images(requests_in, load_settings(), concurrency=1))
    assert len(results) == 1
    assert isinstance(results[0][1], AuthenticationError)
    assert api_backend.ends_the_run(results[0][1])
    assert fake_api.generate_calls <= 2  # the one refused, at most one already on its way


def test_the_stream_keeps_the_services_file_when_asked(fake_api):
    fake_api.set_default(lambda req, fake: Reply.image(request_image(req)))
    ((_, result),) = api_backend.stream_api_images(
        [ApiImageRequest("p", 256, 256, 1)], load_settings(), keep_data=True
    )
    assert isinstance(result, FinishedImage)
    assert result.format == "PNG"
    assert result.data.startswith(b"\x89PNG")


def test_generate_api_reports_progress_events(fake_api):
    fake_api.script(error_reply(503), Reply.image(solid_image(256, 256, (1, 2, 3))))
    events = []
    images, _ = api_backend.generate_api(
        GenerationRequest("a fox", 256, 256, 4, seed=1), Progress(1), load_settings(), on_event=events.append
    )
    assert images.shape == (1, 256, 256, 3)
    assert [(e.label, e.kind) for e in events] == [
        ("image 1", "started"),
        ("image 1", "retrying"),
        ("image 1", "done"),
    ]


def test_cancel_keeps_the_answers_in_flight_and_the_requeue_buys_only_the_rest(
    comfy, comfy_package, fake_api
):
    import asyncio
    import threading

    import pytest
    from support.fake_imageapi import Reply, request_image

    node = comfy_package.NODE_CLASS_MAPPINGS["FluxSchnellGenerate"]()
    fake_api.set_default(lambda req, fake: Reply.image(request_image(req), delay_s=1.0))
    threading.Timer(0.4, comfy.interrupt).start()  # Cancel while 4 answers are in flight
    with pytest.raises(comfy.mm.InterruptProcessingException):
        asyncio.run(node.generate("cancel me", "api", 256, 256, 4, 300, 6))
    assert fake_api.generate_calls == 4  # concurrency 4: two were never sent
    comfy.next_prompt()
    images, _ = asyncio.run(node.generate("cancel me", "api", 256, 256, 4, 300, 6))
    assert images.shape[0] == 6
    assert fake_api.generate_calls == 6  # only the two never sent were bought


def test_kept_images_are_taken_once_and_bounded():
    from comfyui_flux_schnell.api.types import ApiImageRequest
    from comfyui_flux_schnell.api_client import KeptImages
    from comfyui_flux_schnell.generation import FinishedImage
    from support.api_testing import make_settings

    settings = make_settings("http://127.0.0.1:9")
    cache = KeptImages(limit=2)
    reqs = [ApiImageRequest(f"p{i}", 64, 64, 4) for i in range(3)]
    cache.keep(settings, reqs, [FinishedImage(None), None, FinishedImage(None)])
    assert len(cache) == 2
    assert sorted(cache.take(settings, reqs)) == [0, 2]
    assert cache.take(settings, reqs) == {}
    cache.keep(settings, reqs, [FinishedImage(None)] * 3)
    assert sorted(cache.take(settings, reqs)) == [1, 2]  # the oldest dropped
