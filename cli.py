"""The `flux-schnell` command line: the node's generation outside ComfyUI.

    flux-schnell generate --prompt TEXT --out FILE.png [--backend api|local] [--width W]
                          [--height H] [--steps N] [--seed S] [--batch-size B]
    flux-schnell generate --prompts-file FILE --out-dir DIR [--concurrency N] [...]
    flux-schnell set-key            (reads the API key from standard input)
    flux-schnell config             (where the key and base URL come from; never the key)

Draft runs (`--prompts-file`) are resumable: each image is written atomically as soon as it is
done, and a re-run skips the images already on disk. Exit codes: 0 all done, 1 some images failed
(or the run was interrupted), 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import logging
import random
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._version import __version__
from .errors import ConfigurationError, FluxSchnellError, GenerationInterrupted, InvalidInputError
from .generation import BACKENDS, MODEL_NAME, GenerationRequest

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
log = logging.getLogger("flux_schnell.cli")


@dataclass
class Job:
    """One image to make: prompt, seed and where it goes."""

    prompt: str
    seed: int
    path: Path
    label: str


@dataclass
class Outcome:
    done: int = 0
    skipped: int = 0
    failed: list[tuple[Job, str]] = field(default_factory=list)
    exit_code: int | None = None  # set when the run stopped early for a reason that ends it


class StopRun(Exception):
    """Ends a run early: every remaining image would fail the same way."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flux-schnell", description="FLUX.1 [schnell] images from the command line."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images")
    what = gen.add_argument_group("what to generate")
    one = what.add_mutually_exclusive_group(required=True)
    one.add_argument("--prompt", help="the prompt (one run)")
    one.add_argument("--prompts-file", type=Path, help="a text file, one prompt a line (drafts)")
    where = gen.add_argument_group("where to write")
    where.add_argument("--out", type=Path, help="output PNG for --prompt")
    where.add_argument("--out-dir", type=Path, help="output folder for --prompts-file")
    params = gen.add_argument_group("generation")
    params.add_argument("--backend", choices=BACKENDS, default="api")
    params.add_argument("--width", type=int, default=1024)
    params.add_argument("--height", type=int, default=1024)
    params.add_argument("--steps", type=int, default=4, help="1..8 (4: fast, 8: quality)")
    params.add_argument("--seed", type=int, help="seed of the first image (default: random)")
    params.add_argument("--batch-size", type=int, default=1, help="images per prompt")
    params.add_argument("--concurrency", type=int, default=4, help="api requests in flight at once (1..16)")
    local = gen.add_argument_group("local backend")
    local.add_argument("--checkpoint", type=Path, help="all-in-one FLUX.1-schnell checkpoint")
    local.add_argument("--transformer", type=Path, help="flux1-schnell.safetensors")
    local.add_argument("--t5", type=Path, help="t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn")
    local.add_argument("--clip", type=Path, help="clip_l.safetensors")
    local.add_argument("--ae", type=Path, help="ae.safetensors")
    local.add_argument("--t5-tokenizer", type=Path, help="folder with the T5 tokenizer")
    local.add_argument("--clip-tokenizer", type=Path, help="folder with the CLIP tokenizer")
    local.add_argument(
        "--dtype",
        choices=("as-stored", "bf16", "fp8_e4m3fn"),
        default="as-stored",
        help="how transformer and T5 weights are kept in memory",
    )
    local.add_argument("--device", help="cuda, cuda:1, cpu (default: the first GPU, else cpu)")
    local.add_argument(
        "--compile", action="store_true", help="torch.compile the transformer (slow first image)"
    )

    sub.add_parser("set-key", help="save the ImageAPI key (read from standard input)")
    sub.add_parser("config", help="show where the settings come from (never the key)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "set-key":
            return _set_key()
        if args.command == "config":
            return _show_config()
        return _generate(parser, args)
    except (ConfigurationError, InvalidInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _set_key() -> int:
    from .settings import save_api_key

    interactive = sys.stdin.isatty()
    key = getpass.getpass("ImageAPI key (input hidden): ") if interactive else sys.stdin.readline()
    path = save_api_key(key.strip())
    print(f"saved the API key to {path} (readable by you only)")
    return EXIT_OK


def _show_config() -> int:
    from .settings import config_search_paths, default_config_path, load_settings

    looked = ", ".join(f"{p}{'' if p.is_file() else ' (none)'}" for p in config_search_paths())
    print(f"config files read, first found wins: {looked}")
    print(f"set-key writes:  {default_config_path()}")
    settings = load_settings()
    print(f"API key:         set (from {settings.key_source})")
    print(f"base URL:        {settings.base_url}")
    print(f"send seed:       {settings.send_seed}")
    return EXIT_OK


def _generate(parser: argparse.ArgumentParser, args) -> int:
    if args.prompt is not None and args.out is None:
        parser.error("--prompt needs --out FILE.png")
    if args.prompts_file is not None and args.out_dir is None:
        parser.error("--prompts-file needs --out-dir DIR")
    if not 1 <= args.concurrency <= 16:
        parser.error("--concurrency must be between 1 and 16")
    seed = args.seed if args.seed is not None else random.randint(0, 2**32 - 1)
    lines = [(1, args.prompt)] if args.prompt is not None else _read_prompts(args.prompts_file)
    # Validate everything, and that the images can be written, before the first (paid) request.
    for _, prompt in lines:
        GenerationRequest(prompt, args.width, args.height, args.steps, seed, args.batch_size).validate(
            args.backend
        )
    _check_writable(args.out.parent if args.out is not None else args.out_dir)

    jobs = _plan(lines, seed, args)
    resumable = args.prompts_file is not None
    outcome = Outcome()
    pending = []
    for job in jobs:
        if resumable and job.path.exists():
            from .images import is_complete_png

            if is_complete_png(job.path):
                outcome.skipped += 1
                continue
        pending.append(job)
    if outcome.skipped:
        print(f"{outcome.skipped} image(s) already done in {args.out_dir}, skipped", file=sys.stderr)

    bar = _ProgressLine(len(pending))
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: _first_interrupt(stop, previous))
    try:
        runner = _run_api if args.backend == "api" else _run_local
        runner(pending, args, outcome, bar, stop)
    except GenerationInterrupted:
        print("\ninterrupted: finished images are kept; run again to resume", file=sys.stderr)
    except StopRun as e:
        print(f"\nerror: {e}\nstopped: the remaining images would fail the same way.", file=sys.stderr)
        outcome.exit_code = e.exit_code
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    return _summary(outcome, len(pending))


def _first_interrupt(stop: threading.Event, previous) -> None:
    """First Ctrl-C: stop gracefully (keep what is done); a second one aborts at once."""
    if stop.is_set():
        signal.signal(signal.SIGINT, previous)
        raise KeyboardInterrupt
    stop.set()
    print("\nstopping (Ctrl-C again to abort at once)...", file=sys.stderr)


def _read_prompts(path: Path) -> list[tuple[int, str]]:
    """(line number, prompt) for every prompt line; blank lines and '#' comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidInputError(f"--prompts-file {path}: cannot read it ({e.strerror})") from e
    lines = [
        (n, line.strip())
        for n, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise InvalidInputError(f"--prompts-file {path} has no prompts (one a line; '#' starts a comment)")
    return lines


def _check_writable(folder: Path) -> None:
    """Refuse a folder that cannot take the images before any (paid) work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise InvalidInputError(
            f"cannot write images to {folder}: {e.strerror}; choose another --out/--out-dir"
        ) from e


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "prompt"


def _plan(lines: list[tuple[int, str]], seed: int, args) -> list[Job]:
    """One job per image. Draft files are named by prompt and settings, not by position, so
    editing other lines of the prompts file never renames (and re-buys) finished images."""
    jobs = []
    for line, prompt in lines:
        request = GenerationRequest(prompt, args.width, args.height, args.steps, seed, args.batch_size)
        for b, image_seed in enumerate(request.seeds):
            if args.prompts_file is None:
                out: Path = args.out
                path = out if args.batch_size == 1 else out.with_name(f"{out.stem}-{b + 1}{out.suffix}")
                label = f"image {b + 1}"
            else:
                suffix = "" if args.batch_size == 1 else f"-{b + 1}"
                path = args.out_dir / f"{_slug(prompt)}-{_settings_tag(prompt, args)}{suffix}.png"
                label = f"line {line}" + (f" image {b + 1}" if args.batch_size > 1 else "")
            jobs.append(Job(prompt, image_seed, path, label))
    return jobs


def _settings_tag(prompt: str, args) -> str:
    """8 hex digits naming what makes the image: prompt, size, steps, backend, the given seed."""
    what = [prompt, args.width, args.height, args.steps, args.backend, args.seed]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:8]


def _png_text(job: Job, args, backend: str, extra: dict | None = None) -> dict[str, str]:
    text = {
        "prompt": job.prompt,
        "seed": str(job.seed),
        "model": MODEL_NAME,
        "steps": str(args.steps),
        "backend": backend,
        "software": f"comfyui-flux-schnell {__version__}",
    }
    text.update({k: str(v) for k, v in (extra or {}).items() if v is not None})
    return text


def _run_api(jobs: list[Job], args, outcome: Outcome, bar, stop: threading.Event) -> None:
    from .api_backend import ABORT_BATCH, api_requests, client_for
    from .errors import AuthenticationError
    from .settings import load_settings

    if not jobs:
        return
    client = client_for(load_settings())
    requests = [
        api_requests(GenerationRequest(job.prompt, args.width, args.height, args.steps, job.seed))[0]
        for job in jobs
    ]

    def on_result(i: int, result) -> None:
        job = jobs[i]
        if isinstance(result, FluxSchnellError):
            _failed(outcome, bar, job, result)
            if isinstance(result, ABORT_BATCH):  # a refused key, no credits
                code = EXIT_USAGE if isinstance(result, AuthenticationError) else EXIT_FAILED
                raise StopRun(str(result), code)
            return
        _save(
            outcome,
            bar,
            job,
            result.image,
            _png_text(job, args, "api", {"request_id": result.request_id}),
        )

    client.generate_many(requests, concurrency=args.concurrency, should_stop=stop.is_set, on_result=on_result)


def _run_local(jobs: list[Job], args, outcome: Outcome, bar, stop: threading.Event) -> None:
    from .comfy_bridge import Progress
    from .errors import LocalBackendUnavailable, ModelLoadError
    from .images import tensor_to_pil
    from .local_backend import generate_local
    from .local_files import LocalModelSpec

    if not jobs:
        return
    spec = LocalModelSpec(
        checkpoint=args.checkpoint,
        transformer=args.transformer,
        t5=args.t5,
        clip=args.clip,
        ae=args.ae,
        t5_tokenizer=args.t5_tokenizer,
        clip_tokenizer=args.clip_tokenizer,
        weight_dtype="as stored" if args.dtype in (None, "as-stored") else args.dtype,
        device=args.device,
        compile=args.compile,
    )
    for job in jobs:  # models load once (the backend keeps them) and serve every prompt
        if stop.is_set():
            raise GenerationInterrupted("interrupted")
        request = GenerationRequest(job.prompt, args.width, args.height, args.steps, job.seed, 1)
        try:
            images, info = generate_local(request, spec, Progress(args.steps, stop_flag=stop))
        except (ModelLoadError, LocalBackendUnavailable) as e:  # the files, not this prompt
            _failed(outcome, bar, job, e)
            raise StopRun(str(e), EXIT_USAGE) from e
        except FluxSchnellError as e:
            if isinstance(e, (GenerationInterrupted, ConfigurationError)):
                raise
            _failed(outcome, bar, job, e)
            continue
        log.debug("%s: %s", job.label, info.to_json())  # timings, device, peak GPU memory
        _save(outcome, bar, job, tensor_to_pil(images)[0], _png_text(job, args, "local"))


def _failed(outcome: Outcome, bar, job: Job, error: Exception) -> None:
    outcome.failed.append((job, f"{type(error).__name__}: {error}"))
    bar.advance(failed=True)


def _save(outcome: Outcome, bar, job: Job, image, text: dict[str, str]) -> None:
    """Write one finished image; a disk that refuses it ends the run (the rest would be lost)."""
    from .images import save_png

    try:
        save_png(image, job.path, text)
    except OSError as e:
        _failed(outcome, bar, job, e)
        raise StopRun(f"cannot write {job.path}: {e.strerror or e}", EXIT_FAILED) from e
    outcome.done += 1
    bar.advance()


def _summary(outcome: Outcome, planned: int) -> int:
    not_run = planned - outcome.done - len(outcome.failed)
    print(
        f"done: {outcome.done}, failed: {len(outcome.failed)}, skipped (already done): "
        f"{outcome.skipped}" + (f", not run: {not_run}" if not_run else ""),
        file=sys.stderr,
    )
    for job, reason in outcome.failed:
        print(f"  failed {job.label} (seed {job.seed}) -> {job.path.name}: {reason}", file=sys.stderr)
    if outcome.exit_code is not None:
        return outcome.exit_code
    return EXIT_OK if not outcome.failed and not not_run else EXIT_FAILED


class _ProgressLine:
    """A one-line progress bar on a terminal; a log line per image otherwise."""

    def __init__(self, total: int):
        self.total, self.done, self.failed = total, 0, 0
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()

    def advance(self, failed: bool = False) -> None:
        self.done += 1
        self.failed += failed
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
            f" failed {self.failed}  {elapsed:5.1f}s elapsed, ~{eta:5.1f}s left"
        )
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and self.done:
            print(file=sys.stderr)
