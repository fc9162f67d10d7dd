"""The run manifest of a draft folder: `<out-dir>/manifest.jsonl`, one JSON object per line.

Each prompts-file line a run finishes is appended as it finishes and flushed at once, so the file
holds everything finished before a kill -9 (a line cut by the kill is ignored when read). Fields:
`line` (1-based, in the prompts file of that run), `prompt`, `seed`, `status` ("done", "failed" or
"duplicate"), `file` (relative to the folder: the image, for a duplicate the image of the line it
repeats, for a failure where the image would go), `error` (failures, and duplicates of a failed
line), `duplicate_of` (the line a duplicate repeats), `attempts`, `billed_attempts`, `seconds`,
`request_id`, `bytes` (the file's size, so a resumed run trusts it without decoding it),
`found_on_disk` (an image a killed run wrote but did not record), `width`, `height`, `steps`,
`backend`, `time` (Unix seconds). The file is only ever appended to: runs that resume add their
lines, and the last record of a file is what holds.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

MANIFEST_NAME = "manifest.jsonl"
DONE, FAILED, DUPLICATE = "done", "failed", "duplicate"


class ManifestWriter:
    """Appends records to a manifest; each is written with one write call and flushed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file: IO[str] | None = None

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def append(self, record: dict) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- closed in close()
            if self._file.tell() > 0 and not _ends_with_newline(self.path):
                self._file.write("\n")  # a torn last line from a killed run stays on its own line
        record = {**record, "time": round(time.time(), 3)}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()  # in the kernel's hands: survives the process being killed

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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
        if isinstance(name, str) and record["status"] in (DONE, FAILED):
            latest[name] = record
    return latest
