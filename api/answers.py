"""From a successful ImageAPI answer to an RGB image: find it, fetch it, follow a job, decode it.

The service's public documentation (https://imageapi.org) leaves the success body open, so an
answer may be the image itself, JSON with base64 or a data URI, JSON naming a URL to download, or
an asynchronous job with a URL to poll (api/answer_shapes.py reads those shapes). `AnswerReader.locate`
does the HTTP part (downloads and polls are GETs, never billed: a failed one is asked again after
the backoff or its `Retry-After`, within the image's deadline) and returns the image still encoded;
`decode` needs no HTTP, so the client does it after giving back its place in the pool. Every text
that comes from the server is scrubbed (`api.redact.scrub`: the API key replaced by ***) and ids are cut.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin

from PIL import Image

from ..errors import ApiError, ApiTimeoutError, ResponseDecodeError
from .answer_shapes import (
    NOT_JSON,
    AsyncJob,
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
    server_message_from,
    status_tag,
)
from .failures import Failure, attempt
from .http import HttpTransport
from .redact import cut_url
from .retry import Clock, RetryPolicy
from .settings import ApiSettings

OnWait = Callable[[float, str], None]  # (seconds until the next poll, why), for progress events


@dataclass
class Encoded:
    """An image located in an answer but not decoded yet: its bytes, base64 or a data URI."""

    kind: str  # "bytes", "b64" or "data"
    value: bytes | bytearray | str
    where: str  # for messages: which part of which answer
    status: int | None
    request_id: str | None


class AnswerReader:
    """Finds the image in the answers of one client (thread-safe: it keeps no per-call state)."""

    def __init__(
        self,
        settings: ApiSettings,
        http: HttpTransport,
        policy: RetryPolicy,
        clock: Clock,
        logger: logging.Logger,
    ):
        self.settings = settings
        self._http = http
        self._policy = policy
        self._clock = clock
        self.log = logger

    def scrub(self, text: str) -> str:
        """`text` (which may come from the server) with the API key replaced by ***."""
        return self._http.scrub(text)

    def request_id(self, reply: Reply) -> str | None:
        """The call's id from the server: printable, the key replaced by ***, cut short. It goes
        into errors, the node's info output and PNG text, so it is made safe here, at its source."""
        return request_id_of(reply, self.scrub)

    # --- where the image is ---------------------------------------------------------------------

    def locate(
        self,
        reply: Reply,
        deadline: float,
        stop: threading.Event,
        request_id: str | None,
        on_wait: OnWait | None = None,
        on_job: Callable[[str], None] | None = None,
    ) -> tuple[Encoded, str | None]:
        """The image in a successful answer (fetched when it is elsewhere), and the job id if it
        came through a job. Not decoded yet: that needs no HTTP place. `on_job(poll_url)` is told
        each status URL of an async job as soon as it is known (so a re-run can collect it)."""
        tag = status_tag(reply.status, reply.reason, request_id)
        if looks_like_image(reply):
            where = f"the image body ({tag})"
            return Encoded("bytes", reply.content, where, reply.status, request_id), None
        doc = self._json(reply, tag, request_id)
        job = self._job_info(doc)
        if job is not None and ((job.pending and job.poll_url) or (job.done and job.result_url)):
            return self._follow_job(job, reply.url, deadline, stop, request_id, on_wait, on_job)
        found = find_image(doc)
        if found is None:
            raise self._no_image(doc, reply, job, request_id, tag)
        return self._fetch_reference(found, reply.url, deadline, stop, request_id, tag), None

    def _no_image(
        self, doc: object, reply: Reply, job: AsyncJob | None, request_id: str | None, tag: str
    ) -> ApiError:
        """The error for a JSON answer without an image: a failed job, an error, or a new shape."""
        request_id = request_id or (job.id if job else None)
        if job is not None and job.failed:
            return ApiError(
                f"the service reported job {self.scrub(job.id or '?')} as "
                f"{self.scrub(job.status)!r}"
                + (f": {self.scrub(job.error)}" if job.error else "")
                + f" ({tag})",
                status=reply.status,
                request_id=request_id,
            )
        if isinstance(doc, dict) and doc.get("error"):
            return ApiError(
                f"the service answered {tag} but reported an error: {server_message_from(doc, self.scrub)}",
                status=reply.status,
                request_id=request_id,
            )
        if job is not None and job.pending and not job.poll_url:
            return ResponseDecodeError(
                f"the service answered with an asynchronous job (id {self.scrub(job.id or '?')}, "
                f"status {self.scrub(job.status or '?')!r}) but named no URL to poll for the "
                f"result ({tag}); the answer's keys: {self._keys(doc)}",
                status=reply.status,
                request_id=request_id,
            )
        return ResponseDecodeError(
            f"the service's answer ({tag}, Content-Type {self.scrub(reply.content_type) or 'none'})"
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
                f"{self.scrub(reply.content_type) or 'none'}, {len(reply.content):,} bytes",
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
    ) -> Encoded:
        """An image reference from `find_image`: a URL is downloaded, base64 is kept as it is."""
        kind, value, path = found
        where = f"{self.scrub(path)} of the answer ({tag})"
        if kind == "url":
            url = urljoin(base, value)
            data = self._http.download(url, deadline, stop, request_id)
            where = f"the image at {self.scrub(cut_url(url))} ({where})"
            return Encoded("bytes", data, where, None, request_id)
        return Encoded(kind, value, where, None, request_id)

    # --- decoding -------------------------------------------------------------------------------

    def decode(self, encoded: Encoded) -> tuple[Image.Image, bytes | bytearray, str]:
        """The RGB image from located bytes or base64 (no HTTP), the file's bytes and format."""
        value, where, request_id = encoded.value, encoded.where, encoded.request_id
        if isinstance(value, (bytes, bytearray)):
            data = value
        else:
            try:
                data = decode_data_uri(value) if encoded.kind == "data" else b64decode(value)
            except ValueError as e:  # binascii.Error is a ValueError
                raise ResponseDecodeError(
                    f"{where} is not valid base64 ({len(value):,} characters)",
                    request_id=request_id,
                ) from e
            encoded.value = value = b""  # the base64 text is not needed any more
        image, fmt = self.open(data, where, encoded.status, request_id)
        return image, data, fmt

    def open(
        self, data: bytes, where: str, status: int | None, request_id: str | None
    ) -> tuple[Image.Image, str]:
        """Decode to an RGB image, refusing more than max_image_pixels before decompressing."""
        return open_image(data, where, self.settings.max_image_pixels, status, request_id)

    # --- asynchronous jobs ----------------------------------------------------------------------

    def collect(
        self, poll_url: str, deadline: float, stop: threading.Event, on_wait: OnWait | None = None
    ) -> tuple[Encoded, str | None]:
        """Poll a job recorded by an earlier run at `poll_url` (GETs only, never billed); the first
        poll goes out at once: the job was started long ago."""
        job = AsyncJob(id=None, status=None, poll_url=poll_url, result_url=None, error=None)
        return self._follow_job(job, poll_url, deadline, stop, None, on_wait, poll_now=True)

    def _follow_job(
        self,
        job: AsyncJob,
        base: str,
        deadline: float,
        stop: threading.Event,
        request_id: str | None,
        on_wait: OnWait | None,
        on_job: Callable[[str], None] | None = None,
        poll_now: bool = False,
    ) -> tuple[Encoded, str | None]:
        """Poll a job's status URL (GET, free) until it has an image, fails, or the deadline
        (`JobPoller`). `poll_now`: the first poll goes out without waiting `poll_interval_s`."""
        poller = JobPoller(self, job, base, deadline, stop, request_id, on_wait, on_job, poll_now)
        return poller.result()

    def _job_too_slow(
        self, job: AsyncJob, job_id: str | None, request_id: str | None, failed: str | None = None
    ) -> ApiTimeoutError:
        """The error for a job still pending at the deadline, or with no time left after a failed
        poll (`failed`: why it failed)."""
        still = f"job {self.scrub(job_id or '?')} was still {self.scrub(job.status or 'pending')!r}"
        limit = f"the deadline of {self.settings.deadline_s:g} s per image (deadline_s)"
        if failed is None:
            text = f"{still} when {limit} passed"
        else:
            text = f"{still}, its last poll failed ({self.scrub(failed)}), and {limit} leaves no "
            text += "time to poll it again"
        return ApiTimeoutError(text, request_id=request_id or job_id)

    def _job_info(self, doc: object) -> AsyncJob | None:
        """`job_info`, with the job's id (also from the server) made safe like a request id."""
        job = job_info(doc, self.scrub)
        if job is not None and job.id is not None:
            job.id = clean_id(job.id, self.scrub)
        return job

    def _keys(self, doc: object) -> str:
        paths = key_paths(doc, scrub=self.scrub)
        return ", ".join(paths) if paths else "(none)"


class JobPoller:
    """Follows one async job to its image: polls its status URL (GETs, never billed) every
    `poll_interval_s`, fetches its result URL when it is done, and asks a failed GET again after
    the backoff (or its Retry-After) while the deadline allows. One per job, used once."""

    def __init__(
        self,
        reader: AnswerReader,
        job: AsyncJob,
        base: str,
        deadline: float,
        stop: threading.Event,
        request_id: str | None,
        on_wait: OnWait | None,
        on_job: Callable[[str], None] | None,
        poll_now: bool,
    ):
        self.reader, self.job, self.base = reader, job, base
        self.deadline, self.stop, self.request_id = deadline, stop, request_id
        self.on_wait, self.on_job = on_wait, on_job
        self.job_id = job.id
        self.poll_url: str | None = None
        self.failures = 0  # failed GETs asked again so far (free retries)
        self.waited = poll_now  # a failed GET was just followed by its backoff (or: poll at once)
        if job.poll_url:
            self._new_poll_url(urljoin(base, job.poll_url))

    def result(self) -> tuple[Encoded, str | None]:
        """The job's image, still encoded, and its id; raises the error that ends it."""
        while True:
            url = self._next_url()
            if url is None:  # the wait reached the deadline: the next round names the status
                continue
            settings, http = self.reader.settings, self.reader._http
            reply, failure = attempt(
                http.get, url, self.deadline, self.stop, settings.request_timeout_s, http.body_cap()
            )
            self.waited = False
            if failure is not None:
                self._after_failed_get(url, failure)  # waits to ask again, or raises
                continue
            found = self._read(reply, url)
            if found is not None:
                return found, self.job_id

    def _new_poll_url(self, url: str) -> None:
        self.poll_url = url
        if self.on_job is not None:
            self.on_job(url)

    def _next_url(self) -> str | None:
        """What to GET next: the result of a finished job at once, the status URL after a failed
        GET's backoff, else the status URL after `poll_interval_s` (None: the deadline came)."""
        job, clock, scrub = self.job, self.reader._clock, self.reader.scrub
        if job.done and job.result_url:
            return urljoin(self.poll_url or self.base, job.result_url)
        if self.waited:
            return self.poll_url
        if self.poll_url is None:  # a result URL answered "pending", and no poll URL
            raise ResponseDecodeError(
                f"job {scrub(self.job_id or '?')} is {scrub(job.status or '?')!r} "
                "but the service named no URL to poll for its result",
                request_id=self.request_id or self.job_id,
            )
        left = self.deadline - clock.monotonic()
        if left <= 0:
            raise self.reader._job_too_slow(job, self.job_id, self.request_id)
        wait = min(self.reader.settings.poll_interval_s, left)
        if self.on_wait is not None:
            self.on_wait(wait, f"job {scrub(job.status or 'pending')}")
        clock.sleep(wait, self.stop)
        return None if clock.monotonic() >= self.deadline else self.poll_url

    def _after_failed_get(self, url: str, failure: Failure) -> None:
        """Wait the backoff and return (the GET is asked again) while retries and the deadline
        allow; else raise: "still pending" for a status poll, the failure's own error otherwise."""
        reader, clock = self.reader, self.reader._clock
        note = ""
        if failure.retry is not None and self.failures < reader.settings.max_free_retries:
            wait = reader._policy.backoff(failure, self.failures)
            if wait < self.deadline - clock.monotonic():
                self.failures += 1
                reader.log.warning(
                    "ImageAPI job %s: fetching %s failed (%s); asking again in %.2f s (polls are not billed)",
                    reader.scrub(self.job_id or "?"),
                    "its result" if url != self.poll_url else "its status",
                    reader.scrub(failure.reason),
                    wait,
                )
                clock.sleep(wait, self.stop)
                self.waited = True
                return
            if url == self.poll_url and not self.job.done:  # still pending: say so
                raise reader._job_too_slow(
                    self.job, self.job_id, self.request_id, failure.reason
                ) from failure.__cause__
            note = f"; not asked again: waiting {wait:.1f} s would pass deadline_s"
        failure.request_id = failure.request_id or self.request_id or self.job_id
        raise failure.error(
            f" (while polling job {self.job_id or '?'}{note})", reader.scrub
        ) from failure.__cause__

    def _read(self, reply: Reply, url: str) -> Encoded | None:
        """The image in a poll's answer (fetched when it names one), or None when the job goes on
        (its state, and a new status URL if it names one, are taken)."""
        reader = self.reader
        tag = status_tag(reply.status, reply.reason, reader.request_id(reply) or self.job_id)
        if looks_like_image(reply):
            return Encoded("bytes", reply.content, f"the job's result ({tag})", reply.status, self.job_id)
        doc = reader._json(reply, tag, self.job_id)
        found = find_image(doc)
        if found is not None:
            return reader._fetch_reference(found, reply.url, self.deadline, self.stop, self.job_id, tag)
        nxt = reader._job_info(doc)
        if nxt is None or not (nxt.pending or (nxt.done and nxt.result_url)):
            raise reader._no_image(doc, reply, nxt, self.request_id or self.job_id, tag)
        if nxt.done and url != self.poll_url:  # a result URL answered "done" again: no image
            raise reader._no_image(doc, reply, nxt, self.request_id or self.job_id, tag)
        if nxt.poll_url:
            self._new_poll_url(urljoin(reply.url, nxt.poll_url))
        self.job_id = self.job_id or nxt.id
        self.job = nxt
        return None
