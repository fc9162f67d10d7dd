"""Tests of api/redact.py: no URL query, fragment or user info in messages, in exception chains
(`__cause__`, `__context__`) or in any log record at any level, urllib3's own included."""

from __future__ import annotations

import logging

import pytest
from comfyui_flux_schnell.api.redact import redact_urls, safe_cause, safe_url
from comfyui_flux_schnell.errors import ApiError
from support.api_testing import REQ, exception_texts, free_port
from support.fake_imageapi import Reply, error_reply, solid_image

SECRET = "SECRETTOKEN42"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('"GET /files/x.png?token=SECRETTOKEN42 HTTP/1.1" 200 93', '"GET /files/x.png HTTP/1.1" 200 93'),
        ("https://user:SECRETTOKEN42@cdn.example.com:8443/a.png#frag", "https://cdn.example.com:8443/a.png"),
        (
            "Max retries exceeded with url: /img.png?X-Amz-Signature=SECRETTOKEN42 (Caused by x)",
            "Max retries exceeded with url: /img.png (Caused by x)",
        ),
        (
            "no URL here, and/or a path without a query: /a/b.png",
            "no URL here, and/or a path without a query: /a/b.png",
        ),
    ],
)
def test_redact_urls(text, expected):
    assert redact_urls(text) == expected


def test_safe_url_and_safe_cause():
    assert safe_url("https://u:p@[::1]:8080/x.png?sig=1#f") == "https://[::1]:8080/x.png"
    cause = safe_cause(ConnectionError(f"GET https://cdn.example.com/a.png?token={SECRET} failed"))
    assert SECRET not in str(cause)
    assert str(cause) == "builtins.ConnectionError: GET https://cdn.example.com/a.png failed"


def download_faults(other_host) -> dict[str, str]:
    """Image URLs (with a secret in the query) whose download fails in different ways."""
    return {
        "not_found": other_host.route("GET", "/gone.png", error_reply(404, "no such file")),
        "dropped": other_host.route("GET", "/cut.png", Reply(drop_before_headers=True)),
        "refused": f"http://127.0.0.1:{free_port()}/closed.png",
        "ok": other_host.put_file(solid_image(8, 8, (1, 2, 3))),
    }


@pytest.mark.parametrize("fault", ["not_found", "dropped", "refused", "ok"])
def test_signed_download_urls_stay_out_of_logs_and_exception_chains(
    fake, other_host, make_client, caplog, fault
):
    url = download_faults(other_host)[fault] + f"?token={SECRET}&expires=1"
    fake.script(Reply.json({"data": [{"url": url}]}))
    client = make_client()
    texts = []
    with caplog.at_level(logging.DEBUG):  # every logger, urllib3's too
        if fault == "ok":
            assert client.generate(REQ).image.size == (8, 8)
        else:
            with pytest.raises(ApiError) as info:
                client.generate(REQ)
            texts += exception_texts(info.value)
            assert info.value.__cause__ is None or "token" not in str(info.value.__cause__)
    records = [logging.Formatter().format(r) for r in caplog.records]
    assert any(r.name.startswith("urllib3") for r in caplog.records)  # urllib3 did log the download
    assert any("/gone.png" in t or "/cut.png" in t or "/closed.png" in t or "/files/" in t for t in records)
    assert not [t for t in texts + records if SECRET in t]
