"""HTTP transport for the hosted ImageAPI service: requests, retries, and decoding answers to images.

Based on the service's public contract (shared/reference/imageapi-contract.md): `POST
{base_url}/api/v1/generate` with a Bearer key and a JSON body of documented fields. The success
body's shape is undocumented, so every common shape of comparable FLUX hosts is decoded (raw image
bytes, OpenAI `data[]`, `images[]`, single fields, nested wrappers, asynchronous jobs with a poll
URL). Layout of this file: request/result types, the client (worker pool, retry loop), one HTTP
exchange, failure classification, answer decoding (JSON search, jobs, downloads), image opening.

Money rules: a call that may already have been billed (read timeout, 500/502/504, dropped answer)
is retried at most `max_billed_retries` times and each such retry is logged as possibly billed;
calls that certainly did no work (refused connection, 429, 503) are retried up to
`max_free_retries` times. Everything is bounded by one monotonic deadline per image, and every wait
checks a stop event. The API key never appears in a log record or an error message.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import queue
import random
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from PIL import Image, UnidentifiedImageError
from requests.adapters import HTTPAdapter

from ._version import __version__
from .errors import (
    ApiError,
    ApiTimeoutError,
    AuthenticationError,
    BadRequestError,
    FluxSchnellError,
    GenerationInterrupted,
    InsufficientCreditsError,
    InvalidInputError,
    NetworkError,
    RateLimitError,
    ResponseDecodeError,
    ServerError,
)
from .settings import ENV_BASE_URL, KEY_HELP, SET_KEY_COMMAND, ApiSettings, is_loopback_host

GENERATE_PATH = "/api/v1/generate"
USER_AGENT = f"comfyui-flux-schnell/{__version__} python-requests/{requests.__version__}"
POOL_SIZE = 16  # connections kept per host; >= any concurrency the node uses (MAX_BATCH)
CHUNK_BYTES = 2**20  # most a body read returns at once; the deadline and stop are checked per read
SLEEP_SLICE_S = 0.05  # waits (backoff, Retry-After, polling) wake this often to check the stop
MAX_MESSAGE_CHARS = 500  # the server's own error text, shown to the user, is cut here
MAX_REDIRECTS = 5  # for image downloads; the generate call itself never follows redirects
MAX_KEY_PATHS = 40
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

FREE, BILLED = "free", "billed"  # the two kinds of retry
# fmt: off
PENDING = {
    "queued", "in_queue", "pending", "processing", "in_progress", "starting", "started",
    "running", "submitted", "created", "accepted", "waiting"
}
DONE = {
    "succeeded", "success", "successful", "completed", "complete", "done", "ready", "finished"
}
FAILED = {
    "failed", "failure", "error", "errored", "canceled", "cancelled", "rejected", "expired",
    "timeout", "timed_out", "content_moderated", "request_moderated"
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

_URLLIB3_MAJOR = int(urllib3.__version__.split(".", 1)[0])

log = logging.getLogger("flux_schnell.api")


# --- request and result -------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateRequest:
    """One image to ask the service for. Only documented fields are sent unless told otherwise."""

    prompt: str
    width: int
    height: int
    num_inference_steps: int
    seed: int | None = None
    model: str = "flux-schnell"

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidInputError("prompt must be a non-empty string.")
        for name in ("width", "height", "num_inference_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive whole number; got {value!r}.")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0
        ):
            raise InvalidInputError(f"seed must be None or a whole number >= 0; got {self.seed!r}.")
        if not isinstance(self.model, str) or not self.model:
            raise InvalidInputError(f"model must be a non-empty string; got {self.model!r}.")

    def to_body(self, send_seed: bool) -> dict:
        """The JSON body: documented fields, plus the undocumented `seed` only when opted in."""
        body = {
            "prompt": self.prompt,
            "model": self.model,
            "width": self.width,
            "height": self.height,
            "num_inference_steps": self.num_inference_steps,
        }
        if send_seed and self.seed is not None:
            body["seed"] = self.seed
        return body


@dataclass
class ApiImage:
    image: Image.Image  # RGB, fully loaded
    request_id: str | None
    seconds: float  # wall time for this image, retries included
    attempts: int  # generate calls made (1 = no retry)


@dataclass
class _Reply:
    """A complete HTTP answer."""

    status: int
    reason: str
    headers: requests.structures.CaseInsensitiveDict
    content: bytes
    url: str

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


class _Failure(Exception):
    """A failed exchange: the error to raise if it is not retried, and which retry it allows."""

    def __init__(
        self,
        cls: type[ApiError],
        message: str,
        *,
        reason: str,
        retry: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(reason)
        self.cls, self.message, self.reason, self.retry = cls, message, reason, retry
        self.status, self.request_id, self.retry_after = status, request_id, retry_after

    def error(self, note: str, scrub: Callable[[str], str]) -> ApiError:
        """The error to raise, passed through `scrub` (which removes the key)."""
        kwargs = {"status": self.status, "request_id": self.request_id}
        if kwargs["request_id"] is not None:
            kwargs["request_id"] = scrub(kwargs["request_id"])
        if issubclass(self.cls, RateLimitError):
            kwargs["retry_after"] = self.retry_after
        return self.cls(scrub(self.message + note), **kwargs)


class _Crash:
    """A worker's unexpected exception (a bug), carried to the calling thread to be re-raised."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class _Bearer(requests.auth.AuthBase):
    """Sets the key on requests to the service's own origin (also stops ~/.netrc lookups)."""

    def __init__(self, api_key: str | None):
        self._key = api_key

    def __call__(self, r):
        if self._key is not None:
            r.headers["Authorization"] = f"Bearer {self._key}"
        return r

    def __repr__(self) -> str:
        return f"_Bearer({'set' if self._key else 'none'})"


# --- the client ----------------------------------------------------------------------------------


class ImageApiClient:
    """A pooled HTTP client for the service. Thread-safe for the calls it makes itself."""

    def __init__(
        self,
        settings: ApiSettings,
        *,
        session: requests.Session | None = None,
        logger: logging.Logger | None = None,
    ):
        self.settings = settings
        self.log = logger or log
        self._own_session = session is None
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE, max_retries=0)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
        self._session = session
        self._generate_url = settings.base_url + GENERATE_PATH
        self._origin = _origin(settings.base_url)
        self._with_key = _Bearer(settings.api_key)
        self._without_key = _Bearer(None)
        self._random = random.Random()

    def close(self) -> None:
        if self._own_session:
            self._session.close()

    def __enter__(self) -> ImageApiClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ImageApiClient(base_url={self.settings.base_url!r})"

    # public calls

    def generate(
        self, request: GenerateRequest, *, should_stop: Callable[[], bool] | None = None
    ) -> ApiImage:
        """One image, or the `ApiError` it ended with raised."""
        (result,) = self.generate_many([request], concurrency=1, should_stop=should_stop)
        if isinstance(result, ApiError):
            raise result
        return result

    def generate_many(
        self,
        requests: Sequence[GenerateRequest],
        *,
        concurrency: int = 4,
        should_stop: Callable[[], bool] | None = None,
        on_result: Callable[[int, ApiImage | ApiError], None] | None = None,
        poll_interval: float = 0.05,
    ) -> list[ApiImage | ApiError]:
        """Run `requests` through `concurrency` workers; results in input order.

        Each result is an `ApiImage` or the `ApiError` its request ended with. `on_result(index,
        result)` runs in this thread as each finishes. When `should_stop()` turns true (checked
        every `poll_interval` s) nothing more is sent and `GenerationInterrupted` is raised at once;
        calls in flight are abandoned (their threads end by their own timeout).
        """
        items = list(requests)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise InvalidInputError(
                f"concurrency must be a whole number >= 1; got {concurrency!r}."
            )
        if not poll_interval > 0:
            raise InvalidInputError(f"poll_interval must be > 0 seconds; got {poll_interval!r}.")
        if not items:
            return []

        stop = threading.Event()
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        done: queue.SimpleQueue[tuple[int, object]] = queue.SimpleQueue()
        for i in range(len(items)):
            todo.put(i)

        def worker() -> None:
            while not stop.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    outcome: object = self._generate_one(items[i], i, stop)
                except ApiError as e:
                    outcome = self._scrubbed(e)
                except GenerationInterrupted:
                    return
                except BaseException as e:  # noqa: BLE001 -- re-raised in the calling thread
                    outcome = _Crash(e)
                done.put((i, outcome))

        workers = [
            threading.Thread(target=worker, name=f"flux-schnell-api-{k}", daemon=True)
            for k in range(min(concurrency, len(items)))
        ]
        for t in workers:
            t.start()

        results: list[ApiImage | ApiError | None] = [None] * len(items)
        finished = 0
        try:
            while finished < len(items):
                if should_stop is not None and should_stop():
                    raise GenerationInterrupted(
                        f"stopped on request after {finished} of {len(items)} image(s); calls "
                        "already sent may still be billed."
                    )
                try:
                    i, outcome = done.get(timeout=poll_interval)
                except queue.Empty:
                    if not any(t.is_alive() for t in workers) and done.empty():
                        raise FluxSchnellError(
                            "the API worker threads ended without a result (a bug)"
                        ) from None
                    continue
                if isinstance(outcome, _Crash):
                    raise outcome.exc
                results[i] = outcome  # type: ignore[assignment]
                finished += 1
                if on_result is not None:
                    on_result(i, outcome)  # type: ignore[arg-type]
        except BaseException:
            stop.set()  # workers take nothing new and leave their waits
            raise
        return results  # type: ignore[return-value]

    # one image

    def _generate_one(
        self, request: GenerateRequest, index: int, stop: threading.Event
    ) -> ApiImage:
        s = self.settings
        started = time.monotonic()
        deadline = started + s.deadline_s
        body = json.dumps(request.to_body(s.send_seed)).encode()
        self.log.debug("image %d: POST %s %s", index + 1, self._generate_url, body.decode())
        free = billed = attempts = 0
        while True:
            if stop.is_set():
                raise GenerationInterrupted("stopped")
            attempts += 1
            reply, failure = self._try(
                self._exchange,
                "POST",
                self._generate_url,
                body=body,
                timeout_s=s.request_timeout_s,
                deadline=deadline,
                stop=stop,
                cap=self._body_cap(),
                may_bill=True,
            )
            if failure is None and not 200 <= reply.status < 300:
                failure = self._status_failure(reply)
            if failure is not None:
                wait, note = self._retry_wait(failure, free, billed, deadline)
                if wait is None:
                    tried = f" [after {attempts} attempts]" if attempts > 1 else ""
                    raise failure.error(note + tried, self._safe) from failure.__cause__
                if failure.retry == FREE:
                    free += 1
                    kind = f"free retry {free} of {s.max_free_retries}: the call did no work"
                else:
                    billed += 1
                    kind = (
                        f"billed retry {billed} of {s.max_billed_retries}: the failed call "
                        "may already have been billed, so this retry may cost a second image"
                    )
                self.log.warning(
                    "ImageAPI image %d, attempt %d failed (%s); retrying in %.2f s (%s)",
                    index + 1,
                    attempts,
                    self._safe(failure.reason),
                    wait,
                    kind,
                )
                self._sleep(wait, stop)
                continue
            request_id = _request_id(reply)
            image, job_id = self._image_from_reply(reply, deadline, stop, request_id)
            seconds = time.monotonic() - started
            self.log.debug(
                "image %d: %dx%d in %.3f s, %d attempt(s)",
                index + 1,
                image.width,
                image.height,
                seconds,
                attempts,
            )
            return ApiImage(image, request_id or job_id, seconds, attempts)

    def _retry_wait(
        self, failure: _Failure, free: int, billed: int, deadline: float
    ) -> tuple[float | None, str]:
        """Seconds to wait before retrying, or None and a note saying why not."""
        s = self.settings
        if failure.retry == FREE:
            used, limit = free, s.max_free_retries
        elif failure.retry == BILLED:
            used, limit = billed, s.max_billed_retries
        else:
            return None, ""
        if used >= limit:
            return None, ""
        if failure.retry_after is not None:
            wait = failure.retry_after
        else:
            backoff = min(s.backoff_max_s, s.backoff_base_s * 2**used)
            wait = backoff * (0.5 + 0.5 * self._random.random())
        left = deadline - time.monotonic()
        if wait >= left:
            return None, (
                f" (not retried: waiting {wait:.1f} s would pass the deadline of "
                f"{s.deadline_s:g} s per image, deadline_s)"
            )
        return wait, ""

    def _sleep(self, seconds: float, stop: threading.Event) -> None:
        """Wait in short slices; raise `GenerationInterrupted` as soon as `stop` is set."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if stop.wait(min(SLEEP_SLICE_S, left)):
                raise GenerationInterrupted("stopped")
        if stop.is_set():
            raise GenerationInterrupted("stopped")

    def _body_cap(self) -> int:
        # A JSON answer may carry the image as base64, 4/3 of its size, plus some text.
        return self.settings.max_download_bytes * 4 // 3 + 2**20

    # --- one HTTP exchange ---------------------------------------------------------------------

    def _exchange(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None,
        timeout_s: float,
        deadline: float,
        stop: threading.Event,
        cap: int,
        may_bill: bool,
    ) -> _Reply:
        """Send one request and read its whole answer (streamed, capped, within the deadline)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Failure(
                ApiTimeoutError,
                f"no image within the deadline of {self.settings.deadline_s:g} s per image "
                "(deadline_s)",
                reason="deadline reached",
            )
        read_timeout = min(timeout_s, left)
        connect_timeout = min(self.settings.connect_timeout_s, read_timeout)
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json, image/*"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        same_origin = _origin(url) == self._origin
        call_end = time.monotonic() + read_timeout  # a trickling body is cut off here too
        try:
            response = self._session.request(
                method,
                url,
                data=body,
                headers=headers,
                stream=True,
                allow_redirects=False,
                timeout=(connect_timeout, read_timeout),
                auth=self._with_key if same_origin else self._without_key,
            )
        except requests.exceptions.RequestException as e:
            raise self._transport_failure(e, url, read_timeout, may_bill, sent=False) from e
        with response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > cap:
                raise self._too_big(url, int(length), cap, response.status_code)
            chunks: list[bytes] = []
            size = 0
            try:
                for chunk in _body_chunks(response):
                    size += len(chunk)
                    if size > cap:
                        raise self._too_big(url, size, cap, response.status_code)
                    chunks.append(chunk)
                    if stop.is_set():
                        raise GenerationInterrupted("stopped")
                    if time.monotonic() > call_end:
                        raise requests.exceptions.ReadTimeout("answer too slow")
            except (
                requests.exceptions.RequestException,
                urllib3.exceptions.HTTPError,
                OSError,
            ) as e:
                raise self._transport_failure(e, url, read_timeout, may_bill, sent=True) from e
        content = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return _Reply(
            response.status_code, response.reason or "", response.headers, content, response.url
        )

    @staticmethod
    def _try(
        call: Callable[..., _Reply], *args, **kwargs
    ) -> tuple[_Reply, None] | tuple[None, _Failure]:
        """Run one exchange; a failure is returned, so that the error raised for it later does
        not carry it (and the server text it holds) as its `__context__`."""
        try:
            return call(*args, **kwargs), None
        except _Failure as failure:
            return None, failure

    def _too_big(self, url: str, size: int, cap: int, status: int) -> _Failure:
        return _Failure(
            ResponseDecodeError,
            f"the answer from {_safe_url(url)} is over {cap:,} bytes ({size:,} so far), more than "
            f"an image of at most max_download_bytes={self.settings.max_download_bytes:,} needs",
            reason="answer too large",
            status=status,
        )

    # --- classifying failures -------------------------------------------------------------------

    def _transport_failure(
        self, e: Exception, url: str, timeout_s: float, may_bill: bool, sent: bool
    ) -> _Failure:
        """Name the likely cause of a network failure and whether a retry is safe."""
        parts = urlsplit(url)
        host = parts.hostname or "?"
        where = f"{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        chain = _exception_chain(e)
        billed_kind = BILLED if may_bill else FREE

        def has(*types: type) -> bool:
            return any(isinstance(c, types) for c in chain)

        if isinstance(e, requests.exceptions.ProxyError) or has(urllib3.exceptions.ProxyError):
            return _Failure(
                NetworkError,
                f"could not reach {where} through the configured proxy: check the HTTPS_PROXY / "
                "HTTP_PROXY (and NO_PROXY) environment variables",
                reason="proxy error",
            )
        if has(ssl.SSLCertVerificationError):
            return _Failure(
                NetworkError,
                f"TLS certificate verification with {host} failed: if a company proxy or "
                "antivirus inspects HTTPS, point REQUESTS_CA_BUNDLE at its CA certificate; also "
                "check that the system clock is right",
                reason="TLS certificate not trusted",
            )
        if isinstance(e, requests.exceptions.SSLError) or has(ssl.SSLError):
            return _Failure(
                NetworkError,
                f"the TLS (https) handshake with {where} failed: check that the base URL's port "
                "speaks https, and whether a proxy (HTTPS_PROXY) or REQUESTS_CA_BUNDLE setting "
                "interferes",
                reason="TLS error",
            )
        if isinstance(e, requests.exceptions.ConnectTimeout):
            return _Failure(
                ApiTimeoutError,
                f"no connection to {where} within {min(self.settings.connect_timeout_s, timeout_s):g} s"
                f": the service or the network is slow or down",
                reason="connect timeout",
                retry=FREE,
            )
        if has(urllib3.exceptions.NameResolutionError) or _gai_error(chain):
            return _Failure(
                NetworkError,
                f"the host name {host!r} could not be resolved (DNS): check the base URL "
                f"({ENV_BASE_URL} or base_url in the config file) and the network connection",
                reason="host name not resolved",
            )
        if not sent and (has(ConnectionRefusedError) or has(urllib3.exceptions.NewConnectionError)):
            return _Failure(
                NetworkError,
                f"the connection to {where} was refused: the service is down or the base URL "
                "has the wrong port",
                reason="connection refused",
                retry=FREE,
            )
        if isinstance(e, requests.exceptions.ReadTimeout) or has(
            urllib3.exceptions.ReadTimeoutError, TimeoutError
        ):
            return _Failure(
                ApiTimeoutError,
                f"no complete answer from {where} within {timeout_s:g} s "
                "(request_timeout_s, or what was left of deadline_s)",
                reason=f"read timeout after {timeout_s:g} s",
                retry=billed_kind,
            )
        dropped = (
            requests.exceptions.ConnectionError,
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.ProtocolError,
            OSError,
        )
        if isinstance(e, dropped):
            return _Failure(
                NetworkError,
                f"the connection to {where} was dropped before the answer was complete",
                reason="connection dropped mid-answer",
                retry=billed_kind,
            )
        return _Failure(
            NetworkError,
            f"the request to {where} failed ({type(e).__name__})",
            reason=type(e).__name__,
        )

    def _status_failure(self, reply: _Reply) -> _Failure:
        """An HTTP error status of the generate call as an error, and whether to retry it."""
        status, request_id = reply.status, _request_id(reply)
        tag = _tag(status, reply.reason, request_id)
        said = self._safe(_server_message(reply))
        common = {"status": status, "request_id": request_id, "reason": f"HTTP {status}"}
        if 300 <= status < 400:
            target = _safe_url(urljoin(reply.url, reply.headers.get("Location", "")))
            return _Failure(
                ApiError,
                f"the service redirected the request to {self._safe(target)} ({tag}): set "
                f"{ENV_BASE_URL} (or base_url in the config file) to the right address",
                **common,
            )
        if status in (400, 422):
            return _Failure(
                BadRequestError, f"the service refused the request ({tag}): {said}", **common
            )
        if status in (401, 403):
            return _Failure(
                AuthenticationError,
                f"the service refused the API key from {self.settings.key_source} ({tag}): "
                f"{said}. Check the key at {KEY_HELP}, then set it again (`{SET_KEY_COMMAND}` or "
                "the environment variable)",
                **common,
            )
        if status == 402:
            return _Failure(
                InsufficientCreditsError,
                f"the ImageAPI account has no credits left ({tag}): {said}. Top up or change the "
                "plan at imageapi.org → Dashboard",
                **common,
            )
        if status == 404:
            return _Failure(
                ApiError,
                f"{self._generate_url} does not exist ({tag}): check the base URL ({ENV_BASE_URL} "
                f"or base_url in the config file); the service's own is https://imageapi.org",
                **common,
            )
        if status == 408:
            return _Failure(
                ApiTimeoutError,
                f"the service timed out reading the request ({tag})",
                retry=FREE,
                **common,
            )
        if status == 429:
            wait = _retry_after(reply)
            return _Failure(
                RateLimitError,
                f"the service's rate limit was hit ({tag}"
                + (f", asked to wait {wait:g} s" if wait is not None else "")
                + f"): {said}",
                retry=FREE,
                retry_after=wait,
                **common,
            )
        if status == 503:
            return _Failure(
                ServerError,
                f"the service is unavailable ({tag}): {said}",
                retry=FREE,
                retry_after=_retry_after(reply),
                **common,
            )
        if status in (500, 502, 504):
            return _Failure(
                ServerError, f"the service failed ({tag}): {said}", retry=BILLED, **common
            )
        if status >= 500:
            return _Failure(ServerError, f"the service failed ({tag}): {said}", **common)
        return _Failure(ApiError, f"unexpected answer from the service ({tag}): {said}", **common)

    # --- decoding the answer ----------------------------------------------------------------------

    def _image_from_reply(
        self, reply: _Reply, deadline: float, stop: threading.Event, request_id: str | None
    ) -> tuple[Image.Image, str | None]:
        """The image in a successful answer, and the job id if it came through a job."""
        tag = _tag(reply.status, reply.reason, request_id)
        if _looks_like_image(reply):
            return self._open(
                reply.content, f"the image body ({tag})", reply.status, request_id
            ), None
        doc = self._json(reply, tag, request_id)
        return self._image_from_json(doc, reply, deadline, stop, request_id, tag)

    def _image_from_json(
        self,
        doc: object,
        reply: _Reply,
        deadline: float,
        stop: threading.Event,
        request_id: str | None,
        tag: str,
    ) -> tuple[Image.Image, str | None]:
        job = _job_info(doc)
        if job is not None and ((job.pending and job.poll_url) or (job.done and job.result_url)):
            return self._follow_job(job, reply.url, deadline, stop, request_id)
        found = _find_image(doc)
        if found is None:
            raise self._no_image(doc, reply, job, request_id, tag)
        return self._load_reference(found, reply.url, deadline, stop, request_id, tag), None

    def _no_image(
        self, doc: object, reply: _Reply, job: _Job | None, request_id: str | None, tag: str
    ) -> ApiError:
        """The error for a JSON answer without an image: a failed job, an error, or a new shape."""
        request_id = request_id or (job.id if job else None)
        if job is not None and job.failed:
            return ApiError(
                f"the service reported job {self._safe(job.id or '?')} as {self._safe(job.status)!r}"
                + (f": {self._safe(job.error)}" if job.error else "")
                + f" ({tag})",
                status=reply.status,
                request_id=request_id,
            )
        if isinstance(doc, dict) and doc.get("error"):
            return ApiError(
                f"the service answered {tag} but reported an error: "
                f"{self._safe(_server_message_from(doc))}",
                status=reply.status,
                request_id=request_id,
            )
        if job is not None and job.pending and not job.poll_url:
            return ResponseDecodeError(
                f"the service answered with an asynchronous job (id {self._safe(job.id or '?')}, "
                f"status {self._safe(job.status or '?')!r}) but named no URL to poll for the "
                f"result ({tag}); the answer's keys: {self._keys(doc)}",
                status=reply.status,
                request_id=request_id,
            )
        return ResponseDecodeError(
            f"the service's answer ({tag}, Content-Type {self._safe(reply.content_type) or 'none'})"
            f" holds no image this client recognises; its JSON keys: {self._keys(doc)}. Please "
            "report these keys so the client can learn this shape",
            status=reply.status,
            request_id=request_id,
        )

    def _json(self, reply: _Reply, tag: str, request_id: str | None) -> object:
        doc = _parse_json(reply.content)
        if doc is _NOT_JSON:  # raised outside the except: the decode error holds the whole body
            raise ResponseDecodeError(
                f"the service's answer ({tag}) is neither an image nor JSON: Content-Type "
                f"{self._safe(reply.content_type) or 'none'}, {len(reply.content):,} bytes",
                status=reply.status,
                request_id=request_id,
            )
        return doc

    def _load_reference(
        self,
        found: tuple[str, str, str],
        base: str,
        deadline: float,
        stop: threading.Event,
        request_id: str | None,
        tag: str,
    ) -> Image.Image:
        kind, value, path = found
        where = f"{self._safe(path)} of the answer ({tag})"
        if kind == "url":
            url = urljoin(base, value)
            data = self._download(url, deadline, stop, request_id)
            return self._open(
                data, f"the image at {self._safe(_safe_url(url))} ({where})", None, request_id
            )
        try:
            data = _decode_data_uri(value) if kind == "data" else _b64decode(value)
        except (binascii.Error, ValueError) as e:
            raise ResponseDecodeError(
                f"{where} is not valid base64 ({len(value):,} characters)",
                request_id=request_id,
            ) from e
        return self._open(data, where, None, request_id)

    def _open(
        self, data: bytes, where: str, status: int | None, request_id: str | None
    ) -> Image.Image:
        """Decode to an RGB image, refusing more than max_image_pixels before decompressing."""
        limit = self.settings.max_image_pixels
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as e:
            raise ResponseDecodeError(
                f"{where} claims more pixels than any real image (a decompression bomb?); refused "
                f"before decoding (limit max_image_pixels={limit:,})",
                status=status,
                request_id=request_id,
            ) from e
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise ResponseDecodeError(
                f"{where} is not a readable PNG/JPEG/WebP image ({len(data):,} bytes)",
                status=status,
                request_id=request_id,
            ) from e
        width, height = image.size
        if width * height > limit:
            raise ResponseDecodeError(
                f"{where} is {width}x{height} = {width * height:,} pixels, more than "
                f"max_image_pixels={limit:,}; refused before decoding",
                status=status,
                request_id=request_id,
            )
        try:
            image.load()
            # An RGB image is used as it is: convert() would copy it.
            return image if image.mode == "RGB" else image.convert("RGB")
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise ResponseDecodeError(
                f"{where} is corrupt or truncated: {type(e).__name__} while decoding a "
                f"{image.format} image of {width}x{height} ({len(data):,} bytes)",
                status=status,
                request_id=request_id,
            ) from e

    # --- asynchronous jobs ----------------------------------------------------------------------

    def _follow_job(
        self, job: _Job, base: str, deadline: float, stop: threading.Event, request_id: str | None
    ) -> tuple[Image.Image, str | None]:
        """Poll a job's status URL (GET, free) until it has an image, fails, or the deadline."""
        s = self.settings
        poll_url = urljoin(base, job.poll_url) if job.poll_url else None
        job_id = job.id
        failures = 0
        while True:
            if job.done and job.result_url:  # finished: fetch the result, no wait
                url = urljoin(poll_url or base, job.result_url)
            else:
                if poll_url is None:  # a result URL answered "pending", and no poll URL
                    raise ResponseDecodeError(
                        f"job {self._safe(job_id or '?')} is {self._safe(job.status or '?')!r} "
                        "but the service named no URL to poll for its result",
                        request_id=request_id or job_id,
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ApiTimeoutError(
                        f"job {self._safe(job_id or '?')} was still "
                        f"{self._safe(job.status or 'pending')!r} when the deadline of "
                        f"{s.deadline_s:g} s per image (deadline_s) passed",
                        request_id=request_id or job_id,
                    )
                self._sleep(min(s.poll_interval_s, left), stop)
                if time.monotonic() >= deadline:
                    continue  # the check above raises the error that names the job's status
                url = poll_url
            reply, failure = self._try(
                self._get, url, deadline, stop, s.request_timeout_s, self._body_cap()
            )
            if failure is not None:
                if failure.retry is not None and failures < s.max_free_retries:
                    failures += 1
                    self.log.warning(
                        "ImageAPI job %s: polling failed (%s); polling again (polls are not "
                        "billed)",
                        self._safe(job_id or "?"),
                        self._safe(failure.reason),
                    )
                    continue
                failure.request_id = failure.request_id or request_id or job_id
                raise failure.error(f" (while polling job {job_id or '?'})", self._safe) from (
                    failure.__cause__
                )
            tag = _tag(reply.status, reply.reason, _request_id(reply) or job_id)
            if _looks_like_image(reply):
                where = f"the job's result ({tag})"
                return self._open(reply.content, where, reply.status, job_id), job_id
            doc = self._json(reply, tag, job_id)
            found = _find_image(doc)
            if found is not None:
                return self._load_reference(found, reply.url, deadline, stop, job_id, tag), job_id
            nxt = _job_info(doc)
            if nxt is None or not (nxt.pending or (nxt.done and nxt.result_url)):
                raise self._no_image(doc, reply, nxt, request_id or job_id, tag)
            if nxt.done and url != poll_url:  # a result URL answered "done" again: no image
                raise self._no_image(doc, reply, nxt, request_id or job_id, tag)
            if nxt.poll_url:
                poll_url = urljoin(reply.url, nxt.poll_url)
            job_id = job_id or nxt.id
            job = nxt

    def _get(
        self, url: str, deadline: float, stop: threading.Event, timeout_s: float, cap: int
    ) -> _Reply:
        """A GET that is never billed: its own redirects followed, the key only to the service."""
        for _ in range(MAX_REDIRECTS + 1):
            self._check_fetch_url(url)
            reply = self._exchange(
                "GET",
                url,
                body=None,
                timeout_s=timeout_s,
                deadline=deadline,
                stop=stop,
                cap=cap,
                may_bill=False,
            )
            location = reply.headers.get("Location")
            if reply.status in (301, 302, 303, 307, 308) and location:
                url = urljoin(url, location)
                continue
            if 200 <= reply.status < 300:
                return reply
            request_id = _request_id(reply)
            tag = _tag(reply.status, reply.reason, request_id)
            transient = reply.status in (408, 429, 500, 502, 503, 504)
            cls = ServerError if reply.status >= 500 else ResponseDecodeError
            hint = ""
            if reply.status in (401, 403) and _origin(url) != self._origin:
                hint = (
                    " (the API key is only sent to the service's own address, never to "
                    f"{urlsplit(url).hostname})"
                )
            raise _Failure(
                cls,
                f"fetching {self._safe(_safe_url(url))} failed ({tag}){hint}: "
                f"{self._safe(_server_message(reply))}",
                reason=f"HTTP {reply.status}",
                retry=FREE if transient else None,
                status=reply.status,
                request_id=request_id,
            )
        raise _Failure(
            ResponseDecodeError,
            f"more than {MAX_REDIRECTS} redirects fetching {self._safe(_safe_url(url))}",
            reason="too many redirects",
        )

    def _check_fetch_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _Failure(
                ResponseDecodeError,
                f"the answer names an image at {self._safe(_safe_url(url))!r}, which is not an "
                "http(s) URL",
                reason="bad URL",
            )
        if parts.scheme == "http" and not is_loopback_host(parts.hostname):
            raise _Failure(
                ResponseDecodeError,
                f"the answer names an image at {self._safe(_safe_url(url))} over plain http; "
                "only https downloads are allowed from other machines",
                reason="plain http URL",
            )

    # --- downloads ----------------------------------------------------------------------------

    def _download(
        self, url: str, deadline: float, stop: threading.Event, request_id: str | None
    ) -> bytes:
        """The bytes at an image URL; a transient failure is retried once (downloads are free)."""
        s = self.settings
        for attempt in (1, 2):
            reply, failure = self._try(
                self._get, url, deadline, stop, s.download_timeout_s, s.max_download_bytes
            )
            if failure is None:
                return reply.content
            else:
                left = deadline - time.monotonic()
                wait = min(s.backoff_base_s, s.backoff_max_s)
                if attempt == 1 and failure.retry is not None and wait < left:
                    self.log.warning(
                        "ImageAPI image download from %s failed (%s); retrying once in %.2f s "
                        "(downloads are not billed)",
                        self._safe(_safe_url(url)),
                        self._safe(failure.reason),
                        wait,
                    )
                    self._sleep(wait, stop)
                    continue
                failure.request_id = failure.request_id or request_id
                raise failure.error(f" [download attempt {attempt}]", self._safe) from (
                    failure.__cause__
                )
        raise AssertionError("unreachable")

    # --- keeping the key out of everything ------------------------------------------------------

    def _safe(self, text: str) -> str:
        """`text` (which may come from the server) with the API key replaced by ***."""
        key = self.settings.api_key
        return text.replace(key, "***") if key and key in text else text

    def _scrubbed(self, error: ApiError) -> ApiError:
        """Last line of defence: no error leaves a worker with the key in its message."""
        if any(self.settings.api_key in str(a) for a in error.args):
            error.args = tuple(self._safe(str(a)) for a in error.args)
        if error.request_id:
            error.request_id = self._safe(error.request_id)
        return error

    def _keys(self, doc: object) -> str:
        paths = _key_paths(doc)
        return self._safe(", ".join(paths)) if paths else "(none)"


# --- helpers without state ------------------------------------------------------------------------


@dataclass
class _Job:
    id: str | None
    status: str | None
    poll_url: str | None
    result_url: str | None
    error: str | None

    @property
    def _norm(self) -> str | None:
        return re.sub(r"[\s-]+", "_", self.status.strip().lower()) if self.status else None

    @property
    def pending(self) -> bool:
        # No status but a poll URL (an id + polling_url answer): still to come.
        return self._norm in PENDING or (self._norm is None and self.poll_url is not None)

    @property
    def done(self) -> bool:
        return self._norm in DONE

    @property
    def failed(self) -> bool:
        return self._norm in FAILED


def _job_info(doc: object) -> _Job | None:
    """The job fields of an asynchronous answer, None when `doc` does not look like a job."""
    if not isinstance(doc, dict):
        return None
    status = next((doc[k] for k in ("status", "state") if isinstance(doc.get(k), str)), None)
    job_id = next(
        (
            str(doc[k])
            for k in JOB_ID_KEYS
            if isinstance(doc.get(k), (str, int)) and doc.get(k) != ""
        ),
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
    error_text = _server_message_from(doc) if has_message else None
    return _Job(job_id, status, poll, result, error_text)


def _find_image(node: object, path: str = "", depth: int = 0) -> tuple[str, str, str] | None:
    """The first image reference: (kind, value, key path) with kind "data", "b64" or "url"."""
    if depth > 8:
        return None
    if isinstance(node, str):
        kind = _string_kind(node)
        return (kind, node, path or "the body") if kind else None
    if isinstance(node, list):
        for i, item in enumerate(node):
            found = _find_image(item, f"{path}[{i}]", depth + 1)
            if found is not None:
                return found
    elif isinstance(node, dict):
        for key in IMAGE_KEYS:
            if key in node:
                found = _find_image(node[key], f"{path}.{key}" if path else key, depth + 1)
                if found is not None:
                    return found
    return None


def _body_chunks(response: requests.Response) -> Iterator[bytes]:
    """The body as it arrives. urllib3 2's `read1` returns what one receive got, so a trickling
    answer is checked against the deadline per piece; `iter_content` would wait for full chunks."""
    raw = response.raw
    if _URLLIB3_MAJOR >= 2 and hasattr(raw, "read1"):
        while chunk := raw.read1(CHUNK_BYTES, decode_content=True):
            yield chunk
    else:
        yield from response.iter_content(CHUNK_BYTES)


_NOT_JSON = object()
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")
_STRICT_BASE64 = sys.version_info >= (3, 11)  # binascii.a2b_base64(strict_mode=...)


def _parse_json(content: bytes) -> object:
    try:
        return json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return _NOT_JSON


def _string_kind(text: str) -> str | None:
    head = text[:16].lower()
    if head.startswith("data:"):
        return "data"
    if head.startswith(("https://", "http://")) or (
        text.startswith("/") and not text.startswith("//")
    ):
        return "url" if len(text) < 8192 else None
    if len(text) >= 64 and _BASE64_RE.fullmatch(text[:4096]) is not None:
        return "b64"
    return None


def _b64decode(text: str) -> bytes:
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


def _decode_data_uri(uri: str) -> bytes:
    head, comma, payload = uri.partition(",")
    if not comma or not head.lower().endswith(";base64"):
        raise ValueError("a data URI without ;base64")
    return _b64decode(payload)


def _looks_like_image(reply: _Reply) -> bool:
    ctype = reply.content_type
    if ctype.startswith("image/"):
        return True
    if ctype in ("", "application/octet-stream", "binary/octet-stream"):
        head = reply.content[:16]
        return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
    return False


def _server_message(reply: _Reply) -> str:
    """The service's own explanation from an error body, cut to MAX_MESSAGE_CHARS."""
    ctype = reply.content_type
    text = reply.content[: MAX_MESSAGE_CHARS * 8].decode("utf-8", "replace")
    stripped = text.lstrip()
    if "json" in ctype or stripped.startswith(("{", "[")):
        try:
            return _server_message_from(json.loads(reply.content))
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass  # a JSON type with a non-JSON body: shown as text below
    if "html" in ctype or stripped[:15].lower().startswith(("<!doctype", "<html")):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        text = f"an HTML page{': ' + title.group(1) if title else ''}"
    text = " ".join(text.split())
    return _cut(text) if text else f"no message (HTTP {reply.status} {reply.reason})".strip()


def _server_message_from(doc: object) -> str:
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict):
            message = next((err[k] for k in MESSAGE_KEYS if isinstance(err.get(k), str)), None)
            code = err.get("code") or err.get("type")
            if message:
                return _cut(f"{message} (code {code})" if code else message)
        elif isinstance(err, str) and err:
            return _cut(err)
        for key in MESSAGE_KEYS:
            value = doc.get(key)
            if isinstance(value, str) and value:
                return _cut(value)
            if isinstance(value, list) and value:  # FastAPI-style [{"loc": [...], "msg": ...}]
                return _cut("; ".join(_validation_item(v) for v in value))
    if isinstance(doc, str) and doc:
        return _cut(doc)
    return f"no message; the body's JSON keys: {', '.join(_key_paths(doc)) or '(none)'}"


def _validation_item(item: object) -> str:
    if isinstance(item, dict):
        loc = item.get("loc")
        where = ".".join(str(p) for p in loc) if isinstance(loc, list) else ""
        msg = item.get("msg") or item.get("message") or ""
        return f"{where}: {msg}" if where else str(msg)
    return str(item)


def _cut(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def _key_paths(node: object, prefix: str = "", out: list[str] | None = None) -> list[str]:
    """Key paths of a JSON document (`data[0].url`), never its values."""
    out = [] if out is None else out
    if len(out) >= MAX_KEY_PATHS or prefix.count(".") + prefix.count("[") > 6:
        return out
    if isinstance(node, dict):
        for key, value in node.items():
            name = str(key)[:40]
            path = f"{prefix}.{name}" if prefix else name
            if len(out) >= MAX_KEY_PATHS:
                out.append("…")
                break
            out.append(path)
            _key_paths(value, path, out)
    elif isinstance(node, list) and node:
        _key_paths(node[0], f"{prefix}[0]", out)
    if not prefix and not out and isinstance(node, list):
        out.append("[] (an empty list)")
    return out


def _request_id(reply: _Reply) -> str | None:
    for name in REQUEST_ID_HEADERS:
        value = reply.headers.get(name)
        if value:
            return _short_id(value)
    if reply.content[:1] == b"{" and "json" in reply.content_type and len(reply.content) < 2**16:
        try:
            doc = json.loads(reply.content)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        for key in ("request_id", "id"):
            if isinstance(doc, dict) and isinstance(doc.get(key), (str, int)):
                return _short_id(str(doc[key]))
    return None


def _short_id(value: str) -> str:
    value = "".join(ch for ch in value if ch.isprintable())
    return value[:100]


def _tag(status: int, reason: str, request_id: str | None) -> str:
    tag = f"HTTP {status}{' ' + reason if reason else ''}"
    return f"{tag}, request id {request_id}" if request_id else tag


def _retry_after(reply: _Reply) -> float | None:
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


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or (443 if scheme == "https" else 80)


def _safe_url(url: str) -> str:
    """A URL without its query and fragment (signed download URLs carry tokens there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else parts.path


def _exception_chain(e: BaseException) -> list[BaseException]:
    """`e` and every exception it wraps (args, `reason`, cause, context)."""
    seen: list[BaseException] = []
    todo: list[object] = [e]
    while todo and len(seen) < 32:
        item = todo.pop()
        if not isinstance(item, BaseException) or any(item is s for s in seen):
            continue
        seen.append(item)
        todo.extend(item.args)
        todo.extend([getattr(item, "reason", None), item.__cause__, item.__context__])
    return seen


def _gai_error(chain: list[BaseException]) -> bool:
    return any(isinstance(c, socket.gaierror) for c in chain)
