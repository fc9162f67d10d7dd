"""Tests of api/service.py against the fake ImageAPI on 127.0.0.1 (real sockets, no mocks of HTTP):
what is sent, the worker pool (order, concurrency, streaming with a bounded number of images),
stopping, and the key never leaving the service's origin or showing up in a log record or an error."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from comfyui_flux_schnell.api.types import ApiImageRequest
from comfyui_flux_schnell.errors import (
    ApiError,
    BadRequestError,
    GenerationInterrupted,
    InvalidInputError,
)
from comfyui_flux_schnell.generation import FinishedImage
from support.api_testing import (
    LEAK_KEY,
    REQ,
    RecordingClock,
    api_threads_alive,
    exception_texts,
    expected_color,
    free_port,
    retry_warnings,
    stop_after,
)
from support.fake_imageapi import (
    SHAPES,
    Reply,
    corrupt_png,
    default_png,
    dropped_mid_body,
    error_reply,
    png_with_claimed_size,
    request_image,
)

# --- what is sent ---------------------------------------------------------------------------------


def test_body_has_documented_fields_only_by_default(fake, client):
    client.generate(REQ)
    (sent,) = fake.requests
    assert sent.json == {
        "prompt": REQ.prompt,
        "model": "flux-schnell",
        "width": 64,
        "height": 48,
        "num_inference_steps": 4,
    }


def test_seed_sent_when_opted_in(fake, make_client):
    result = make_client(send_seed=True).generate(REQ)
    assert fake.requests[0].json["seed"] == 7
    assert result.image.getpixel((0, 0)) == expected_color(REQ, send_seed=True)


def test_seed_none_never_sent(fake, make_client):
    make_client(send_seed=True).generate(ApiImageRequest("x", 16, 16, 1))
    assert "seed" not in fake.requests[0].json


# --- deadline and stopping ------------------------------------------------------------------------


def test_should_stop_interrupts_a_call_in_flight(fake, make_client):
    fake.route("POST", "/api/v1/generate", Reply(delay_s=30.0))
    flag = stop_after(0.2)
    started = time.monotonic()
    with pytest.raises(GenerationInterrupted):
        make_client(request_timeout_s=60.0, deadline_s=60.0).generate(REQ, should_stop=flag.is_set)
    assert time.monotonic() - started < 10.0  # not the 30 s answer: the stop ended the wait
    assert fake.generate_calls == 1


def test_should_stop_interrupts_a_backoff_and_ends_the_workers(fake, make_client):
    fake.route("POST", "/api/v1/generate", error_reply(429, retry_after="30"))
    flag = stop_after(0.2)
    clock = RecordingClock()
    client = make_client(clock=clock, deadline_s=60.0)
    with pytest.raises(GenerationInterrupted):
        client.generate_many([REQ, REQ], should_stop=flag.is_set)
    deadline = time.monotonic() + 5.0
    while api_threads_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert api_threads_alive() == []
    assert clock.sleeps == [30.0, 30.0]  # each image waited its Retry-After ...
    assert clock.interrupted == 2  # ... and the stop ended both waits
    assert fake.generate_calls == 2  # one each, no retry after the stop


def test_should_stop_interrupts_job_polling(fake, make_client):
    fake.route("GET", "/jobs/slow", Reply.json({"status": "processing"}))
    fake.script(Reply.json({"id": "slow", "status": "queued", "poll_url": "/jobs/slow"}))
    flag = stop_after(0.3)
    clock = RecordingClock()
    started = time.monotonic()
    with pytest.raises(GenerationInterrupted):
        make_client(clock=clock, poll_interval_s=0.1, deadline_s=60.0).generate(REQ, should_stop=flag.is_set)
    assert time.monotonic() - started < 10.0  # not the 60 s deadline
    deadline = time.monotonic() + 5.0
    while api_threads_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert api_threads_alive() == []  # the polling worker left too
    assert clock.sleeps  # it was polling (waiting poll_interval_s between polls) when stopped


def test_stop_already_requested_sends_nothing(fake, client):
    fake.set_default(lambda req, f: Reply.image(request_image(req), delay_s=0.2))
    reqs = [ApiImageRequest(f"p{i}", 16, 16, 1) for i in range(4)]
    with pytest.raises(GenerationInterrupted, match="before any"):
        client.generate_many(reqs, concurrency=2, should_stop=lambda: True)
    time.sleep(0.3)  # a worker that had started would have sent by now
    assert fake.generate_calls == 0


# --- generate_many --------------------------------------------------------------------------------


def test_generate_many_runs_concurrently_in_input_order(fake, client):
    fake.set_default(lambda req, f: Reply.image(request_image(req), delay_s=0.3))
    reqs = [ApiImageRequest(f"prompt {i}", 32, 32, 4) for i in range(6)]
    results = client.generate_many(reqs, concurrency=3)
    assert fake.max_in_flight == 3  # three calls at once, never more
    assert fake.generate_calls == 6
    assert [r.image.getpixel((0, 0)) for r in results] == [expected_color(r) for r in reqs]


def test_decoding_an_image_does_not_hold_back_the_next_call(fake, client, monkeypatch):
    second_sent = threading.Event()

    def answer(req, f):
        if req.prompt == "prompt 1":
            second_sent.set()
        return Reply.image(request_image(req))

    fake.set_default(answer)
    opened, seen_while_decoding = client._answers.open, []

    def slow_open(*args, **kwargs):
        # Image 0's decode waits for image 1's call: it only comes if the place was given back.
        seen_while_decoding.append(second_sent.wait(timeout=10))
        return opened(*args, **kwargs)

    monkeypatch.setattr(client._answers, "open", slow_open)
    reqs = [ApiImageRequest(f"prompt {i}", 16, 16, 1) for i in range(3)]
    results = client.generate_many(reqs, concurrency=1)
    assert [r.image.getpixel((0, 0)) for r in results] == [expected_color(r) for r in reqs]
    assert fake.max_in_flight == 1  # still one call at a time
    assert seen_while_decoding[0] is True  # image 1 was sent while image 0 was decoding


def test_generate_many_keeps_going_after_a_failure(fake, client):
    def answer(req, f):
        return error_reply(400, "bad prompt") if "fail" in req.prompt else default_png(req, f)

    fake.set_default(answer)
    reqs = [ApiImageRequest(p, 16, 16, 1) for p in ("ok 1", "fail me", "ok 2")]
    calls = []
    results = client.generate_many(
        reqs, concurrency=2, on_result=lambda i, r: calls.append((i, threading.get_ident()))
    )
    assert isinstance(results[0], FinishedImage)
    assert isinstance(results[1], BadRequestError)
    assert isinstance(results[2], FinishedImage)
    assert sorted(i for i, _ in calls) == [0, 1, 2]
    assert {ident for _, ident in calls} == {threading.get_ident()}


def test_on_result_raising_cancels_the_rest(fake, client):
    fake.set_default(lambda req, f: Reply.image(request_image(req), delay_s=0.2))
    reqs = [ApiImageRequest(f"p{i}", 16, 16, 1) for i in range(8)]

    def on_result(i, result):
        raise RuntimeError("stop the batch")

    with pytest.raises(RuntimeError, match="stop the batch"):
        client.generate_many(reqs, concurrency=2, on_result=on_result)
    time.sleep(0.6)
    assert fake.generate_calls <= 4


def test_generate_many_edge_cases(client):
    assert client.generate_many([]) == []
    with pytest.raises(InvalidInputError, match="concurrency"):
        client.generate_many([REQ], concurrency=0)
    with pytest.raises(InvalidInputError, match="poll_interval"):
        client.generate_many([REQ], poll_interval=0)


def test_a_bug_in_a_worker_reaches_the_caller(fake, client, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(client._answers, "open", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        client.generate(REQ)


# --- the key never leaks --------------------------------------------------------------------------


def _leak_scenarios(other_url: str, refused_url: str):
    echo = f"invalid key {LEAK_KEY}"
    return {
        "401_echo": ([error_reply(401, echo)], {}),
        "400_echo_detail_list": ([error_reply(422, echo, style="detail_list")], {}),
        "402": ([error_reply(402, echo, style="error_object")], {}),
        "429_retries": ([error_reply(429, echo, retry_after="0")] * 3, {}),
        "500_billed_retry": ([error_reply(500, echo)] * 2, {}),
        "html_502": ([error_reply(502, echo, style="html")] * 2, {}),
        "request_id_echo": ([error_reply(400, "bad", request_id=LEAK_KEY)], {}),
        "json_keys_echo": ([Reply.json({LEAK_KEY: {"x": 1}})], {}),
        "error_field_echo": ([Reply.json({"error": echo})], {}),
        "job_failed_echo": ([Reply.json({"id": "j", "status": "failed", "error": echo})], {}),
        "job_no_poll": ([Reply.json({"id": LEAK_KEY, "status": "queued"})], {}),
        "not_json": ([Reply.text(echo)], {}),
        "corrupt": ([Reply.image(corrupt_png())], {}),
        "bomb": ([Reply.image(png_with_claimed_size(50000, 50000))], {}),
        "timeout": ([Reply(delay_s=1.0)] * 2, {"request_timeout_s": 0.2}),
        "dropped": ([dropped_mid_body] * 2, {}),
        "redirect": ([Reply(status=307, headers={"Location": f"/x?k={LEAK_KEY}"})], {}),
        "download_other_host_403": ([Reply.json({"url": other_url})], {}),
        # A download URL that carries the key in its query: failing, and failing to connect.
        "download_url_query_404": ([Reply.json({"url": f"{other_url}?k={LEAK_KEY}"})], {}),
        "download_url_query_refused": ([Reply.json({"url": f"{refused_url}/x.png?k={LEAK_KEY}"})], {}),
        "refused": ([], {"base_url": refused_url}),
    }


@pytest.mark.parametrize("scenario", sorted(_leak_scenarios("", "")), ids=lambda s: s)
def test_key_never_leaks(fake, other_host, make_client, caplog, capfd, tmp_path, monkeypatch, scenario):
    monkeypatch.chdir(tmp_path)
    other_url = other_host.route("GET", "/private.png", error_reply(403, f"no {LEAK_KEY}"))
    replies, overrides = _leak_scenarios(other_url, f"http://127.0.0.1:{free_port()}")[scenario]
    if replies:
        fake.script(*replies)
    client = make_client(key=LEAK_KEY, **overrides)
    with caplog.at_level(logging.DEBUG), pytest.raises(ApiError) as info:
        client.generate(REQ)
    texts = exception_texts(info.value)
    texts += [r.getMessage() for r in caplog.records]
    texts += [logging.Formatter().format(r) for r in caplog.records]
    out, err = capfd.readouterr()
    texts += [out, err, repr(client), repr(client.settings)]
    assert not [t for t in texts if LEAK_KEY in t]
    assert list(tmp_path.iterdir()) == []
    if scenario.endswith("_echo") and "request_id" not in scenario and "keys" not in scenario:
        assert "***" in str(info.value)


def test_key_not_in_success_logs(fake, make_client, caplog):
    fake.script(SHAPES["openai_url"])
    with caplog.at_level(logging.DEBUG):
        make_client(key=LEAK_KEY).generate(REQ)
    assert caplog.records  # debug logging did run
    assert not [r for r in caplog.records if LEAK_KEY in logging.Formatter().format(r)]


# --- streaming ------------------------------------------------------------------------------------


def test_generate_stream_reads_its_input_lazily_and_keeps_few_images(fake, client):
    fake.set_default(lambda req, f: Reply.image(request_image(req), delay_s=0.02))
    pulled = []

    def requests_in():
        for i in range(40):
            pulled.append(i)
            yield ApiImageRequest(f"p{i}", 16, 16, 1, label=f"line {i + 1}")

    most = 0
    read_at_first_result = None
    stream = client.generate_stream(requests_in(), concurrency=2)
    for given, (i, result) in enumerate(stream, start=1):
        if read_at_first_result is None:
            read_at_first_result = len(pulled)
        assert isinstance(result, FinishedImage)
        assert result.image.getpixel((0, 0)) == expected_color(ApiImageRequest(f"p{i}", 16, 16, 1))
        most = max(most, len(pulled) - given)  # read, and not yet given back
    assert read_at_first_result <= 4  # 2 x concurrency, not the whole input
    assert most <= 4
    assert len(pulled) == 40
    assert fake.generate_calls == 40


def test_closing_a_stream_early_sends_nothing_more(fake, client):
    fake.set_default(lambda req, f: Reply.image(request_image(req), delay_s=0.05))
    stream = client.generate_stream((ApiImageRequest(f"p{i}", 16, 16, 1) for i in range(100)), concurrency=2)
    next(stream)
    stream.close()
    time.sleep(0.3)  # calls already out may finish; no new one starts
    assert fake.generate_calls <= 5


def test_events_name_the_image_and_carry_no_key_or_url(fake, make_client):
    fake.script(error_reply(429, retry_after="0.05"), error_reply(503), SHAPES["raw_png"])
    events = []
    threads = set()

    def on_event(event):
        events.append(event)
        threads.add(threading.get_ident())

    client = make_client(key=LEAK_KEY)
    request = ApiImageRequest("a fox", 64, 48, 4, label="line 7 -> a-fox-1234abcd.png")
    results = client.generate_many([request], on_event=on_event)
    assert isinstance(results[0], FinishedImage)
    assert [e.kind for e in events] == ["started", "rate limited", "retrying", "done"]
    assert all(e.label == "line 7 -> a-fox-1234abcd.png" and e.index == 0 for e in events)
    assert events[1].retry_in_s == 0.05
    assert events[1].message == "HTTP 429"
    assert events[2].message == "HTTP 503"
    assert events[3].attempt == 3
    assert threads == {threading.get_ident()}  # in the caller's thread
    for event in events:
        assert LEAK_KEY not in str(event)
        assert "http" not in str(event)


def test_a_failed_image_ends_with_a_failed_event(fake, client):
    fake.script(error_reply(400, "no"))
    events = []
    client.generate_many([REQ], on_event=events.append)
    assert [e.kind for e in events] == ["started", "failed"]
    assert events[-1].message == "BadRequestError"


def test_retry_log_lines_name_the_label(fake, client, caplog):
    fake.script(error_reply(503), SHAPES["raw_png"])
    with caplog.at_level(logging.WARNING, logger="flux_schnell.api"):
        client.generate(ApiImageRequest("x", 16, 16, 1, label="line 12 -> x-00000000.png"))
    (warning,) = retry_warnings(caplog)
    assert warning.startswith("ImageAPI line 12 -> x-00000000.png, attempt 1 failed (HTTP 503)")
