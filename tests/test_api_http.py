"""Tests of api/http.py against the fake ImageAPI on 127.0.0.1: headers, pooled connections, the stop
checked before a call goes out, and downloads (the key only to the service's own origin, size caps,
one free retry, no query string in messages)."""

from __future__ import annotations

import io
import logging
import threading
import time

import pytest
import requests
from comfyui_flux_schnell._version import __version__
from comfyui_flux_schnell.errors import (
    GenerationInterrupted,
    NetworkError,
    ResponseDecodeError,
    ServerError,
)
from PIL import Image
from support.api_testing import (
    KEY,
    REQ,
    retry_warnings,
)
from support.fake_imageapi import (
    SHAPES,
    Reply,
    error_reply,
    solid_image,
)


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


# --- issue 15: no proxy to this machine (16), the key to no other host (17), no private downloads (22)


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_requests_to_this_machine_never_go_through_a_proxy(
    fake, other_host, make_client, monkeypatch, variable
):
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, other_host.base_url)  # a recording proxy on 127.0.0.1
    job = fake.put_file(solid_image(8, 8, (4, 5, 6)))
    fake.script(Reply.json({"data": [{"url": job}]}))
    assert make_client().generate(REQ).image.size == (8, 8)
    assert other_host.count() == 0  # the proxy never saw the key (nor anything else)
    assert fake.count("POST") == 1
    assert fake.count("GET") == 1


@pytest.mark.parametrize("where", ["query", "path", "fragment of it in the path"])
def test_a_download_url_on_another_host_holding_the_key_is_refused_naming_the_host(
    fake, other_host, make_client, where
):
    key = "sk_live_Q7vX2mN9pR4tW8yB3cF6hJ1kL5zD0a"
    name = other_host.put_file(solid_image(8, 8, (1, 2, 3)))
    url = {
        "query": f"{name}?k={key}",
        "path": other_host.url(f"/files/{key}/x.png"),
        "fragment of it in the path": other_host.url(f"/files/{key[5:25]}.png"),
    }[where]
    fake.script(Reply.json({"data": [{"url": url}]}))
    with pytest.raises(ResponseDecodeError) as info:
        make_client(key=key).generate(REQ)
    assert "127.0.0.1" in str(info.value)
    assert "holds the API key" in str(info.value)
    assert other_host.count() == 0
    assert key[5:17] not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://169.254.169.254/latest/meta-data/",
        "https://10.1.2.3/x.png",
        "https://192.168.0.9/x.png",
        "https://127.0.0.1:9/x.png",
        "https://[::1]:9/x.png",
        "https://localhost:9/x.png",
        "https://[fe80::1]/x.png",
    ],
)
def test_a_remote_service_cannot_send_downloads_to_private_or_local_addresses(url):
    from comfyui_flux_schnell.api.failures import Failure
    from comfyui_flux_schnell.api.http import HttpTransport
    from support.api_testing import make_settings

    transport = HttpTransport(make_settings("https://imageapi.example.com"), None, logging.getLogger("t"))
    with pytest.raises(Failure) as info:  # refused before any connection is tried
        transport.get(url, time.monotonic() + 5, threading.Event(), 1.0, 1000)
    assert "private" in info.value.message
    transport.close()


def test_a_local_service_may_name_local_downloads(fake, other_host, make_client):
    fake.script(Reply.json({"data": [{"url": other_host.put_file(solid_image(8, 8, (1, 2, 3)))}]}))
    assert make_client().generate(REQ).image.size == (8, 8)
