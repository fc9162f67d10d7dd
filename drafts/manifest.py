"""The run manifest of a draft folder: `<out-dir>/manifest.jsonl`, one JSON object per line.

Each prompts-file line a run finishes is appended as it finishes and flushed at once, so the file
holds everything finished before a kill -9 (a line cut by the kill is ignored when read). Fields:
`line` (1-based, in the prompts file of that run), `prompt`, `seed`, `status` ("done", "failed" or
"duplicate"), `file` (relative to the folder: the image, for a duplicate the image of the line it
repeats, for a failure where the image would go), `error` (failures, and duplicates of a failed
line), `duplicate_of` (the line a duplicate repeats), `attempts`, `seconds`, `request_id`, and
on the api the billing record: `paid_calls` (calls that may have been billed, the one that delivered
included; failures too), `free_retries`, `request_ids`, an async job's `poll_url` (on a failed
line: the job a later run collects), `collected_from` (a done line whose image came from such a job:
its poll URL; `paid_calls` 0, the payment is in the failed line); `seed` only when
the service received it (`seed_sent`), `bytes` (the file's size, so a resumed run trusts it
without decoding it), `found_on_disk` (an image a killed run wrote but did not record), `width`,
`height`, `steps`, `backend`, `time` (Unix seconds). The file is only ever appended to: runs that
resume add their lines, and the last record of a file is what holds.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

from ..errors import InvalidInputError

MANIFEST_NAME = "manifest.jsonl"


class RecordStatus(str, Enum):
    """A manifest record's `status`: what became of one line of a run (written as its value)."""

    DONE = "done"  # its PNG is in the folder
    FAILED = "failed"  # no PNG; `error` says why
    DUPLICATE = "duplicate"  # the same request as an earlier line (`duplicate_of`): not paid again

    def __str__(self) -> str:
        return self.value


class ManifestWriter:
    """Appends records to a manifest; each is one `write()` of a whole line to a file opened with
    `O_APPEND`, so the records of several processes appending at once (the shards of one prompts
    file, `--shard K/N`) never interleave, and each is in the kernel's hands as soon as it is written
    (it survives the process being killed)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def append(self, record: dict) -> None:
        if self._fd is None:
            # O_NOFOLLOW: a symlink put in its place never sends the records out of the folder.
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
            self._fd = os.open(self.path, flags, 0o666)
            if os.fstat(self._fd).st_size > 0 and not _ends_with_newline(self.path):
                os.write(self._fd, b"\n")  # a torn last line from a killed run stays on its own line
        record = {**record, "time": round(time.time(), 3)}
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self._fd, line)
        if written != len(line):  # a full disk: the short line is cut, read_manifest skips it
            raise OSError(errno.ENOSPC, f"{self.path}: only {written} of {len(line)} bytes written")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def check_manifest_file(path: Path, flag: str) -> None:
    """Refuse a manifest that is not a plain file of the folder (a symlink to a file elsewhere, a
    directory, a device), naming it, before anything is paid for."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise InvalidInputError(f"{flag}: cannot read {path} ({e.strerror}).") from None
    if stat.S_ISLNK(info.st_mode):
        raise InvalidInputError(
            f"{flag}: {path} is a symbolic link; the manifest is written only inside the folder: "
            "replace the link with the file itself (or remove it), or choose another folder."
        )
    if not stat.S_ISREG(info.st_mode):
        raise InvalidInputError(
            f"{flag}: {path} is not a file (a folder or a device?); move it away or choose another folder."
        )


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_manifest(path: Path) -> Iterator[dict]:
    """The records of a manifest in order; lines that are not a complete JSON object (a line cut by
    a kill, or damaged) are skipped. Nothing when the file does not exist."""
    try:
        f = open(path, "rb")  # noqa: SIM115 -- closed by the generator's `with` below
    except FileNotFoundError:
        return
    with f:
        for raw in f:
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(record, dict) and isinstance(record.get("status"), str):
                yield record


def latest_by_file(path: Path) -> dict[str, dict]:
    """The last record of each `file` in the manifest."""
    latest: dict[str, dict] = {}
    for record in read_manifest(path):
        name = record.get("file")
        if isinstance(name, str) and record["status"] in (RecordStatus.DONE, RecordStatus.FAILED):
            latest[name] = record
    return latest
