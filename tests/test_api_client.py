"""Tests of api_client.py, api_http.py and api_responses.py against the fake ImageAPI on 127.0.0.1
(real sockets, no mocks of HTTP).

Every answer shape, every fault, and request counts that prove what is and is not retried; the key
never leaves the service's origin and never shows up in a log record or an error.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from email.utils import formatdate

import pytest
import requests
from comfyui_flux_schnell import api_responses
from comfyui_flux_schnell._version import __version__
from comfyui_flux_schnell.api_client import ApiImage, GenerateRequest, ImageApiClient
from comfyui_flux_schnell.errors import (
    ApiError,
    ApiTimeoutError,
    AuthenticationError,
    BadRequestError,
    GenerationInterrupted,
    InsufficientCreditsError,
    InvalidInputError,
    NetworkError,
    RateLimitError,
    ResponseDecodeError,
    ServerError,
)
from comfyui_flux_schnell.settings import ApiSettings
from PIL import Image
from support.fake_imageapi import (
    ERROR_STYLES,
    LOSSY_SHAPES,
    SHAPES,
    FakeImageAPI,
    Reply,
    b64,
    color_for,
    corrupt_png,
    data_uri,
    default_png,
    dropped_mid_body,
    error_reply,
    png_with_claimed_size,
    request_image,
    solid_image,
)

KEY = "sk_test_KEY123"
LEAK_KEY = "sk_leakcheck_ABC123"
REQ = GenerateRequest("a red fox in snow", 64, 48, 4, seed=7)
FAST = {
    "request_timeout_s": 5.0,
    "deadline_s": 10.0,
    "connect_timeout_s": 2.0,
    "download_timeout_s": 5.0,
    "backoff_base_s": 0.01,
    "backoff_max_s": 0.05,
    "poll_interval_s": 0.02,
    "max_free_retries": 2,
    "max_billed_retries": 1,
}


def make_settings(base_url: str, key: str = KEY, **overrides) -> ApiSettings:
    return ApiSettings(base_url=base_url, api_key=key, key_source="test settings", **{**FAST, **overrides})


@pytest.fixture
def fake():
    with FakeImageAPI() as server:
        yield server


@pytest.fixture
def other_host():
    """A second fake: "another host" for downloads (another port = another origin)."""
    with FakeImageAPI() as server:
        yield server


@pytest.fixture
def make_client(fake):
    clients = []

    def build(key: str = KEY, base_url: str | None = None, **overrides) -> ImageApiClient:
        client = ImageApiClient(make_settings(base_url or fake.base_url, key, **overrides))
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client):
    return make_client()


def expected_color(req: GenerateRequest, send_seed: bool = False):
    return color_for(req.prompt, req.seed if send_seed else None)


def close_to(a, b, tolerance=4) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def retry_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "flux_schnell.api" and r.levelno == logging.WARNING
    ]


# --- success shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_success_shape_decodes(fake, client, shape):
    fake.script(SHAPES[shape])
    result = client.generate(REQ)
    assert isinstance(result, ApiImage)
    assert result.image.mode == "RGB"
    assert result.image.size == (REQ.width, REQ.height)
    tolerance = 6 if shape in LOSSY_SHAPES else 0
    assert close_to(result.image.getpixel((5, 5)), expected_color(REQ), tolerance)
    assert result.attempts == 1
    assert fake.generate_calls == 1
    assert result.seconds > 0


def test_different_requests_give_different_images(fake, client):
    a = client.generate(GenerateRequest("a cat", 32, 32, 4)).image.getpixel((0, 0))
    b = client.generate(GenerateRequest("a dog", 32, 32, 4)).image.getpixel((0, 0))
    assert a != b


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply.image(solid_image(8, 8, (1, 2, 3)), headers={"X-Request-Id": "hdr-1"}), "hdr-1"),
        (Reply.image(solid_image(8, 8, (1, 2, 3)), headers={"Request-Id": "hdr-2"}), "hdr-2"),
        (Reply.json({"id": "body-3", "image": b64(solid_image(8, 8, (1, 2, 3)))}), "body-3"),
        (
            Reply.json({"request_id": "b4", "images": [data_uri(solid_image(8, 8, (0, 0, 0)))]}),
            "b4",
        ),
        (Reply.image(solid_image(8, 8, (1, 2, 3))), None),
    ],
)
def test_request_id(fake, client, reply, expected):
    fake.script(reply)
    assert client.generate(REQ).request_id == expected


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16", "CMYK"])
def test_other_image_modes_become_rgb(fake, client, mode):
    image = Image.new("RGB", (16, 8), (200, 100, 50)).convert(mode)
    out = io.BytesIO()
    image.save(out, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    fake.script(Reply.image(out.getvalue(), "image/tiff" if mode in ("CMYK", "I;16") else "image/png"))
    result = client.generate(REQ).image
    assert result.mode == "RGB"
    assert result.size == (16, 8)


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
    make_client(send_seed=True).generate(GenerateRequest("x", 16, 16, 1))
    assert "seed" not in fake.requests[0].json


def test_headers(fake, client):
    client.generate(REQ)
    sent = fake.requests[0]
    assert sent.method == "POST"
    assert sent.path == "/api/v1/generate"
    assert sent.header("Authorization") == f"Bearer {KEY}"
    assert sent.header("Content-Type") == "application/json"
    ua = sent.header("User-Agent")
    assert ua == f"comfyui-flux-schnell/{__version__} python-requests/{requests.__version__}"


def test_connections_are_pooled(fake, client):
    for _ in range(4):
        client.generate(REQ)
    assert len({r.client_port for r in fake.requests}) == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"width": 0}, "width"),
        ({"height": 1.5}, "height"),
        ({"num_inference_steps": True}, "num_inference_steps"),
        ({"seed": -1}, "seed"),
        ({"model": ""}, "model"),
    ],
)
def test_generate_request_validation(kwargs, field):
    base = {"prompt": "p", "width": 64, "height": 64, "num_inference_steps": 4}
    with pytest.raises(InvalidInputError, match=field):
        GenerateRequest(**{**base, **kwargs})


# --- error statuses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "style", "cls", "calls", "fragment"),
    [
        (400, "error_string", BadRequestError, 1, "width must be a multiple of 64"),
        (400, "error_object", BadRequestError, 1, "(code bad_thing)"),
        (422, "detail_list", BadRequestError, 1, "body.width: width must be a multiple of 64"),
        (422, "detail", BadRequestError, 1, "width must be a multiple of 64"),
        (400, "message", BadRequestError, 1, "width must be a multiple of 64"),
        (400, "text", BadRequestError, 1, "width must be a multiple of 64"),
        (401, "error_string", AuthenticationError, 1, "API key from test settings"),
        (403, "error_object", AuthenticationError, 1, "Dashboard"),
        (402, "message", InsufficientCreditsError, 1, "no credits"),
        (404, "html", ApiError, 1, "check the base URL"),
        (408, "error_string", ApiTimeoutError, 2, "timed out"),
        (418, "text", ApiError, 1, "unexpected answer"),
        (429, "error_string", RateLimitError, 3, "rate limit"),
        (500, "error_string", ServerError, 2, "width must be a multiple of 64"),
        (502, "html", ServerError, 2, "an HTML page: 502 width must"),
        (503, "message", ServerError, 3, "unavailable"),
        (504, "text", ServerError, 2, "service failed"),
        (501, "text", ServerError, 1, "service failed"),
    ],
)
def test_error_status(fake, client, status, style, cls, calls, fragment):
    reply = error_reply(status, "width must be a multiple of 64", style=style)
    fake.route("POST", "/api/v1/generate", reply)  # the same answer every time
    with pytest.raises(cls) as info:
        client.generate(REQ)
    assert fake.generate_calls == calls
    assert fragment in str(info.value)
    assert info.value.status == status
    assert info.value.request_id == "req-err-1"
    assert "req-err-1" in str(info.value)
    assert f"HTTP {status}" in str(info.value)


def test_bad_request_is_a_value_error(fake, client):
    fake.script(error_reply(400))
    with pytest.raises(ValueError, match="something is wrong"):
        client.generate(REQ)


@pytest.mark.parametrize("style", ERROR_STYLES)
def test_long_server_messages_are_cut(fake, client, style):
    fake.script(error_reply(400, "x" * 5000, style=style))
    with pytest.raises(BadRequestError) as info:
        client.generate(REQ)
    assert len(str(info.value)) < 800


def test_redirect_of_generate_is_not_followed(fake, client, other_host):
    target = other_host.url("/api/v1/generate?token=secret-token")
    fake.script(Reply(status=308, headers={"Location": target}))
    with pytest.raises(ApiError, match="redirected") as info:
        client.generate(REQ)
    assert other_host.count() == 0
    assert "secret-token" not in str(info.value)


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
def test_retry_after_seconds_honoured(fake, client, retry_after):
    fake.script(error_reply(429, retry_after=retry_after), SHAPES["raw_png"])
    client.generate(REQ)
    first, second = fake.requests
    waited = second.time - first.time
    assert float(retry_after) <= waited < float(retry_after) + 0.4


def test_retry_after_http_date():
    when = formatdate(time.time() + 3, usegmt=True)
    reply = api_responses.Reply(
        429, "", requests.structures.CaseInsensitiveDict({"Retry-After": when}), b"", ""
    )
    assert 1.5 <= api_responses.retry_after_seconds(reply) <= 3.1
    reply.headers["Retry-After"] = "not a date"
    assert api_responses.retry_after_seconds(reply) is None
    reply.headers["Retry-After"] = "-5"
    assert api_responses.retry_after_seconds(reply) == 0.0


def test_retry_after_past_deadline_fails_at_once(fake, make_client):
    fake.route("POST", "/api/v1/generate", error_reply(429, retry_after="60"))
    started = time.monotonic()
    with pytest.raises(RateLimitError) as info:
        make_client(deadline_s=2.0).generate(REQ)
    assert time.monotonic() - started < 0.5
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


def test_connection_refused_is_retried_free(make_client, caplog):
    client = make_client(base_url=f"http://127.0.0.1:{free_port()}")
    with (
        caplog.at_level(logging.WARNING, logger="flux_schnell.api"),
        pytest.raises(NetworkError, match="refused") as info,
    ):
        client.generate(REQ)
    assert info.value.status is None
    warnings = retry_warnings(caplog)
    assert len(warnings) == 2
    assert all("connection refused" in w and "did no work" in w for w in warnings)


def test_dns_failure_is_not_retried(make_client, caplog):
    client = make_client(base_url="https://no-such-host.invalid")
    with caplog.at_level(logging.WARNING), pytest.raises(NetworkError, match="resolved") as info:
        client.generate(REQ)
    assert "base URL" in str(info.value)
    assert retry_warnings(caplog) == []


def test_tls_handshake_failure_is_not_retried(fake, make_client, caplog):
    client = make_client(base_url=fake.base_url.replace("http://", "https://"))
    with caplog.at_level(logging.WARNING), pytest.raises(NetworkError, match="TLS"):
        client.generate(REQ)
    assert retry_warnings(caplog) == []


@pytest.fixture
def untrusted_tls_server(tmp_path):
    """An https server with a self-signed certificate (needs the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(5)

    def serve():
        try:
            conn, _ = listener.accept()
            with conn, context.wrap_socket(conn, server_side=True):
                pass
        except (OSError, ssl.SSLError):
            pass  # the client refuses the certificate: exactly what the test wants

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_untrusted_certificate_names_the_fix(make_client, untrusted_tls_server):
    client = make_client(base_url=untrusted_tls_server)
    with pytest.raises(NetworkError, match="certificate verification") as info:
        client.generate(REQ)
    assert "REQUESTS_CA_BUNDLE" in str(info.value)
    assert "clock" in str(info.value)


def test_proxy_failure_names_the_variables(make_client, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = make_client(base_url="https://imageapi.org")
    with pytest.raises(NetworkError, match="HTTPS_PROXY"):
        client.generate(REQ)


# --- deadline and stopping ------------------------------------------------------------------------


def test_deadline_bounds_a_slow_answer(fake, make_client):
    fake.route("POST", "/api/v1/generate", Reply(delay_s=3.0))
    started = time.monotonic()
    with pytest.raises(ApiTimeoutError) as info:
        make_client(deadline_s=0.4).generate(REQ)
    assert time.monotonic() - started < 0.9
    assert "deadline" in str(info.value)
    assert fake.generate_calls == 1


def test_deadline_bounds_retries(fake, make_client):
    fake.route("POST", "/api/v1/generate", error_reply(503, retry_after="0.3"))
    started = time.monotonic()
    with pytest.raises(ServerError, match="no time for another attempt"):
        make_client(deadline_s=1.0, min_call_s=0.4, max_free_retries=10).generate(REQ)
    assert time.monotonic() - started < 0.9
    assert fake.generate_calls == 2  # t=0 and t=0.3; a call at t=0.6 would have < 0.4 s left


def test_no_retry_sent_too_late_to_be_answered(fake, make_client):
    # The retry would go out with 0.05 s left: billed, and its answer certainly lost.
    slow_image = lambda req, f: Reply.image(request_image(req), delay_s=0.3)  # noqa: E731
    fake.script(error_reply(429, retry_after="1.95"), slow_image)
    started = time.monotonic()
    with pytest.raises(RateLimitError, match="no time for another attempt") as info:
        make_client(deadline_s=2.0, request_timeout_s=2.0).generate(REQ)
    assert time.monotonic() - started < 0.5  # refused at once, no pointless wait
    assert fake.generate_calls == 1
    assert "min_call_s" in str(info.value)


@pytest.mark.parametrize(("retry_after", "calls"), [("0.3", 2), ("2.3", 1)])
def test_min_call_s_decides_whether_a_retry_fits(fake, make_client, retry_after, calls):
    fake.script(error_reply(429, retry_after=retry_after), SHAPES["raw_png"])
    client = make_client(deadline_s=3.0, request_timeout_s=5.0, min_call_s=1.0)
    if calls == 2:
        assert client.generate(REQ).attempts == 2
    else:
        with pytest.raises(RateLimitError, match="no time for another attempt"):
            client.generate(REQ)
    assert fake.generate_calls == calls


def test_a_wait_that_overran_sends_no_late_call(fake, make_client, monkeypatch):
    from comfyui_flux_schnell import api_client

    real_sleep = api_client.sleep_unless_stopped

    def overrunning_sleep(seconds, stop):  # a loaded machine wakes up late
        real_sleep(seconds + 1.0, stop)

    monkeypatch.setattr(api_client, "sleep_unless_stopped", overrunning_sleep)
    fake.script(error_reply(503, retry_after="0.1"), SHAPES["raw_png"])
    with pytest.raises(ServerError, match="no time for another attempt"):
        make_client(deadline_s=1.5, min_call_s=0.5).generate(REQ)
    assert fake.generate_calls == 1  # 1.1 s gone, 0.4 s left: less than the 0.5 s a call needs


def stop_after(seconds: float):
    flag = threading.Event()
    timer = threading.Timer(seconds, flag.set)
    timer.daemon = True
    timer.start()
    return flag


def api_threads_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("flux-schnell-api")]


def test_should_stop_interrupts_a_call_in_flight(fake, client):
    fake.route("POST", "/api/v1/generate", Reply(delay_s=4.0))
    flag = stop_after(0.2)
    started = time.monotonic()
    with pytest.raises(GenerationInterrupted):
        client.generate(REQ, should_stop=flag.is_set)
    assert time.monotonic() - started < 0.2 + 0.5


def test_should_stop_interrupts_a_backoff_and_ends_the_workers(fake, client):
    fake.route("POST", "/api/v1/generate", error_reply(429, retry_after="3"))
    flag = stop_after(0.2)
    started = time.monotonic()
    with pytest.raises(GenerationInterrupted):
        client.generate_many([REQ, REQ], should_stop=flag.is_set)
    assert time.monotonic() - started < 0.2 + 0.5
    deadline = time.monotonic() + 1.0
    while api_threads_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert api_threads_alive() == []
    assert fake.generate_calls == 2  # one each, no retry after the stop


def test_should_stop_interrupts_job_polling(fake, make_client):
    fake.route("GET", "/jobs/slow", Reply.json({"status": "processing"}))
    fake.script(Reply.json({"id": "slow", "status": "queued", "poll_url": "/jobs/slow"}))
    flag = stop_after(0.3)
    started = time.monotonic()
    with pytest.raises(GenerationInterrupted):
        make_client(poll_interval_s=0.1).generate(REQ, should_stop=flag.is_set)
    assert time.monotonic() - started < 0.3 + 0.5


def test_stop_already_requested_sends_nothing(fake, client):
    fake.set_default(lambda req, f: Reply.image(request_image(req), delay_s=0.2))
    reqs = [GenerateRequest(f"p{i}", 16, 16, 1) for i in range(4)]
    with pytest.raises(GenerationInterrupted, match="before any"):
        client.generate_many(reqs, concurrency=2, should_stop=lambda: True)
    time.sleep(0.3)  # a worker that had started would have sent by now
    assert fake.generate_calls == 0


def test_no_call_starts_once_the_stop_is_set(fake, client):
    stop = threading.Event()
    stop.set()
    with pytest.raises(GenerationInterrupted):
        client._http.exchange(
            "POST",
            client._generate_url,
            body=b"{}",
            timeout_s=1.0,
            deadline=time.monotonic() + 1.0,
            stop=stop,
            cap=2**20,
            may_bill=True,
        )
    assert fake.count() == 0


# --- generate_many --------------------------------------------------------------------------------


def test_generate_many_runs_concurrently_in_input_order(fake, client):
    fake.set_default(lambda req, f: Reply.image(request_image(req), delay_s=0.3))
    reqs = [GenerateRequest(f"prompt {i}", 32, 32, 4) for i in range(6)]
    started = time.monotonic()
    results = client.generate_many(reqs, concurrency=3)
    elapsed = time.monotonic() - started
    assert 0.55 < elapsed < 1.3
    assert fake.max_in_flight == 3
    assert [r.image.getpixel((0, 0)) for r in results] == [expected_color(r) for r in reqs]


def test_decoding_an_image_does_not_hold_back_the_next_call(fake, client, monkeypatch):
    fake.set_default(lambda req, f: Reply.image(request_image(req)))
    opened, decoded_at = client._open, []

    def slow_open(*args, **kwargs):
        time.sleep(0.4)
        image = opened(*args, **kwargs)
        decoded_at.append(time.monotonic())
        return image

    monkeypatch.setattr(client, "_open", slow_open)
    reqs = [GenerateRequest(f"prompt {i}", 16, 16, 1) for i in range(3)]
    results = client.generate_many(reqs, concurrency=1)
    assert [r.image.getpixel((0, 0)) for r in results] == [expected_color(r) for r in reqs]
    assert fake.max_in_flight == 1  # still one call at a time
    first_decoded = min(decoded_at)
    assert fake.requests[1].time < first_decoded - 0.2  # sent while image 0 was decoding


def test_generate_many_keeps_going_after_a_failure(fake, client):
    def answer(req, f):
        return error_reply(400, "bad prompt") if "fail" in req.prompt else default_png(req, f)

    fake.set_default(answer)
    reqs = [GenerateRequest(p, 16, 16, 1) for p in ("ok 1", "fail me", "ok 2")]
    calls = []
    results = client.generate_many(
        reqs, concurrency=2, on_result=lambda i, r: calls.append((i, threading.get_ident()))
    )
    assert isinstance(results[0], ApiImage)
    assert isinstance(results[1], BadRequestError)
    assert isinstance(results[2], ApiImage)
    assert sorted(i for i, _ in calls) == [0, 1, 2]
    assert {ident for _, ident in calls} == {threading.get_ident()}


def test_on_result_raising_cancels_the_rest(fake, client):
    fake.set_default(lambda req, f: Reply.image(request_image(req), delay_s=0.2))
    reqs = [GenerateRequest(f"p{i}", 16, 16, 1) for i in range(8)]

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

    monkeypatch.setattr(client, "_open", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        client.generate(REQ)


# --- undecodable answers --------------------------------------------------------------------------

DECODE_FAULTS = {
    "not_json": (Reply.text("hello, this is not JSON"), "text/plain"),
    "empty_json_body": (Reply(body=b""), "neither an image nor JSON"),
    "json_without_image": (
        Reply.json({"created": 1, "meta": {"secret_value": "VALUE123"}}),
        "meta.secret_value",
    ),
    "job_without_poll_url": (Reply.json({"id": "j1", "status": "queued"}), "asynchronous job"),
    "corrupt_png": (Reply.image(corrupt_png()), "corrupt or truncated"),
    "garbage_as_png": (Reply.image(b"\x00garbage" * 100), "not a readable"),
    "invalid_base64": (Reply.json({"image": "A" * 65}), "not valid base64"),
    "data_uri_not_base64": (Reply.json({"image": "data:image/png,abc"}), "not valid base64"),
    "bomb_raw": (Reply.image(png_with_claimed_size(50000, 50000)), "decompression bomb"),
    "bomb_base64": (
        Reply.json({"data": [{"b64_json": b64(png_with_claimed_size(50000, 50000))}]}),
        "decompression bomb",
    ),
    "oversized": (Reply.image(png_with_claimed_size(5000, 5000)), "max_image_pixels"),
}


@pytest.mark.parametrize("fault", sorted(DECODE_FAULTS))
def test_undecodable_answers(fake, client, fault):
    reply, fragment = DECODE_FAULTS[fault]
    fake.script(reply)
    with pytest.raises(ResponseDecodeError) as info:
        client.generate(REQ)
    assert fragment in str(info.value)
    assert "VALUE123" not in str(info.value)
    assert fake.generate_calls == 1  # an answered call is never retried


def test_job_without_poll_url_shows_keys(fake, client):
    fake.script(Reply.json({"id": "j1", "status": "queued", "eta": 3}))
    with pytest.raises(ResponseDecodeError, match=r"keys: id, status, eta"):
        client.generate(REQ)


def test_pixel_limit_is_a_setting(fake, make_client):
    with pytest.raises(ResponseDecodeError, match="max_image_pixels=100"):
        make_client(max_image_pixels=100).generate(REQ)


@pytest.mark.parametrize(
    ("doc", "cls", "fragment"),
    [
        ({"error": "NSFW content detected"}, ApiError, "NSFW content detected"),
        ({"id": "j", "status": "failed", "error": "moderated"}, ApiError, "as 'failed': moderated"),
        ({"id": "j", "status": "Error", "message": "prompt blocked"}, ApiError, "prompt blocked"),
    ],
)
def test_success_status_with_an_error_body(fake, client, doc, cls, fragment):
    fake.script(Reply.json(doc))
    with pytest.raises(cls, match=fragment):
        client.generate(REQ)
    assert fake.generate_calls == 1


def test_job_that_fails_while_polling(fake, client):
    fake.route("GET", "/jobs/j9", Reply.json({"status": "error", "error": {"message": "GPU fell over"}}))
    fake.script(Reply.json({"id": "j9", "status": "queued", "status_url": "/jobs/j9"}))
    with pytest.raises(ApiError, match="GPU fell over") as info:
        client.generate(REQ)
    assert info.value.request_id == "j9"


def test_job_polling_stops_at_the_deadline(fake, make_client):
    fake.route("GET", "/jobs/j2", Reply.json({"status": "processing"}))
    fake.script(Reply.json({"id": "j2", "status": "queued", "poll_url": "/jobs/j2"}))
    started = time.monotonic()
    with pytest.raises(ApiTimeoutError, match="still 'processing'"):
        make_client(deadline_s=0.4).generate(REQ)
    assert time.monotonic() - started < 0.8
    assert fake.count("GET", "/jobs/j2") >= 3


def test_job_polling_survives_a_transient_failure(fake, client):
    image_url = fake.put_file(solid_image(8, 8, (9, 9, 9)))
    fake.route("GET", "/jobs/j3", error_reply(503), Reply.json({"status": "done", "url": image_url}))
    fake.script(Reply.json({"id": "j3", "status": "pending", "poll_url": "/jobs/j3"}))
    result = client.generate(REQ)
    assert result.image.getpixel((0, 0)) == (9, 9, 9)
    assert result.request_id == "j3"
    assert fake.count("GET", "/jobs/j3") == 2


@pytest.mark.parametrize("kind", ["result", "status"])
def test_failed_job_fetch_waits_the_backoff(fake, make_client, caplog, kind):
    image = Reply.image(solid_image(8, 8, (7, 7, 7)))
    if kind == "result":  # a finished job: its result URL fails once
        fake.route("GET", "/jobs/r", error_reply(502), image)
        fake.script(Reply.json({"id": "r", "status": "completed", "result_url": "/jobs/r"}))
    else:  # a pending job: its status URL fails once
        fake.route("GET", "/jobs/r", error_reply(503), image)
        fake.script(Reply.json({"id": "r", "status": "queued", "poll_url": "/jobs/r"}))
    client = make_client(backoff_base_s=0.3, backoff_max_s=0.3, poll_interval_s=0.01)
    with caplog.at_level(logging.WARNING, logger="flux_schnell.api"):
        assert client.generate(REQ).image.getpixel((0, 0)) == (7, 7, 7)
    first, second = fake.requests_to("/jobs/r")
    assert 0.14 <= second.time - first.time < 0.6  # the backoff (0.15-0.3 s), not at once
    (warning,) = retry_warnings(caplog)
    assert f"its {kind}" in warning
    assert "not billed" in warning


@pytest.mark.parametrize(
    ("job", "cls", "match"),
    [
        ({"status": "done", "result_url": "/jobs/late"}, ServerError, "would pass deadline_s"),
        (
            {"status": "queued", "poll_url": "/jobs/late"},
            ApiTimeoutError,
            r"still 'queued', its last poll failed \(HTTP 503\)",
        ),
    ],
)
def test_failed_job_fetch_not_retried_past_the_deadline(fake, make_client, job, cls, match):
    fake.route("GET", "/jobs/late", error_reply(503, retry_after="30"))
    fake.script(Reply.json({"id": "late", **job}))
    started = time.monotonic()
    with pytest.raises(cls, match=match):
        make_client(deadline_s=2.0).generate(REQ)
    assert time.monotonic() - started < 0.5
    assert fake.count("GET", "/jobs/late") == 1


# --- downloads ------------------------------------------------------------------------------------


def test_key_sent_to_own_host_downloads(fake, client):
    fake.script(SHAPES["url"])
    client.generate(REQ)
    (download,) = fake.requests_to("/files/")
    assert download.header("Authorization") == f"Bearer {KEY}"


def test_key_never_sent_to_another_host(fake, client, other_host):
    url = other_host.put_file(solid_image(8, 8, (1, 1, 1)))
    fake.script(Reply.json({"images": [{"url": url}]}))
    assert client.generate(REQ).image.getpixel((0, 0)) == (1, 1, 1)
    (download,) = other_host.requests
    assert download.header("Authorization") is None
    assert download.header("User-Agent").startswith("comfyui-flux-schnell/")


def test_key_not_sent_after_redirect_to_another_host(fake, client, other_host):
    url = other_host.put_file(solid_image(8, 8, (2, 2, 2)))
    fake.route("GET", "/files/moved.png", Reply(status=302, headers={"Location": url}))
    fake.script(Reply.json({"url": "/files/moved.png"}))
    assert client.generate(REQ).image.getpixel((0, 0)) == (2, 2, 2)
    assert fake.requests_to("/files/moved.png")[0].header("Authorization") == f"Bearer {KEY}"
    assert other_host.requests[0].header("Authorization") is None


def test_download_refused_by_other_host_explains(fake, client, other_host):
    url = other_host.route("GET", "/private.png", error_reply(403, "auth needed"))
    fake.script(Reply.json({"url": url}))
    with pytest.raises(ResponseDecodeError, match="only sent to the service's own address"):
        client.generate(REQ)


@pytest.mark.parametrize(
    "url", ["http://example.com/a.png", "http://[2001:db8::1]/x.png", "http://10.1.2.3/x.png"]
)
def test_plain_http_download_to_another_machine_refused(fake, client, url):
    fake.script(Reply.json({"data": [{"url": url}]}))
    with pytest.raises(ResponseDecodeError, match="http"):
        client.generate(REQ)


@pytest.mark.parametrize("omit_length", [False, True])
def test_download_size_cap(fake, make_client, omit_length):
    big = Image.effect_noise((64, 64), 80).convert("RGB")
    out = io.BytesIO()
    big.save(out, format="PNG")
    assert len(out.getvalue()) > 5000
    path = "/files/big.png"
    fake.route("GET", path, Reply.image(out.getvalue(), omit_length=omit_length))
    fake.script(Reply.json({"url": path}))
    with pytest.raises(ResponseDecodeError, match="max_download_bytes"):
        make_client(max_download_bytes=4000).generate(REQ)
    assert fake.count("GET", path) == 1  # too large is not retried


def test_download_retried_once(fake, client, caplog):
    fake.route("GET", "/files/flaky.png", error_reply(500), Reply.image(solid_image(8, 8, (3, 3, 3))))
    fake.script(Reply.json({"url": "/files/flaky.png"}))
    with caplog.at_level(logging.WARNING, logger="flux_schnell.api"):
        result = client.generate(REQ)
    assert result.image.getpixel((0, 0)) == (3, 3, 3)
    assert fake.count("GET", "/files/flaky.png") == 2
    assert result.attempts == 1
    (warning,) = retry_warnings(caplog)
    assert "retrying once" in warning


@pytest.mark.parametrize(
    ("reply", "calls", "cls"),
    [
        (error_reply(502), 2, ServerError),
        (error_reply(404), 1, ResponseDecodeError),
        (Reply(drop_before_headers=True), 2, NetworkError),
    ],
)
def test_download_failures(fake, client, reply, calls, cls):
    fake.route("GET", "/files/gone.png", reply)
    fake.script(Reply.json({"url": "/files/gone.png"}))
    with pytest.raises(cls):
        client.generate(REQ)
    assert fake.count("GET", "/files/gone.png") == calls
    assert fake.generate_calls == 1  # a failed download never re-sends the paid call


def test_signed_url_query_not_in_messages(fake, client, other_host):
    url = other_host.route("GET", "/signed.png", error_reply(404)) + "?X-Amz-Signature=SIGSECRET"
    fake.script(Reply.json({"url": url}))
    with pytest.raises(ResponseDecodeError) as info:
        client.generate(REQ)
    assert "SIGSECRET" not in str(info.value)


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
        "refused": ([], {"base_url": refused_url}),
    }


def _exception_texts(exc: BaseException) -> list[str]:
    texts, todo, seen = [], [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        texts += [str(e), repr(e), *(repr(a) for a in e.args)]
        texts += [repr(v) for v in vars(e).values()] if hasattr(e, "__dict__") else []
        todo += [e.__cause__, e.__context__]
    return texts


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
    texts = _exception_texts(info.value)
    texts += [r.getMessage() for r in caplog.records]
    texts += [logging.Formatter().format(r) for r in caplog.records]
    out, err = capfd.readouterr()
    texts += [out, err, repr(client), repr(client.settings)]
    assert not [t for t in texts if LEAK_KEY in t]
    assert list(tmp_path.iterdir()) == []
    if scenario.endswith("_echo") and "request_id" not in scenario and "keys" not in scenario:
        assert "***" in str(info.value)


@pytest.mark.parametrize(
    "reply",
    [
        Reply.image(solid_image(8, 8, (1, 2, 3)), headers={"X-Request-Id": f"id-{LEAK_KEY}-1"}),
        Reply.json({"id": f"id-{LEAK_KEY}\u0007-1", "image": b64(solid_image(8, 8, (1, 2, 3)))}),
        # Cut to length after the key is replaced, so no piece of the key survives the cut.
        Reply.image(solid_image(8, 8, (1, 2, 3)), headers={"X-Request-Id": "x" * 90 + LEAK_KEY}),
    ],
    ids=["header", "body_with_control_char", "key_across_the_cut"],
)
def test_request_id_of_a_success_is_scrubbed(fake, make_client, reply):
    fake.script(reply)
    request_id = make_client(key=LEAK_KEY).generate(REQ).request_id
    assert LEAK_KEY[:8] not in request_id
    assert "***" in request_id
    assert request_id.isprintable()
    assert len(request_id) <= 100


def test_job_id_of_a_success_is_scrubbed(fake, make_client):
    fake.route("GET", "/jobs/j", Reply.json({"status": "done", "image": b64(solid_image(8, 8, (4, 5, 6)))}))
    fake.script(Reply.json({"id": f"job-{LEAK_KEY}" + "y" * 200, "status": "queued", "poll_url": "/jobs/j"}))
    request_id = make_client(key=LEAK_KEY).generate(REQ).request_id
    assert request_id.startswith("job-***y")
    assert len(request_id) <= 100


def test_key_not_in_success_logs(fake, make_client, caplog):
    fake.script(SHAPES["openai_url"])
    with caplog.at_level(logging.DEBUG):
        make_client(key=LEAK_KEY).generate(REQ)
    assert caplog.records  # debug logging did run
    assert not [r for r in caplog.records if LEAK_KEY in logging.Formatter().format(r)]


# --- decoding helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"a": 1, "b": {"c": [{"d": 2}]}}, ["a", "b", "b.c", "b.c[0].d"]),
        ([], ["[] (an empty list)"]),
        ([{"x": "secret"}], ["[0].x"]),
        ("just a string", []),
    ],
)
def test_key_paths_show_keys_not_values(doc, expected):
    assert api_responses.key_paths(doc) == expected


def test_prompt_and_status_url_never_taken_for_the_image():
    doc = {"prompt": "https://example.com/x.png", "status_url": "https://example.com/s"}
    assert api_responses.find_image(doc) is None
    assert api_responses.find_image({"output": "queued"}) is None


def test_json_error_body_shapes_do_not_need_json_content_type():
    reply = api_responses.Reply(
        400,
        "Bad Request",
        requests.structures.CaseInsensitiveDict({"Content-Type": "text/plain"}),
        json.dumps({"error": {"message": "nope", "code": 7}}).encode(),
        "",
    )
    assert api_responses.server_message(reply) == "nope (code 7)"
