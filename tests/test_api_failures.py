"""Tests of api/failures.py through the client: what each HTTP error status of the generate call
means (error class, message, request count) and how each network failure is named, with the fix."""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import subprocess
import threading

import pytest
from comfyui_flux_schnell.errors import (
    ApiError,
    ApiTimeoutError,
    AuthenticationError,
    BadRequestError,
    InsufficientCreditsError,
    NetworkError,
    RateLimitError,
    ServerError,
)
from support.api_testing import (
    REQ,
    free_port,
    retry_warnings,
)
from support.fake_imageapi import (
    ERROR_STYLES,
    Reply,
    error_reply,
)

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
