"""One folder, one run: the lock a draft run holds on its `--out-dir` while it runs.

The lock is a small JSON file in the folder (`.lock`, or `.lock-K-of-N` for shard K of N, so the
shards of one prompts file share one folder) naming the process that holds it: `pid`, `host` and
`since` (Unix seconds). It is created with `O_CREAT | O_EXCL`, so of two runs starting at once
exactly one gets it; the other exits naming the first. A lock left by a process of this host that
is no longer alive (a run killed with kill -9, a machine that lost power) is taken over with a
note. A lock from another host is respected (its process cannot be checked from here): the message
names the host and says to delete the file when that run is known to be gone.

A takeover is itself guarded by an `O_EXCL` file (`<lock>.takeover`), so two runs finding the same
dead lock cannot both take it. A lock file that holds no complete record (its writer was killed
between creating and writing it) counts as held for `_UNREADABLE_GRACE_S` seconds, then as dead.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import FolderLockedError

log = logging.getLogger("flux_schnell.cli")

LOCK_NAME = ".lock"
_UNREADABLE_GRACE_S = 10.0  # a lock file still empty after this long lost its writer
_TAKEOVER_GRACE_S = 30.0  # a takeover guard older than this lost its writer


def lock_name(shard: tuple[int, int] | None = None) -> str:
    """The lock file's name: `.lock`, or `.lock-K-of-N` for shard K of N."""
    return LOCK_NAME if shard is None else f"{LOCK_NAME}-{shard[0]}-of-{shard[1]}"


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock, as its file says (`pid` None: the file holds no complete record)."""

    pid: int | None
    host: str
    since: float

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on host {self.host}, since {when}"


class FolderLock:
    """The lock of one folder (or one shard's lock in it). `acquire()` or raise FolderLockedError;
    `release()` removes the file only while it is still this process's."""

    def __init__(self, folder: Path, shard: tuple[int, int] | None = None, flag: str = "--out-dir"):
        self.folder = Path(folder)
        self.path = self.folder / lock_name(shard)
        self.flag = flag
        self.shard = shard
        self._mine: LockHolder | None = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        self._acquire_own()
        try:
            self._check_overlapping()
        except FolderLockedError:
            self.release()
            raise

    def _acquire_own(self) -> None:
        for _ in range(3):  # a lock released or taken over between our tries: look again
            if self._create():
                return
            holder = read_holder(self.path)
            if holder is None:
                continue  # removed meanwhile
            if not self._is_dead(holder):
                raise FolderLockedError(self._held_message(holder))
            if self._take_over(holder):
                return
        holder = read_holder(self.path)
        raise FolderLockedError(self._held_message(holder or LockHolder(None, "?", time.time())))

    def release(self) -> None:
        if self._mine is None:
            return
        if read_holder(self.path) == self._mine:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._mine = None

    def _check_overlapping(self) -> None:
        """A run of the whole folder and a shard, or shards of different counts (1/2 and 1/3), make
        some of the same lines: the other's live lock refuses this run too. Two such runs starting
        at the same moment may both stop; neither pays for the other's lines."""
        for other in sorted(self.folder.glob(LOCK_NAME + "*")):
            shard = _shard_of(other.name)
            if other == self.path or shard is False:
                continue
            if self.shard is not None and shard is not None and shard[1] == self.shard[1]:
                continue  # another shard of the same split: no line in common
            holder = read_holder(other)
            if holder is not None and not self._is_dead(holder):
                what = f"shard {shard[0]}/{shard[1]}" if shard else "the whole folder"
                raise FolderLockedError(
                    f"{self.flag} {self.folder}: a run of {what} is running there ({holder.describe()}) "
                    f"and makes some of the same lines; wait for it, or give every run the same --shard K/N "
                    f"split."
                )

    # creating and taking over

    def _create(self) -> bool:
        me = LockHolder(os.getpid(), socket.gethostname(), round(time.time(), 3))
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps({"pid": me.pid, "host": me.host, "since": me.since}) + "\n").encode())
        finally:
            os.close(fd)
        self._mine = me
        return True

    def _is_dead(self, holder: LockHolder) -> bool:
        if holder.pid is None:  # created, never written: dead once the grace has passed
            return time.time() - holder.since > _UNREADABLE_GRACE_S
        if holder.host != socket.gethostname():
            return False  # another machine's process: cannot be checked from here
        return not _alive(holder.pid)

    def _take_over(self, dead: LockHolder) -> bool:
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > _TAKEOVER_GRACE_S:
                    guard.unlink()
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return False  # another run is taking it over: look again
        os.close(fd)
        try:
            if read_holder(self.path) != dead:
                return False  # released or taken over meanwhile: look again
            self.path.unlink()
            if not self._create():
                return False
        finally:
            guard.unlink()
        what = f"pid {dead.pid} on {dead.host}" if dead.pid is not None else "an unfinished lock file"
        log.warning(
            "%s %s: took over the lock of a run that is no longer running (%s)", self.flag, self.folder, what
        )
        return True

    def _held_message(self, holder: LockHolder) -> str:
        who = f"shard {self.shard[0]}/{self.shard[1]} " if self.shard else ""
        text = f"{self.flag} {self.folder}: another run of {who}this folder is running ({holder.describe()})"
        if holder.host != socket.gethostname() and holder.pid is not None:
            text += (
                f"; it runs on another host, so it cannot be checked from here: if it is gone, delete "
                f"{self.path} and run again"
            )
        else:
            text += "; wait for it to finish, or choose another folder"
        return text + "."


def _shard_of(name: str) -> tuple[int, int] | bool | None:
    """(K, N) for `.lock-K-of-N`, None for `.lock`, False for any other file."""
    if name == LOCK_NAME:
        return None
    match = re.fullmatch(re.escape(LOCK_NAME) + r"-(\d+)-of-(\d+)", name)
    return (int(match[1]), int(match[2])) if match else False


def read_holder(path: Path) -> LockHolder | None:
    """Who a lock file names; None when there is no such file. A file without a complete record
    names pid None, dated by the file's time."""
    try:
        raw = path.read_bytes()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        pid, host, since = doc["pid"], doc["host"], doc["since"]
        if isinstance(pid, int) and isinstance(host, str) and isinstance(since, (int, float)):
            return LockHolder(pid, host, since)
    except (ValueError, TypeError, KeyError):
        pass
    return LockHolder(None, "?", mtime)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as e:
        return e.errno == errno.EPERM  # alive, another user's
    return True
