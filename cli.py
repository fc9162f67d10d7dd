"""The `flux-schnell` command line: the node's generation outside ComfyUI.

    flux-schnell generate --prompt TEXT --out FILE.png [--backend api|local] [--width W]
                          [--height H] [--steps N] [--seed S] [--batch-size B]
    flux-schnell generate --prompts-file FILE --out-dir DIR [--concurrency N] [...]
    flux-schnell gallery DIR        (thumbnails and index.html for a folder of drafts)
    flux-schnell set-key            (reads the API key from standard input)
    flux-schnell config             (where the key and base URL come from; never the key)

Everything the user gives is checked before anything is paid for or created: the prompts (every
line of a prompts file), the sizes, the output paths, the API key or the local backend's packages.
Only then are folders made and the run started (drafts/run.py). The environment is read here, at
the start. The api path never imports torch. Exit codes: 0 all done, 1 some images failed (or the
run was interrupted), 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import ctypes
import getpass
import logging
import os
import random
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from ._version import __version__
from .errors import (
    ConfigurationError,
    FluxSchnellError,
    GenerationInterrupted,
    InvalidInputError,
    LocalBackendUnavailable,
)
from .generation import BACKENDS, MAX_BATCH, MAX_PROMPT_CHARS, MAX_SEED, MAX_STEPS, GenerationRequest
from .local.lora import LoraChoice, parse_lora_option

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
MAX_CONCURRENCY = 16
OUT_SUFFIX = ".png"  # the prompt, seed and model go into PNG text chunks
log = logging.getLogger("flux_schnell.cli")

ENVIRONMENT_HELP = """\
environment variables:
  IMAGEAPI_API_KEY     the ImageAPI key for --backend api (IMAGEAPI_KEY, the service's name, works
                       too); or run `flux-schnell set-key` once
  IMAGEAPI_BASE_URL    the service's address (default https://imageapi.org)
  IMAGEAPI_CONFIG      the one config file to read and write, instead of the default
  XDG_CONFIG_HOME      where the default config file lives (default ~/.config)
  HTTPS_PROXY, HTTP_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE
                       proxies and certificates, as for any program using requests

exit codes:
  0  every image is done (or was already on disk)
  1  some images failed, or the run was interrupted: run the same command again to resume
  2  a usage or configuration error (bad input, no or refused API key, a missing package)"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (when it has one worth showing) and keeps the epilog's layout."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and action.option_strings
            and default not in (None, False, argparse.SUPPRESS)
            and action.nargs != 0
        ):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log every request and retry (accepted before or after the command)",
    )
    parser = argparse.ArgumentParser(
        prog="flux-schnell",
        description="FLUX.1 [schnell] images from the command line: the hosted ImageAPI service "
        "or local weight files.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=_HelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=text,
            description=description,
            epilog=ENVIRONMENT_HELP,
            formatter_class=_HelpFormatter,
            parents=[common],
        )

    gen = command(
        "generate",
        "generate images",
        "One prompt to --out, or a prompts file (one prompt a line, '#' comments) to a draft "
        "folder: resumable, each image written as it arrives, duplicates requested once, a "
        "manifest.jsonl of every line and an index.html gallery.",
    )
    gen.set_defaults(command_parser=gen)
    what = gen.add_argument_group("what to generate")
    one = what.add_mutually_exclusive_group(required=True)
    one.add_argument("--prompt", help=f"the prompt (at most {MAX_PROMPT_CHARS:,} characters)")
    one.add_argument("--prompts-file", type=Path, help="a UTF-8 text file, one prompt a line (drafts)")
    where = gen.add_argument_group("where to write")
    where.add_argument("--out", type=Path, help="the PNG for --prompt (FILE-1.png, ... with --batch-size)")
    where.add_argument("--out-dir", type=Path, help="the draft folder for --prompts-file")
    params = gen.add_argument_group("generation")
    params.add_argument("--backend", choices=BACKENDS, default="api", help="where images are made")
    params.add_argument("--width", type=int, default=1024, help="pixels, a multiple of 16")
    params.add_argument("--height", type=int, default=1024, help="pixels, a multiple of 16")
    params.add_argument("--steps", type=int, default=4, help=f"1..{MAX_STEPS} (4: fast, 8: quality)")
    params.add_argument(
        "--seed", type=int, help=f"seed of each prompt's first image, 0..{MAX_SEED} (default: random)"
    )
    params.add_argument("--batch-size", type=int, default=1, help=f"images per prompt, 1..{MAX_BATCH}")
    params.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help=f"api requests in flight at once, 1..{MAX_CONCURRENCY}",
    )
    local = gen.add_argument_group('local backend (needs: pip install "comfyui-flux-schnell[local]")')
    local.add_argument("--checkpoint", type=Path, help="all-in-one FLUX.1-schnell checkpoint")
    local.add_argument("--transformer", type=Path, help="flux1-schnell.safetensors or a GGUF of it")
    local.add_argument("--t5", type=Path, help="t5xxl_fp16/_fp8_e4m3fn(_scaled).safetensors or a GGUF")
    local.add_argument("--clip", type=Path, help="clip_l.safetensors")
    local.add_argument("--ae", type=Path, help="ae.safetensors")
    local.add_argument("--t5-tokenizer", type=Path, help="folder with the T5 tokenizer")
    local.add_argument("--clip-tokenizer", type=Path, help="folder with the CLIP tokenizer")
    local.add_argument(
        "--dtype",
        choices=("as-stored", "bf16", "fp8_e4m3fn", "fp8_e4m3fn_fast"),
        default="as-stored",
        help="how transformer and T5 weights are kept in memory; fp8_e4m3fn_fast also multiplies the "
        "transformer's fp8 weights as fp8 (GPUs of compute capability 8.9+, else as fp8_e4m3fn)",
    )
    local.add_argument("--device", help="cuda, cuda:1, cpu (default: the first GPU, else cpu)")
    local.add_argument(
        "--compile", action="store_true", help="torch.compile the transformer (slow first image)"
    )
    local.add_argument(
        "--lora",
        action="append",
        default=[],
        type=_lora_option,
        metavar="FILE[:STRENGTH]",
        help="apply a LoRA (repeatable: they stack); strength -10..10, default 1.0, negative allowed",
    )

    gallery = command(
        "gallery",
        "write the review page of a draft folder",
        "Writes DIR/index.html (opens from disk) and the thumbnails it shows in DIR/thumbs/: every "
        "PNG of the folder, captioned with its prompts-file line and seed, and the lines that failed.",
    )
    gallery.add_argument("dir", type=Path, metavar="DIR", help="a draft folder (--out-dir of a run)")
    command(
        "set-key",
        "save the ImageAPI key (read from standard input)",
        "Reads the key from standard input (hidden on a terminal) and stores it in the config file, "
        "readable by you only.",
    )
    command(
        "config",
        "show where the settings come from (never the key)",
        "Lists the config files looked at, where set-key writes, whether a key is set and where from, "
        "and the base URL. Exits 0 also when no key is set.",
    )
    return parser


def _lora_option(text: str) -> LoraChoice:
    try:
        return parse_lora_option(text)
    except InvalidInputError as e:  # argparse shows this message, not a generic one
        raise argparse.ArgumentTypeError(str(e)) from e


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _set_up_logging(getattr(args, "verbose", False))
    try:
        if args.command == "set-key":
            return _set_key()
        if args.command == "config":
            return _show_config()
        if args.command == "gallery":
            return _gallery(args.dir)
        _limit_malloc_arenas()  # before the worker threads start
        return _generate(args)
    except (ConfigurationError, InvalidInputError, LocalBackendUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own malloc arena (up to 8 per core) and keeps what
    is freed in it: with a pool of worker threads passing multi-megabyte images around, the peak RSS
    of a long draft run nearly doubles (measured in benchmarks/README.md). Two arenas let freed
    memory be reused across threads. The same as MALLOC_ARENA_MAX=2; nothing happens where the C
    library is not glibc. https://man7.org/linux/man-pages/man3/mallopt.3.html (M_ARENA_MAX)"""
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return  # the user's own choice, or no glibc
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(ctypes.c_int(-8), ctypes.c_int(arenas))  # -8: M_ARENA_MAX
    except (OSError, AttributeError):
        return  # another C library (musl): it has no per-thread arenas to limit


def _set_up_logging(verbose: bool) -> None:
    from .drafts.progress import ProgressLogHandler

    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, ProgressLogHandler)]:
        root.removeHandler(handler)
    handler = ProgressLogHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _progress_handler():
    from .drafts.progress import ProgressLogHandler

    return next((h for h in logging.getLogger().handlers if isinstance(h, ProgressLogHandler)), None)


def _set_key() -> int:
    from .api.settings import save_api_key

    interactive = sys.stdin.isatty()
    key = getpass.getpass("ImageAPI key (input hidden): ") if interactive else sys.stdin.readline()
    path = save_api_key(key.strip())
    print(f"saved the API key to {path} (readable by you only)")
    return EXIT_OK


def _show_config() -> int:
    from .api.settings import (
        config_search_paths,
        default_config_path,
        load_settings,
        masked,
        missing_key_message,
    )

    looked = config_search_paths()
    files = ", ".join(f"{masked(str(p))}{'' if p.is_file() else ' (none)'}" for p in looked)
    print(f"config files read, first found wins: {files}")
    print(f"set-key writes:  {masked(str(default_config_path()))}")
    try:
        settings = load_settings()
    except ConfigurationError as e:
        if "No ImageAPI key is set" not in str(e):
            raise
        print("API key:         not set")
        print(
            "\n".join("  " + line for line in missing_key_message(looked, _first_file(looked)).splitlines())
        )
        return EXIT_OK
    print(f"API key:         set (from {masked(settings.key_source)})")
    print(f"base URL:        {masked(settings.base_url)}")
    print(f"send seed:       {settings.send_seed}")
    return EXIT_OK


def _first_file(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _gallery(folder: Path) -> int:
    from .drafts.gallery import write_gallery

    if not folder.is_dir():
        raise InvalidInputError(f"gallery: {folder} is not a folder; give the --out-dir of a draft run.")
    stats = write_gallery(folder)
    print(
        f"wrote {stats.path}: {stats.images} image(s), {stats.failures} failed line(s), "
        f"{stats.thumbnails_made} new thumbnail(s)"
    )
    return EXIT_OK


# --- generate ---------------------------------------------------------------------------------------


def _generate(args) -> int:
    from .drafts.prompts import check_prompts_file, read_prompts
    from .drafts.run import RunSettings

    gen_parser = args.command_parser  # its usage line goes with the errors below
    if args.prompt is not None and args.out is None:
        gen_parser.error("--prompt needs --out FILE.png")
    if args.prompts_file is not None and args.out_dir is None:
        gen_parser.error("--prompts-file needs --out-dir DIR")
    if args.prompt is not None and args.out_dir is not None:
        gen_parser.error("--out-dir goes with --prompts-file; with --prompt, name the file with --out")
    if args.prompts_file is not None and args.out is not None:
        gen_parser.error("--out goes with --prompt; with --prompts-file, name a folder with --out-dir")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        gen_parser.error(f"--concurrency must be between 1 and {MAX_CONCURRENCY}")
    if args.lora and args.backend != "local":
        gen_parser.error("--lora needs --backend local (the hosted API applies no LoRA)")

    # 1. Where the images go: checked, nothing created yet.
    if args.out is not None:
        _check_out_file(args.out)
    else:
        _check_folder(args.out_dir, "--out-dir")

    # 2. What to generate: every input, every line of a prompts file.
    seed = args.seed if args.seed is not None else random.randint(0, 2**32 - 1)

    def check(prompt: str) -> None:
        GenerationRequest(prompt, args.width, args.height, args.steps, seed, args.batch_size).validate(
            args.backend
        )

    if args.prompt is not None:
        check(args.prompt)
        prompts_total = 1
    else:
        check("x")  # size, steps, seed and batch, once, with the file's name out of the message
        prompts_total = check_prompts_file(args.prompts_file, lambda _line, prompt: check(prompt))

    # 3. What the backend needs: the key (read here, where the program starts) or the packages.
    if args.backend == "api":
        from .api.settings import load_settings

        settings = load_settings()
    else:
        from .local.packages import require_local_packages

        require_local_packages()
        settings = None

    # 4. Only now: folders, and what a killed run left behind.
    s = RunSettings(
        backend=args.backend,
        width=args.width,
        height=args.height,
        steps=args.steps,
        seed=seed,
        seed_given=args.seed,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        out=args.out,
        out_dir=args.out_dir,
        loras=tuple(args.lora),
    )
    _prepare_folders(s)
    lines = read_prompts(args.prompts_file) if args.prompts_file is not None else [(1, args.prompt.strip())]
    return _run(s, args, settings, lines, prompts_total * args.batch_size)


def _check_out_file(out: Path) -> None:
    if out.is_dir():
        raise InvalidInputError(f"--out {out} is a folder; name a file in it, like {out / 'image.png'}.")
    if out.suffix.lower() != OUT_SUFFIX:
        raise InvalidInputError(
            f"--out {out}: only PNG files are written (the prompt, seed and model go into their text "
            f"chunks); name the file {out.with_suffix(OUT_SUFFIX).name}."
        )
    _check_folder(out.parent, "--out")


def _check_folder(folder: Path, flag: str) -> None:
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


def _prepare_folders(s) -> None:
    from .drafts.gallery import THUMBS_DIR
    from .drafts.png_files import remove_stale_parts

    folder = s.out_dir if s.drafts else s.out.parent
    flag = "--out-dir" if s.drafts else "--out"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
        if s.drafts:
            (folder / THUMBS_DIR).mkdir(exist_ok=True)
    except OSError as e:
        raise InvalidInputError(
            f"{flag}: cannot write images to {folder}: {e.strerror}; choose another {flag}."
        ) from e
    if s.drafts:
        removed = remove_stale_parts(folder) + remove_stale_parts(folder / THUMBS_DIR)
    else:
        removed = []
        for name in {s.out.name} | {f"{s.out.stem}-{b + 1}{s.out.suffix}" for b in range(s.batch_size)}:
            removed += remove_stale_parts(folder, name)
    if removed:
        log.info("removed %d unfinished file(s) left by an interrupted run", len(removed))


def _run(s, args, settings, lines, planned: int) -> int:
    from .drafts.progress import Progress
    from .drafts.run import DraftRun, StopRun, api_results, local_results

    progress = Progress(planned)
    handler = _progress_handler()
    if handler is not None:
        handler.progress = progress
    stop = threading.Event()
    if s.backend == "api":
        from .api_client import ends_the_run
        from .errors import AuthenticationError

        def ends_run(error: FluxSchnellError) -> int | None:
            if not ends_the_run(error):  # a refused key, no credits left
                return None
            return EXIT_USAGE if isinstance(error, AuthenticationError) else EXIT_FAILED

        backend = api_results(settings, s, stop, on_event=_show_event(progress))
    else:
        from .errors import ModelLoadError
        from .local.files import LocalModelSpec

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
            loras=tuple(args.lora),
        )

        def ends_run(error: FluxSchnellError) -> int | None:
            return EXIT_USAGE if isinstance(error, (ModelLoadError, LocalBackendUnavailable)) else None

        backend = local_results(spec, s, stop)

    run = DraftRun(s, backend, progress, ends_run)
    previous = signal.signal(signal.SIGINT, lambda *_: _first_interrupt(stop, previous))
    try:
        run.run(lines, planned)
    except GenerationInterrupted:
        progress.note("interrupted: finished images are kept; run the same command again to resume")
    except StopRun as e:
        progress.note(f"error: {e}\nstopped: the remaining images would fail the same way.")
        run.outcome.exit_code = e.exit_code
    finally:
        signal.signal(signal.SIGINT, previous)
        progress.close()
        if handler is not None:
            handler.progress = None
    return _summary(run.outcome, s)


def _show_event(progress):
    from .api.types import DONE, FAILED, RATE_LIMITED, RETRYING, STARTED, WAITING

    def on_event(event) -> None:
        if event.kind in (RATE_LIMITED, RETRYING, WAITING):
            progress.waiting_on(event.label, event.kind)
        elif event.kind in (STARTED, DONE, FAILED):
            progress.waiting_on(event.label, None)

    return on_event


def _first_interrupt(stop: threading.Event, previous) -> None:
    """First Ctrl-C: stop gracefully (keep what is done); a second one aborts at once."""
    if stop.is_set():
        signal.signal(signal.SIGINT, previous)
        raise KeyboardInterrupt
    stop.set()
    print("\nstopping (Ctrl-C again to abort at once)...", file=sys.stderr)


def _summary(outcome, s) -> int:
    from .drafts.gallery import GALLERY_NAME, write_gallery
    from .drafts.manifest import MANIFEST_NAME

    err = sys.stderr
    if outcome.skipped:
        print(f"{outcome.skipped} image(s) already done in {s.out_dir}, skipped", file=err)
    not_run = outcome.not_run
    print(
        f"done: {outcome.done}, failed: {outcome.failed_count}, duplicates (requested once): "
        f"{outcome.duplicates}, skipped (already done): {outcome.skipped}"
        + (f", not run: {not_run}" if not_run else ""),
        file=err,
    )
    for p, reason in outcome.failed:
        print(f"  failed {p.label} (seed {p.seed}): {reason}", file=err)
    if outcome.failed_count > len(outcome.failed):
        print(f"  ... and {outcome.failed_count - len(outcome.failed)} more", file=err)
    if s.drafts:
        try:
            gallery = write_gallery(s.out_dir)
        except OSError as e:
            print(f"could not write the gallery: {e}", file=err)
        else:
            print(
                f"images in {s.out_dir}; every line in {s.out_dir / MANIFEST_NAME}; "
                f"review them in {s.out_dir / GALLERY_NAME} ({gallery.images} image(s))",
                file=err,
            )
    else:
        for path in outcome.written:
            print(f"wrote {path}", file=err)
    if outcome.exit_code is not None:
        return outcome.exit_code
    return EXIT_OK if not outcome.failed_count and not not_run else EXIT_FAILED
