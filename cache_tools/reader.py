"""The read half of the cache contract: one shard's block, keyed by sample.

The trainer, inspect, validate and verify all read through :func:`read_block`, which fetches each
array's one chunk for the shard and trims the padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kdcache.encoding import decode
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
    sample_idx: np.ndarray | None = None
    """Encoding ``sampled``: the classes drawn from the tail ``[n, A, slots]`` (and below: their
    logits, their counts, 0 for an empty slot, and ``logsumexp(l / T)`` ``[n, A, T]``)."""
    sample_logit: np.ndarray | None = None
    sample_count: np.ndarray | None = None
    lse_t: np.ndarray | None = None
    temperatures: tuple[float, ...] = ()
    """The temperatures of ``lse_t``'s last axis."""

    @property
    def sampled(self) -> bool:
        return self.sample_idx is not None

    def fields(self) -> tuple[np.ndarray, ...]:
        """The arrays in the order of :class:`~kdcache.targets.SparseTargets` (sampled:
        :class:`~kdcache.targets.SampledTargets`, the temperatures broadcast to ``lse_t``)."""
        head = (self.topk_idx, self.topk_logit, self.lse, self.label_logit, self.tail_lse)
        if not self.sampled:
            return head
        temps = np.broadcast_to(np.asarray(self.temperatures, np.float32), self.lse_t.shape).copy()
        return head + (self.sample_idx, self.sample_logit, self.sample_count, self.lse_t, temps)


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
        for name in meta.arrays(store.meta.num_classes)
    }
    temperatures = tuple(meta.sample_temperatures)
    return TeacherBlock(*decode(meta.encoding, arrays, temperatures), temperatures=temperatures)


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
