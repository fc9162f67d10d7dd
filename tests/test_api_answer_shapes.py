"""Tests of api/answer_shapes.py, the pure functions that read an answer."""

from __future__ import annotations

import json
import time
from email.utils import formatdate

import pytest
import requests
from comfyui_flux_schnell.api import answer_shapes as api_responses


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
