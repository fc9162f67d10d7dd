"""A fake ImageAPI service: a real HTTP server on 127.0.0.1 for tests, the benchmark and the proof.

No pytest needed. `FakeImageAPI()` is a context manager (or `.start()` / `.stop()`) serving
`POST /api/v1/generate` plus any GET route, on a free port (`.base_url`). Answers come from a
script: `.script(r1, r2, ...)` queues answers for the generate call (then `.set_default(...)`,
which starts as "a PNG of the requested size"), `.route(method, path, ...)` scripts any other
path, `.put_file(...)` serves bytes at /files/<name>. An answer is a `Reply` or a callable
`(request, server) -> Reply`; `SHAPES` builds every success shape of the service's
documented contract (https://imageapi.org) and the helpers below build every fault (error statuses
and bodies, Retry-After, slow headers, slow body, a connection cut mid-body, non-JSON, corrupt and
decompression-bomb images, asynchronous jobs). Every request is recorded (`.requests`,
`.count()`), so tests prove what was and was not retried. The default image is a solid colour
derived from the prompt and seed (`color_for`), so different requests differ, and cheap to make.

Run as a script (`python -m tests.support.fake_imageapi --port 8787 --delay 0.3`) it serves default PNG
answers until Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import itertools
import json
import signal
import socket
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

GENERATE_PATH = "/api/v1/generate"
MAX_FAKE_SIDE = 4096  # the fake never renders more than this per side


# --- what the server answers ---------------------------------------------------------------------


@dataclass
class Reply:
    """One HTTP answer, and how badly to deliver it."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # wait before the status line (a slow service)
    body_delay_s: float = 0.0  # spread the body over this long (a trickling answer)
    drop_after: int | None = None  # cut the connection after this many body bytes (0: before)
    drop_before_headers: bool = False  # read the request, then close without answering
    omit_length: bool = False  # no Content-Length: the body ends when the connection closes

    @classmethod
    def json(cls, doc: Any, status: int = 200, **kwargs) -> Reply:
        return cls(status=status, body=json.dumps(doc).encode(), **kwargs)

    @classmethod
    def text(cls, text: str, status: int = 200, content_type="text/plain", **kwargs) -> Reply:
        return cls(status=status, body=text.encode(), content_type=content_type, **kwargs)

    @classmethod
    def image(cls, data: bytes, content_type: str = "image/png", **kwargs) -> Reply:
        return cls(body=data, content_type=content_type, **kwargs)


@dataclass
class RecordedRequest:
    method: str
    path: str  # without the query
    query: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    json: Any  # the parsed body, None when it is not JSON
    client_port: int
    time: float

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def prompt(self) -> str:
        return str((self.json or {}).get("prompt", "")) if isinstance(self.json, dict) else ""

    @property
    def size(self) -> tuple[int, int]:
        doc = self.json if isinstance(self.json, dict) else {}
        return _side(doc.get("width")), _side(doc.get("height"))


Responder = Reply | Callable[[RecordedRequest, "FakeImageAPI"], Reply]


class _Route:
    def __init__(self, default: Responder | None = None, repeat_last: bool = False):
        self.queue: deque[Responder] = deque()
        self.default = default
        self.repeat_last = repeat_last

    def next(self) -> Responder | None:
        if self.queue:
            if self.repeat_last and len(self.queue) == 1:
                return self.queue[0]
            return self.queue.popleft()
        return self.default


# --- the server ----------------------------------------------------------------------------------


class FakeImageAPI:
    """A scripted ImageAPI on 127.0.0.1. See the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, delay_s: float = 0.0):
        self.host, self.port = host, port
        self.delay_s = delay_s  # applied to the default answer
        self.requests: list[RecordedRequest] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._names = itertools.count(1)
        self._files: dict[str, Reply] = {}
        self._routes: dict[tuple[str, str], _Route] = {("POST", GENERATE_PATH): _Route(default=default_png)}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> FakeImageAPI:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer((self.host, self.port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()  # ends scripted delays at once
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeImageAPI:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    # scripting

    def script(self, *responders: Responder) -> FakeImageAPI:
        """Queue answers for the next generate calls (then the default answer again)."""
        with self._lock:
            self._routes["POST", GENERATE_PATH].queue.extend(responders)
        return self

    def set_default(self, responder: Responder) -> FakeImageAPI:
        with self._lock:
            self._routes["POST", GENERATE_PATH].default = responder
        return self

    def route(self, method: str, path: str, *responders: Responder) -> str:
        """Script `method path`; its last answer repeats. Returns the absolute URL."""
        with self._lock:
            route = self._routes.setdefault((method.upper(), path), _Route(repeat_last=True))
            route.repeat_last = True
            route.queue.extend(responders)
        return self.url(path)

    def put_file(self, data: bytes, content_type: str = "image/png", name: str | None = None) -> str:
        """Serve `data` at /files/<name> (a fresh name when None); returns its absolute URL."""
        name = name or f"img-{next(self._names)}.{content_type.rsplit('/', 1)[-1]}"
        with self._lock:
            self._files[name] = Reply.image(data, content_type)
        return self.url(f"/files/{name}")

    def new_name(self, prefix: str = "job") -> str:
        return f"{prefix}-{next(self._names)}"

    # inspection

    def count(self, method: str | None = None, path: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (method is None or r.method == method) and (path is None or r.path == path)
            )

    @property
    def generate_calls(self) -> int:
        return self.count("POST", GENERATE_PATH)

    def requests_to(self, path_prefix: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path.startswith(path_prefix)]

    # serving

    def _answer(self, req: RecordedRequest) -> Reply:
        with self._lock:
            route = self._routes.get((req.method, req.path))
            responder = route.next() if route is not None else None
            if responder is None and req.method == "GET" and req.path.startswith("/files/"):
                responder = self._files.get(req.path[len("/files/") :])
        if responder is None:
            return Reply.json({"error": f"no route {req.method} {req.path}"}, status=404)
        return responder(req, self) if callable(responder) else responder

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._closing.wait(seconds)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so a pooled client reuses its connections
    fake: FakeImageAPI

    def setup(self) -> None:
        super().setup()
        # Answer headers and body go out in separate writes: without this, Nagle's algorithm
        # and the client's delayed ACK add ~40 ms to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def log_message(self, format: str, *args) -> None:
        """Quiet: tests read `.requests` instead."""

    def _serve(self) -> None:
        fake = self.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            doc = json.loads(body) if body else None
        except ValueError:
            doc = None
        parts = urlsplit(self.path)
        req = RecordedRequest(
            method=self.command,
            path=parts.path,
            query=parts.query,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            json=doc,
            client_port=self.client_address[1],
            time=time.monotonic(),
        )
        with fake._lock:
            fake.requests.append(req)
            fake._in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake._in_flight)
        try:
            self._send(fake._answer(req))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (an interrupt, a timeout): nobody is left to answer
        finally:
            with fake._lock:
                fake._in_flight -= 1

    def _send(self, reply: Reply) -> None:
        fake = self.fake
        fake._sleep(reply.delay_s)
        if reply.drop_before_headers:
            self._cut()
            return
        self.send_response(reply.status)
        if reply.content_type:
            self.send_header("Content-Type", reply.content_type)
        if reply.omit_length:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        body = reply.body
        if reply.drop_after is not None:
            self.wfile.write(body[: reply.drop_after])
            self.wfile.flush()
            self._cut()
        elif reply.body_delay_s > 0 and body:
            pieces = 10
            step = max(1, -(-len(body) // pieces))
            for start in range(0, len(body), step):
                self.wfile.write(body[start : start + step])
                self.wfile.flush()
                fake._sleep(reply.body_delay_s / pieces)
        else:
            self.wfile.write(body)

    def _cut(self) -> None:
        """Close the connection abruptly (the client sees it dropped)."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the client may already be gone


# --- images ----------------------------------------------------------------------------------------


def color_for(prompt: str, seed: int | None = None) -> tuple[int, int, int]:
    """The solid colour the fake paints for a prompt and seed."""
    digest = hashlib.sha256(f"{prompt}\0{seed}".encode()).digest()
    return digest[0], digest[1], digest[2]


@lru_cache(maxsize=64)
def solid_image(width: int, height: int, color: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    image = Image.new("RGB", (width, height), color)
    out = io.BytesIO()
    options = {"PNG": {"compress_level": 1}, "WEBP": {"lossless": True}, "JPEG": {"quality": 95}}
    image.save(out, format=fmt, **options.get(fmt, {}))
    return out.getvalue()


def request_image(req: RecordedRequest, fmt: str = "PNG") -> bytes:
    """The image the fake makes for a generate request: its size, its prompt's colour."""
    doc = req.json if isinstance(req.json, dict) else {}
    width, height = req.size
    return solid_image(width, height, color_for(req.prompt, doc.get("seed")), fmt)


def default_png(req: RecordedRequest, fake: FakeImageAPI) -> Reply:
    return Reply.image(request_image(req), delay_s=fake.delay_s)


def photo_like_png(side: int = 1024, seed: int = 0, noise: float = 6.0) -> bytes:
    """Smooth colour fields plus sensor-like noise: compresses like a photo (~2 MB at 1024x1024 and
    noise 6), not like a flat fill. For benchmarks."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)  # (H, W) each
    base = np.stack(
        [
            128 + 100 * np.sin(x / 97 + y / 131),
            128 + 100 * np.cos(y / 73),
            128 + 80 * np.sin((x + y) / 53),
        ],
        axis=-1,
    )  # (H, W, 3)
    pixels = np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def png_with_claimed_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims `width` x `height` (IHDR patched, CRC fixed)."""
    data = bytearray(solid_image(1, 1, (255, 0, 0)))
    # bytes 8..11 length, 12..15 b"IHDR", 16..23 width and height, 29..32 CRC of type + data
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


def _side(value: object) -> int:
    return max(1, min(int(value), MAX_FAKE_SIDE)) if isinstance(value, int) else 64


# --- success shapes ------------------------------------------------------------------------------


def _json_with(build: Callable[[bytes, RecordedRequest, FakeImageAPI], Any], **kw) -> Responder:
    def responder(req: RecordedRequest, fake: FakeImageAPI) -> Reply:
        return Reply.json(build(request_image(req), req, fake), **kw)

    return responder


def _raw(fmt: str, content_type: str) -> Responder:
    def responder(req: RecordedRequest, fake: FakeImageAPI) -> Reply:
        return Reply.image(request_image(req, fmt), content_type)

    return responder


def _job(kind: str) -> Responder:
    """An asynchronous job: the first answer names where to poll; the poll finishes on try 2."""

    def responder(req: RecordedRequest, fake: FakeImageAPI) -> Reply:
        job = fake.new_name()
        image_url = fake.put_file(request_image(req))
        status_path = f"/jobs/{job}"
        if kind == "replicate":
            fake.route(
                "GET",
                status_path,
                Reply.json({"id": job, "status": "processing", "output": None}),
                Reply.json({"id": job, "status": "succeeded", "output": [image_url]}),
            )
            return Reply.json(
                {"id": job, "status": "starting", "urls": {"get": fake.url(status_path)}},
                status=201,
            )
        if kind == "fal":
            result_path = f"/jobs/{job}/response"
            fake.route(
                "GET",
                status_path,
                Reply.json({"status": "IN_PROGRESS", "request_id": job}),
                Reply.json({"status": "COMPLETED", "response_url": fake.url(result_path)}),
            )
            fake.route("GET", result_path, Reply.json({"images": [{"url": image_url}]}))
            return Reply.json(
                {
                    "request_id": job,
                    "status": "IN_QUEUE",
                    "status_url": fake.url(status_path),
                    "response_url": fake.url(result_path),
                },
                status=202,
            )
        if kind == "bfl":
            fake.route(
                "GET",
                status_path,
                Reply.json({"id": job, "status": "Pending"}),
                Reply.json({"id": job, "status": "Ready", "result": {"sample": image_url}}),
            )
            return Reply.json({"id": job, "polling_url": fake.url(status_path)})
        # generic: relative poll URL, a raw image at the end
        fake.route(
            "GET",
            status_path,
            Reply.json({"job_id": job, "status": "queued"}),
            Reply.image(request_image(req)),
        )
        return Reply.json({"job_id": job, "status": "queued", "poll_url": status_path}, status=202)

    return responder


class ScriptedJobs:
    """Async jobs whose fate a test decides: each generate call (`start`, as the default answer)
    starts a job and names its status URL `/jobs/<name>`; that URL answers "processing" while
    `state` is "pending", the image once "done", an HTTP 404 once "expired", and a "failed" job
    once "failed". `polls()` counts the GETs of those URLs."""

    def __init__(self, fake: FakeImageAPI, state: str = "pending"):
        self.fake = fake
        self.state = state
        self._posted: dict[str, RecordedRequest] = {}

    def start(self, req: RecordedRequest, fake: FakeImageAPI) -> Reply:
        name = fake.new_name()
        self._posted[name] = req
        fake.route("GET", f"/jobs/{name}", self._status)
        return Reply.json({"job_id": name, "status": "queued", "poll_url": f"/jobs/{name}"}, status=202)

    def _status(self, req: RecordedRequest, fake: FakeImageAPI) -> Reply:
        name = req.path.rsplit("/", 1)[-1]
        if self.state == "expired":
            return error_reply(404, f"no job {name}", request_id=None)
        if self.state == "failed":
            return Reply.json({"job_id": name, "status": "failed", "error": "the job failed"})
        if self.state == "done":
            return Reply.image(request_image(self._posted[name]))
        return Reply.json({"job_id": name, "status": "processing"})

    def polls(self) -> int:
        return len(self.fake.requests_to("/jobs/"))


def _wrapped_b64(data: bytes) -> str:
    text = b64(data)
    return "\n".join(text[i : i + 76] for i in range(0, len(text), 76))


def _urlsafe_unpadded(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


# Every success shape: name -> responder. Each answers the request's own image.
SHAPES: dict[str, Responder] = {
    "raw_png": _raw("PNG", "image/png"),
    "raw_jpeg": _raw("JPEG", "image/jpeg"),
    "raw_webp": _raw("WEBP", "image/webp"),
    "raw_png_octet_stream": _raw("PNG", "application/octet-stream"),
    "raw_png_no_content_type": _raw("PNG", ""),
    "openai_b64_json": _json_with(lambda d, r, f: {"created": 1, "data": [{"b64_json": b64(d)}]}),
    "openai_url": _json_with(lambda d, r, f: {"created": 1, "data": [{"url": f.put_file(d)}]}),
    "images_data_uri": _json_with(lambda d, r, f: {"images": [data_uri(d), data_uri(d)]}),
    "images_bare_b64": _json_with(lambda d, r, f: {"images": [b64(d)]}),
    "images_url": _json_with(lambda d, r, f: {"images": [f.put_file(d)]}),
    "images_url_objects": _json_with(
        lambda d, r, f: {"images": [{"url": f.put_file(d), "width": 1, "content_type": "png"}]}
    ),
    "image_b64": _json_with(lambda d, r, f: {"image": b64(d), "seed": 1}),
    "image_b64_line_wrapped": _json_with(lambda d, r, f: {"image": _wrapped_b64(d)}),
    "image_b64_urlsafe_unpadded": _json_with(lambda d, r, f: {"image": _urlsafe_unpadded(d)}),
    "image_data_uri_jpeg": _json_with(
        lambda d, r, f: {"image": data_uri(request_image(r, "JPEG"), "image/jpeg")}
    ),
    "result_image": _json_with(lambda d, r, f: {"result": {"image": b64(d)}, "id": "res-1"}),
    "result_sample_url": _json_with(
        lambda d, r, f: {"id": "x", "status": "Ready", "result": {"sample": f.put_file(d)}}
    ),
    "output_url_list": _json_with(
        lambda d, r, f: {"id": "p1", "status": "succeeded", "output": [f.put_file(d)]}
    ),
    "image_url": _json_with(lambda d, r, f: {"image_url": f.put_file(d)}),
    "url": _json_with(lambda d, r, f: {"url": f.put_file(d)}),
    "relative_url": _json_with(lambda d, r, f: {"url": urlsplit(f.put_file(d)).path, "status": "succeeded"}),
    "nested_data_result_output": _json_with(
        lambda d, r, f: {"data": {"result": {"output": [{"image": data_uri(d)}]}}}
    ),
    "top_level_list": _json_with(lambda d, r, f: [{"url": f.put_file(d)}]),
    "top_level_data_uri_string": _json_with(lambda d, r, f: data_uri(d)),
    "job_replicate_style": _job("replicate"),
    "job_fal_style": _job("fal"),
    "job_bfl_style": _job("bfl"),
    "job_relative_poll_url": _job("generic"),
}
LOSSY_SHAPES = {"raw_jpeg", "image_data_uri_jpeg"}


# --- faults ----------------------------------------------------------------------------------------

ERROR_STYLES = ("error_string", "error_object", "message", "detail", "detail_list", "text", "html")


def error_reply(
    status: int,
    message: str = "something is wrong",
    *,
    style: str = "error_string",
    retry_after: str | None = None,
    request_id: str | None = "req-err-1",
    **kwargs,
) -> Reply:
    """An error answer with `message` in one of the common body styles."""
    headers = dict(kwargs.pop("headers", {}))
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    if style == "error_string":
        return Reply.json({"error": message}, status, headers=headers, **kwargs)
    if style == "error_object":
        doc = {"error": {"message": message, "code": "bad_thing", "type": "invalid"}}
        return Reply.json(doc, status, headers=headers, **kwargs)
    if style == "message":
        return Reply.json({"message": message, "statusCode": status}, status, headers=headers, **kwargs)
    if style == "detail":
        return Reply.json({"detail": message}, status, headers=headers, **kwargs)
    if style == "detail_list":
        doc = {"detail": [{"loc": ["body", "width"], "msg": message, "type": "value_error"}]}
        return Reply.json(doc, status, headers=headers, **kwargs)
    if style == "text":
        return Reply.text(message, status, headers=headers, **kwargs)
    if style == "html":
        page = f"<!DOCTYPE html><html><head><title>{status} {message}</title></head><body>x</body></html>"
        return Reply.text(page, status, content_type="text/html", headers=headers, **kwargs)
    raise ValueError(f"unknown error style {style!r}; one of {ERROR_STYLES}")


def dropped_mid_body(req: RecordedRequest, fake: FakeImageAPI) -> Reply:
    data = json.dumps({"image": b64(request_image(req))}).encode()
    return Reply(body=data, drop_after=len(data) // 2)


def corrupt_png() -> bytes:
    """A real PNG cut short: its header reads, its pixels do not."""
    image = Image.effect_noise((64, 64), 50).convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()[:300]


# --- command line ----------------------------------------------------------------------------------


def _stop_on_signal(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a fake ImageAPI on this machine.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_signal)  # `kill` ends it like Ctrl-C does
    fake = FakeImageAPI(args.host, args.port, delay_s=args.delay).start()
    print(f"fake ImageAPI at {fake.base_url} (set IMAGEAPI_BASE_URL to it); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print(f"\nserved {fake.generate_calls} generate call(s)")
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
