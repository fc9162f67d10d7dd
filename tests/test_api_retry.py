"""Tests of api/retry.py through the client: which failed calls are sent again, how often (counted at
the fake server), after which waits (counted through a recording clock), within the deadline."""

from __future__ import annotations

import logging
import time

import pytest
from comfyui_flux_schnell.errors import (
    ApiTimeoutError,
    NetworkError,
    RateLimitError,
    ServerError,
)
from support.api_testing import (
    REQ,
    RecordingClock,
    expected_color,
    retry_warnings,
)
from support.fake_imageapi import (
    SHAPES,
    Reply,
    b64,
    dropped_mid_body,
    error_reply,
    request_image,
)

# --- retries --------------------------------------------------------------------------------------


def test_free_retries_then_success(fake, client, caplog):
    fake.script(error_reply(503), error_reply(429, retry_after="0"), SHAPES["raw_png"])
    with caplog.at_level(logging.WARNING, logger="flux_schnell.api"):
        result = client.generate(REQ)
    assert result.attempts == 3
    assert fake.generate_calls == 3
    warnings = retry_warnings(caplog)
    assert len(warnings) == 2
    assert "attempt 1" in warnings[0]
    assert "HTTP 503" in warnings[0]
    assert "attempt 2" in warnings[1]
    assert "HTTP 429" in warnings[1]
    assert not any("billed" in w and "may already" in w for w in warnings)


@pytest.mark.parametrize("retry_after", ["0.3", "1"])
def test_retry_after_seconds_honoured(fake, make_client, retry_after):
    fake.script(error_reply(429, retry_after=retry_after), SHAPES["raw_png"])
    clock = RecordingClock()
    make_client(clock=clock).generate(REQ)
    assert clock.sleeps == [float(retry_after)]  # one wait, the one the service asked for
    first, second = fake.requests
    assert second.time - first.time >= float(retry_after)


def test_retry_after_past_deadline_fails_at_once(fake, make_client):
    fake.route("POST", "/api/v1/generate", error_reply(429, retry_after="60"))
    clock = RecordingClock()
    with pytest.raises(RateLimitError) as info:
        make_client(clock=clock, deadline_s=2.0).generate(REQ)
    assert clock.sleeps == []  # failed at once: no wait
    assert info.value.retry_after == 60
    assert "deadline" in str(info.value)
    assert fake.generate_calls == 1


def test_rate_limit_after_retries_carries_retry_after(fake, client):
    fake.route("POST", "/api/v1/generate", error_reply(429, retry_after="0.01"))
    with pytest.raises(RateLimitError) as info:
        client.generate(REQ)
    assert info.value.retry_after == pytest.approx(0.01)
    assert fake.generate_calls == 3


@pytest.mark.parametrize("max_billed", [0, 1, 2])
@pytest.mark.parametrize(("status", "cls"), [(500, ServerError), (408, ApiTimeoutError)])
def test_billed_retry_cap_and_warning(fake, make_client, caplog, max_billed, status, cls):
    # 408: the service (or a proxy before it) gave up on the call, which may have been billed.
    fake.route("POST", "/api/v1/generate", error_reply(status))
    with caplog.at_level(logging.WARNING, logger="flux_schnell.api"), pytest.raises(cls):
        make_client(max_billed_retries=max_billed, max_free_retries=4).generate(REQ)
    assert fake.generate_calls == 1 + max_billed
    warnings = retry_warnings(caplog)
    assert len(warnings) == max_billed
    for attempt, line in enumerate(warnings, start=1):
        assert f"attempt {attempt}" in line
        assert "may already have been billed" in line
        assert "did no work" not in line
        assert f"HTTP {status}" in line


def big_json_image(req, fake):
    return Reply.json({"image": b64(request_image(req))}, body_delay_s=2.0)


BILLED_FAULTS = {
    "read_timeout": (Reply(delay_s=1.0), ApiTimeoutError),
    "slow_body": (big_json_image, ApiTimeoutError),
    "dropped_mid_body": (dropped_mid_body, NetworkError),
    "dropped_before_headers": (Reply(drop_before_headers=True), NetworkError),
}


@pytest.mark.parametrize("fault", sorted(BILLED_FAULTS))
def test_billed_faults_retried_once(fake, make_client, caplog, fault):
    responder, cls = BILLED_FAULTS[fault]
    fake.route("POST", "/api/v1/generate", responder)
    client = make_client(request_timeout_s=0.3)
    with caplog.at_level(logging.WARNING, logger="flux_schnell.api"), pytest.raises(cls):
        client.generate(REQ)
    assert fake.generate_calls == 2
    (warning,) = retry_warnings(caplog)
    assert "may already have been billed" in warning


@pytest.mark.parametrize("fault", sorted(BILLED_FAULTS))
def test_billed_fault_then_success(fake, make_client, fault):
    responder, _ = BILLED_FAULTS[fault]
    fake.script(responder, SHAPES["image_b64"])
    result = make_client(request_timeout_s=0.3).generate(REQ)
    assert result.attempts == 2
    assert result.image.getpixel((0, 0)) == expected_color(REQ)


def test_slow_body_within_timeout_is_fine(fake, client):
    fake.script(lambda req, f: Reply.json({"image": b64(request_image(req))}, body_delay_s=0.2))
    assert client.generate(REQ).attempts == 1


# --- deadline and stopping ------------------------------------------------------------------------


def test_deadline_bounds_a_slow_answer(fake, make_client):
    fake.route("POST", "/api/v1/generate", Reply(delay_s=30.0))
    started = time.monotonic()
    with pytest.raises(ApiTimeoutError) as info:
        make_client(deadline_s=0.4).generate(REQ)
    assert time.monotonic() - started < 10.0  # cut at the deadline, not after the 30 s answer
    assert "deadline" in str(info.value)
    assert fake.generate_calls == 1


def test_deadline_bounds_retries(fake, make_client):
    fake.route("POST", "/api/v1/generate", error_reply(503, retry_after="3"))
    clock = RecordingClock(skip=True)  # waits cost no time; the deadline still sees them
    client = make_client(clock=clock, deadline_s=10.0, min_call_s=4.0, max_free_retries=10)
    with pytest.raises(ServerError, match="no time for another attempt"):
        client.generate(REQ)
    assert clock.sleeps == [3.0]
    assert fake.generate_calls == 2  # t=0 and t=3; a call at t=6 would have < 4 s left


def test_no_retry_sent_too_late_to_be_answered(fake, make_client):
    # The retry would go out with 0.05 s left: billed, and its answer certainly lost.
    slow_image = lambda req, f: Reply.image(request_image(req), delay_s=0.3)  # noqa: E731
    fake.script(error_reply(429, retry_after="1.95"), slow_image)
    clock = RecordingClock()
    with pytest.raises(RateLimitError, match="no time for another attempt") as info:
        make_client(clock=clock, deadline_s=2.0, request_timeout_s=2.0).generate(REQ)
    assert clock.sleeps == []  # refused at once, no pointless wait
    assert fake.generate_calls == 1
    assert "min_call_s" in str(info.value)


@pytest.mark.parametrize(("retry_after", "calls"), [("0.3", 2), ("2.3", 1)])
def test_min_call_s_decides_whether_a_retry_fits(fake, make_client, retry_after, calls):
    fake.script(error_reply(429, retry_after=retry_after), SHAPES["raw_png"])
    clock = RecordingClock(skip=True)
    client = make_client(clock=clock, deadline_s=3.0, request_timeout_s=5.0, min_call_s=1.0)
    if calls == 2:
        assert client.generate(REQ).attempts == 2
    else:
        with pytest.raises(RateLimitError, match="no time for another attempt"):
            client.generate(REQ)
    assert fake.generate_calls == calls


def test_a_wait_that_overran_sends_no_late_call(fake, make_client):
    clock = RecordingClock(skip=True, overrun=1.0)  # a loaded machine wakes up 1 s late
    fake.script(error_reply(503, retry_after="0.1"), SHAPES["raw_png"])
    with pytest.raises(ServerError, match="no time for another attempt"):
        make_client(clock=clock, deadline_s=1.5, min_call_s=0.5).generate(REQ)
    assert clock.sleeps == [0.1]
    assert fake.generate_calls == 1  # 1.1 s gone, 0.4 s left: less than the 0.5 s a call needs
