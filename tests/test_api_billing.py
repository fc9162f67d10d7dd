"""The money side of the hosted-API client against the fake ImageAPI on 127.0.0.1: the billing record
of each image (`CallRecord`), idempotency keys, no POST after a refused key, graceful stops, an early
stop when the service is unreachable, and collecting an async job recorded by an earlier run."""

from __future__ import annotations

import pytest
from comfyui_flux_schnell.errors import ApiError, ServerError
from support.api_testing import REQ
from support.fake_imageapi import SHAPES, Reply, default_png, error_reply

# --- the billing record ----------------------------------------------------------------------------


def test_finished_image_records_paid_calls_free_retries_and_ids(fake, make_client):
    fake.script(
        error_reply(503, request_id="r-free"),  # free: the service did no work
        error_reply(500, request_id="r-billed"),  # may have been billed
        lambda req, f: Reply.image(default_png(req, f).body, headers={"X-Request-Id": "r-ok"}),
    )
    result = make_client(max_billed_retries=1).generate(REQ)
    assert result.calls.paid_calls == 2  # the 500 and the delivering call
    assert result.calls.free_retries == 1
    assert result.calls.request_ids == ("r-free", "r-billed", "r-ok")
    assert result.calls.poll_url is None


def test_error_carries_the_record_of_its_calls(fake, make_client):
    fake.script(error_reply(500, request_id="r1"), error_reply(500, request_id="r2"))
    with pytest.raises(ServerError) as caught:
        make_client(max_billed_retries=1).generate(REQ)
    assert caught.value.calls is not None
    assert caught.value.calls.paid_calls == 2
    assert caught.value.calls.request_ids == ("r1", "r2")


def test_async_job_records_its_poll_url(fake, client):
    fake.set_default(SHAPES["job_relative_poll_url"])
    result = client.generate(REQ)
    assert result.calls.paid_calls == 1
    assert result.calls.poll_url is not None
    assert result.calls.poll_url.startswith(fake.base_url + "/jobs/")


def test_errors_in_a_batch_carry_records(fake, client):
    fake.script(error_reply(400))
    results = client.generate_many([REQ], concurrency=1)
    assert isinstance(results[0], ApiError)
    assert results[0].calls.paid_calls == 0
    assert results[0].calls.request_ids == ("req-err-1",)


# --- idempotency keys ------------------------------------------------------------------------------


def test_retries_and_reruns_send_one_key_and_images_differ(fake, make_client):
    from comfyui_flux_schnell.api.types import ApiImageRequest, idempotency_key

    client = make_client(max_billed_retries=1)
    fake.script(error_reply(503), error_reply(500))
    client.generate(REQ)  # two retries, then the image
    client.generate(REQ)  # a re-run of the same image
    keys = [r.header("Idempotency-Key") for r in fake.requests]
    assert len(keys) == 4
    assert len(set(keys)) == 1
    assert keys[0] == idempotency_key(fake.base_url, REQ, send_seed=False)
    assert len(keys[0]) == 64
    int(keys[0], 16)
    second = ApiImageRequest(REQ.prompt, 64, 48, 4, seed=7, index_in_batch=1)
    client.generate(second)
    assert fake.requests[-1].header("Idempotency-Key") != keys[0]


def test_key_follows_the_image_identity():
    from comfyui_flux_schnell.api.types import ApiImageRequest, idempotency_key

    base = "https://imageapi.org"
    key = idempotency_key(base, REQ, send_seed=False)
    assert idempotency_key(base, ApiImageRequest("  " + REQ.prompt + " ", 64, 48, 4, seed=7), False) == key
    assert idempotency_key(base, ApiImageRequest(REQ.prompt, 64, 48, 4, seed=8), False) == key  # unsent
    assert idempotency_key(base, ApiImageRequest(REQ.prompt, 64, 48, 4, seed=8), True) != key
    assert idempotency_key(base, ApiImageRequest(REQ.prompt, 64, 64, 4, seed=7), False) != key
    assert idempotency_key(base, ApiImageRequest(REQ.prompt, 64, 48, 3, seed=7), False) != key
    assert idempotency_key(base, ApiImageRequest("another", 64, 48, 4, seed=7), False) != key
    assert idempotency_key("https://other.example", REQ, False) != key


def test_batch_images_get_distinct_keys(fake, client):
    from comfyui_flux_schnell.api_client import image_requests
    from comfyui_flux_schnell.generation import GenerationRequest

    client.generate_many(image_requests(GenerationRequest("a fox", 256, 256, 4, seed=1, batch_size=3)))
    assert len({r.header("Idempotency-Key") for r in fake.requests}) == 3
