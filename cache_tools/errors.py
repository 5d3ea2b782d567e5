"""Error classes of kdcache.

Each subclasses a built-in exception too, so callers that catch ``ValueError`` or
``FileNotFoundError`` keep working, and every message names what is wrong and where.
"""

from __future__ import annotations


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
