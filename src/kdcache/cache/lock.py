"""The cache's writer lock: one precompute at a time per cache.

The precompute driver holds ``<cache>.lock``, a file beside the cache (never inside it, so creating
or overwriting the cache leaves it alone), from planning to the end of the run. It is created with
exclusive-create semantics: ``os.open(O_CREAT | O_EXCL)`` for a local path, ``open(mode="xb")`` for
an fsspec URL (S3 and compatible stores refuse the second writer through a conditional write,
``If-None-Match: *``). A filesystem that does not support ``"xb"`` gets a best-effort lock:
check, write, read back the token (two drivers starting within the same moment can both pass).

The file records its holder as JSON: host, boot id, pid, the process's start time, the time, a
random token and the command line. A lock whose holder is gone is stale and is taken over with a
warning: a dead pid, or a pid that now belongs to a later process, on this host and boot. A lock
held from another host cannot be checked from here: the run is refused naming the holder;
``--force-unlock`` (``cache.force_unlock: true``) removes it when you know that run is gone.
``--force-unlock`` never removes the lock of a holder that is alive on this host (stop that run
first). Release deletes the file only if it still holds this process's token. "Host" is
``platform.node()``: containers that share a hostname but not a pid namespace must not share a
cache path (one would take the other's live lock for stale).

The same lock, with :data:`RUN_DIR` as its :class:`Subject`, keeps one ``kdcache train`` per
``run.dir`` (``<run.dir>.lock``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import sys
import uuid
from dataclasses import asdict, dataclass
from typing import IO, Any, cast

import fsspec

from kdcache.core.config import REDACTED
from kdcache.core.errors import CacheLockedError, OutputError
from kdcache.core.outputs import check_output_dir, check_output_file

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
_HELD: set[str] = set()
"""Tokens of the locks this process holds (planning and running check against them)."""


def redacted_command(argv: list[str]) -> str:
    """The command line with the values of ``...storage_options...=VALUE`` overrides
    (credentials) hidden: the lock file lies beside the cache, and its holder is printed in
    errors."""
    return " ".join(
        f"{a.split('=', 1)[0]}={REDACTED}"
        if "storage_options" in a.split("=", 1)[0] and "=" in a
        else a
        for a in argv
    )


@dataclass(frozen=True)
class Subject:
    """What a lock guards, for its messages: the noun, its config key, who writes it, and the
    config key of ``--force-unlock``."""

    noun: str
    option: str
    writer: str
    force_option: str


CACHE = Subject("cache", "cache.path", "precompute", "cache.force_unlock")
RUN_DIR = Subject("run directory", "run.dir", "kdcache train", "run.force_unlock")


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock (the lock file's content)."""

    host: str
    pid: int
    token: str
    time: str = ""
    boot_id: str = ""
    start: int | None = None
    command: str = ""

    @classmethod
    def this_process(cls) -> LockHolder:
        return cls(
            host=platform.node(),
            pid=os.getpid(),
            token=uuid.uuid4().hex,
            time=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            boot_id=_boot_id(),
            start=_start_time(os.getpid()),
            command=redacted_command(sys.argv)[:300],
        )

    @classmethod
    def parse(cls, raw: bytes) -> LockHolder | None:
        try:
            data = json.loads(raw.decode())
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            return None

    def describe(self) -> str:
        command = f", command {self.command!r}" if self.command else ""
        return (
            f"pid {self.pid} on host {self.host!r} since {self.time or 'an unknown time'}{command}"
        )

    def is_ours(self) -> bool:
        return self.token in _HELD

    def is_stale(self) -> bool:
        """True when the holder is certainly gone: same host and boot, and its process is not
        alive."""
        if self.host != platform.node():
            return False
        if self.boot_id and _boot_id() and self.boot_id != _boot_id():
            return True  # the machine rebooted since
        return not _alive(self.pid, self.start)

    def is_alive_here(self) -> bool:
        """True when the holder is certainly alive: a live process on this host and boot."""
        if self.host != platform.node() or self.pid <= 0:
            return False
        if self.boot_id and _boot_id() and self.boot_id != _boot_id():
            return False
        return _alive(self.pid, self.start)


def lock_path(cache_path: str) -> str:
    """``<cache>.lock``, beside the cache."""
    return cache_path.rstrip("/") + LOCK_SUFFIX


class WriterLock:
    """The writer lock of one cache; use as a context manager (acquire on entry, release on
    exit)."""

    def __init__(
        self,
        cache_path: str,
        storage_options: dict[str, Any] | None = None,
        *,
        force: bool = False,
        subject: Subject = CACHE,
    ):
        self.cache_path = cache_path
        self.path = lock_path(cache_path)
        self.storage_options = storage_options or {}
        self.force = force
        self.subject = subject
        self.holder: LockHolder | None = None

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return fsspec.core.url_to_fs(self.path, **self.storage_options)

    def acquire(self) -> None:
        """Take the lock, taking over a stale one (or any one with ``force``); else
        CacheLockedError. A cache path that cannot be written (read-only filesystem, a file in the
        way) is an OutputError here, before any work."""
        option = self.subject.option
        check_output_dir(self.cache_path, option)
        check_output_file(self.path, f"{option} (its writer lock)")
        me = LockHolder.this_process()
        payload = json.dumps(asdict(me)).encode()
        for _ in range(2):  # a second try after removing a stale (or forced) lock
            if self._create(payload):
                self.holder = me
                _HELD.add(me.token)
                logger.debug("took the writer lock %s", self.path)
                return
            current = read_holder(self.path, self.storage_options)
            if current is None or not (self.force or current.is_stale()):
                break
            if current.is_alive_here():  # even forced: a live run on this host keeps its lock
                raise CacheLockedError(self._live_holder_message(current))
            forced = f"--force-unlock ({self.subject.force_option})"
            why = forced if self.force else "its holder is gone"
            logger.warning(
                "removing the writer lock %s of %s: %s", self.path, current.describe(), why
            )
            self._remove()
        holder = read_holder(self.path, self.storage_options)
        raise CacheLockedError(locked_message(self.cache_path, self.path, holder, self.subject))

    def _live_holder_message(self, holder: LockHolder) -> str:
        s = self.subject
        return (
            f"{s.option}: --force-unlock refused: {s.noun} {self.cache_path!r} is held by a live "
            f"{s.writer} on this host ({holder.describe()}, lock {self.path!r}); stop that run "
            "first (--force-unlock is for a holder that is gone, e.g. on another host)"
        )

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if self.holder is None:
            return
        current = read_holder(self.path, self.storage_options)
        if current is not None and current.token == self.holder.token:
            self._remove()
        else:
            logger.warning(
                "the writer lock %s was removed or taken over while this run held it", self.path
            )
        _HELD.discard(self.holder.token)
        self.holder = None

    def _create(self, payload: bytes) -> bool:
        """Exclusive create; False when the file exists; OutputError when it cannot be written."""
        try:
            return self._create_once(payload)
        except FileExistsError:
            return False
        except OSError as exc:
            raise OutputError(
                f"{self.subject.option}: cannot create the writer lock {self.path!r} "
                f"({type(exc).__name__}: {exc})"
            ) from None

    def _create_once(self, payload: bytes) -> bool:
        if "://" not in self.path:
            return _create_local(self.path, payload)
        fs, path = self._fs()
        try:
            return _create_exclusive(fs, path, payload)
        except FileNotFoundError:  # a filesystem with directories, and the parent is missing
            fs.makedirs(fs._parent(path), exist_ok=True)
            return _create_exclusive(fs, path, payload)

    def _remove(self) -> None:
        fs, path = self._fs()
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)


def _create_local(path: str, payload: bytes) -> bool:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(payload)
    return True


def _create_exclusive(fs: fsspec.AbstractFileSystem, path: str, payload: bytes) -> bool:
    try:
        # a cast: fsspec's open is unannotated, so pyright infers a text file for "xb" too
        with cast(IO[bytes], fs.open(path, "xb")) as handle:
            handle.write(payload)
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError, TypeError):  # no exclusive create on this filesystem
        return _create_best_effort(fs, path, payload)


def _create_best_effort(fs: fsspec.AbstractFileSystem, path: str, payload: bytes) -> bool:
    if fs.exists(path):
        return False
    fs.pipe_file(path, payload)
    return fs.cat_file(path) == payload


def read_holder(
    cache_or_lock: str, storage_options: dict[str, Any] | None = None
) -> LockHolder | None:
    """The holder recorded in a lock file (``None`` if there is none or it cannot be read)."""
    path = cache_or_lock if cache_or_lock.endswith(LOCK_SUFFIX) else lock_path(cache_or_lock)
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    try:
        raw = fs.cat_file(root)
    except (FileNotFoundError, IsADirectoryError):
        return None
    holder = LockHolder.parse(raw)
    return (
        holder
        if holder is not None
        else LockHolder(host="?", pid=-1, token="?", command="unreadable lock file")
    )


def check_unlocked(cache_path: str, storage_options: dict[str, Any] | None = None) -> None:
    """Refuse to write a cache whose lock another live process holds (ours or a stale one is
    fine)."""
    holder = read_holder(cache_path, storage_options)
    if holder is None or holder.is_ours():
        return
    if holder.is_stale():
        logger.warning("cache %s has a stale writer lock (%s)", cache_path, holder.describe())
        return
    raise CacheLockedError(locked_message(cache_path, lock_path(cache_path), holder))


def locked_message(
    cache_path: str, path: str, holder: LockHolder | None, subject: Subject = CACHE
) -> str:
    who = (
        holder.describe()
        if holder is not None
        else "another process (the lock vanished while checking it)"
    )
    return (
        f"{subject.noun} {cache_path!r} is being written by another {subject.writer}: "
        f"{who} holds its lock {path!r}. "
        "Wait for that run to finish, or, if it is gone (e.g. killed on another host), rerun with "
        f"--force-unlock ({subject.force_option}=true)"
    )


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start: int | None) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    if _is_zombie(pid):
        return False
    now = _start_time(pid)
    return start is None or now is None or now == start


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
