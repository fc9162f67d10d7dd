"""Tests of api/types.py: what an `ApiImageRequest` accepts and what it sends."""

from __future__ import annotations

import pytest
from comfyui_flux_schnell.api.types import ApiEvent, ApiImageRequest
from comfyui_flux_schnell.errors import (
    InvalidInputError,
)


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
        ApiImageRequest(**{**base, **kwargs})


def test_the_label_is_for_messages_only():
    a = ApiImageRequest("p", 64, 64, 4, seed=1, label="line 3 -> p.png")
    b = ApiImageRequest("p", 64, 64, 4, seed=1)
    assert a == b
    assert hash(a) == hash(b)
    assert "label" not in a.to_body(send_seed=True)
    assert a.name(0) == "line 3 -> p.png"
    assert b.name(2) == "image 3"
    with pytest.raises(InvalidInputError, match="label"):
        ApiImageRequest("p", 64, 64, 4, label=3)


@pytest.mark.parametrize(
    ("kind", "retry_in_s", "message", "shown"),
    [
        ("rate limited", 3.2, "HTTP 429", "rate limited, retrying in 3 s"),
        ("retrying", 2.0, "HTTP 503", "HTTP 503, retrying in 2 s"),
        ("retrying", None, "", "a call failed, retrying"),
        ("waiting", 1.0, "", "the service is still working on it"),
        ("started", None, "", "waiting for the service"),
        ("done", None, "", "waiting for the service"),
    ],
)
def test_an_event_as_a_node_status(kind, retry_in_s, message, shown):
    event = ApiEvent(index=0, label="image 1", kind=kind, retry_in_s=retry_in_s, message=message)
    assert event.node_status() == shown
