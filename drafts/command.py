"""The body of the command line's commands: `generate`, `gallery`, `set-key`, `config`.

cli.py parses and checks the flags, then calls these with typed objects (never argparse's
namespace): `generate` takes the `RunSettings` (its `GenerationRequest` template, the output, the
concurrency), the prompt or prompts file and, for the local backend, the `LocalModelSpec`.

Everything the user gives is checked before anything is paid for or created: the output paths, the
prompts (every line of a prompts file), the sizes, the API key or the local backend's packages.
Only then are folders made and the run started (drafts/run.py).
"""

from __future__ import annotations

import getpass
import logging
import os
import signal
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from ..errors import (
    FluxSchnellError,
    GenerationInterrupted,
    InvalidInputError,
    LocalBackendUnavailable,
)

# One exit code per class of failure, the same in the code, each command's --help and the README.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ACCOUNT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_MEANINGS = {
    EXIT_OK: "every image is done (or was already on disk)",
    EXIT_FAILED: "some images failed or were not made (the service unreachable, a disk full): run the "
    "same command again to resume",
    EXIT_USAGE: "bad input, a usage or configuration error, missing weights or packages: nothing was "
    "paid for",
    EXIT_ACCOUNT: "the service refused the API key or the account has no credits left",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C): finished images are kept; run the same command again",
}
# The exit codes each command can end with.
COMMAND_EXIT_CODES = {
    "generate": (EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ACCOUNT, EXIT_INTERRUPTED),
    "gallery": (EXIT_OK, EXIT_USAGE),
    "report": (EXIT_OK, EXIT_USAGE),
    "config": (EXIT_OK, EXIT_USAGE),
    "set-key": (EXIT_OK, EXIT_USAGE),
}


def exit_codes_help(command: str) -> str:
    """The `exit codes:` block of one command's --help."""
    lines = ["exit codes:"]
    lines += [f"  {code:<3}  {EXIT_MEANINGS[code]}" for code in COMMAND_EXIT_CODES[command]]
    return "\n".join(lines)


OUT_SUFFIX = ".png"  # the prompt, seed and model go into PNG text chunks
log = logging.getLogger("flux_schnell.cli")


# --- set-key, config, gallery ---------------------------------------------------------------------


def set_key_command() -> int:
    from ..api import save_api_key

    interactive = sys.stdin.isatty()
    key = getpass.getpass("ImageAPI key (input hidden): ") if interactive else sys.stdin.readline()
    path = save_api_key(key.strip())
    print(f"saved the API key to {path} (readable by you only)")
    return EXIT_OK


def config_command() -> int:
    """Every setting with its value and where it came from (environment variable, which config
    file, default), with or without a key; then the settings' own check."""
    from ..api import (
        config_search_paths,
        default_config_path,
        describe_settings,
        load_settings,
        missing_key_message,
        scrub,
    )

    looked = config_search_paths()
    files = ", ".join(f"{scrub(str(p), key_like=True)}{'' if p.is_file() else ' (none)'}" for p in looked)
    print(f"config files read, first found wins: {files}")
    print(f"set-key writes:  {scrub(str(default_config_path()), key_like=True)}")
    lines = describe_settings()
    for line in lines:
        label = "API key:" if line.name == "api_key" else f"{line.name}:"
        print(f"{label:<16} {line.value}  (from {line.source})")
    if lines[0].value == "not set":
        print(
            "\n".join("  " + line for line in missing_key_message(looked, _first_file(looked)).splitlines())
        )
        return EXIT_OK
    load_settings()  # the checks a run makes: a ConfigurationError is printed by main (exit 2)
    return EXIT_OK


def _first_file(paths: list[Path]) -> Path | None:
    return next((path for path in paths if path.is_file()), None)


def gallery_command(folder: Path) -> int:
    from .gallery import write_gallery

    if not folder.is_dir():
        raise InvalidInputError(f"gallery: {folder} is not a folder; give the --out-dir of a draft run.")
    stats = write_gallery(folder)
    print(
        f"wrote {stats.path}: {stats.images} image(s), {stats.failures} failed line(s), "
        f"{stats.thumbnails_made} new thumbnail(s)"
    )
    return EXIT_OK


# --- generate -------------------------------------------------------------------------------------


def report_command(folder: Path, csv_path: Path | None = None) -> int:
    """What a draft folder's runs cost, from its manifest (drafts/report.py), on stdout."""
    from .manifest import MANIFEST_NAME
    from .report import write_report

    if not (folder / MANIFEST_NAME).is_file():
        raise InvalidInputError(
            f"report: {folder} has no {MANIFEST_NAME}; give the --out-dir of a draft run."
        )
    if csv_path is not None:
        _check_output_folder(csv_path.parent if str(csv_path.parent) else Path("."), "--csv")
    report = write_report(folder, csv_path)
    print(f"images delivered:                    {report.delivered}")
    if report.collected:
        print(f"  of those, collected by a re-run:   {report.collected} (jobs paid for once)")
    print(f"calls that may have been billed:     {report.paid_calls}")
    print(f"  of those, without an image:        {report.paid_without_image}")
    for row in report.listed:
        rid = row["request_id"] or "no request id"
        print(f"    {row['time']}  line {row['line']}  {row['status']}  {rid}  {row['file']}")
    if report.paid_without_image > len(report.listed):
        print(f"    ... and {report.paid_without_image - len(report.listed)} more (--csv lists them all)")
    print(f"free retries (not billed):           {report.free_retries}")
    print(f"duplicates (requested once):         {report.duplicates}")
    print(f"failures:                            {report.failures}")
    if report.records_without_billing:
        print(
            f"records without a billing record:    {report.records_without_billing} "
            "(local backend, or older runs)"
        )
    if csv_path is not None:
        print(f"wrote {csv_path}: one row per call that may have been billed")
    return EXIT_OK


def generate_command(
    run_settings,
    prompt: str | None,
    prompts_file: Path | None,
    spec=None,
    *,
    dry_run: bool = False,
    max_images: int | None = None,
) -> int:
    """Check, prepare and run one `generate`: `run_settings` is a drafts.run.RunSettings, `spec` the
    local.files.LocalModelSpec for the local backend (None for the api). `dry_run` prints the plan
    and sends nothing; `max_images` (else the config's `max_images_per_run`) refuses a run that
    would send more paid requests, before any."""
    from .prompts import PromptLine, PromptsFile, check_prompts_file, read_prompt_lines
    from .run import line_request

    template = run_settings.request
    backend = run_settings.backend

    # 1. Where the images go: checked, nothing created yet.
    if run_settings.out is not None:
        _check_out_file(run_settings.out)
    else:
        _check_output_folder(run_settings.out_dir, "--out-dir")

    # 2. What to generate: every input, every line of a prompts file (a JSONL line's overrides too).
    def check(entry: PromptLine) -> None:
        line_request(entry, run_settings)[0].validate(backend)

    try:  # the flags: an error names the flag typed, not the service's field
        check(PromptLine(1, prompt) if prompt is not None else PromptLine(0, "x"))
    except InvalidInputError as e:
        raise InvalidInputError(_named_by_flag(str(e))) from None
    # Then each line of a prompts file (a JSONL line's own fields keep their names).
    found = PromptsFile(1) if prompt is not None else check_prompts_file(prompts_file, check)

    # 3. What the backend needs: the key (read here, where the program starts) or the packages.
    if backend == "api":
        from ..api import load_settings

        api_settings = load_settings()
        run_settings = replace(run_settings, seed_sent=api_settings.send_seed)
        if not api_settings.send_seed:  # said once: no file, manifest or gallery will claim a seed
            log.info(
                "the service chooses each image's seed (it does not document one and send_seed is off "
                'in the config), so no seed is recorded; set "send_seed": true to send yours.'
            )
        if found.seeded and not api_settings.send_seed:
            log.warning(
                "%s gives seeds for %d line(s), but the service does not receive seeds (send_seed is "
                "off in the config): it chooses its own, so these images will not match those seeds.",
                prompts_file,
                found.seeded,
            )
    else:
        from ..local import require_local_packages

        require_local_packages()
        api_settings = None
    if found.unsent_seeds:  # said before anything is paid: a re-render cannot reproduce those drafts
        log.warning(
            "%s: the seeds of %d draft(s) were not sent to the service (it chose them), so rendering "
            "them again makes new images, not these drafts at another quality; the command line's seed "
            "is used for them.",
            prompts_file,
            found.unsent_seeds,
        )

    def lines():
        if prompts_file is not None:  # what was checked, not what was appended since
            return read_prompt_lines(prompts_file, found.last_line)
        return [(1, prompt.strip())]

    count = found.count
    if run_settings.shard is not None:  # its own lines only (read again, lazily: nothing is held)
        count = sum(1 for entry in lines() if run_settings.in_shard(entry.line))
        k, n = run_settings.shard
        log.info("shard %d/%d: %d of the %d prompts of %s", k, n, count, found.count, prompts_file)

    # 4. What it would cost: the plan after repeats and earlier runs, before anything is sent.
    limit = max_images
    if limit is None and api_settings is not None:
        limit = api_settings.max_images_per_run
    if dry_run or (limit is not None and backend == "api"):
        plan_count = _count_plan(run_settings, lines())
        price = api_settings.price_per_image if api_settings is not None else None
        if dry_run:
            _print_plan(plan_count, count, backend, price)
            return EXIT_OK
        # Collecting a job an earlier run paid for is not paid; with --rebuy-expired each may be
        # bought again (if the service reports it gone), so the guard counts them then.
        paid = plan_count.to_request + (plan_count.to_collect if run_settings.rebuy_expired else 0)
        if paid > limit:
            flag = "--max-images" if max_images is not None else "max_images_per_run in the config file"
            rebuys = (
                f", {plan_count.to_collect} job(s) to collect that --rebuy-expired may buy again"
                if run_settings.rebuy_expired and plan_count.to_collect
                else ""
            )
            raise InvalidInputError(
                f"this run would send {paid} paid request(s) ({plan_count.images} "
                f"image(s) planned, {plan_count.duplicates} repeat(s), {plan_count.already_done} already "
                f"done{rebuys}), more than {flag} allows ({limit}); nothing was sent. Raise {flag}, or "
                "split the prompts file (--dry-run shows the plan)."
            )

    # 5. Only now: folders, the lock, and what a killed run left behind.
    lock = _prepare_folders(run_settings)
    try:
        return _run(run_settings, api_settings, spec, lines(), count * template.batch_size)
    finally:
        if lock is not None:
            lock.release()


# The request's fields and the flags that set them.
FLAG_OF_FIELD = {
    "prompt": "--prompt",
    "width": "--width",
    "height": "--height",
    "num_inference_steps": "--steps",
    "seed": "--seed",
    "batch_size": "--batch-size",
}


def _named_by_flag(message: str) -> str:
    """`message` with the field it starts with named by its flag ("--steps must be ...")."""
    field, _, rest = message.partition(" ")
    flag = FLAG_OF_FIELD.get(field)
    return f"{flag} {rest}" if flag else message


class _Silent:
    """The progress a counting pass reports to: nothing is shown."""

    def advance(self, **_kinds) -> None:
        pass

    def note(self, text: str) -> None:
        pass


def _count_plan(run_settings, lines):
    from .run import DraftRun

    def no_backend(planned):  # never called by count_plan: it sends nothing
        raise AssertionError("a counting pass has no backend")

    return DraftRun(run_settings, no_backend, _Silent(), lambda error: None).count_plan(lines)


def _print_plan(count, lines: int, backend: str, price: float | None) -> None:
    """The plan on stdout (it is the command's result), in the words of the summary."""
    print(f"dry run: nothing sent, nothing written ({backend} backend)")
    print(f"  prompt lines:        {lines}")
    print(f"  images planned:      {count.images}")
    print(f"  repeats (sent once): {count.duplicates}")
    print(f"  already done:        {count.already_done}")
    paid = " (each may be billed)" if backend == "api" else ""
    if count.to_collect:
        print(f"  to collect:          {count.to_collect} (jobs an earlier run paid for; not billed again)")
    print(f"  to request:          {count.to_request}{paid}")
    if backend == "api" and price is not None:
        print(f"  estimated cost:      {count.to_request * price:.4g} (price_per_image {price:g})")


def _check_out_file(out: Path) -> None:
    if out.is_dir():
        raise InvalidInputError(f"--out {out} is a folder; name a file in it, like {out / 'image.png'}.")
    if out.suffix.lower() != OUT_SUFFIX:
        raise InvalidInputError(
            f"--out {out}: only PNG files are written (the prompt, seed and model go into their text "
            f"chunks); name the file {out.with_suffix(OUT_SUFFIX).name}."
        )
    _check_output_folder(out.parent, "--out")


def _check_output_folder(folder: Path, flag: str) -> None:
    """Refuse a folder that cannot take the images, without creating anything."""
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError(f"{flag}: {folder} exists and is not a folder; choose another {flag}.")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidInputError(
            f"{flag}: cannot create {folder}: {existing} is not a folder; choose another {flag}."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidInputError(
            f"{flag}: cannot write images to {folder}: {existing} is not writable; choose another {flag}."
        )
    if flag == "--out-dir":
        from .manifest import MANIFEST_NAME, check_manifest_file

        check_manifest_file(folder / MANIFEST_NAME, flag)


def _prepare_folders(run_settings):
    """Make the folders, lock a draft folder (drafts/lock.py: a second run into it exits 2 naming
    the first) and remove what a killed run left; returns the lock (None for `--out`)."""
    from .gallery import THUMBS_DIR
    from .lock import FolderLock
    from .png_files import remove_stale_parts

    drafts = run_settings.drafts
    folder = run_settings.out_dir if drafts else run_settings.out.parent
    flag = "--out-dir" if drafts else "--out"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
        if drafts:
            (folder / THUMBS_DIR).mkdir(exist_ok=True)
    except OSError as e:
        raise InvalidInputError(
            f"{flag}: cannot write images to {folder}: {e.strerror}; choose another {flag}."
        ) from e
    lock = None
    if drafts:
        lock = FolderLock(folder, shard=run_settings.shard, flag=flag)
        lock.acquire()
        removed = remove_stale_parts(folder) + remove_stale_parts(folder / THUMBS_DIR)
    else:
        out = run_settings.out
        removed = []
        batch = run_settings.request.batch_size
        for name in {out.name} | {f"{out.stem}-{b + 1}{out.suffix}" for b in range(batch)}:
            removed += remove_stale_parts(folder, name)
    if removed:
        log.info("removed %d unfinished file(s) left by an interrupted run", len(removed))
    return lock


def _progress_handler():
    from .progress import ProgressLogHandler

    return next((h for h in logging.getLogger().handlers if isinstance(h, ProgressLogHandler)), None)


def _run(run_settings, api_settings, spec, lines, planned: int) -> int:
    from .progress import TerminalProgress
    from .run import DraftRun, StopRun, api_backend, local_backend

    progress = TerminalProgress(planned)
    handler = _progress_handler()
    if handler is not None:
        handler.progress = progress
    stop = threading.Event()
    stop_request = None  # the api's graceful stop (api.control.StopRequest)
    if run_settings.backend == "api":
        from ..api_client import ends_the_run
        from ..errors import ServiceUnreachableError

        def ends_run(error: FluxSchnellError) -> int | None:
            if isinstance(error, ServiceUnreachableError):  # nothing was made: run again later
                return EXIT_FAILED
            return EXIT_ACCOUNT if ends_the_run(error) else None  # a refused key, no credits left

        from ..api import StopRequest

        stop_request = StopRequest()
        backend = api_backend(
            api_settings, run_settings, stop, on_event=_show_event(progress), stop_request=stop_request
        )
    else:
        from ..errors import ModelLoadError

        def ends_run(error: FluxSchnellError) -> int | None:
            return EXIT_USAGE if isinstance(error, (ModelLoadError, LocalBackendUnavailable)) else None

        backend = local_backend(spec, run_settings, stop)

    collector = None
    if run_settings.backend == "api" and run_settings.drafts:
        from .run import JobCollector

        collector = JobCollector(api_settings, stop, stop_request)
    run = DraftRun(run_settings, backend, progress, ends_run, collector)
    signals = StopSignals(stop, stop_request)
    signals.install()
    try:
        run.run(lines, planned)
        if stop_request is not None and stop_request.draining:  # drained: what was paid is written
            progress.note(
                f"stopped: the answers already paid for are written; {stop_request.not_sent} image(s) "
                "were not sent: run the same command again to make them"
            )
            run.outcome.exit_code = EXIT_INTERRUPTED
    except GenerationInterrupted as e:
        progress.note(f"interrupted ({e}): finished images are kept; run the same command again to resume")
        run.outcome.exit_code = EXIT_INTERRUPTED
    except StopRun as e:
        progress.note(f"error: {e}\nstopped: the remaining images would fail the same way.")
        run.outcome.exit_code = e.exit_code
        run.outcome.stop_message = str(e)  # said once: the summary does not list it again
    finally:
        signals.restore()
        progress.close()
        if handler is not None:
            handler.progress = None
    return _summary(run.outcome, run_settings)


def _show_event(progress):
    from ..api import EventKind

    def on_event(event) -> None:
        if event.kind in (EventKind.RATE_LIMITED, EventKind.RETRYING, EventKind.WAITING):
            progress.waiting_on(event.label, event.kind)
        elif event.kind in (EventKind.STARTED, EventKind.DONE, EventKind.FAILED):
            progress.waiting_on(event.label, None)

    return on_event


class StopSignals:
    """Ctrl-C and SIGTERM during a run. On the api (`stop_request`): the first stops sending and
    waits for the answers in flight, which may have been paid for, so they are written and recorded;
    the second abandons them. On the local backend (`stop_event`): the first stops after the current
    step, the second raises KeyboardInterrupt."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop_event: threading.Event, stop_request=None):
        self.stop_event = stop_event
        self.stop_request = stop_request
        self._previous: dict = {}

    def install(self) -> None:
        self._previous = {number: signal.signal(number, self) for number in self.SIGNALS}

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def __call__(self, number, frame) -> None:
        if self.stop_request is None:
            if self.stop_event.is_set():
                self.restore()
                raise KeyboardInterrupt
            self.stop_event.set()
            print("\nstopping after the current image (Ctrl-C again to abort at once)...", file=sys.stderr)
            return
        self.stop_request.request()
        if not self.stop_request.abandoned:
            waiting = self.stop_request.count_in_flight()
            print(
                f"\nstopping: waiting for {waiting} answer(s) already paid for; Ctrl-C again to abandon them",
                file=sys.stderr,
            )
        else:
            print("\nabandoning the answers in flight...", file=sys.stderr)


def _summary(outcome, run_settings) -> int:
    from .gallery import GALLERY_NAME, write_gallery
    from .manifest import MANIFEST_NAME

    err = sys.stderr
    out_dir = run_settings.out_dir
    if outcome.skipped:
        where = out_dir if out_dir is not None else run_settings.out.parent
        print(f"{outcome.skipped} image(s) already done in {where}, skipped", file=err)
    not_run = outcome.not_run
    print(
        f"done: {outcome.done}, failed: {outcome.failed_count}, duplicates (requested once): "
        f"{outcome.duplicates}, skipped (already done): {outcome.skipped}"
        + (f", not run: {not_run}" if not_run else ""),
        file=err,
    )
    if outcome.collected:
        print(
            f"collected: {outcome.collected} image(s) from jobs an earlier run paid for (no new request)",
            file=err,
        )
    for planned, reason in outcome.failed:
        if outcome.stop_message and reason.endswith(outcome.stop_message):
            continue  # the error that ended the run, printed once already
        print(f"  failed {planned.label}{run_settings.seed_note(planned)}: {reason}", file=err)
    if outcome.failed_count > len(outcome.failed):
        print(f"  ... and {outcome.failed_count - len(outcome.failed)} more", file=err)
    if run_settings.drafts:
        try:
            gallery = write_gallery(out_dir)
        except OSError as e:
            print(f"could not write the gallery: {e}", file=err)
        else:
            # The run's result: on stdout, so a script can capture where the images went.
            print(
                f"images in {out_dir}; every line in {out_dir / MANIFEST_NAME}; "
                f"review them in {out_dir / GALLERY_NAME} ({gallery.images} image(s))"
            )
    else:
        for path in outcome.written:
            print(f"wrote {path}")
    if outcome.exit_code is not None:
        return outcome.exit_code
    return EXIT_OK if not outcome.failed_count and not not_run else EXIT_FAILED
