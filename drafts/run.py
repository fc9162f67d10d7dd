"""A command-line run: prompts to PNG files, streamed, resumable, each distinct image paid for once.

`plan` turns the prompts (a file read lazily, or one `--prompt`) into the images to make, one per
line and seed, each named after its prompt and settings (not its position, so editing other lines
renames nothing). `run` sends them to a backend (`api_backend`: the hosted service's bounded pool;
`local_backend`: the local models, one image after another) and writes each image the moment it
arrives, then drops it: images alive at once are bounded by the concurrency, whatever the length of
the run. In a draft folder (`--out-dir`) it also:

- skips what is already on disk (a file the manifest lists as done with its size, or a complete PNG
  it does not list: a run killed between writing and recording);
- requests identical images (same trimmed prompt, size, steps and seed) once: a repeated line is
  recorded as a duplicate of the first, never sent;
- appends every line it finishes to `manifest.jsonl` (drafts/manifest.py) and writes a thumbnail per
  image for the gallery (drafts/gallery.py);
- on the api, collects the async jobs earlier runs paid for but never collected (the file's last
  record is "failed" with a `poll_url`: the job passed `deadline_s`) by GETs of that URL, never a
  POST, after the new requests (`JobCollector`). A job still running is left for a later run; one the
  service reports failed or no longer knows (404/410) is bought again only with `rebuy_expired`.

Memory besides the images in flight: a few dozen bytes per distinct image of the run (which
requests were already seen, which files are done, which jobs to collect), never the images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from .._version import __version__
from ..errors import ConfigurationError, FluxSchnellError, GenerationInterrupted
from ..generation import MODEL_NAME, FinishedImage, GenerationRequest
from . import png_files
from .gallery import thumbnail_path
from .manifest import MANIFEST_NAME, ManifestWriter, RecordStatus, read_manifest

log = logging.getLogger("flux_schnell.cli")

MAX_FAILURES_LISTED = 20  # the summary lists this many failures; the manifest has them all


@dataclass(frozen=True)
class RunSettings:
    """What the command line asked for (after its checks)."""

    backend: str
    request: GenerationRequest  # the template: size, steps, batch, the seed of each prompt's first image
    seed_given: int | None  # --seed as given (None: a random one), part of the file names
    concurrency: int
    out: Path | None = None  # --prompt: the file
    out_dir: Path | None = None  # --prompts-file: the draft folder
    loras: tuple = ()  # local.lora.LoraChoice: they make other images, so they name other files
    seed_sent: bool = True  # api: whether the service receives the seed (config `send_seed`)
    shard: tuple[int, int] | None = None  # --shard K/N: only the lines whose number % N == K % N
    # api: a job an earlier run paid for that the service now reports failed or no longer knows
    # (404/410) is requested again (paid) only with this (--rebuy-expired); never a running one
    rebuy_expired: bool = False
    # more PNG text chunks (the Drafts node: ComfyUI's "prompt" graph and "workflow", as SaveImage
    # writes them; our prompt text then goes under "flux_prompt")
    png_extra: tuple[tuple[str, str], ...] = ()

    @property
    def drafts(self) -> bool:
        return self.out_dir is not None

    @property
    def seed_recorded(self) -> bool:
        """Whether the images' seeds are known: the local backend's always; the service's only when
        it receives them (`send_seed`), else it chooses its own and no seed is ever recorded."""
        return self.backend != "api" or self.seed_sent

    def seed_note(self, planned: PlannedImage) -> str:
        """ " (seed N)" for messages, or nothing when the seed was not sent."""
        return f" (seed {planned.seed})" if self.seed_recorded else ""

    def in_shard(self, line: int) -> bool:
        """Whether this run makes prompts-file line `line` (1-based): always, without --shard."""
        return self.shard is None or line % self.shard[1] == self.shard[0] % self.shard[1]


@dataclass
class PlannedImage:
    """One image to make: its prompt, seed, file, what messages call it, and its identity."""

    line: int
    prompt: str
    seed: int
    path: Path
    label: str
    key: int  # the same for identical requests (trimmed prompt, size, steps, seed)
    request: GenerationRequest  # its line's: the template with the prompt and the line's overrides


@dataclass
class RunOutcome:
    planned: int = 0
    done: int = 0
    skipped: int = 0
    duplicates: int = 0
    failed: list[tuple[PlannedImage, str]] = field(default_factory=list)
    failed_count: int = 0
    written: list[Path] = field(default_factory=list)  # --prompt runs only: what was written
    collected: int = 0  # of `done`: images of jobs an earlier run paid for, collected (no POST)
    exit_code: int | None = None  # set when the run stopped early for a reason that ends it
    stop_message: str | None = None

    @property
    def not_run(self) -> int:
        return self.planned - self.done - self.skipped - self.duplicates - self.failed_count


@dataclass
class PlanCount:
    """What a run would do, counted without sending anything (`--dry-run`, the spend guard)."""

    images: int = 0  # planned: lines x batch size
    duplicates: int = 0  # requested once for several lines
    already_done: int = 0  # on disk from an earlier run
    to_request: int = 0  # what the backend would be asked for (paid, on the api)
    to_collect: int = 0  # api: jobs an earlier run paid for, to collect by their poll URL (not paid)


class StopRun(Exception):
    """Ends a run early: every remaining image would fail the same way."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


Results = Iterator[tuple[PlannedImage, "FinishedImage | FluxSchnellError"]]
Backend = Callable[[Iterator[PlannedImage]], Results]


# --- naming ---------------------------------------------------------------------------------------


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "prompt"


def settings_tag(request: GenerationRequest, run_settings: RunSettings, seed_given: int | None) -> str:
    """8 hex digits naming what makes the image: prompt, size, steps, backend, the given seed."""
    what = [request.prompt, request.width, request.height, request.steps, run_settings.backend]
    what.append(seed_given)
    if run_settings.loras:  # a LoRA makes another image (names without LoRAs stay as they were)
        what.append(_lora_names(run_settings))
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:8]


def _lora_names(run_settings: RunSettings) -> list:
    return [[str(choice.path), choice.strength] for choice in run_settings.loras]


def request_key(
    request: GenerationRequest, run_settings: RunSettings, image: int, seed_given: int | None = None
) -> int:
    """64 bits that identify a request: equal for the same trimmed prompt, size, steps, the seed as
    given (--seed or the line's; a random one is not part of it, as in the file names) when the
    seed is sent at all, and the image's place in its batch."""
    seed = seed_given if run_settings.seed_recorded else None
    what = [request.prompt.strip(), request.width, request.height, request.steps, run_settings.backend]
    what += [seed, image, _lora_names(run_settings)]
    return int.from_bytes(hashlib.blake2b(json.dumps(what).encode(), digest_size=8).digest(), "big")


def line_request(entry, run_settings: RunSettings) -> tuple[GenerationRequest, int | None]:
    """A prompts-file line's request (the template with its prompt and what a JSONL line, a
    `drafts.prompts.PromptLine`, overrides) and the seed that names its files."""
    changes = {"prompt": entry.prompt}
    for name, value in (("width", entry.width), ("height", entry.height), ("steps", entry.steps)):
        if value is not None:
            changes[name] = value
    seed_given = run_settings.seed_given
    if entry.seed is not None:
        changes["seed"] = seed_given = entry.seed
    return replace(run_settings.request, **changes), seed_given


def plan(lines: Iterable, run_settings: RunSettings) -> Iterator[PlannedImage]:
    """One `PlannedImage` per image, lazily: per prompt, the seeds `seed .. seed + batch - 1`.
    `lines` holds `(line, prompt)` pairs or `PromptLine`s (whose overrides apply to their line)."""
    drafts = run_settings.drafts
    batch = run_settings.request.batch_size
    for entry in lines:
        if isinstance(entry, tuple):
            line, prompt = entry
            request, seed_given = replace(run_settings.request, prompt=prompt), run_settings.seed_given
        else:
            line, prompt = entry.line, entry.prompt
            request, seed_given = line_request(entry, run_settings)
        tag = settings_tag(request, run_settings, seed_given) if drafts else ""
        for b, image_seed in enumerate(request.seeds):
            if drafts:
                suffix = "" if batch == 1 else f"-{b + 1}"
                path = run_settings.out_dir / f"{slug(prompt)}-{tag}{suffix}.png"
                label = f"line {line}" + (f" image {b + 1}" if batch > 1 else "")
            else:
                out = run_settings.out
                path = out if batch == 1 else out.with_name(f"{out.stem}-{b + 1}{out.suffix}")
                label = f"image {b + 1}"
            label += f" -> {path.name}"
            key = request_key(request, run_settings, b, seed_given)
            yield PlannedImage(line, prompt, image_seed, path, label, key, request)


def image_request(planned: PlannedImage) -> GenerationRequest:
    """The request for one planned image: its line's request with its own seed, one image."""
    return replace(planned.request, seed=planned.seed, batch_size=1)


IDENTITY_CHUNK = "flux_schnell_request"  # the PNG text chunk holding an image's request key


def png_text_for(
    planned: PlannedImage, run_settings: RunSettings, request_id: str | None = None
) -> dict[str, str]:
    """The text chunks to write into one image's PNG."""
    text = {"prompt": planned.prompt}
    if run_settings.seed_recorded:  # never a seed the service did not receive
        text["seed"] = str(planned.seed)
    text |= {
        "model": MODEL_NAME,
        "steps": str(planned.request.steps),
        "backend": run_settings.backend,
        "software": f"comfyui-flux-schnell {__version__}",
    }
    text[IDENTITY_CHUNK] = f"{planned.key:016x}"  # a re-run of --out skips a file of this identity
    if request_id is not None:
        text["request_id"] = request_id
    if run_settings.loras:
        text["loras"] = ", ".join(choice.describe() for choice in run_settings.loras)
    extra = dict(run_settings.png_extra)
    if "prompt" in extra:
        text["flux_prompt"] = text.pop("prompt")
    return {**text, **extra}


# --- backends -------------------------------------------------------------------------------------


def api_backend(
    api_settings, run_settings: RunSettings, stop: threading.Event, on_event=None, stop_request=None
) -> Backend:
    """The hosted service: `PlannedImage`s in, results out as they finish (see api_client.py).
    With `stop_request` (api.control.StopRequest) a stop drains: the answers in flight are still
    given back, to be written and recorded; else `stop` ends the stream at once."""
    from ..api_client import image_requests, stream_api_images

    def results(planned: Iterator[PlannedImage]) -> Results:
        by_index: dict[int, PlannedImage] = {}

        def requests_in():
            for i, one in enumerate(planned):
                by_index[i] = one
                yield image_requests(image_request(one), [one.label])[0]

        stream = stream_api_images(
            requests_in(),
            api_settings,
            concurrency=run_settings.concurrency,
            should_stop=None if stop_request is not None else stop.is_set,
            stop_request=stop_request,
            on_event=on_event,
            keep_data=True,
        )
        try:
            for i, result in stream:
                wanted = by_index.pop(i)
                yield wanted, result  # a generation.FinishedImage or the error
                del result
        finally:
            stream.close()

    return results


def local_backend(spec, run_settings: RunSettings, stop: threading.Event) -> Backend:
    """The local models, one image after another; they load once and serve the whole run."""

    def results(planned: Iterator[PlannedImage]) -> Results:
        from ..comfy_bridge import Progress
        from ..errors import LocalBackendUnavailable, ModelLoadError
        from ..image_tensors import tensor_to_pil
        from ..local_backend import generate_local

        for wanted in planned:
            if stop.is_set():
                raise GenerationInterrupted("interrupted")
            request = image_request(wanted)
            try:
                images, info = generate_local(request, spec, Progress(request.steps, stop_flag=stop))
            except (ModelLoadError, LocalBackendUnavailable) as e:  # the files, not this prompt
                yield wanted, e
                return
            except FluxSchnellError as e:
                if isinstance(e, (GenerationInterrupted, ConfigurationError)):
                    raise
                yield wanted, e
                continue
            log.debug("%s: %s", wanted.label, info.to_json())  # timings, device, peak GPU memory
            yield wanted, FinishedImage(tensor_to_pil(images)[0], seconds=info.seconds)

    return results


# --- the run --------------------------------------------------------------------------------------


def _call_fields(calls, backend: str) -> dict:
    """The billing record of one image for its manifest line (api only): `paid_calls` (calls that
    may have been billed, the one that delivered included), `free_retries`, the service's
    `request_ids` and an async job's `poll_url` (so a re-run can collect it)."""
    if backend != "api" or calls is None:
        return {}
    fields = {"paid_calls": calls.paid_calls, "free_retries": calls.free_retries}
    if calls.request_ids:
        fields["request_ids"] = list(calls.request_ids)
    if calls.poll_url:
        fields["poll_url"] = calls.poll_url
    return fields


# What a recorded job that could not be collected is now (`job_state`).
JOB_RUNNING, JOB_GONE = "running", "gone"


def job_state(error: Exception) -> str:
    """JOB_RUNNING: the job may still deliver (still running, or its status could not be read: a
    timeout, a dropped connection, a 5xx): run again later. JOB_GONE: the service reports it failed, no
    longer knows it (404/410), or its result is unusable: only `rebuy_expired` buys it again."""
    from ..errors import ApiTimeoutError, NetworkError, RateLimitError, ServerError

    if getattr(error, "status", None) in (404, 410):
        return JOB_GONE
    if isinstance(error, (ApiTimeoutError, NetworkError, RateLimitError, ServerError)):
        return JOB_RUNNING
    return JOB_GONE


class JobCollector:
    """Collects, for a draft run on the api, the async jobs earlier runs paid for but never
    collected: GETs of the recorded poll URL (api_client.collect_api_image), never a POST, at most
    `concurrency` at once. A stop (the run's `stop`, a drain of `stop_request`, `cancel()`) ends
    the polls at once: a job left is still recorded, for the next run."""

    def __init__(self, api_settings, stop: threading.Event, stop_request=None):
        self.api_settings = api_settings
        self.stop = stop
        self.stop_request = stop_request
        self._cancelled = threading.Event()

    def stopped(self) -> bool:
        if self.stop_request is not None:
            self.stop_request.poll()
            if self.stop_request.draining:
                return True
        return self.stop.is_set() or self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def collect(self, planned: PlannedImage, poll_url: str) -> FinishedImage:
        """The job's image; raises the `ApiError` it ended with (or `GenerationInterrupted`)."""
        from ..api_client import collect_api_image, image_requests

        request = image_requests(image_request(planned), [planned.label])[0]
        return collect_api_image(poll_url, request, self.api_settings, should_stop=self.stopped)

    def host(self, poll_url: str) -> str:
        """The poll URL's host (and port) for messages: never its path or query, never the key."""
        from urllib.parse import urlsplit

        from ..api import scrub

        try:
            parts = urlsplit(poll_url)
            host = parts.hostname or "?"
            host += f":{parts.port}" if parts.port else ""
        except ValueError:
            host = "?"
        return scrub(host, self.api_settings.api_key)


class DraftRun:
    """One run: plans lazily, feeds the backend, writes what comes back, records every line."""

    def __init__(
        self,
        run_settings: RunSettings,
        backend: Backend,
        progress,
        ends_run: Callable[[FluxSchnellError], int | None],
        collector: JobCollector | None = None,
    ):
        self.settings = run_settings
        self.backend = backend
        self.progress = progress
        self.ends_run = ends_run
        self.collector = collector  # api draft runs: collects the jobs earlier runs paid for
        self.outcome = RunOutcome()
        self.manifest: ManifestWriter | None = None
        self._done_files: dict[str, int] = {}  # file -> size, from earlier runs' manifests
        self._seen: dict[int, int] = {}  # request key -> line of its first occurrence
        self._first_failed: dict[int, str] = {}  # request key -> why its first occurrence failed
        self._waiting: dict[int, list[PlannedImage]] = {}  # in flight: key -> its duplicates so far
        self._jobs: dict[str, str] = {}  # file -> poll URL of its paid, uncollected job (api)
        self._to_collect: list[tuple[PlannedImage, str]] = []  # planned images of those jobs

    def run(self, lines: Iterable[tuple[int, str]], planned_total: int) -> RunOutcome:
        self.outcome.planned = planned_total
        if self.settings.drafts:
            self.manifest = ManifestWriter(self.settings.out_dir / MANIFEST_NAME)
        self._read_done_files()
        try:
            self._take(self.backend(self._to_make(plan(lines, self.settings))))
            if self._to_collect:
                rebuy = self._collect_jobs()
                if rebuy:
                    self._take(self.backend(iter(rebuy)))
        finally:
            if self.manifest is not None:
                self.manifest.close()
        return self.outcome

    def _take(self, results: Results) -> None:
        """Write and record what the backend gives back; a run-ending error raises `StopRun`."""
        try:
            for image, result in results:
                if isinstance(result, FluxSchnellError):
                    code = self.ends_run(result)
                    self._failed(image, result, announce=code is None)  # else the stop message says it
                    if code is not None:
                        raise StopRun(str(result), code)
                else:
                    self._write(image, result)
                del result
        finally:
            results.close()  # stops the backend: nothing more is sent

    def _collect_jobs(self) -> list[PlannedImage]:
        """Collect the jobs earlier runs paid for (GETs only), at most `concurrency` at once, each
        written and recorded as it finishes. Returns the images to buy again: jobs the service
        reports gone, only with `rebuy_expired`. A stop leaves the rest uncollected (not run)."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        collector = self.collector
        if collector is None or collector.stopped():
            return []
        jobs = iter(self._to_collect)
        rebuy: list[PlannedImage] = []
        running: dict = {}  # future -> (planned image, poll URL)
        pool = ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="flux-schnell-collect")
        try:
            while True:
                while len(running) < self.settings.concurrency and not collector.stopped():
                    job = next(jobs, None)
                    if job is None:
                        break
                    running[pool.submit(collector.collect, *job)] = job
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    planned, poll_url = running.pop(future)
                    try:
                        image = future.result()
                    except GenerationInterrupted:
                        continue  # stopped: still recorded, for the next run
                    except FluxSchnellError as e:  # an ApiError, or a recorded URL refused
                        if self._job_not_collected(planned, poll_url, e):
                            rebuy.append(planned)
                        continue
                    self._write(planned, image, collected_from=poll_url)
                    del image
        finally:
            collector.cancel()  # polls still running end at once
            pool.shutdown(wait=True)
        self._to_collect = []
        return rebuy

    def _job_not_collected(self, planned: PlannedImage, poll_url: str, error: Exception) -> bool:
        """Say why the job of `planned` was not collected; record it failed with its poll URL kept
        (nothing paid this run), unless it is bought again: returns True for that."""
        host = self.collector.host(poll_url)
        reason = f"{type(error).__name__}: {error}"
        if job_state(error) == JOB_RUNNING:
            self.progress.note(
                f"{planned.label}: the job an earlier run paid for (poll URL on {host}) is not finished yet "
                f"({reason}); not bought again: run the same command again later to collect it"
            )
        elif self.settings.rebuy_expired:
            self.progress.note(
                f"{planned.label}: the job an earlier run paid for (poll URL on {host}) is gone ({reason}); "
                "requesting the image again (--rebuy-expired: paid again)"
            )
            return True
        else:
            self.progress.note(
                f"{planned.label}: the job an earlier run paid for (poll URL on {host}) is gone ({reason}); "
                "not bought again without your say: `flux-schnell generate` into this folder with "
                "--rebuy-expired requests it again (paid)"
            )
        self._failed(planned, error, announce=False, poll_url=poll_url)
        return False

    def count_plan(self, lines: Iterable) -> PlanCount:
        """What `run` would send, writing nothing (no manifest, no file, no request): the lines
        are planned, repeats and files already done are taken out as `run` takes them out."""
        self._read_done_files()
        count = PlanCount()
        for _ in self._to_make(plan(lines, self.settings)):
            count.to_request += 1
        count.to_collect = len(self._to_collect)
        count.duplicates = self.outcome.duplicates + sum(len(waiting) for waiting in self._waiting.values())
        count.already_done = self.outcome.skipped
        count.images = count.to_request + count.to_collect + count.duplicates + count.already_done
        return count

    def _read_done_files(self) -> None:
        if not self.settings.drafts:
            return
        collect = self.settings.backend == "api"
        for record in read_manifest(self.settings.out_dir / MANIFEST_NAME):
            name, size = record.get("file"), record.get("bytes")
            if record["status"] == RecordStatus.DONE and isinstance(name, str) and isinstance(size, int):
                self._done_files[name] = size
            if (
                collect
                and isinstance(name, str)
                and record["status"] in (RecordStatus.DONE, RecordStatus.FAILED)
            ):
                poll_url = record.get("poll_url")  # the last record of a file is what holds
                if record["status"] == RecordStatus.FAILED and isinstance(poll_url, str) and poll_url:
                    self._jobs[name] = poll_url
                else:
                    self._jobs.pop(name, None)

    # planning: what to send

    def _to_make(self, planned: Iterator[PlannedImage]) -> Iterator[PlannedImage]:
        """The planned images the backend must make: not on disk, not a repeat of another line, in
        this run's shard. A line of another shard is not recorded, but it still counts as the first
        occurrence of its request, so a repeat of it in this shard is a duplicate of that line (the
        shard that owns it pays for it), never paid twice."""
        for image in planned:
            if not self.settings.in_shard(image.line):
                if image.key not in self._waiting:
                    self._seen.setdefault(image.key, image.line)
                continue
            if image.key in self._waiting:  # its first occurrence is being made now
                self._waiting[image.key].append(image)
                continue
            if image.key in self._seen:
                self._duplicate(image, self._seen[image.key], self._first_failed.get(image.key))
                continue
            if self._on_disk(image) if self.settings.drafts else self._made_before(image):
                self._seen[image.key] = image.line
                self.outcome.skipped += 1
                self.progress.advance(skipped=True)
                continue
            self._waiting[image.key] = []
            poll_url = self._jobs.get(image.path.name) if self.settings.drafts else None
            if poll_url is not None:  # paid for by an earlier run: collected, never bought here
                self._to_collect.append((image, poll_url))
                continue
            yield image

    def _made_before(self, planned: PlannedImage) -> bool:
        """`--out` runs: `planned.path` is whole and was written for this very request (its identity chunk),
        so a re-run after a failed batch requests only the missing images and overwrites none."""
        try:
            text = png_files.read_png_text(planned.path)
        except FileNotFoundError:
            return False
        except png_files.UNREADABLE:
            return False
        return text.get(IDENTITY_CHUNK) == f"{planned.key:016x}" and png_files.is_complete_png(planned.path)

    def _on_disk(self, planned: PlannedImage) -> bool:
        try:
            size = planned.path.stat().st_size
        except OSError:
            return False
        if self._done_files.get(planned.path.name) == size:
            return True
        if not png_files.is_complete_png(planned.path):
            return False  # damaged, or a file of another kind: made again
        self._record(
            planned, RecordStatus.DONE, bytes=size, found_on_disk=True
        )  # written, then the run was killed
        return True

    # what came back

    def _write(self, planned: PlannedImage, result: FinishedImage, collected_from: str | None = None) -> None:
        """Write one finished image; a disk that refuses it ends the run (the rest would be lost).
        `collected_from`: the poll URL of the earlier run's job it came from (nothing paid now)."""
        text = png_text_for(planned, self.settings, result.request_id)
        other_size = None
        if result.size_differs:  # kept (it was paid for), never silently: said and recorded
            other_size = list(result.size)
            self.progress.note(
                f"{planned.label}: the service sent {result.size[0]}x{result.size[1]}, not the "
                f"{planned.request.width}x{planned.request.height} asked for; kept as sent"
            )
        try:
            if result.format == "PNG" and result.data is not None:
                png_files.save_png_bytes(result.data, planned.path, text)
            else:
                png_files.save_png(result.image, planned.path, text)
            size = planned.path.stat().st_size
        except (OSError, ValueError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            self._failed(planned, e, announce=False)
            raise StopRun(f"cannot write {planned.path}: {reason}", 1) from e
        if self.settings.drafts:
            try:
                png_files.save_thumbnail(
                    result.image, thumbnail_path(self.settings.out_dir, planned.path.name)
                )
            except OSError as e:  # the image is safe; the gallery makes the thumbnail later
                log.warning("could not write the thumbnail of %s: %s", planned.path.name, e)
        else:
            self.outcome.written.append(planned.path)
        self.outcome.done += 1
        calls = _call_fields(result.calls, self.settings.backend)
        if collected_from is not None:
            self.outcome.collected += 1
            calls.pop("poll_url", None)  # done: nothing left to collect
            calls["collected_from"] = collected_from
        self._record(
            planned,
            RecordStatus.DONE,
            bytes=size,
            attempts=result.attempts,
            **calls,
            seconds=round(result.seconds, 3),
            size_sent=other_size,
            request_id=result.request_id,
        )
        self.progress.advance()
        self._settle(planned, None)

    def _failed(
        self, planned: PlannedImage, error: Exception, announce: bool = True, poll_url: str | None = None
    ) -> None:
        """Record `planned` failed; `poll_url`: its uncollected job's, kept so a later run collects it."""
        reason = f"{type(error).__name__}: {error}"
        self.outcome.failed_count += 1
        if len(self.outcome.failed) < MAX_FAILURES_LISTED:
            self.outcome.failed.append((planned, reason))
        calls = _call_fields(getattr(error, "calls", None), self.settings.backend)
        if poll_url is not None:  # a collect that failed: nothing was paid in this run
            calls = {**calls, "paid_calls": 0, "free_retries": 0, "poll_url": poll_url}
        self._record(planned, RecordStatus.FAILED, error=reason, **calls)
        self.progress.advance(failed=True)
        if announce:  # at once, above the bar; the summary lists it again at the end
            self.progress.note(f"{planned.label}{self.settings.seed_note(planned)} failed: {reason}")
        self._settle(planned, reason)

    def _settle(self, planned: PlannedImage, failed: str | None) -> None:
        """The first occurrence of a request finished: record the duplicates that waited for it."""
        self._seen[planned.key] = planned.line
        if failed is not None:
            self._first_failed[planned.key] = failed
        for duplicate in self._waiting.pop(planned.key, []):
            self._duplicate(duplicate, planned.line, failed)

    def _duplicate(self, planned: PlannedImage, first_line: int, failed: str | None) -> None:
        self.outcome.duplicates += 1
        extra = {"error": f"same request as line {first_line}, which failed: {failed}"} if failed else {}
        self._record(planned, RecordStatus.DUPLICATE, duplicate_of=first_line, **extra)
        self.progress.advance(duplicate=True)

    def _record(self, planned: PlannedImage, status: str, **fields) -> None:
        if self.manifest is None:
            return
        record = {
            "line": planned.line,
            "prompt": planned.prompt,
            "status": status,
            "file": planned.path.name,
            "width": planned.request.width,
            "height": planned.request.height,
            "steps": planned.request.steps,
            "backend": self.settings.backend,
        }
        if self.settings.seed_recorded:
            record["seed"] = planned.seed
        if self.settings.backend == "api":  # a re-render from this manifest can reproduce only sent seeds
            record["seed_sent"] = self.settings.seed_sent
        record.update({k: v for k, v in fields.items() if v is not None})
        self.manifest.append(record)
