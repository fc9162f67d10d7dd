"""Prompts files for draft runs: one prompt a line, read lazily, checked completely before a run.

A prompts file is UTF-8 text (a byte-order mark is allowed), one prompt a line; blank lines and
lines starting with `#` are skipped; surrounding whitespace is trimmed. `check_prompts_file` reads
it once, in bounded memory, and refuses it with the reason and the line before anything is paid
for: not a regular file (a device such as /dev/zero, a FIFO, a folder), larger than
`MAX_PROMPTS_FILE_BYTES`, a line longer than `MAX_LINE_BYTES`, a line that is not UTF-8, no prompt
at all, or a prompt the `check` callback refuses. `read_prompts` then yields the prompts one by one,
so a file of any length is never held in memory.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
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


def check_prompts_file(path: Path, check: Callable[[int, str], None] | None = None) -> int:
    """Read `path` once and raise `InvalidInputError` naming the first problem (and its line);
    `check(line, prompt)` may refuse a prompt by raising `InvalidInputError`. Returns how many
    prompts the file holds."""
    count = 0
    for number, prompt in read_prompts(path):
        if check is not None:
            try:
                check(number, prompt)
            except InvalidInputError as e:
                raise InvalidInputError(f"--prompts-file {path}, line {number}: {e}") from None
        count += 1
    if count == 0:
        raise InvalidInputError(f"--prompts-file {path} has no prompts (one a line; '#' starts a comment).")
    return count


def read_prompts(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, prompt) for each prompt line, read lazily."""
    _check_kind_and_size(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 -- closed by the generator's `with` below
    except OSError as e:
        raise InvalidInputError(f"--prompts-file {path}: cannot read it ({e.strerror}).") from None
    with f:
        number = 0
        while True:
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
