"""The api backend: a `GenerationRequest` to images through the hosted service, for the node (one
IMAGE batch) and for the command line (a stream of drafts).

Per run the caller passes the settings it read where the program starts (the node reads them on
every run, so a new key or base URL needs no restart); a batch becomes one request per seed (`seed,
seed + 1, ...`) run through the client's bounded worker pool.

`generate_api` (the node): the finished images become one IMAGE tensor in seed order. When some
images of a batch fail the node raises (ComfyUI shows the error and caches nothing), but the images
that did finish were paid for: they are kept here, keyed by their exact request, and a re-queue of
the same batch only sends the requests that failed. The kept images are dropped once used, and at
most `KEEP_LIMIT` are held.

`stream_api_images` (the command line): any number of requests, read lazily, each result given
back as it finishes; a refused key or an empty account ends the stream. `collect_api_image`: the
image of an async job an earlier run paid for but never collected (GETs only). Neither path imports torch
until a tensor is made (`generate_api` only), so the command line runs without it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from PIL import Image

from .api import ApiImageRequest, ApiSettings, ImageApiClient, OnEvent, StopRequest, load_settings
from .comfy_bridge import Progress
from .errors import (
    ApiError,
    AuthenticationError,
    BatchFailedError,
    GenerationInterrupted,
    InsufficientCreditsError,
    ServiceUnreachableError,
)
from .generation import MODEL_NAME, FinishedImage, GenerationInfo, GenerationRequest

log = logging.getLogger("flux_schnell.api")

CONCURRENCY = 4
# Errors after which the rest of a batch is not sent: every request would fail the same way.
ABORT_BATCH = (AuthenticationError, InsufficientCreditsError, ServiceUnreachableError)
KEEP_LIMIT = 32
CANCEL_GRACE_S = 5.0  # how long ComfyUI's Cancel waits for answers already in flight (paid for)


class KeptImages:
    """The node's process-wide state: one pooled client per configuration, and the finished images
    of a failed or cancelled batch (paid for), keyed by their exact request, until a re-queue takes
    them (at most `limit`, the oldest dropped first). Thread-safe."""

    def __init__(self, limit: int = KEEP_LIMIT):
        self.limit = limit
        self._lock = threading.Lock()
        self._client: ImageApiClient | None = None
        self._client_settings: ApiSettings | None = None
        self._kept: OrderedDict[tuple, FinishedImage] = OrderedDict()

    def client_for(self, settings: ApiSettings) -> ImageApiClient:
        """One pooled client per configuration; a changed key or URL gets a fresh one."""
        with self._lock:
            if self._client is None or self._client_settings != settings:
                if self._client is not None:
                    self._client.close()
                self._client, self._client_settings = ImageApiClient(settings), settings
            return self._client

    @staticmethod
    def _key(settings: ApiSettings, req: ApiImageRequest) -> tuple:
        return (settings.base_url, settings.send_seed, req)

    def take(self, settings: ApiSettings, reqs: list[ApiImageRequest]) -> dict[int, FinishedImage]:
        """The kept images of `reqs` by position, removed from the cache (used once)."""
        found: dict[int, FinishedImage] = {}
        with self._lock:
            for i, req in enumerate(reqs):
                kept = self._kept.pop(self._key(settings, req), None)
                if kept is not None:
                    found[i] = kept
        return found

    def keep(self, settings: ApiSettings, reqs: list[ApiImageRequest], results: list) -> None:
        """Keep the finished images among `results` (one per request of `reqs`)."""
        with self._lock:
            for req, result in zip(reqs, results, strict=True):
                if isinstance(result, FinishedImage):
                    self._kept[self._key(settings, req)] = result
            while len(self._kept) > self.limit:
                self._kept.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)


KEPT = KeptImages()


def client_for(settings: ApiSettings) -> ImageApiClient:
    """One pooled client per configuration (see `KeptImages.client_for`)."""
    return KEPT.client_for(settings)


def image_requests(request: GenerationRequest, labels: Iterable[str] = ()) -> list[ApiImageRequest]:
    """One service request per image of `request` (seeds `seed, seed + 1, ...`); `labels` name
    them in messages (default: "image 1", "image 2", ...)."""
    names = list(labels)
    return [
        ApiImageRequest(
            prompt=request.prompt,
            width=request.width,
            height=request.height,
            num_inference_steps=request.steps,
            seed=seed,
            model=MODEL_NAME,
            label=names[i] if i < len(names) else "",
            index_in_batch=i,
        )
        for i, seed in enumerate(request.seeds)
    ]


def ends_the_run(error: ApiError) -> bool:
    """Whether every other request would fail the same way (a refused key, no credits left)."""
    return isinstance(error, ABORT_BATCH)


def stream_api_images(
    requests_in: Iterable[ApiImageRequest],
    settings: ApiSettings,
    *,
    concurrency: int = CONCURRENCY,
    should_stop: Callable[[], bool] | None = None,
    stop_request: StopRequest | None = None,
    on_event: OnEvent | None = None,
    keep_data: bool = False,
) -> Iterator[tuple[int, FinishedImage | ApiError]]:
    """`(index, result)` for each request as it finishes, read lazily; images alive at once are
    bounded by the concurrency (see `ImageApiClient.generate_stream`). After an error for which
    `ends_the_run` is true, nothing more is sent and the stream ends. `keep_data` keeps the
    service's file (`FinishedImage.data`, `.format`) so a caller can write it without re-encoding."""
    stream = client_for(settings).generate_stream(
        requests_in,
        concurrency=concurrency,
        should_stop=should_stop,
        stop_request=stop_request,
        on_event=on_event,
        keep_data=keep_data,
    )
    try:
        for index, result in stream:
            yield index, result
            if isinstance(result, ApiError) and ends_the_run(result):
                return
            del result  # the caller has it; this frame keeps no image alive
    finally:
        stream.close()  # stops the pool: nothing more is sent


def collect_api_image(
    poll_url: str,
    request: ApiImageRequest,
    settings: ApiSettings,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> FinishedImage:
    """The image of an async job an earlier run paid for and recorded (its `poll_url`): GETs of
    that URL only, never a POST (see `ImageApiClient.collect`). The result keeps the service's file
    (`data`, `format`) and has `paid_calls` 0; an `ApiError` raised carries the poll URL."""
    return client_for(settings).collect(poll_url, request, keep_data=True, should_stop=should_stop)


def generate_api(
    request: GenerationRequest,
    progress: Progress,
    settings: ApiSettings | None = None,
    *,
    on_event: OnEvent | None = None,
):
    """Run `request` on the hosted API; returns `(IMAGE tensor, GenerationInfo)`. Synchronous,
    called from one thread per run. `settings`: what the caller read at its start (the node reads
    them on every run); None reads them here. `on_event(ApiEvent)` is called in this thread for
    each image's progress (started, rate limited, retrying, waiting, done, failed), with the
    image's label ("image 2") and never the key or a URL: for a status line."""
    from .image_tensors import pil_to_tensor  # torch: the node's path only (ComfyUI always has it)

    request.validate("api")
    settings = settings or load_settings()
    started = time.monotonic()
    reqs = image_requests(request)
    results: list[FinishedImage | ApiError | None] = [None] * len(reqs)

    for i, kept in KEPT.take(settings, reqs).items():
        results[i] = kept
    reused = [i for i, r in enumerate(results) if r is not None]
    todo = [i for i, r in enumerate(results) if r is None]

    # ComfyUI's Cancel drains the batch: nothing new is sent, the answers in flight (paid for) are
    # taken and kept below for the re-queue; after CANCEL_GRACE_S they are abandoned.
    stop = StopRequest(drain_when=progress.should_stop, abandon_after_s=CANCEL_GRACE_S)

    def on_result(position: int, result: FinishedImage | ApiError) -> None:
        results[todo[position]] = result
        stop.poll()
        if stop.draining:
            return  # ComfyUI's bar would raise its interrupt: the answers still coming are kept
        progress.advance(1)
        if isinstance(result, ABORT_BATCH):
            raise result  # the rest of the batch would fail the same way: send no more

    try:  # from here on, whatever stops the run puts the finished images back
        if reused:
            log.info("reusing %d image(s) finished in an earlier, partly failed run", len(reused))
            progress.advance(len(reused))  # ComfyUI's bar may raise its interrupt here
        if todo:
            client_for(settings).generate_many(
                [reqs[i] for i in todo],
                concurrency=min(CONCURRENCY, len(todo)),
                stop_request=stop,
                on_result=on_result,
                on_event=on_event,
            )
        if stop.draining:  # a Cancel: the answers in flight were taken; keep them, then stop
            raise GenerationInterrupted(
                f"interrupted by the user; {sum(isinstance(r, FinishedImage) for r in results)} "
                "finished image(s) are kept for the re-queue"
            )
    except GenerationInterrupted:
        _keep_finished(settings, reqs, results)
        progress.raise_if_interrupted()  # ComfyUI's own exception: a cancel, not an error
        raise
    except BaseException:  # ComfyUI's interrupt from the progress bar, an aborted batch, ...
        _keep_finished(settings, reqs, results)
        raise
    failures = {i: r for i, r in enumerate(results) if isinstance(r, ApiError)}
    if failures:
        _keep_finished(settings, reqs, results)
        raise _batch_error(request, failures)

    images: list[FinishedImage] = results  # type: ignore[assignment]  # all succeeded here
    pictures, notes = _one_size([r.image for r in images], request)
    info = GenerationInfo(
        backend="api",
        model=MODEL_NAME,
        prompt=request.prompt,
        width=pictures[0].width,
        height=pictures[0].height,
        steps=request.steps,
        seeds=request.seeds,
        seconds=time.monotonic() - started,
        request_ids=[r.request_id for r in images],
        seed_sent=settings.send_seed,
        notes=notes or None,
    )
    return pil_to_tensor(pictures), info


def _keep_finished(settings, reqs, results) -> None:
    KEPT.keep(settings, reqs, results)


def _batch_error(request: GenerationRequest, failures: dict[int, ApiError]) -> ApiError:
    first = next(iter(failures.values()))
    if len(failures) == request.batch_size and len({type(e) for e in failures.values()}) == 1:
        return first  # every image failed the same way: the single error says it best
    finished = request.batch_size - len(failures)
    lines = [f"image {i + 1} (seed {request.seeds[i]}): {type(e).__name__}: {e}" for i, e in failures.items()]
    kept = (
        f" The {finished} finished image(s) are kept: queue the same prompt again with seed "
        f"{request.seed} (set the seed's control to 'fixed') and only the failed ones are "
        "requested (and paid for) again."
        if finished
        else ""
    )
    return BatchFailedError(
        f"{len(failures)} of {request.batch_size} images failed:\n" + "\n".join(lines) + kept,
        failures=failures,
        status=first.status,
    )


def _one_size(pictures, request: GenerationRequest):
    """A batch tensor needs one size: keep the service's size, but say when it is not the asked one."""
    notes = []
    size = pictures[0].size
    if size != (request.width, request.height):
        notes.append(
            f"the service returned {size[0]}x{size[1]} instead of the requested "
            f"{request.width}x{request.height}"
        )
        log.warning(notes[-1])
    if any(p.size != size for p in pictures):
        notes.append(f"images of different sizes were resized to {size[0]}x{size[1]}")
        log.warning(notes[-1])
        pictures = [p if p.size == size else p.resize(size, Image.Resampling.BICUBIC) for p in pictures]
    return pictures, notes
