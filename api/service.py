"""The hosted ImageAPI client: a bounded worker pool, and the attempts that make one image.

`ImageApiClient.generate_stream` runs a stream of `ApiImageRequest`s (api/types.py) with at most
`concurrency` images in their HTTP calls (a `_WorkerPool`) and yields each result as it finishes;
it reads its input lazily and holds at most `2 x concurrency` images between reading a request and
the caller taking its result, so a run of any length holds a bounded number of images.
`generate_many` (results in input order) and `generate` (one image) are built on it. Per image,
`_attempts` sends the paid `POST {base_url}/api/v1/generate` (https://imageapi.org) and sends it
again only as the money rules allow (api/retry.py), then finds and decodes the image
(api/answers.py). The HTTP exchange is in api/http.py, what a failure means in api/failures.py.

A stop (`should_stop()`, read in the caller's thread) ends the run at once: no call is started
after it, and waits end within `SLEEP_SLICE_S`. Progress goes to `on_event` (`ApiEvent`, in the
caller's thread) and retries to the log; neither ever holds the API key or a URL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

import requests

from ..errors import (
    ApiError,
    AuthenticationError,
    FluxSchnellError,
    GenerationInterrupted,
    InsufficientCreditsError,
    InvalidInputError,
    ServiceUnreachableError,
)
from ..generation import CallRecord, FinishedImage
from .answers import AnswerReader
from .control import StopRequest
from .failures import BILLED, FREE, GENERATE, RATE_LIMIT_STATUS, Failure, attempt, status_failure
from .http import HttpTransport
from .retry import SLEEP_SLICE_S, SYSTEM_CLOCK, Clock, RetryPolicy
from .settings import ApiSettings
from .types import (
    IDEMPOTENCY_HEADER,
    ApiEvent,
    ApiImageRequest,
    EventKind,
    idempotency_key,
)

GENERATE_PATH = "/api/v1/generate"

log = logging.getLogger("flux_schnell.api")

Result = FinishedImage | ApiError
OnEvent = Callable[[ApiEvent], None]


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


# Errors after which no further POST of the run goes out: every one would fail the same way.
ENDS_THE_RUN = (AuthenticationError, InsufficientCreditsError, ServiceUnreachableError)
UNREACHABLE_AFTER = 3  # connection failures, with no call answered yet, that end a run early


class _NotSent(Exception):
    """Raised in a worker for an image whose first POST a drain kept from going out."""


class RunGate:
    """What every worker of one run looks at right before each POST: a drain (send nothing new), an
    error that ends the run (a refused key, no credits: set before the worker gives back its place,
    so even at concurrency 1 no queued call goes out after it), and whether the service has been
    reachable (the first `UNREACHABLE_AFTER` connection failures with no answer end the run)."""

    def __init__(self, settings: ApiSettings, stop_request: StopRequest | None):
        self.settings = settings
        self.stop_request = stop_request
        self._lock = threading.Lock()
        self._ended: ApiError | None = None
        self._answered = False
        self._unreachable = 0
        self._sent: set[int] = set()  # images with a POST out and no result taken yet

    def before_post(self, index: int, attempts: int, last: Failure | None) -> None:
        """Raise instead of sending when the run must send nothing more."""
        with self._lock:
            ended = self._ended
        if ended is not None:
            raise self._not_sent_error(ended)
        if self.stop_request is not None and self.stop_request.draining:
            if attempts == 0 or last is None:
                raise _NotSent()
            raise last.error(" (not retried: the run is stopping)", lambda text: text)
        with self._lock:
            self._sent.add(index)

    def _not_sent_error(self, ended: ApiError) -> ApiError:
        error = type(ended)(f"not sent: {ended}", status=ended.status)
        error.calls = CallRecord()
        return error

    def failed(self, failure: Failure) -> None:
        if not failure.unreachable:
            return
        settings = self.settings
        with self._lock:
            if self._answered or self._ended is not None:
                return
            self._unreachable += 1
            if self._unreachable >= UNREACHABLE_AFTER:
                self._ended = ServiceUnreachableError(
                    f"the service at {settings.base_url} could not be reached: the first {self._unreachable} "
                    f"calls failed to connect ({failure.reason}) and none succeeded, so the run "
                    f"stopped early; nothing was billed. The base URL comes from "
                    f"{settings.base_url_source}: check it and that the service is up"
                )

    def answered(self) -> None:
        with self._lock:
            self._answered = True

    def ended(self, error: ApiError) -> None:
        """An image ended with `error`; one that ends the run stops every later POST."""
        if isinstance(error, ENDS_THE_RUN):
            with self._lock:
                if self._ended is None:
                    self._ended = error

    def ending_error(self) -> ApiError | None:
        with self._lock:
            return self._ended

    def taken(self, index: int) -> None:
        with self._lock:
            self._sent.discard(index)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._sent)


_NO_MORE = object()  # put on the work queue once per worker when the input is used up or the run stops
_NOT_SENT = object()  # a worker's outcome for an image a drain kept from being sent


class CallTally:
    """The retry loop's counters for one image, and the billing record they make (`record()`).

    `attempts`: POSTs sent; `free`/`billed`: retries of each kind so far; `paid`: POSTs that may have
    been billed (a billed-kind failure, a 5xx without a retry, any answered 2xx, the delivering one
    included); `request_ids`: the service's ids of the calls, in order; `poll_url`: an async job's
    status URL (key-free: `api_key` is what a URL holding it is checked against)."""

    def __init__(self, api_key: str | None = None) -> None:
        self.attempts = self.free = self.billed = self.paid = self.refused = 0
        self.request_ids: list[str] = []
        self.poll_url: str | None = None
        self._api_key = api_key

    def job_at(self, url: str) -> None:
        """An async job's status URL became known: kept for the record, unless it holds the key."""
        self.poll_url = url if not (self._api_key and self._api_key in url) else None

    def sent(self) -> None:
        self.attempts += 1

    def failed(self, failure: Failure) -> None:
        """A POST that failed: counted as paid when the service may have done (and billed) the work."""
        if failure.retry == FREE:
            self.refused += 1
        if failure.retry == BILLED or (failure.retry is None and (failure.status or 0) >= 500):
            self.paid += 1
        self.add_id(failure.request_id)

    def retrying(self, failure: Failure) -> None:
        if failure.retry == FREE:
            self.free += 1
        else:
            self.billed += 1

    def answered(self, request_id: str | None) -> None:
        """A POST answered 2xx: the service took the work, whatever the answer turns out to hold."""
        self.paid += 1
        self.add_id(request_id)

    def add_id(self, request_id: str | None) -> None:
        if request_id and request_id not in self.request_ids:
            self.request_ids.append(request_id)

    def record(self) -> CallRecord:
        return CallRecord(
            paid_calls=self.paid,
            free_retries=self.refused,
            request_ids=tuple(self.request_ids),
            poll_url=self.poll_url,
        )


def _tried(attempts: int) -> str:
    return f" [after {attempts} attempts]" if attempts > 1 else ""


class ImageApiClient:
    """A pooled HTTP client for the service. Thread-safe for the calls it makes itself."""

    def __init__(
        self,
        settings: ApiSettings,
        *,
        session: requests.Session | None = None,
        logger: logging.Logger | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ):
        self.settings = settings
        self.log = logger or log
        self.clock = clock
        self._http = HttpTransport(settings, session, self.log, clock)
        self._policy = RetryPolicy(settings, clock)
        self._answers = AnswerReader(settings, self._http, self._policy, clock, self.log)
        self._generate_url = settings.base_url + GENERATE_PATH

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ImageApiClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ImageApiClient(base_url={self.settings.base_url!r})"

    # --- public calls ---------------------------------------------------------------------------

    def generate(
        self, request: ApiImageRequest, *, should_stop: Callable[[], bool] | None = None
    ) -> FinishedImage:
        """One image, or the `ApiError` it ended with raised."""
        (result,) = self.generate_many([request], concurrency=1, should_stop=should_stop)
        if isinstance(result, ApiError):
            raise result
        return result

    def generate_many(
        self,
        batch: Sequence[ApiImageRequest],
        *,
        concurrency: int = 4,
        should_stop: Callable[[], bool] | None = None,
        stop_request: StopRequest | None = None,
        on_result: Callable[[int, Result], None] | None = None,
        on_event: OnEvent | None = None,
        poll_interval: float = 0.05,
    ) -> list[Result]:
        """Run `batch` through `generate_stream`; the results in input order.

        `on_result(index, result)` runs in this thread as each finishes; an exception it raises
        stops the run (nothing more is sent) and reaches the caller.
        """
        results: list[Result | None] = [None] * len(batch)
        stream = self.generate_stream(
            batch,
            concurrency=concurrency,
            should_stop=should_stop,
            stop_request=stop_request,
            on_event=on_event,
            poll_interval=poll_interval,
        )
        with contextlib.closing(stream):
            for i, result in stream:
                results[i] = result
                if on_result is not None:
                    on_result(i, result)
        return results  # type: ignore[return-value]

    def generate_stream(
        self,
        requests_in: Iterable[ApiImageRequest],
        *,
        concurrency: int = 4,
        should_stop: Callable[[], bool] | None = None,
        stop_request: StopRequest | None = None,
        on_event: OnEvent | None = None,
        keep_data: bool = False,
        poll_interval: float = 0.05,
    ) -> Iterator[tuple[int, Result]]:
        """Yield `(index, result)` for each request as it finishes (index: its place in the input).

        At most `concurrency` images are in their HTTP calls: an image holds one place from its
        first call to its last (retries, waits, polls and downloads included) and gives it back
        before its image is decoded, so decoding does not hold back the next call (2 x
        `concurrency` worker threads). The input is read lazily in this thread, and at most
        `2 x concurrency` requests are read and not yet taken back as results: images alive at
        once are bounded by the concurrency, not by the length of the input. Each result is an
        `FinishedImage` (with the file's `data` and `format` when `keep_data`) or the `ApiError` its
        request ended with. `on_event` runs in this thread. `should_stop()` is read here before
        anything is sent, then every `poll_interval` s; once it is true no call is started (a
        worker checks the stop right before each request goes out), `GenerationInterrupted` is
        raised, and calls in flight are abandoned (their threads leave at the next piece of the
        answer or their timeout). Closing the generator early stops the run the same way.

        `stop_request` (api/control.py) is the graceful stop: after its `drain()` nothing new is
        sent (no new image, no retry), the input is not read further, the calls in flight finish
        and are yielded, and the stream ends normally (`stop_request.not_sent`: images read but not
        sent); after its `abandon()` the stream raises `GenerationInterrupted` as `should_stop` does
        and sets `stop_request.abandoned_in_flight` (images with a call out, maybe billed without an
        image). After a refused key or an empty account (and after `UNREACHABLE_AFTER` connection
        failures with no answer: `ServiceUnreachableError`) no further POST goes out; the images
        not sent then end with an error of the same class and an empty `CallRecord`.
        """
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise InvalidInputError(f"concurrency must be a whole number >= 1; got {concurrency!r}.")
        if not poll_interval > 0:
            raise InvalidInputError(f"poll_interval must be > 0 seconds; got {poll_interval!r}.")
        return self._stream(
            iter(requests_in), concurrency, should_stop, stop_request, on_event, keep_data, poll_interval
        )

    def collect(
        self,
        poll_url: str,
        request: ApiImageRequest,
        *,
        keep_data: bool = False,
        should_stop: Callable[[], bool] | None = None,
        poll_interval: float = 0.05,
    ) -> FinishedImage:
        """The image of an async job an earlier run paid for and recorded (`CallRecord.poll_url`,
        kept when the job passed `deadline_s`): its status URL is polled (GET, never billed) until
        the job is done or failed, within `deadline_s`; no POST is sent. The result's `calls` has
        `paid_calls` 0 (the payment is in the earlier record) and the poll URL; an `ApiError`
        raised carries the same record, so the URL can be kept for a later try."""
        settings = self.settings
        if not isinstance(poll_url, str) or not poll_url.startswith(("http://", "https://")):
            raise InvalidInputError(f"poll_url must be an http(s) URL; got {poll_url!r}.")
        if settings.api_key in poll_url:
            raise InvalidInputError("poll_url holds the API key; a recorded poll URL never does.")
        record = CallRecord(poll_url=poll_url)
        stop = threading.Event()
        outcome: list[object] = []

        def work() -> None:
            try:
                started = self.clock.monotonic()
                encoded, job_id = self._answers.collect(poll_url, started + settings.deadline_s, stop)
                image, data, fmt = self._answers.decode(encoded)
                outcome.append(
                    FinishedImage(
                        image,
                        job_id,
                        self.clock.monotonic() - started,
                        attempts=0,
                        data=data if keep_data else None,
                        format=fmt if keep_data else None,
                        requested_size=(request.width, request.height),
                        calls=CallRecord(request_ids=(job_id,) if job_id else (), poll_url=poll_url),
                    )
                )
            except BaseException as e:  # noqa: BLE001 -- re-raised in the calling thread
                outcome.append(e)

        thread = threading.Thread(target=work, name="flux-schnell-api-collect", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                if should_stop is not None and should_stop():
                    raise GenerationInterrupted("stopped on request while collecting a job; nothing billed.")
                thread.join(poll_interval)
        finally:
            stop.set()
        (result,) = outcome
        if isinstance(result, ApiError):
            result.calls = record
            raise self._scrub_error(result)
        if isinstance(result, BaseException):
            raise result
        return result  # type: ignore[return-value]

    # --- the pool -------------------------------------------------------------------------------

    def _stream(
        self,
        source: Iterator[ApiImageRequest],
        concurrency: int,
        should_stop: Callable[[], bool] | None,
        stop_request: StopRequest | None,
        on_event: OnEvent | None,
        keep_data: bool,
        poll_interval: float,
    ) -> Iterator[tuple[int, Result]]:
        pool = _WorkerPool(self, source, concurrency, stop_request, on_event, keep_data)
        return pool.results(should_stop, poll_interval)

    # --- one image ------------------------------------------------------------------------------

    def _attempts(
        self,
        request: ApiImageRequest,
        index: int,
        stop: threading.Event,
        calls_done: Callable[[], None] = lambda: None,
        report: Callable[[ApiEvent], None] | None = None,
        keep_data: bool = False,
        gate: RunGate | None = None,
    ) -> FinishedImage:
        """Call (and retry) until the answer holds an image, say `calls_done()`, decode it. An
        `ApiError` raised carries the image's `CallRecord` in `.calls`. `gate` (the run's) is
        asked right before each POST whether it may go out."""
        tally = CallTally(self.settings.api_key)
        try:
            return self._attempt_calls(request, index, stop, tally, calls_done, report, keep_data, gate)
        except ApiError as e:
            e.calls = tally.record()
            raise

    def _attempt_calls(
        self,
        request: ApiImageRequest,
        index: int,
        stop: threading.Event,
        tally: CallTally,
        calls_done: Callable[[], None],
        report: Callable[[ApiEvent], None] | None,
        keep_data: bool,
        gate: RunGate | None,
    ) -> FinishedImage:
        settings, clock = self.settings, self.clock
        name = request.name(index)
        started = clock.monotonic()
        deadline = started + settings.deadline_s
        body = json.dumps(request.to_body(settings.send_seed)).encode()
        idempotency = {IDEMPOTENCY_HEADER: idempotency_key(settings.base_url, request, settings.send_seed)}
        self.log.debug("%s: POST %s %s", name, self._generate_url, body.decode())
        last: Failure | None = None  # the failure being retried
        if report is not None:
            report(ApiEvent(index, name, EventKind.STARTED))
        while True:
            if stop.is_set():
                raise GenerationInterrupted("stopped")
            if last is not None and self._policy.too_late(deadline):
                # The wait overran: a call now would be billed and its answer cut off.
                note = self._policy.no_time_note(deadline - clock.monotonic(), None)
                raise last.error(note + _tried(tally.attempts), self._scrub) from last.__cause__
            if gate is not None:
                gate.before_post(index, tally.attempts, last)
            tally.sent()
            reply, failure = attempt(
                self._http.exchange,
                "POST",
                self._generate_url,
                body=body,
                timeout_s=settings.request_timeout_s,
                deadline=deadline,
                stop=stop,
                cap=self._http.body_cap(),
                may_bill=True,
                extra_headers=idempotency,
            )
            if failure is None and not 200 <= reply.status < 300:
                failure = status_failure(
                    reply,
                    GENERATE,
                    request_id=self._answers.request_id(reply),
                    scrub=self._scrub,
                    key_source=settings.key_source,
                    url=self._generate_url,
                )
            if failure is not None:
                tally.failed(failure)
                if gate is not None:
                    gate.failed(failure)
                    ended = gate.ending_error()
                    if isinstance(ended, ServiceUnreachableError):  # no retry: the run ends here
                        raise ServiceUnreachableError(str(ended)) from None
                wait, note = self._policy.wait_before_retry(failure, tally.free, tally.billed, deadline)
                if wait is None:
                    raise failure.error(note + _tried(tally.attempts), self._scrub) from failure.__cause__
                tally.retrying(failure)
                reason = self._scrub(failure.reason)
                self.log.warning(
                    "ImageAPI %s, attempt %d failed (%s); retrying in %.2f s (%s)",
                    name,
                    tally.attempts,
                    reason,
                    wait,
                    self._policy.retry_kind(failure, tally.free, tally.billed),
                )
                if report is not None:
                    kind = (
                        EventKind.RATE_LIMITED if failure.status == RATE_LIMIT_STATUS else EventKind.RETRYING
                    )
                    report(ApiEvent(index, name, kind, tally.attempts, wait, reason))
                clock.sleep(wait, stop)
                last = failure
                continue
            request_id = self._answers.request_id(reply)
            tally.answered(request_id)
            if gate is not None:
                gate.answered()

            def waiting(seconds: float, why: str, attempt_no: int = tally.attempts) -> None:
                if report is not None:
                    report(ApiEvent(index, name, EventKind.WAITING, attempt_no, seconds, why))

            encoded, job_id = self._answers.locate(reply, deadline, stop, request_id, waiting, tally.job_at)
            del reply  # the answer's body is not needed any more
            tally.add_id(job_id)
            calls_done()
            image, data, fmt = self._answers.decode(encoded)
            del encoded
            seconds = clock.monotonic() - started
            self.log.debug(
                "%s: %dx%d in %.3f s, %d attempt(s)", name, image.width, image.height, seconds, tally.attempts
            )
            return FinishedImage(
                image,
                request_id or job_id,
                seconds,
                tally.attempts,
                billed_attempts=tally.billed,
                data=data if keep_data else None,
                format=fmt if keep_data else None,
                requested_size=(request.width, request.height),
                calls=tally.record(),
            )

    # --- keeping the key out of everything ------------------------------------------------------

    def _scrub(self, text: str) -> str:
        """`text` (which may come from the server) with the API key replaced by ***."""
        return self._http.scrub(text)

    def _scrub_error(self, error: ApiError) -> ApiError:
        """Last line of defence: no error leaves a worker with the key in its message."""
        if any(self.settings.api_key in str(a) for a in error.args):
            error.args = tuple(self._scrub(str(a)) for a in error.args)
        if error.request_id:
            error.request_id = self._scrub(error.request_id)
        return error


class _WorkerPool:
    """One run of `ImageApiClient.generate_stream`: the input read lazily into a window of
    `2 x concurrency` requests, worker threads that each hold one of `concurrency` places for an
    image's HTTP calls, and the calling thread's loop (`results`) that gives back results and
    events and watches the stops (see `generate_stream` for the rules).

    State: `taken` (requests read from the input), `given` (results given back, or images a drain
    kept from being sent), `exhausted` (nothing more is read: the input is used up, or a drain);
    `labels` of the requests read and not given back; the queues `todo` (requests for the workers,
    then one `_NO_MORE` per worker), `done` (outcomes for the calling thread) and `events`
    (progress, sent in the calling thread); `stop` tells the workers to leave."""

    def __init__(
        self,
        client: ImageApiClient,
        source: Iterator[ApiImageRequest],
        concurrency: int,
        stop_request: StopRequest | None,
        on_event: OnEvent | None,
        keep_data: bool,
    ):
        self.client = client
        self.source = source
        self.stop_request = stop_request
        self.on_event = on_event
        self.keep_data = keep_data
        self.gate = RunGate(client.settings, stop_request)
        self.window = 2 * concurrency  # requests read and not yet given back as results
        self.stop = threading.Event()
        self.places = threading.BoundedSemaphore(concurrency)
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.events: queue.SimpleQueue[ApiEvent] = queue.SimpleQueue()
        self.workers: list[threading.Thread] = []
        self.labels: dict[int, str] = {}
        self.taken = self.given = 0
        self.exhausted = False

    # --- in each worker thread ------------------------------------------------------------------

    def work(self) -> None:
        """Take requests from `todo` until `_NO_MORE` or the stop; make each image, holding a
        place for its HTTP calls, and put its outcome on `done`."""
        client, gate = self.client, self.gate
        while True:
            job = self.todo.get()  # a request, or _NO_MORE: the input is used up or the run stops
            if job is _NO_MORE or self.stop.is_set():
                return
            i, request = job
            while not self.places.acquire(timeout=SLEEP_SLICE_S):  # all places taken: wait,
                if self.stop.is_set():  # looking at the stop
                    return
            place = _Place(self.places)
            try:
                outcome: object = client._attempts(
                    request, i, self.stop, place.release, self.events.put, self.keep_data, gate
                )
            except ApiError as e:
                gate.ended(e)  # before the place is given back: the next POST sees it
                outcome = client._scrub_error(e)
            except _NotSent:
                outcome = _NOT_SENT
            except GenerationInterrupted:
                return
            except BaseException as e:  # noqa: BLE001 -- re-raised in the calling thread
                outcome = _Crash(e)
            finally:
                place.release()
            self.done.put((i, outcome))
            del outcome, job, request  # this thread keeps no image while it waits for more

    # --- in the calling thread ------------------------------------------------------------------

    def read_more(self) -> None:
        """Read requests until the window is full, the input is used up or a drain began; start
        a worker per request read while there are fewer than the window."""
        while not self.exhausted and self.taken - self.given < self.window:
            if self.stop_request is not None and self.stop_request.draining:
                self._no_more_input()  # read nothing more: what was read and not sent is counted
                break
            try:
                request = next(self.source)
            except StopIteration:
                self._no_more_input()
                break
            if not isinstance(request, ApiImageRequest):
                raise InvalidInputError(f"expected an ApiImageRequest; got {type(request).__name__}.")
            self.labels[self.taken] = request.name(self.taken)
            self.todo.put((self.taken, request))
            self.taken += 1
            if len(self.workers) < self.window:
                thread = threading.Thread(
                    target=self.work, name=f"flux-schnell-api-{len(self.workers)}", daemon=True
                )
                self.workers.append(thread)
                thread.start()

    def _no_more_input(self) -> None:
        self.exhausted = True
        for _ in self.workers:
            self.todo.put(_NO_MORE)

    def send_events(self) -> None:
        """Hand the workers' progress events to `on_event`, in this thread."""
        while self.on_event is not None:
            try:
                self.on_event(self.events.get_nowait())
            except queue.Empty:
                return

    def _refuse_if_stopped_before_start(self, should_stop: Callable[[], bool] | None) -> None:
        stop_request = self.stop_request
        if should_stop is not None and should_stop():
            raise GenerationInterrupted("stopped on request before any image was sent; nothing billed.")
        if stop_request is not None:
            stop_request.poll()
            if stop_request.draining:
                raise GenerationInterrupted("stopped on request before any image was sent; nothing billed.")

    def _raise_if_abandoned(self, should_stop: Callable[[], bool] | None) -> None:
        """A hard stop (`should_stop()`, or the stop request abandoned): raise at once, counting
        the images with a call in flight (which may still be billed)."""
        stop_request = self.stop_request
        if stop_request is not None:
            stop_request.poll()
        if (should_stop is not None and should_stop()) or (
            stop_request is not None and stop_request.abandoned
        ):
            abandoned = self.gate.in_flight()
            if stop_request is not None:
                stop_request.abandoned_in_flight = abandoned
            raise GenerationInterrupted(
                f"stopped on request after {self.given} image(s); {abandoned} image(s) with a call "
                "in flight were abandoned: those calls may still be billed."
            )

    def _report(self, i: int, label: str, outcome: object) -> None:
        if self.on_event is None:
            return
        if isinstance(outcome, FinishedImage):
            self.on_event(ApiEvent(i, label, EventKind.DONE, outcome.attempts))
        else:
            self.on_event(ApiEvent(i, label, EventKind.FAILED, message=type(outcome).__name__))

    def results(
        self, should_stop: Callable[[], bool] | None, poll_interval: float
    ) -> Iterator[tuple[int, Result]]:
        """`(index, result)` as each image finishes; on leaving (done, an error, closed early) the
        workers are told to stop and woken."""
        if self.stop_request is not None:  # so a stop can say how many paid answers it waits for
            self.stop_request.count_in_flight = self.gate.in_flight
        try:
            self._refuse_if_stopped_before_start(should_stop)
            self.read_more()
            while not (self.exhausted and self.given == self.taken):
                self.send_events()
                self._raise_if_abandoned(should_stop)
                try:
                    i, outcome = self.done.get(timeout=poll_interval)
                except queue.Empty:
                    if not any(t.is_alive() for t in self.workers) and self.done.empty():
                        raise FluxSchnellError(
                            "the API worker threads ended without a result (a bug)"
                        ) from None
                    continue
                if isinstance(outcome, _Crash):
                    raise outcome.exc
                self.send_events()
                label = self.labels.pop(i)
                self.gate.taken(i)
                if outcome is _NOT_SENT:
                    self.given += 1
                    if self.stop_request is not None:
                        self.stop_request.not_sent += 1
                    self.read_more()
                    continue
                self._report(i, label, outcome)
                self.given += 1
                yield i, outcome
                del outcome  # the caller has it; this frame keeps no image alive
                self.read_more()
        finally:
            self.stop.set()  # workers take nothing new and leave their waits
            for _ in self.workers:
                self.todo.put(_NO_MORE)  # wakes the ones waiting for a request
