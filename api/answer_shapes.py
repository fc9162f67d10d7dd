"""Reading the ImageAPI's answers: where the image is, whether it is a job, what an error says.

Pure functions over a complete answer (`Reply`), no I/O: used by api/answers.py (the
generate call's answer, job polling) and api/failures.py (error texts). Based on the service's public
documentation (https://imageapi.org), which leaves the success body undocumented, so
every common shape of comparable FLUX hosts is recognised: raw image bytes, OpenAI `data[]`,
`images[]`, single fields, nested wrappers, data URIs and (URL-safe, wrapped, unpadded) base64,
asynchronous jobs with a poll or result URL. Also here: the service's own message from an error
body (JSON, FastAPI validation lists, HTML pages), request ids, `Retry-After`, and opening image
bytes with the decompression-bomb guard (the pixel count is checked before decoding).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import Enum

import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ResponseDecodeError

MAX_MESSAGE_CHARS = 500  # the server's own error text, shown to the user, is cut here
MAX_ID_CHARS = 100  # request and job ids are cut here
MAX_KEY_PATHS = 40
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

# fmt: off


class JobState(str, Enum):
    """Where an async job stands, read from its status word (`STATE_WORDS`)."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


# fmt: off
STATE_WORDS = {
    JobState.PENDING: frozenset({
        "queued", "in_queue", "pending", "processing", "in_progress", "starting", "started",
        "running", "submitted", "created", "accepted", "waiting"
    }),
    JobState.DONE: frozenset({
        "succeeded", "success", "successful", "completed", "complete", "done", "ready", "finished"
    }),
    JobState.FAILED: frozenset({
        "failed", "failure", "error", "errored", "canceled", "cancelled", "rejected", "expired",
        "timeout", "timed_out", "content_moderated", "request_moderated"
    }),
}

# Where an image may sit in a JSON answer, most specific first. Only these keys are searched, so a
# job's `status_url` or an echoed `prompt` is never mistaken for the image.
IMAGE_KEYS = (
    "b64_json", "image_base64", "base64", "b64", "image", "images", "image_url", "image_urls",
    "url", "output", "outputs", "sample", "samples", "data", "result", "results", "artifacts",
    "files", "file"
)
# fmt: on
JOB_ID_KEYS = ("id", "job_id", "request_id", "task_id", "prediction_id")
POLL_URL_KEYS = ("status_url", "poll_url", "polling_url")
RESULT_URL_KEYS = ("response_url", "result_url")
REQUEST_ID_HEADERS = ("X-Request-Id", "Request-Id", "X-Correlation-Id")
MESSAGE_KEYS = ("message", "detail", "error_description", "error_message", "msg", "title")
_BASE64_RE = re.compile(r"[A-Za-z0-9+/=_\-\s]+")
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")
_STRICT_BASE64 = sys.version_info >= (3, 11)  # binascii.a2b_base64(strict_mode=...)
NOT_JSON = object()  # what `parse_json` returns for a body that is not JSON
Scrub = Callable[[str], str]  # takes the API key out of text (api/redact.py)


def _no_scrub(text: str) -> str:
    return text


@dataclass
class Reply:
    """A complete HTTP answer."""

    status: int
    reason: str
    headers: requests.structures.CaseInsensitiveDict
    content: bytes | bytearray  # the body as read, without a second copy
    url: str

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


# --- asynchronous jobs ----------------------------------------------------------------------------


@dataclass
class AsyncJob:
    """An answer that says the image is being made elsewhere: where to poll it, or its result."""

    id: str | None
    status: str | None
    poll_url: str | None
    result_url: str | None
    error: str | None

    @property
    def state(self) -> JobState | None:
        """The status word's `JobState`; None when there is no status or an unknown word."""
        if not self.status:
            return None
        word = re.sub(r"[\s-]+", "_", self.status.strip().lower())
        return next((state for state, words in STATE_WORDS.items() if word in words), None)

    @property
    def pending(self) -> bool:
        # No status but a poll URL (an id + polling_url answer): still to come.
        return self.state is JobState.PENDING or (not self.status and self.poll_url is not None)

    @property
    def done(self) -> bool:
        return self.state is JobState.DONE

    @property
    def failed(self) -> bool:
        return self.state is JobState.FAILED


def job_info(doc: object, scrub: Scrub = _no_scrub) -> AsyncJob | None:
    """The job fields of an asynchronous answer, None when `doc` does not look like a job."""
    if not isinstance(doc, dict):
        return None
    status = next((doc[k] for k in ("status", "state") if isinstance(doc.get(k), str)), None)
    job_id = next(
        (str(doc[k]) for k in JOB_ID_KEYS if isinstance(doc.get(k), (str, int)) and doc.get(k) != ""),
        None,
    )
    poll = next((doc[k] for k in POLL_URL_KEYS if isinstance(doc.get(k), str) and doc[k]), None)
    urls = doc.get("urls")
    if poll is None and isinstance(urls, dict) and isinstance(urls.get("get"), str):
        poll = urls["get"]
    result = next((doc[k] for k in RESULT_URL_KEYS if isinstance(doc.get(k), str) and doc[k]), None)
    if status is None and poll is None and result is None:
        return None
    has_message = doc.get("error") or any(isinstance(doc.get(k), str) for k in MESSAGE_KEYS)
    error_text = server_message_from(doc, scrub) if has_message else None
    return AsyncJob(job_id, status, poll, result, error_text)


# --- where the image is ---------------------------------------------------------------------------


def looks_like_image(reply: Reply) -> bool:
    """Whether the body is the image itself (by Content-Type, or magic bytes when untyped)."""
    ctype = reply.content_type
    if ctype.startswith("image/"):
        return True
    if ctype in ("", "application/octet-stream", "binary/octet-stream"):
        head = reply.content[:16]
        return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
    return False


def parse_json(content: bytes) -> object:
    """The JSON document in `content`, or `NOT_JSON`: also for JSON nested past the interpreter's
    recursion limit (RecursionError) and for numbers past int's digit limit (ValueError), which a
    hostile or broken answer may hold; neither ever escapes."""
    try:
        return json.loads(content)
    except (UnicodeDecodeError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return NOT_JSON


def find_image(node: object, path: str = "", depth: int = 0) -> tuple[str, str, str] | None:
    """The first image reference: (kind, value, key path) with kind "data", "b64" or "url"."""
    if depth > 8:
        return None
    if isinstance(node, str):
        kind = _string_kind(node)
        return (kind, node, path or "the body") if kind else None
    if isinstance(node, list):
        for i, item in enumerate(node):
            found = find_image(item, f"{path}[{i}]", depth + 1)
            if found is not None:
                return found
    elif isinstance(node, dict):
        for key in IMAGE_KEYS:
            if key in node:
                found = find_image(node[key], f"{path}.{key}" if path else key, depth + 1)
                if found is not None:
                    return found
    return None


def _string_kind(text: str) -> str | None:
    head = text[:16].lower()
    if head.startswith("data:"):
        return "data"
    if head.startswith(("https://", "http://")) or (text.startswith("/") and not text.startswith("//")):
        return "url" if len(text) < 8192 else None
    if len(text) >= 64 and _BASE64_RE.fullmatch(text[:4096]) is not None:
        return "b64"
    return None


def b64decode(text: str) -> bytes:
    """Standard or URL-safe base64; line breaks and missing padding are allowed.

    binascii's strict mode (Python >= 3.11) is the fast path: twice as fast as
    `base64.b64decode(validate=True)` on a multi-megabyte image, and it reads the str in place.
    """
    if "-" in text or "_" in text:
        text = text.translate(_URLSAFE_TO_STANDARD)
    if _STRICT_BASE64:
        try:
            return binascii.a2b_base64(text, strict_mode=True)
        except binascii.Error:
            pass  # line breaks or no padding: the lenient path below
    cleaned = "".join(text.split())
    return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)


def decode_data_uri(uri: str) -> bytes:
    head, comma, payload = uri.partition(",")
    if not comma or not head.lower().endswith(";base64"):
        raise ValueError("a data URI without ;base64")
    return b64decode(payload)


def open_image(
    data: bytes, where: str, max_pixels: int, status: int | None, request_id: str | None
) -> tuple[Image.Image, str]:
    """Decode to an RGB image, refusing more than `max_pixels` before decompressing; also the
    file's format as Pillow names it ("PNG", "JPEG", ...)."""

    def refused(message: str) -> ResponseDecodeError:
        return ResponseDecodeError(message, status=status, request_id=request_id)

    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise refused(
            f"{where} claims more pixels than any real image (a decompression bomb?); refused "
            f"before decoding (limit max_image_pixels={max_pixels:,})"
        ) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise refused(f"{where} is not a readable PNG/JPEG/WebP image ({len(data):,} bytes)") from e
    width, height = image.size
    if width * height > max_pixels:
        raise refused(
            f"{where} is {width}x{height} = {width * height:,} pixels, more than "
            f"max_image_pixels={max_pixels:,}; refused before decoding"
        )
    try:
        image.load()
        fmt = image.format
        return to_rgb(ImageOps.exif_transpose(image)), fmt
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise refused(
            f"{where} is corrupt or truncated: {type(e).__name__} while decoding a "
            f"{image.format} image of {width}x{height} ({len(data):,} bytes)"
        ) from e


_SIXTEEN_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image. Pillow's convert() clips 16-bit grayscale (values 0..65535) to 255,
    which turns it solid white: it is scaled to 8 bits first. An RGB image is used as it is."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_GRAY:
        image = image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    return image.convert("RGB")


# --- what an error answer says --------------------------------------------------------------------


def server_message(reply: Reply, scrub: Scrub = _no_scrub) -> str:
    """The service's own explanation from an error body, passed through `scrub` (which takes the
    key out), then cut to MAX_MESSAGE_CHARS."""
    ctype = reply.content_type
    text = reply.content[: MAX_MESSAGE_CHARS * 8].decode("utf-8", "replace")
    stripped = text.lstrip()
    if "json" in ctype or stripped.startswith(("{", "[")):
        doc = parse_json(reply.content)
        if doc is not NOT_JSON:  # a JSON type with a non-JSON body is shown as text below
            return server_message_from(doc, scrub)
    if "html" in ctype or stripped[:15].lower().startswith(("<!doctype", "<html")):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        text = f"an HTML page{': ' + title.group(1) if title else ''}"
    text = " ".join(text.split())
    return _cut(text, scrub) if text else f"no message (HTTP {reply.status} {reply.reason})".strip()


def server_message_from(doc: object, scrub: Scrub = _no_scrub) -> str:
    """The message in a JSON error document (`error.message`, `detail`, ...), scrubbed, then cut."""
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict):
            message = next((err[k] for k in MESSAGE_KEYS if isinstance(err.get(k), str)), None)
            code = err.get("code") or err.get("type")
            if message:
                return _cut(f"{message} (code {code})" if code else message, scrub)
        elif isinstance(err, str) and err:
            return _cut(err, scrub)
        for key in MESSAGE_KEYS:
            value = doc.get(key)
            if isinstance(value, str) and value:
                return _cut(value, scrub)
            if isinstance(value, list) and value:  # FastAPI-style [{"loc": [...], "msg": ...}]
                return _cut("; ".join(_validation_item(v) for v in value), scrub)
    if isinstance(doc, str) and doc:
        return _cut(doc, scrub)
    return f"no message; the body's JSON keys: {', '.join(key_paths(doc, scrub=scrub)) or '(none)'}"


def _validation_item(item: object) -> str:
    if isinstance(item, dict):
        loc = item.get("loc")
        where = ".".join(str(p) for p in loc) if isinstance(loc, list) else ""
        msg = item.get("msg") or item.get("message") or ""
        return f"{where}: {msg}" if where else str(msg)
    return str(item)


def _cut(text: str, scrub: Scrub) -> str:
    """Scrub first, then cut: no piece of a key that the cut would split survives it."""
    text = scrub(" ".join(str(text).split()))
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def key_paths(
    node: object, prefix: str = "", out: list[str] | None = None, scrub: Scrub = _no_scrub
) -> list[str]:
    """Key paths of a JSON document (`data[0].url`), never its values; each key name is passed
    through `scrub` before it is cut."""
    out = [] if out is None else out
    if len(out) >= MAX_KEY_PATHS or prefix.count(".") + prefix.count("[") > 6:
        return out
    if isinstance(node, dict):
        for key, value in node.items():
            name = scrub(str(key))[:40]
            path = f"{prefix}.{name}" if prefix else name
            if len(out) >= MAX_KEY_PATHS:
                out.append("…")
                break
            out.append(path)
            key_paths(value, path, out, scrub)
    elif isinstance(node, list) and node:
        key_paths(node[0], f"{prefix}[0]", out, scrub)
    if not prefix and not out and isinstance(node, list):
        out.append("[] (an empty list)")
    return out


def request_id_of(reply: Reply, scrub: Callable[[str], str] | None = None) -> str | None:
    """The service's id for the call: a request-id header, else `request_id`/`id` in small JSON,
    made safe by `clean_id`."""
    for name in REQUEST_ID_HEADERS:
        value = reply.headers.get(name)
        if value:
            return clean_id(value, scrub)
    if reply.content[:1] == b"{" and "json" in reply.content_type and len(reply.content) < 2**16:
        doc = parse_json(reply.content)
        for key in ("request_id", "id"):
            if isinstance(doc, dict) and isinstance(doc.get(key), (str, int)):
                return clean_id(str(doc[key]), scrub)
    return None


def clean_id(value: str, scrub: Callable[[str], str] | None = None) -> str:
    """An id from the server, fit for messages, info and PNG text: printable characters only,
    passed through `scrub` (which replaces the key), then cut to MAX_ID_CHARS. Cut last, so that
    no piece of a key the cut would split survives."""
    value = "".join(ch for ch in value if ch.isprintable())
    if scrub is not None:
        value = scrub(value)
    return value[:MAX_ID_CHARS]


def status_tag(status: int, reason: str, request_id: str | None) -> str:
    """`HTTP 503 Service Unavailable, request id abc`, for messages."""
    text = f"HTTP {status}{' ' + reason if reason else ''}"
    return f"{text}, request id {request_id}" if request_id else text


def retry_after_seconds(reply: Reply) -> float | None:
    """`Retry-After` as seconds (a number or an HTTP date), None when absent or unreadable."""
    value = reply.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass  # not a number: maybe an HTTP date
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())
