"""The read half of the cache contract: one shard's block, keyed by sample.

The trainer, inspect, validate and verify all read through :func:`read_block`, which fetches each
array's one chunk for the shard and trims the padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kdcache.encoding import array_specs, decode
from kdcache.errors import CacheIncompleteError, CacheMismatchError, CacheReadError
from kdcache.store import STATUS_VALID, CacheStore
from kdcache.views import ViewParams, param_arrays


@dataclass
class TeacherBlock:
    """One teacher's targets for the rows of a shard: arrays ``[n, A, k]`` and ``[n, A]``."""

    topk_idx: np.ndarray
    topk_logit: np.ndarray
    lse: np.ndarray
    label_logit: np.ndarray
    tail_lse: np.ndarray
    """logsumexp of the logits outside the top-k (``-inf``: no tail)."""


@dataclass
class ShardBlock:
    """Everything the cache holds for one shard, padding trimmed."""

    shard: str
    index: int
    keys: np.ndarray
    labels: np.ndarray
    status: np.ndarray
    errors: np.ndarray
    views: ViewParams
    teachers: dict[str, TeacherBlock] = field(default_factory=dict)
    _rows: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def row(self, key: str) -> int:
        """Row of ``key`` within the block; an unknown key is an error (never a misalignment)."""
        if self._rows is None:
            self._rows = {str(k): i for i, k in enumerate(self.keys)}
        try:
            return self._rows[key]
        except KeyError:
            raise CacheMismatchError(
                f"key {key!r} is not in the cache's block for shard {self.shard!r}"
            ) from None

    def valid(self, row: int) -> bool:
        return int(self.status[row]) == STATUS_VALID


def read_block(
    store: CacheStore,
    shard: int | str,
    teachers: list[str] | None = None,
    *,
    require_complete: bool = True,
) -> ShardBlock:
    """Read one shard's rows: keys, labels, status, view params and the named teachers' targets."""
    index = store.shard_index(shard) if isinstance(shard, str) else shard
    name = store.meta.fingerprint.shards[index]
    teachers = list(teachers or [])
    if require_complete:
        _require_done(store, index, name, teachers)
    rows = store.rows(index)
    arrays = {
        key: read_rows(store, store.group, key, rows, name)
        for key in ("keys", "labels", "status", "errors")
    }
    block = ShardBlock(shard=name, index=index, views=read_views(store, rows, name), **arrays)
    for teacher in teachers:
        block.teachers[teacher] = read_teacher_rows(store, teacher, rows, name)
    return block


def read_views(store: CacheStore, rows: slice, shard: str) -> ViewParams:
    """The stored view parameters of a row range."""
    group = store.views
    names = ["image_hw", *param_arrays(store.meta.recipe)]
    arrays = {name: read_rows(store, group, name, rows, shard) for name in names}
    return ViewParams(arrays.pop("image_hw"), arrays)


def read_teacher_rows(store: CacheStore, teacher: str, rows: slice, shard: str) -> TeacherBlock:
    """One teacher's targets for a row range, decoded from its encoding."""
    group = store.teacher_group(teacher)
    meta = store.teacher_meta(teacher)
    arrays = {
        name: read_rows(store, group, name, rows, shard)
        for name in array_specs(meta.encoding, meta.index_dtype)
    }
    return TeacherBlock(*decode(meta.encoding, arrays))


def read_rows(store: CacheStore, group, name: str, rows: slice, shard: str) -> np.ndarray:
    """``group[name][rows]``; a damaged or unreadable chunk is a :class:`CacheReadError` naming
    array and shard."""
    try:
        return group[name][rows]
    except Exception as exc:  # codecs raise RuntimeError/ValueError, stores OSError: all one here
        path = f"{group.path}/{name}".lstrip("/")
        raise CacheReadError(
            f"cache {store.path!r}: cannot read {path!r} of shard {shard!r} "
            f"({type(exc).__name__}: {str(exc)[:200]}); the chunk is damaged or unreachable"
        ) from exc


def _require_done(store: CacheStore, index: int, name: str, teachers: list[str]) -> None:
    if not bool(store.group["views_done"][index]):
        raise CacheIncompleteError(
            f"shard {name!r} has no views yet in cache {store.path!r}: run precompute to finish it"
        )
    for teacher in teachers:
        if not bool(store.teacher_group(teacher)["done"][index]):
            raise CacheIncompleteError(
                f"shard {name!r} is not complete for teacher {teacher!r} in cache "
                f"{store.path!r}: run precompute to finish it"
            )
