"""Error classes of kdcache.

Each subclasses a built-in exception too, so callers that catch ``ValueError`` or
``FileNotFoundError`` keep working, and every message names what is wrong and where.
"""

from __future__ import annotations

import re


class KdcacheError(Exception):
    """Base class of every error kdcache raises on purpose."""


class ConfigError(KdcacheError, ValueError):
    """A config file or override is invalid; the message names the dotted key."""


class DataError(KdcacheError, ValueError):
    """A shard or sample is unusable; the message names the shard and the key."""


class DuplicateKeyError(DataError):
    """The same ``__key__`` occurs twice in the dataset."""


class CacheError(KdcacheError):
    """Base class of errors about a cache store."""


class CacheNotFoundError(CacheError, FileNotFoundError):
    """No cache exists at the given path."""


class CacheMismatchError(CacheError, ValueError):
    """A cache does not match the data, recipe, classes or teacher asked for."""


class CacheIncompleteError(CacheError, RuntimeError):
    """A shard (or teacher) has no completion mark yet."""


class CacheLockedError(CacheError, RuntimeError):
    """Another precompute holds the cache's writer lock; the message names the holder."""


class CacheReadError(CacheError, OSError):
    """A stored chunk cannot be read or decoded (damaged file, unreachable object); names array
    and shard."""


class CacheWriteError(CacheError, OSError):
    """Writing a shard's chunks failed (full disk, permissions, object store); its mark stays
    unset."""


class TeacherError(KdcacheError, RuntimeError):
    """A teacher could not be built or produced bad outputs (NaN, inf, wrong shape)."""


class WeightsError(TeacherError, ValueError):
    """A model's weights file (``checkpoint:``, teacher or student) cannot be used: missing,
    unreadable, a pickled object rather than weights, or not fitting the model. The message names
    the file and the forms kdcache accepts."""


class TrainingError(KdcacheError, RuntimeError):
    """Training cannot go on: a non-finite loss (``run.on_nonfinite: stop``); the message names
    the step, epoch and shards."""


class ResultError(KdcacheError, ValueError):
    """A result file (a run record, ``summary.json``, a ``--json`` output) cannot be read, or is not
    the result asked for; the message names the file."""


class OutputError(KdcacheError, OSError):
    """An output path cannot be written (read-only filesystem, a file where a directory is needed,
    no permission); checked before any work, the message names the path and its option or key."""


_WORKER_WRAPPER = re.compile(r"\ACaught (\w+) in DataLoader worker process \d+\.\n")


def user_message(exc: BaseException) -> str:
    """The message to show for ``exc``: torch's DataLoader re-raises a worker's exception as the
    same type with "Caught X in DataLoader worker process N" and the worker's traceback as its
    message; this gives back the worker's own message (the traceback's last entry)."""
    text = str(exc)
    wrapped = _WORKER_WRAPPER.match(text)
    if wrapped is None:
        return text
    # the worker's traceback: indented frames, then "module.Name: message" (maybe several lines)
    start = text.rfind("Traceback (most recent call last):")
    name = re.escape(wrapped.group(1))
    line = re.compile(rf"^(?:[\w.]+\.)?{name}: ", flags=re.MULTILINE).search(text, max(start, 0))
    return text[line.end() :].rstrip() if line is not None else text


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def short_reason(exc: BaseException) -> str:
    """``Type: first sentence`` of an exception, without terminal colour codes (torch's load
    errors run for lines, with ANSI escapes and advice that does not apply here)."""
    text = _ANSI.sub("", str(exc)).strip()
    text = text.splitlines()[0] if text else ""
    text = text.split(". ", 1)[0].rstrip(".")[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
