"""The `flux-schnell` command line: the node's generation outside ComfyUI.

    flux-schnell generate --prompt TEXT --out FILE.png [--backend api|local] [--width W]
                          [--height H] [--steps N] [--seed S] [--batch-size B]
    flux-schnell generate --prompts-file FILE --out-dir DIR [--concurrency N] [--shard K/N] [...]
    flux-schnell gallery DIR        (thumbnails and index.html for a folder of drafts)
    flux-schnell set-key            (reads the API key from standard input)
    flux-schnell config             (where the key and base URL come from; never the key)

Everything the user gives is checked before anything is paid for or created: the prompts (every
line of a prompts file), the sizes, the output paths, the API key or the local backend's packages.
Only then are folders made and the run started (drafts/command.py, drafts/run.py). The flags are read here,
at the start. The api path never imports torch. Exit codes: drafts.command.EXIT_MEANINGS.
"""

from __future__ import annotations

import argparse
import ctypes
import difflib
import logging
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from ._version import __version__
from .drafts import (
    EXIT_USAGE,
    config_command,
    exit_codes_help,
    gallery_command,
    generate_command,
    report_command,
    set_key_command,
)
from .errors import (
    ConfigurationError,
    InvalidInputError,
    LocalBackendUnavailable,
)
from .generation import (
    BACKENDS,
    MAX_BATCH,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    SIDE_MULTIPLE,
    GenerationRequest,
)
from .local import LoraChoice, parse_lora_option

MAX_CONCURRENCY = 16
log = logging.getLogger("flux_schnell.cli")

ENVIRONMENT_HELP = """\
environment variables:
  IMAGEAPI_API_KEY     the ImageAPI key for --backend api (IMAGEAPI_KEY, the service's name, works
                       too); or run `flux-schnell set-key` once
  IMAGEAPI_BASE_URL    the service's address (default https://imageapi.org)
  IMAGEAPI_CONFIG      the one config file to read and write, instead of the default
  XDG_CONFIG_HOME      where the default config file lives (default ~/.config)
  HTTPS_PROXY, HTTP_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE
                       proxies and certificates, as for any program using requests"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (when it has one worth showing) and keeps the epilog's layout."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and action.option_strings
            and not (default is None or default is False or default is argparse.SUPPRESS or default == [])
            and action.nargs != 0
        ):
            text += " (default: %(default)s)"
        return text


# The flags that only the local backend reads, with their argparse names.
LOCAL_ONLY_FLAGS = tuple(
    (flag, flag[2:].replace("-", "_"))
    for flag in (
        "--checkpoint",
        "--transformer",
        "--t5",
        "--clip",
        "--ae",
        "--t5-tokenizer",
        "--clip-tokenizer",
        "--dtype",
        "--device",
        "--compile",
    )
)


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
        epilog=f"{ENVIRONMENT_HELP}\n\n{exit_codes_help('generate')}",
        formatter_class=_HelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands: dict[str, argparse.ArgumentParser] = {}
    parser.set_defaults(command_parsers=commands)

    def command(name: str, text: str, description: str) -> argparse.ArgumentParser:
        commands[name] = sub.add_parser(
            name,
            help=text,
            description=description,
            epilog=f"{ENVIRONMENT_HELP}\n\n{exit_codes_help(name)}",
            formatter_class=_HelpFormatter,
            parents=[common],
        )
        return commands[name]

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
    one.add_argument(
        "--prompts-file",
        type=Path,
        help='a UTF-8 text file, one prompt a line, or a .jsonl file of {"prompt": ..., "seed": ...} '
        "objects (a draft folder's manifest.jsonl renders its drafts again) (drafts)",
    )
    where = gen.add_argument_group("where to write")
    where.add_argument("--out", type=Path, help="the PNG for --prompt (FILE-1.png, ... with --batch-size)")
    where.add_argument("--out-dir", type=Path, help="the draft folder for --prompts-file")
    money = gen.add_argument_group("spending")
    money.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (lines, repeats, already done, to request, the estimated cost with "
        "price_per_image in the config) and send nothing",
    )
    money.add_argument(
        "--max-images",
        type=int,
        metavar="N",
        help="refuse the run, before any request, when it would send more than N paid requests "
        "(default: max_images_per_run in the config, else no limit)",
    )
    money.add_argument(
        "--rebuy-expired",
        action="store_true",
        help="api drafts: a re-run collects the async jobs an earlier run paid for but did not "
        "collect; request again (paid) those the service reports failed or no longer knows "
        "(default: they stay failed; a job still running is never bought again)",
    )
    where.add_argument(
        "--shard",
        type=_shard_option,
        metavar="K/N",
        help="make only the prompts whose line number modulo N is K modulo N, so N processes (a Slurm "
        "array, a Kubernetes indexed Job, one per GPU) share one prompts file and one --out-dir",
    )
    params = gen.add_argument_group("generation")
    params.add_argument("--backend", choices=BACKENDS, default="api", help="where images are made")
    side = f"pixels, {MIN_SIDE}..{MAX_SIDE}, a multiple of {SIDE_MULTIPLE}"
    params.add_argument("--width", type=int, default=1024, help=side)
    params.add_argument("--height", type=int, default=1024, help=side)
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
        default=None,  # as stored; None tells a flag left out from one given (refused on the api)
        help="how transformer and T5 weights are kept in memory; fp8_e4m3fn_fast also multiplies the "
        "transformer's fp8 weights as fp8 (GPUs of compute capability 8.9+, else as fp8_e4m3fn)",
    )
    local.add_argument("--device", help="cuda, cuda:1, cpu (default: the first GPU, else cpu)")
    local.add_argument(
        "--compile", action="store_true", help="torch.compile the transformer (slow first image)"
    )
    local.add_argument(
        "--memory",
        choices=LOCAL_MEMORY_FLAGS,
        default="auto",
        help="which models stay on the GPU between stages; stream-blocks "
        "keeps the transformer blocks that do not fit on the CPU and streams them in (low VRAM)",
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
    report = command(
        "report",
        "what a draft folder's runs cost",
        "Reads DIR/manifest.jsonl: images delivered, calls that may have been billed, those billed "
        "without an image (request ids and times), free retries, duplicates, failures.",
    )
    report.add_argument("dir", type=Path, metavar="DIR", help="a draft folder (--out-dir of a run)")
    report.add_argument(
        "--csv", type=Path, metavar="FILE", help="also write one row per call that may have been billed"
    )
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


def _shard_option(text: str) -> tuple[int, int]:
    """`K/N` with 1 <= K <= N, as a pair."""
    k, slash, n = text.strip().partition("/")
    try:
        shard = int(k), int(n)
    except ValueError:
        shard = None
    if not slash or shard is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N; write it like 2/8 (shard 2 of 8)")
    if not 1 <= shard[0] <= shard[1]:
        raise argparse.ArgumentTypeError(
            f"{text!r}: K must be between 1 and N (shards are numbered 1..N), like 1/{max(shard[1], 1)}"
        )
    return shard


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _name_unknown_flags(parser, argv)
    args = parser.parse_args(argv)
    _set_up_logging(getattr(args, "verbose", False))
    try:
        if args.command == "set-key":
            return set_key_command()
        if args.command == "config":
            return config_command()
        if args.command == "gallery":
            return gallery_command(args.dir)
        if args.command == "report":
            return report_command(args.dir, args.csv)
        _limit_malloc_arenas()  # before the worker threads start
        return _generate(args)
    except (ConfigurationError, InvalidInputError, LocalBackendUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _name_unknown_flags(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Exit 2 naming the first unknown `--flag` with the closest known one of its command and a
    one-line usage, before argparse's own checks (which would print the whole usage and complain
    of a missing --prompt instead of the misspelt --promt)."""
    commands = parser.get_default("command_parsers")
    name = next((token for token in argv if not token.startswith("-")), None)
    target = commands.get(name, parser)
    known = _flags_of(parser) | _flags_of(target)
    for token in argv:
        if token == "--":
            break
        flag = token.split("=", 1)[0]
        if not flag.startswith("--") or flag in known or any(k.startswith(flag) for k in known):
            continue  # a value, a known flag, or an abbreviation argparse resolves
        close = difflib.get_close_matches(flag, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        print(
            f"{target.prog}: error: unrecognized argument {flag}{hint}\n"
            f"run '{target.prog} --help' for its flags",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_USAGE)


def _flags_of(parser: argparse.ArgumentParser) -> set[str]:
    # argparse keeps a parser's flags in `_actions` only (no public accessor).
    return {flag for action in parser._actions for flag in action.option_strings}


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
    from .drafts import ProgressLogHandler

    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, ProgressLogHandler)]:
        root.removeHandler(handler)
    handler = ProgressLogHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _generate(args) -> int:
    """Check the flags, build one request template and one model spec, hand them to drafts."""
    from .drafts import RunSettings

    gen_parser = args.command_parser  # its usage line goes with the errors below
    if args.prompt is not None and args.out is None:
        gen_parser.error("--prompt needs --out FILE.png")
    if args.prompts_file is not None and args.out_dir is None:
        gen_parser.error("--prompts-file needs --out-dir DIR")
    if args.prompt is not None and args.out_dir is not None:
        gen_parser.error("--out-dir goes with --prompts-file; with --prompt, name the file with --out")
    if args.prompts_file is not None and args.out is not None:
        gen_parser.error("--out goes with --prompt; with --prompts-file, name a folder with --out-dir")
    if args.shard is not None and args.prompts_file is None:
        gen_parser.error("--shard goes with --prompts-file and --out-dir (it splits the file's lines)")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        gen_parser.error(f"--concurrency must be between 1 and {MAX_CONCURRENCY}")
    if args.rebuy_expired and (args.backend != "api" or args.out_dir is None):
        gen_parser.error(
            "--rebuy-expired goes with --prompts-file and --out-dir on the api backend (it acts on the "
            "jobs a draft folder's manifest records)"
        )
    if args.lora and args.backend != "local":
        gen_parser.error("--lora needs --backend local (the hosted API applies no LoRA)")
    if args.backend != "local":
        given = [flag for flag, dest in LOCAL_ONLY_FLAGS if getattr(args, dest) not in (None, False)]
        if given:  # ignored by the service: refused before the image is paid for
            gen_parser.error(
                f"{' '.join(given)} {'applies' if len(given) == 1 else 'apply'} to the local backend only; "
                f"add --backend local, or drop {'it' if len(given) == 1 else 'them'} for the hosted API"
            )

    seed = args.seed if args.seed is not None else random.randint(0, 2**32 - 1)
    template = GenerationRequest(
        args.prompt if args.prompt is not None else "",  # drafts fills in each line's prompt
        args.width,
        args.height,
        args.steps,
        seed,
        args.batch_size,
    )
    run_settings = RunSettings(
        backend=args.backend,
        request=template,
        seed_given=args.seed,
        concurrency=args.concurrency,
        out=args.out,
        out_dir=args.out_dir,
        loras=tuple(args.lora),
        shard=args.shard,
        rebuy_expired=args.rebuy_expired,
    )
    spec = _local_model_spec(args) if args.backend == "local" else None
    if args.max_images is not None and args.max_images < 1:
        gen_parser.error(f"--max-images must be at least 1; got {args.max_images}")
    return generate_command(
        run_settings,
        args.prompt,
        args.prompts_file,
        spec,
        dry_run=args.dry_run,
        max_images=args.max_images,
    )


# --memory's values: local.files.MEMORY_CHOICES with dashes (not imported here: the api path imports no torch)
LOCAL_MEMORY_FLAGS = ("auto", "keep-on-GPU", "offload-to-CPU", "free-after-run", "stream-blocks")


def _local_model_spec(args):
    from .local import LocalModelSpec

    return LocalModelSpec(
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
        memory=args.memory.replace("-", " "),
        loras=tuple(args.lora),
    )
