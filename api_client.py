"""The hosted ImageAPI client: what to ask for, the worker pool, the money rules, answer to image.

Based on the service's public documentation (https://imageapi.org, API reference): `POST
{base_url}/api/v1/generate` with a Bearer key and a JSON body of documented fields. Here: the
public `GenerateRequest`, `ApiImage` and `ImageApiClient` (a worker pool with at most
`concurrency` images in their HTTP calls, decoding outside that bound, results in input order, a
stop checked while waiting, one retry loop per image), what each error status of the generate
call means, and the way from a successful answer to an RGB image (raw bytes, base64, a URL to
download, an asynchronous job to poll). The HTTP exchange and the never-billed GETs are in
api_http.py; reading an answer's JSON shapes, error texts and image bytes is in api_responses.py.

Money rules: a call that may already have been billed (read timeout, 408, 500/502/504, dropped
answer) is retried at most `max_billed_retries` times and each such retry is logged as possibly
billed; calls that certainly did no work (connection refused or not made within the connect
timeout, 429, 503) are retried up to `max_free_retries` times. Everything is bounded by one
monotonic deadline per image; a call is only retried while the deadline leaves it `min_call_s` (at
most `request_timeout_s`) after the wait, so no paid call goes out too late to be answered. Every
wait checks a stop event. The API key never appears in a log record or an error message.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin

import requests
from PIL import Image

from .api_http import (
    BILLED,
    FREE,
    SLEEP_SLICE_S,
    Failure,
    HttpTransport,
    attempt,
    safe_url,
    sleep_unless_stopped,
)
from .api_responses import (
    NOT_JSON,
    Job,
    Reply,
    b64decode,
    clean_id,
    decode_data_uri,
    find_image,
    job_info,
    key_paths,
    looks_like_image,
    open_image,
    parse_json,
    request_id_of,
    retry_after_seconds,
    server_message,
    server_message_from,
    status_tag,
)
from .errors import (
    ApiError,
    ApiTimeoutError,
    AuthenticationError,
    BadRequestError,
    FluxSchnellError,
    GenerationInterrupted,
    InsufficientCreditsError,
    InvalidInputError,
    RateLimitError,
    ResponseDecodeError,
    ServerError,
)
from .settings import ENV_BASE_URL, KEY_HELP, SET_KEY_COMMAND, ApiSettings

GENERATE_PATH = "/api/v1/generate"

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


class _Crash:
    """A worker's unexpected exception (a bug), carried to the calling thread to be re-raised."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class _Place:
    """A worker's hold on one of the `concurrency` places for HTTP calls; given back once."""

    def __init__(self, places: threading.BoundedSemaphore):
        self._places = places
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._places.release()


@dataclass
class _Encoded:
    """An image located in an answer but not decoded yet: its bytes, base64 or a data URI."""

    kind: str  # "bytes", "b64" or "data"
    value: bytes | str
    where: str  # for messages: which part of which answer
    status: int | None
    request_id: str | None


def _tried(attempts: int) -> str:
    return f" [after {attempts} attempts]" if attempts > 1 else ""


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
        self._http = HttpTransport(settings, session, self.log)
        self._generate_url = settings.base_url + GENERATE_PATH
        self._random = random.Random()

    def close(self) -> None:
        self._http.close()

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
        batch: Sequence[GenerateRequest],
        *,
        concurrency: int = 4,
        should_stop: Callable[[], bool] | None = None,
        on_result: Callable[[int, ApiImage | ApiError], None] | None = None,
        poll_interval: float = 0.05,
    ) -> list[ApiImage | ApiError]:
        """Run `batch` with at most `concurrency` in their HTTP calls; results in input order.

        An image holds one of `concurrency` places from its first HTTP call to its last (retries,
        waits, polls and downloads included) and gives it back before its image is decoded, so
        decoding one image does not hold back the next one's call (2 x `concurrency` worker
        threads at most). Each result is an `ApiImage` or the `ApiError` its request ended with.
        `on_result(index, result)` runs in this thread as each finishes. `should_stop()` is read
        in this thread before anything is sent, then every `poll_interval` s; once it is true no
        call is started (a worker checks the stop right before each request goes out),
        `GenerationInterrupted` is raised at once, and calls in flight are abandoned (their
        threads leave at the next piece of the answer or their timeout).
        """
        items = list(batch)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise InvalidInputError(f"concurrency must be a whole number >= 1; got {concurrency!r}.")
        if not poll_interval > 0:
            raise InvalidInputError(f"poll_interval must be > 0 seconds; got {poll_interval!r}.")
        if not items:
            return []
        if should_stop is not None and should_stop():
            raise GenerationInterrupted(
                f"stopped on request before any of {len(items)} image(s) was sent; nothing billed."
            )

        stop = threading.Event()
        places = threading.BoundedSemaphore(concurrency)
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        done: queue.SimpleQueue[tuple[int, object]] = queue.SimpleQueue()
        for i in range(len(items)):
            todo.put(i)

        def worker() -> None:
            while not stop.is_set():
                if not places.acquire(timeout=SLEEP_SLICE_S):
                    continue  # all places taken: look at the stop again
                place = _Place(places)
                try:
                    try:
                        i = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        outcome: object = self._generate_one(items[i], i, stop, place.release)
                    except ApiError as e:
                        outcome = self._scrubbed(e)
                    except GenerationInterrupted:
                        return
                    except BaseException as e:  # noqa: BLE001 -- re-raised in the calling thread
                        outcome = _Crash(e)
                finally:
                    place.release()
                done.put((i, outcome))

        workers = [
            threading.Thread(target=worker, name=f"flux-schnell-api-{k}", daemon=True)
            for k in range(min(2 * concurrency, len(items)))
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
        self,
        request: GenerateRequest,
        index: int,
        stop: threading.Event,
        calls_done: Callable[[], None] = lambda: None,
    ) -> ApiImage:
        """Call (and retry) until the answer holds an image, say `calls_done()`, decode it."""
        s = self.settings
        started = time.monotonic()
        deadline = started + s.deadline_s
        body = json.dumps(request.to_body(s.send_seed)).encode()
        self.log.debug("image %d: POST %s %s", index + 1, self._generate_url, body.decode())
        free = billed = attempts = 0
        last: Failure | None = None  # the failure being retried
        while True:
            if stop.is_set():
                raise GenerationInterrupted("stopped")
            if last is not None and deadline - time.monotonic() < self._min_call_s():
                # The wait overran: a call now would be billed and its answer cut off.
                note = self._no_time_note(deadline - time.monotonic(), None)
                raise last.error(note + _tried(attempts), self._safe) from last.__cause__
            attempts += 1
            reply, failure = attempt(
                self._http.exchange,
                "POST",
                self._generate_url,
                body=body,
                timeout_s=s.request_timeout_s,
                deadline=deadline,
                stop=stop,
                cap=self._http.body_cap(),
                may_bill=True,
            )
            if failure is None and not 200 <= reply.status < 300:
                failure = self._status_failure(reply)
            if failure is not None:
                wait, note = self._retry_wait(failure, free, billed, deadline)
                if wait is None:
                    raise failure.error(note + _tried(attempts), self._safe) from failure.__cause__
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
                sleep_unless_stopped(wait, stop)
                last = failure
                continue
            request_id = self._request_id(reply)
            encoded, job_id = self._locate(reply, deadline, stop, request_id)
            calls_done()
            image = self._decode(encoded)
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
        self, failure: Failure, free: int, billed: int, deadline: float
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
        wait = self._backoff(failure, used)
        left = deadline - time.monotonic()
        # The retry must still have min_call_s after its wait (and the wait's wake-up slice).
        if wait + self._min_call_s() + SLEEP_SLICE_S > left:
            return None, self._no_time_note(left, wait)
        return wait, ""

    def _backoff(self, failure: Failure, used: int) -> float:
        """The wait before asking again: the server's Retry-After, else exponential with jitter."""
        if failure.retry_after is not None:
            return failure.retry_after
        s = self.settings
        backoff = min(s.backoff_max_s, s.backoff_base_s * 2**used)
        return backoff * (0.5 + 0.5 * self._random.random())

    def _min_call_s(self) -> float:
        """Least time a retried call is sent with: less, and it is billed but cut off unanswered."""
        return min(self.settings.min_call_s, self.settings.request_timeout_s)

    def _no_time_note(self, left: float, wait: float | None) -> str:
        waiting = f"waiting {wait:.1f} s and then " if wait is not None else ""
        return (
            f" (not retried: the deadline of {self.settings.deadline_s:g} s per image "
            f"(deadline_s) leaves {max(left, 0.0):.1f} s, no time for another attempt: "
            f"{waiting}a call needs {self._min_call_s():g} s (min_call_s, at most "
            "request_timeout_s))"
        )

    # --- what an error status of the generate call means ----------------------------------------

    def _status_failure(self, reply: Reply) -> Failure:
        """An HTTP error status of the generate call as an error, and whether to retry it."""
        status, request_id = reply.status, self._request_id(reply)
        tag = status_tag(status, reply.reason, request_id)
        said = self._safe(server_message(reply))
        common = {"status": status, "request_id": request_id, "reason": f"HTTP {status}"}
        if 300 <= status < 400:
            target = safe_url(urljoin(reply.url, reply.headers.get("Location", "")))
            return Failure(
                ApiError,
                f"the service redirected the request to {self._safe(target)} ({tag}): set "
                f"{ENV_BASE_URL} (or base_url in the config file) to the right address",
                **common,
            )
        if status in (400, 422):
            return Failure(BadRequestError, f"the service refused the request ({tag}): {said}", **common)
        if status in (401, 403):
            return Failure(
                AuthenticationError,
                f"the service refused the API key from {self.settings.key_source} ({tag}): "
                f"{said}. Check the key at {KEY_HELP}, then set it again (`{SET_KEY_COMMAND}` or "
                "the environment variable)",
                **common,
            )
        if status == 402:
            return Failure(
                InsufficientCreditsError,
                f"the ImageAPI account has no credits left ({tag}): {said}. Top up or change the "
                "plan at imageapi.org → Dashboard",
                **common,
            )
        if status == 404:
            return Failure(
                ApiError,
                f"{self._generate_url} does not exist ({tag}): check the base URL ({ENV_BASE_URL} "
                f"or base_url in the config file); the service's own is https://imageapi.org",
                **common,
            )
        if status == 408:  # the service or a proxy before it gave up: the work may have been done
            return Failure(
                ApiTimeoutError,
                f"the service (or a proxy in front of it) timed out on the request ({tag}): {said}",
                retry=BILLED,
                **common,
            )
        if status == 429:
            wait = retry_after_seconds(reply)
            return Failure(
                RateLimitError,
                f"the service's rate limit was hit ({tag}"
                + (f", asked to wait {wait:g} s" if wait is not None else "")
                + f"): {said}",
                retry=FREE,
                retry_after=wait,
                **common,
            )
        if status == 503:
            return Failure(
                ServerError,
                f"the service is unavailable ({tag}): {said}",
                retry=FREE,
                retry_after=retry_after_seconds(reply),
                **common,
            )
        if status in (500, 502, 504):
            return Failure(ServerError, f"the service failed ({tag}): {said}", retry=BILLED, **common)
        if status >= 500:
            return Failure(ServerError, f"the service failed ({tag}): {said}", **common)
        return Failure(ApiError, f"unexpected answer from the service ({tag}): {said}", **common)

    # --- from the answer to the image -----------------------------------------------------------

    def _locate(
        self, reply: Reply, deadline: float, stop: threading.Event, request_id: str | None
    ) -> tuple[_Encoded, str | None]:
        """The image in a successful answer (fetched when it is elsewhere), and the job id if it
        came through a job. Not decoded yet: that needs no HTTP place."""
        tag = status_tag(reply.status, reply.reason, request_id)
        if looks_like_image(reply):
            where = f"the image body ({tag})"
            return _Encoded("bytes", reply.content, where, reply.status, request_id), None
        doc = self._json(reply, tag, request_id)
        return self._locate_in_json(doc, reply, deadline, stop, request_id, tag)

    def _locate_in_json(
        self,
        doc: object,
        reply: Reply,
        deadline: float,
        stop: threading.Event,
        request_id: str | None,
        tag: str,
    ) -> tuple[_Encoded, str | None]:
        job = self._job_info(doc)
        if job is not None and ((job.pending and job.poll_url) or (job.done and job.result_url)):
            return self._follow_job(job, reply.url, deadline, stop, request_id)
        found = find_image(doc)
        if found is None:
            raise self._no_image(doc, reply, job, request_id, tag)
        return self._fetch_reference(found, reply.url, deadline, stop, request_id, tag), None

    def _no_image(
        self, doc: object, reply: Reply, job: Job | None, request_id: str | None, tag: str
    ) -> ApiError:
        """The error for a JSON answer without an image: a failed job, an error, or a new shape."""
        request_id = request_id or (job.id if job else None)
        if job is not None and job.failed:
            return ApiError(
                f"the service reported job {self._safe(job.id or '?')} as "
                f"{self._safe(job.status)!r}"
                + (f": {self._safe(job.error)}" if job.error else "")
                + f" ({tag})",
                status=reply.status,
                request_id=request_id,
            )
        if isinstance(doc, dict) and doc.get("error"):
            return ApiError(
                f"the service answered {tag} but reported an error: {self._safe(server_message_from(doc))}",
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

    def _json(self, reply: Reply, tag: str, request_id: str | None) -> object:
        doc = parse_json(reply.content)
        if doc is NOT_JSON:  # raised outside the except: the decode error holds the whole body
            raise ResponseDecodeError(
                f"the service's answer ({tag}) is neither an image nor JSON: Content-Type "
                f"{self._safe(reply.content_type) or 'none'}, {len(reply.content):,} bytes",
                status=reply.status,
                request_id=request_id,
            )
        return doc

    def _fetch_reference(
        self,
        found: tuple[str, str, str],
        base: str,
        deadline: float,
        stop: threading.Event,
        request_id: str | None,
        tag: str,
    ) -> _Encoded:
        """An image reference from `find_image`: a URL is downloaded, base64 is kept as it is."""
        kind, value, path = found
        where = f"{self._safe(path)} of the answer ({tag})"
        if kind == "url":
            url = urljoin(base, value)
            data = self._http.download(url, deadline, stop, request_id)
            where = f"the image at {self._safe(safe_url(url))} ({where})"
            return _Encoded("bytes", data, where, None, request_id)
        return _Encoded(kind, value, where, None, request_id)

    def _decode(self, encoded: _Encoded) -> Image.Image:
        """The RGB image from located bytes or base64 (no HTTP)."""
        value, where, request_id = encoded.value, encoded.where, encoded.request_id
        if isinstance(value, bytes):
            return self._open(value, where, encoded.status, request_id)
        try:
            data = decode_data_uri(value) if encoded.kind == "data" else b64decode(value)
        except ValueError as e:  # binascii.Error is a ValueError
            raise ResponseDecodeError(
                f"{where} is not valid base64 ({len(value):,} characters)",
                request_id=request_id,
            ) from e
        return self._open(data, where, encoded.status, request_id)

    def _open(self, data: bytes, where: str, status: int | None, request_id: str | None) -> Image.Image:
        """Decode to an RGB image, refusing more than max_image_pixels before decompressing."""
        return open_image(data, where, self.settings.max_image_pixels, status, request_id)

    # --- asynchronous jobs ----------------------------------------------------------------------

    def _follow_job(
        self, job: Job, base: str, deadline: float, stop: threading.Event, request_id: str | None
    ) -> tuple[_Encoded, str | None]:
        """Poll a job's status URL (GET, free) until it has an image, fails, or the deadline. A
        failed poll or result fetch is asked again after the backoff (or its Retry-After)."""
        s = self.settings
        poll_url = urljoin(base, job.poll_url) if job.poll_url else None
        job_id = job.id
        failures = 0
        waited = False  # a failed GET was just followed by its backoff
        while True:
            if job.done and job.result_url:  # finished: fetch the result, no wait
                url = urljoin(poll_url or base, job.result_url)
            elif waited:  # pending, and the backoff after a failed poll was the wait
                url = poll_url
            else:
                if poll_url is None:  # a result URL answered "pending", and no poll URL
                    raise ResponseDecodeError(
                        f"job {self._safe(job_id or '?')} is {self._safe(job.status or '?')!r} "
                        "but the service named no URL to poll for its result",
                        request_id=request_id or job_id,
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._job_too_slow(job, job_id, request_id)
                sleep_unless_stopped(min(s.poll_interval_s, left), stop)
                if time.monotonic() >= deadline:
                    continue  # the check above raises the error that names the job's status
                url = poll_url
            reply, failure = attempt(
                self._http.get, url, deadline, stop, s.request_timeout_s, self._http.body_cap()
            )
            waited = False
            if failure is not None:
                note = ""
                if failure.retry is not None and failures < s.max_free_retries:
                    wait = self._backoff(failure, failures)
                    if wait < deadline - time.monotonic():
                        failures += 1
                        self.log.warning(
                            "ImageAPI job %s: fetching %s failed (%s); asking again in %.2f s "
                            "(polls are not billed)",
                            self._safe(job_id or "?"),
                            "its result" if url != poll_url else "its status",
                            self._safe(failure.reason),
                            wait,
                        )
                        sleep_unless_stopped(wait, stop)
                        waited = True
                        continue
                    if url == poll_url and not job.done:  # still pending: say so
                        raise self._job_too_slow(
                            job, job_id, request_id, failure.reason
                        ) from failure.__cause__
                    note = f"; not asked again: waiting {wait:.1f} s would pass deadline_s"
                failure.request_id = failure.request_id or request_id or job_id
                raise failure.error(
                    f" (while polling job {job_id or '?'}{note})", self._safe
                ) from failure.__cause__
            tag = status_tag(reply.status, reply.reason, self._request_id(reply) or job_id)
            if looks_like_image(reply):
                where = f"the job's result ({tag})"
                return _Encoded("bytes", reply.content, where, reply.status, job_id), job_id
            doc = self._json(reply, tag, job_id)
            found = find_image(doc)
            if found is not None:
                encoded = self._fetch_reference(found, reply.url, deadline, stop, job_id, tag)
                return encoded, job_id
            nxt = self._job_info(doc)
            if nxt is None or not (nxt.pending or (nxt.done and nxt.result_url)):
                raise self._no_image(doc, reply, nxt, request_id or job_id, tag)
            if nxt.done and url != poll_url:  # a result URL answered "done" again: no image
                raise self._no_image(doc, reply, nxt, request_id or job_id, tag)
            if nxt.poll_url:
                poll_url = urljoin(reply.url, nxt.poll_url)
            job_id = job_id or nxt.id
            job = nxt

    def _job_too_slow(
        self, job: Job, job_id: str | None, request_id: str | None, failed: str | None = None
    ) -> ApiTimeoutError:
        """The error for a job still pending at the deadline, or with no time left after a failed
        poll (`failed`: why it failed)."""
        still = f"job {self._safe(job_id or '?')} was still {self._safe(job.status or 'pending')!r}"
        limit = f"the deadline of {self.settings.deadline_s:g} s per image (deadline_s)"
        if failed is None:
            text = f"{still} when {limit} passed"
        else:
            text = f"{still}, its last poll failed ({self._safe(failed)}), and {limit} leaves no "
            text += "time to poll it again"
        return ApiTimeoutError(text, request_id=request_id or job_id)

    # --- keeping the key out of everything ------------------------------------------------------

    def _safe(self, text: str) -> str:
        """`text` (which may come from the server) with the API key replaced by ***."""
        return self._http.safe(text)

    def _request_id(self, reply: Reply) -> str | None:
        """The call's id from the server: printable, the key replaced by ***, cut short. It goes
        into errors, the node's info output and PNG text, so it is made safe here, at its source."""
        return request_id_of(reply, self._safe)

    def _job_info(self, doc: object) -> Job | None:
        """`job_info`, with the job's id (also from the server) made safe like a request id."""
        job = job_info(doc)
        if job is not None and job.id is not None:
            job.id = clean_id(job.id, self._safe)
        return job

    def _scrubbed(self, error: ApiError) -> ApiError:
        """Last line of defence: no error leaves a worker with the key in its message."""
        if any(self.settings.api_key in str(a) for a in error.args):
            error.args = tuple(self._safe(str(a)) for a in error.args)
        if error.request_id:
            error.request_id = self._safe(error.request_id)
        return error

    def _keys(self, doc: object) -> str:
        paths = key_paths(doc)
        return self._safe(", ".join(paths)) if paths else "(none)"
