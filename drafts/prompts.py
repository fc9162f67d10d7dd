"""Prompts files for draft runs: one prompt a line, read lazily, checked completely before a run.

A prompts file is UTF-8 text (a byte-order mark is allowed), one prompt a line; blank lines and
lines starting with `#` are skipped; surrounding whitespace is trimmed. `check_prompts_file` reads
it once, in bounded memory, and refuses it with the reason and the line before anything is paid
for: not a regular file (a device such as /dev/zero, a FIFO, a folder), larger than
`MAX_PROMPTS_FILE_BYTES`, a line longer than `MAX_LINE_BYTES`, a line that is not UTF-8, no prompt
at all, or a prompt the `check` callback refuses. `read_prompts` then yields the prompts one by one,
so a file of any length is never held in memory.

A file named `*.jsonl` holds one JSON object a line instead (`read_prompt_lines`): `prompt`
(required), and optionally `seed`, `width`, `height`, `num_inference_steps`, which override the
command line's for that line; any other field is refused, naming the line and the field. A record
with a `status` field is a draft folder's manifest record (drafts/manifest.py): its `done` records
are read as their prompt and seed (size and steps come from the command line, so a manifest renders
its drafts again at another quality); every other record, and in a file named manifest.jsonl a line
cut by a kill, is ignored. `PromptsFile.unsent_seeds` counts the done drafts whose seed the service
never received (it chose its own), which a re-render cannot reproduce.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInputError
from ..generation import MAX_PROMPT_CHARS

MAX_PROMPTS_FILE_BYTES = 256 * 2**20  # 100,000 prompts of 2,000 characters fit
MAX_LINE_BYTES = 4 * MAX_PROMPT_CHARS + 2  # the longest UTF-8 encoding of a prompt, plus CR LF
_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


JSONL_SUFFIX = ".jsonl"
OVERRIDES = ("seed", "width", "height", "num_inference_steps")  # the JSONL fields besides `prompt`


@dataclass(frozen=True)
class PromptLine:
    """One prompt of a prompts file, with what its JSONL line overrides (None: the command line's)."""

    line: int
    prompt: str
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seed_sent: bool = True  # False: a manifest's draft whose seed the service never received


@dataclass(frozen=True)
class PromptsFile:
    """What `check_prompts_file` found: how many prompts, how many give their own seed, and how
    many are drafts whose seeds were not sent."""

    count: int
    unsent_seeds: int = 0
    seeded: int = 0
    last_line: int = 0  # the number of the last prompt line checked: a run reads no further


def check_prompts_file(path: Path, check: Callable[[PromptLine], None] | None = None) -> PromptsFile:
    """Read `path` once and raise `InvalidInputError` naming the first problem (and its line);
    `check(prompt_line)` may refuse a prompt by raising `InvalidInputError`."""
    count = unsent = seeded = last_line = 0
    for entry in read_prompt_lines(path):
        last_line = entry.line
        if check is not None:
            try:
                check(entry)
            except InvalidInputError as e:
                raise InvalidInputError(f"--prompts-file {path}, line {entry.line}: {e}") from None
        count += 1
        unsent += not entry.seed_sent
        seeded += entry.seed is not None
    if count == 0:
        what = "JSON objects with a 'prompt'" if _is_jsonl(path) else "prompts"
        raise InvalidInputError(
            f"--prompts-file {path} has no {what} (one a line; '#' starts a comment; a manifest gives "
            "its done lines)."
        )
    return PromptsFile(count, unsent, seeded, last_line)


def read_prompt_lines(path: Path, last_line: int | None = None) -> Iterator[PromptLine]:
    """`PromptLine`s of a text or JSONL prompts file (by its name), read lazily; with `last_line`,
    none after that line (lines appended while a run goes on were never checked: not sent)."""
    if not _is_jsonl(path):
        for number, prompt in read_prompts(path, last_line):
            yield PromptLine(number, prompt)
        return
    from .manifest import MANIFEST_NAME

    torn_lines_skipped = Path(path).name == MANIFEST_NAME  # a kill may cut a manifest's last line
    for number, text in read_prompts(path, last_line):
        entry = _jsonl_entry(path, number, text, torn_lines_skipped)
        if entry is not None:
            yield entry


def _is_jsonl(path: Path) -> bool:
    return Path(path).suffix.lower() == JSONL_SUFFIX


def _jsonl_entry(path: Path, number: int, text: str, torn_lines_skipped: bool) -> PromptLine | None:
    where = f"--prompts-file {path}, line {number}"
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        if torn_lines_skipped:
            return None
        raise InvalidInputError(
            f'{where}: not a JSON object ({e}); write one object a line, like {{"prompt": "a red fox"}}.'
        ) from None
    if not isinstance(record, dict):
        raise InvalidInputError(
            f'{where}: a JSON {type(record).__name__}, not an object; write {{"prompt": "..."}}.'
        )
    if "status" in record:  # a draft folder's manifest record
        return _manifest_entry(where, number, record)
    unknown = [name for name in record if name != "prompt" and name not in OVERRIDES]
    if unknown:
        raise InvalidInputError(
            f"{where}: unknown field {unknown[0]!r}; a line may hold 'prompt' and "
            f"{', '.join(repr(n) for n in OVERRIDES)}."
        )
    prompt = record.get("prompt")
    if not isinstance(prompt, str):
        got = "no 'prompt'" if prompt is None else f"'prompt' is a {type(prompt).__name__}"
        raise InvalidInputError(f"{where}: {got}; each line needs a 'prompt' string.")
    values = {name: _whole_number(where, name, record.get(name)) for name in OVERRIDES}
    return PromptLine(
        number,
        prompt.strip(),
        seed=values["seed"],
        width=values["width"],
        height=values["height"],
        steps=values["num_inference_steps"],
    )


def _manifest_entry(where: str, number: int, record: dict) -> PromptLine | None:
    from .manifest import RecordStatus

    prompt, seed = record.get("prompt"), record.get("seed")
    if record["status"] != RecordStatus.DONE or not isinstance(prompt, str):
        return None
    sent = isinstance(seed, int) and not isinstance(seed, bool) and seed_was_sent(record)
    return PromptLine(
        number, prompt.strip(), seed=_whole_number(where, "seed", seed) if sent else None, seed_sent=sent
    )


def seed_was_sent(record: dict) -> bool:
    """Whether a manifest record's seed made its image: the local backend always uses it, the
    service only when the run sent it (`seed_sent`; manifests without the field did not)."""
    if record.get("backend") == "local":
        return True
    return record.get("seed_sent") is True


def _whole_number(where: str, name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{where}: {name!r} must be a whole number; got {json.dumps(value)}.")
    return value


def read_prompts(path: Path, last_line: int | None = None) -> Iterator[tuple[int, str]]:
    """(line number from 1, prompt) for each prompt line, read lazily, up to `last_line`."""
    _check_kind_and_size(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 -- closed by the generator's `with` below
    except OSError as e:
        raise InvalidInputError(f"--prompts-file {path}: cannot read it ({e.strerror}).") from None
    with f:
        number = 0
        while last_line is None or number < last_line:
            try:
                raw = f.readline(MAX_LINE_BYTES + 1)
            except OSError as e:
                raise InvalidInputError(f"--prompts-file {path}: cannot read it ({e.strerror}).") from None
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise InvalidInputError(
                    f"--prompts-file {path}, line {number}: longer than {MAX_LINE_BYTES:,} bytes; a "
                    f"prompt may have at most {MAX_PROMPT_CHARS:,} characters."
                )
            text = _decode(raw, number, path)
            prompt = text.strip()
            if prompt and not prompt.startswith("#"):
                yield number, prompt


def _check_kind_and_size(path: Path) -> None:
    try:
        info = os.stat(path)
    except OSError as e:
        raise InvalidInputError(f"--prompts-file {path}: cannot read it ({e.strerror}).") from None
    for test, kind in _KINDS:
        if test(info.st_mode):
            raise InvalidInputError(
                f"--prompts-file {path} is {kind}, not a text file: give a UTF-8 text file with one "
                "prompt a line."
            )
    if info.st_size > MAX_PROMPTS_FILE_BYTES:
        raise InvalidInputError(
            f"--prompts-file {path} is {info.st_size / 2**20:,.0f} MiB; at most "
            f"{MAX_PROMPTS_FILE_BYTES // 2**20} MiB are read: split it into several files."
        )


def _decode(raw: bytes, number: int, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInputError(
            f"--prompts-file {path}, line {number}: not UTF-8 text (byte {e.start + 1} of the line is "
            f"0x{raw[e.start]:02x}): save the file as UTF-8."
        ) from None
