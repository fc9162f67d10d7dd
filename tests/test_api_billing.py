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


# --- no POST after a refused key -------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403, 402])
def test_no_post_after_a_refused_key_even_queued_at_concurrency_1(fake, client, status):
    from comfyui_flux_schnell.api.types import ApiImageRequest

    fake.script(error_reply(status))
    batch = [ApiImageRequest(f"image {i}", 64, 48, 4) for i in range(4)]
    results = client.generate_many(batch, concurrency=1)
    assert fake.generate_calls == 1
    assert all(isinstance(r, type(results[0])) for r in results)
    assert [r.calls.paid_calls for r in results[1:]] == [0, 0, 0]


# --- an early stop when the service is unreachable -------------------------------------------------


def test_closed_port_stops_the_run_within_seconds_naming_the_base_url(fake):
    import time

    from comfyui_flux_schnell.api.service import ImageApiClient
    from comfyui_flux_schnell.api.settings import ApiSettings
    from comfyui_flux_schnell.api.types import ApiImageRequest
    from comfyui_flux_schnell.errors import ServiceUnreachableError
    from support.api_testing import KEY, free_port

    base = f"http://127.0.0.1:{free_port()}"
    settings = ApiSettings(  # the default retries and backoff
        base_url=base,
        api_key=KEY,
        key_source="test",
        base_url_source="environment variable IMAGEAPI_BASE_URL",
    )
    batch = [ApiImageRequest(f"image {i}", 64, 48, 4) for i in range(20)]
    started = time.monotonic()
    with ImageApiClient(settings) as client:
        results = client.generate_many(batch, concurrency=1)
    assert time.monotonic() - started < 6
    assert all(isinstance(r, ServiceUnreachableError) for r in results)
    assert base in str(results[0])
    assert "IMAGEAPI_BASE_URL" in str(results[0])
    assert all(r.calls.paid_calls == 0 for r in results)


def test_unreachable_stops_the_stream_of_the_command_line(fake):
    from comfyui_flux_schnell.api.settings import ApiSettings
    from comfyui_flux_schnell.api.types import ApiImageRequest
    from comfyui_flux_schnell.api_client import stream_api_images
    from comfyui_flux_schnell.errors import ServiceUnreachableError
    from support.api_testing import FAST, KEY, free_port

    settings = ApiSettings(base_url=f"http://127.0.0.1:{free_port()}", api_key=KEY, key_source="t", **FAST)
    batch = (ApiImageRequest(f"image {i}", 64, 48, 4) for i in range(50))
    results = list(stream_api_images(batch, settings, concurrency=2))
    assert len(results) == 1
    assert isinstance(results[0][1], ServiceUnreachableError)


def test_failures_after_an_answer_do_not_end_the_run():
    from comfyui_flux_schnell.api.failures import Failure
    from comfyui_flux_schnell.api.service import UNREACHABLE_AFTER, RunGate
    from comfyui_flux_schnell.errors import NetworkError
    from support.api_testing import make_settings

    refused = Failure(NetworkError, "refused", reason="connection refused", retry="free", unreachable=True)
    gate = RunGate(make_settings("http://127.0.0.1:9"), None)
    gate.answered()
    for _ in range(UNREACHABLE_AFTER + 2):
        gate.failed(refused)
    assert gate.ending_error() is None
    fresh = RunGate(make_settings("http://127.0.0.1:9"), None)
    for _ in range(UNREACHABLE_AFTER):
        fresh.failed(refused)
    assert fresh.ending_error() is not None


# --- graceful stop ---------------------------------------------------------------------------------


def _slow(seconds):
    def responder(req, fake):
        reply = default_png(req, fake)
        reply.delay_s = seconds
        return reply

    return responder


def test_drain_sends_nothing_new_and_delivers_the_calls_in_flight(fake, client):
    import threading

    from comfyui_flux_schnell.api.control import StopRequest
    from comfyui_flux_schnell.api.types import ApiImageRequest
    from comfyui_flux_schnell.generation import FinishedImage

    fake.set_default(_slow(0.5))
    stop = StopRequest()
    batch = [ApiImageRequest(f"image {i}", 64, 48, 4) for i in range(10)]
    timer = threading.Timer(0.2, stop.drain)
    timer.start()
    got = list(client.generate_stream(batch, concurrency=2, stop_request=stop))
    timer.join()
    assert len(got) == 2  # the two in flight, delivered
    assert all(isinstance(r, FinishedImage) for _, r in got)
    assert fake.generate_calls == 2
    assert stop.not_sent == 2  # read ahead (2 x concurrency) and never sent
    assert stop.abandoned_in_flight == 0


def test_abandon_after_drain_raises_and_counts_the_calls_in_flight(fake, client):
    import threading

    from comfyui_flux_schnell.api.control import StopRequest
    from comfyui_flux_schnell.api.types import ApiImageRequest
    from comfyui_flux_schnell.errors import GenerationInterrupted

    fake.set_default(_slow(2.0))
    stop = StopRequest()
    batch = [ApiImageRequest(f"image {i}", 64, 48, 4) for i in range(10)]
    threading.Timer(0.2, stop.request).start()  # first: drain
    threading.Timer(0.4, stop.request).start()  # second: abandon
    with pytest.raises(GenerationInterrupted, match="2 image"):
        list(client.generate_stream(batch, concurrency=2, stop_request=stop))
    assert stop.abandoned_in_flight == 2
    assert fake.generate_calls == 2


# --- collecting a job an earlier run paid for ------------------------------------------------------


def test_job_past_its_deadline_is_collected_by_a_rerun_without_a_post(fake, make_client):
    import time

    from comfyui_flux_schnell.errors import ApiTimeoutError
    from support.fake_imageapi import request_image

    ready_at = time.monotonic() + 1.2  # the job finishes after the first run's deadline

    def status(req, f):
        if time.monotonic() < ready_at:
            return Reply.json({"job_id": "j1", "status": "processing"})
        return Reply.image(request_image(posted[0]))

    posted = []

    def start_job(req, f):
        posted.append(req)
        return Reply.json({"job_id": "j1", "status": "queued", "poll_url": "/jobs/j1"}, status=202)

    fake.set_default(start_job)
    fake.route("GET", "/jobs/j1", *([status] * 200))
    client = make_client(deadline_s=0.6, min_call_s=0.1)
    with pytest.raises(ApiTimeoutError) as caught:
        client.generate(REQ)
    record = caught.value.calls
    assert record.paid_calls == 1
    assert record.poll_url == fake.base_url + "/jobs/j1"
    posts = fake.generate_calls

    image = make_client(deadline_s=5.0).collect(record.poll_url, REQ)
    assert fake.generate_calls == posts  # 0 new POSTs
    assert image.size == (64, 48)
    assert image.calls.paid_calls == 0
    assert image.calls.poll_url == record.poll_url


def test_collect_polls_at_once_without_waiting_the_poll_interval(fake, make_client):
    from support.fake_imageapi import ScriptedJobs

    jobs = ScriptedJobs(fake, state="done")
    fake.set_default(jobs.start)
    started = make_client().generate_many([REQ], concurrency=1)[0]  # a job that finished
    posts = fake.generate_calls
    # a poll interval longer than the whole deadline: only a first poll at once can collect it
    image = make_client(deadline_s=0.5, poll_interval_s=5.0).collect(started.calls.poll_url, REQ)
    assert image.size == (64, 48)
    assert fake.generate_calls == posts
