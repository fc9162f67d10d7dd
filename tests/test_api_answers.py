"""Tests of api/answers.py through the client, against the fake ImageAPI on 127.0.0.1: every success
shape of the answer, images that cannot be decoded, asynchronous jobs, ids made safe at the source."""

from __future__ import annotations

import io
import logging
import time

import pytest
from comfyui_flux_schnell.api.types import ApiImageRequest
from comfyui_flux_schnell.errors import (
    ApiError,
    ApiTimeoutError,
    ResponseDecodeError,
    ServerError,
)
from comfyui_flux_schnell.generation import FinishedImage
from PIL import Image
from support.api_testing import (
    LEAK_KEY,
    REQ,
    RecordingClock,
    close_to,
    expected_color,
    retry_warnings,
)
from support.fake_imageapi import (
    LOSSY_SHAPES,
    SHAPES,
    Reply,
    b64,
    corrupt_png,
    data_uri,
    error_reply,
    png_with_claimed_size,
    solid_image,
)

# --- success shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_success_shape_decodes(fake, client, shape):
    fake.script(SHAPES[shape])
    result = client.generate(REQ)
    assert isinstance(result, FinishedImage)
    assert result.image.mode == "RGB"
    assert result.image.size == (REQ.width, REQ.height)
    tolerance = 6 if shape in LOSSY_SHAPES else 0
    assert close_to(result.image.getpixel((5, 5)), expected_color(REQ), tolerance)
    assert result.attempts == 1
    assert fake.generate_calls == 1
    assert result.seconds > 0


def test_different_requests_give_different_images(fake, client):
    a = client.generate(ApiImageRequest("a cat", 32, 32, 4)).image.getpixel((0, 0))
    b = client.generate(ApiImageRequest("a dog", 32, 32, 4)).image.getpixel((0, 0))
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
    assert time.monotonic() - started < 5.0  # ends at the deadline: polling does not go on
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
    clock = RecordingClock()
    client = make_client(clock=clock, backoff_base_s=0.3, backoff_max_s=0.3, poll_interval_s=0.01)
    with caplog.at_level(logging.WARNING, logger="flux_schnell.api"):
        assert client.generate(REQ).image.getpixel((0, 0)) == (7, 7, 7)
    polls = [0.01] if kind == "status" else []  # a pending job is polled after poll_interval_s
    (backoff,) = clock.sleeps[len(polls) :]
    assert clock.sleeps[: len(polls)] == polls
    assert 0.15 <= backoff <= 0.3  # the backoff (0.15-0.3 s with jitter), not at once
    first, second = fake.requests_to("/jobs/r")
    assert second.time - first.time >= 0.15
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
    clock = RecordingClock()
    with pytest.raises(cls, match=match):
        make_client(clock=clock, deadline_s=2.0).generate(REQ)
    assert all(wait < 1.0 for wait in clock.sleeps)  # the 30 s Retry-After was not waited
    assert fake.count("GET", "/jobs/late") == 1


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


# --- hostile JSON (issue 15: 4): an ApiError naming the answer, never RecursionError/ValueError -------


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 5000 + b"]" * 5000,
        b'{"a":' * 3000 + b"1" + b"}" * 3000,
        b'{"id": ' + b"9" * 5000 + b"}",
    ],
    ids=["deep list", "deep object", "5000-digit number"],
)
def test_hostile_json_answers_become_a_response_decode_error(fake, make_client, body):
    from comfyui_flux_schnell.errors import ResponseDecodeError

    fake.script(Reply(body=body))
    with pytest.raises(ResponseDecodeError) as info:
        make_client().generate(REQ)
    assert "HTTP 200" in str(info.value)


def test_a_deeply_nested_http_500_body_is_a_server_error(fake, make_client):
    from comfyui_flux_schnell.errors import ServerError

    fake.script(Reply(status=500, body=b'{"error":' * 2000 + b'"x"' + b"}" * 2000))
    with pytest.raises(ServerError) as info:
        make_client(max_billed_retries=0).generate(REQ)
    assert "HTTP 500" in str(info.value)


# --- decoding (issue 15: 23): 16-bit grayscale, EXIF orientation, the decoded size -------------------


def test_a_16_bit_grayscale_png_decodes_to_its_gray_levels_not_white(fake, make_client):
    import numpy as np

    levels = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    out = io.BytesIO()
    Image.fromarray(levels).save(out, format="PNG")
    fake.script(Reply.image(out.getvalue()))
    image = make_client().generate(REQ).image
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((15, 15)) == (255, 255, 255)
    assert image.getpixel((0, 8)) == (128, 128, 128)


def test_exif_orientation_is_applied_and_the_decoded_size_is_exposed(fake, make_client):
    picture = Image.new("RGB", (64, 32), (200, 10, 10))
    picture.paste((10, 10, 200), (0, 0, 8, 8))  # a blue corner, top left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image is to be rotated 90 degrees clockwise
    out = io.BytesIO()
    picture.save(out, format="JPEG", exif=exif, quality=95)
    fake.script(Reply.image(out.getvalue(), content_type="image/jpeg"))
    result = make_client().generate(REQ)
    assert result.image.size == (32, 64)  # shown upright
    assert result.size == (32, 64)
    assert result.size_differs  # REQ asked for 64x48: the caller can refuse it or record it
    blue = result.image.getpixel((28, 3))  # the top-left corner went to the top right
    assert blue[2] > 150
    assert blue[0] < 80
