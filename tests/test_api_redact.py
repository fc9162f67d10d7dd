"""Tests of api/redact.py: no URL query, fragment or user info in messages, in exception chains
(`__cause__`, `__context__`) or in any log record at any level, urllib3's own included."""

from __future__ import annotations

import logging

import pytest
from comfyui_flux_schnell.api.redact import cut_url, cut_urls, safe_cause
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
    assert cut_urls(text) == expected


def test_safe_url_and_safe_cause():
    assert cut_url("https://u:p@[::1]:8080/x.png?sig=1#f") == "https://[::1]:8080/x.png"
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


# --- one verb for the key: scrub, fragments included, before any cut (issue 15: 19) ------------------

LONG_KEY = "sk_live_Q7vX2mN9pR4tW8yB3cF6hJ1kL5zD0a"


@pytest.mark.parametrize("start", [0, 5, 17])
def test_scrub_takes_out_every_run_of_twelve_characters_of_the_key(start):
    from comfyui_flux_schnell.api.redact import MIN_KEY_FRAGMENT, scrub

    piece = LONG_KEY[start : start + MIN_KEY_FRAGMENT]
    assert scrub(f"echo {piece} end", LONG_KEY) == "echo *** end"
    assert scrub(f"x{LONG_KEY[start:]}y", LONG_KEY) == "x***y"
    short = LONG_KEY[start : start + MIN_KEY_FRAGMENT - 1]  # 11 characters: ordinary text
    assert scrub(f"echo {short} end", LONG_KEY) == f"echo {short} end"


def test_a_key_echoed_in_a_long_error_message_or_key_name_is_scrubbed_before_the_cut(make_client, fake):
    from comfyui_flux_schnell.api.answer_shapes import MAX_MESSAGE_CHARS

    # The key straddles the message's cut, and sits in a JSON key name longer than its 40-char cut.
    message = "x" * (MAX_MESSAGE_CHARS - 20) + LONG_KEY + " tail"
    fake.script(error_reply(400, message), Reply.json({"junk": 1, ("k" * 3) + LONG_KEY: 2}))
    client = make_client(key=LONG_KEY)
    texts = []
    for _ in range(2):
        with pytest.raises(ApiError) as info:
            client.generate(REQ)
        texts += exception_texts(info.value)
    for text in texts:
        for i in range(len(LONG_KEY) - 11):
            assert LONG_KEY[i : i + 12] not in text


def test_urllib3_log_lines_never_hold_the_key_in_a_path(fake, other_host, make_client, caplog):
    # A download URL on the service's own host with the key in its path (the key goes nowhere else).
    url = fake.put_file(solid_image(8, 8, (1, 2, 3)), name=f"{LONG_KEY}.png")
    fake.script(Reply.json({"data": [{"url": url}]}))
    with caplog.at_level(logging.DEBUG):
        assert make_client(key=LONG_KEY).generate(REQ).image.size == (8, 8)
    records = [logging.Formatter().format(r) for r in caplog.records if r.name.startswith("urllib3")]
    assert any("GET" in r for r in records)
    assert not [r for r in records if LONG_KEY[:12] in r]
