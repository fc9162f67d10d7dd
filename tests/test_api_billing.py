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
