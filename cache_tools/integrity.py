"""Damage at rest: which chunks a cache must hold, and finding those lost or unreadable.

The layout this relies on (:mod:`kdcache.store`, :mod:`kdcache.writer`): shard ``s`` owns exactly
chunk ``(s, 0, ..., 0)`` of every per-row array (its rows are one chunk along axis 0, every other
axis is a single chunk) and element ``s`` of a completion-mark array, whose chunks hold one
element, so chunk ``(s,)`` there too. The writer stores every chunk of a shard it writes, even
one equal to the fill value. Hence:

- a shard marked complete for its views (``views_done``) holds its chunk of ``keys`` (the worker
  writes them with the views; the driver may have written them at creation too), ``labels``,
  ``status``, ``errors`` and every ``views/*`` array, and a shard marked complete for a teacher
  (``teachers/<t>/done``) its chunk of each of that teacher's arrays: a missing one there is
  damage, where Zarr would quietly read fill values;
- a missing completion-mark chunk means "not done": marks are written last, and only then.

Every chunk ends with a crc32c checksum, so a flipped or truncated byte fails decoding. Readers
check existence per block (:func:`missing_chunks`: one ``exists`` per array, all at once); the
precompute driver checks a whole cache (:func:`find_damage`: one listing per array, and with
``check`` a read of every marked chunk).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.core.sync import sync

from kdcache.errors import CacheReadError
from kdcache.views import param_arrays

if TYPE_CHECKING:  # the store imports this module
    from kdcache.store import CacheStore

VIEWS = "views"
"""The part of a shard its views mark vouches for; any other part is a teacher's name."""
CHECK_BATCH = 16
"""Shards read at once when checking checksums (Zarr fetches their chunks concurrently)."""


@dataclass(frozen=True)
class Damage:
    """One damaged chunk: of which part of which shard, in which array, and how."""

    part: str
    """``views`` or a teacher's name: what a repair redoes."""
    shard: int
    name: str
    """The shard's name."""
    array: str
    """The array's path in the cache, e.g. ``teachers/t1/topk_logit``."""
    reason: str

    def __str__(self) -> str:
        return f"shard {self.name!r}: {self.array!r} {self.reason}"


# ---- chunks of one array --------------------------------------------------------------------


def array_path(array: zarr.Array) -> str:
    return array.path.lstrip("/")


def chunk_key(array: zarr.Array, shard: int) -> str:
    """The store key of the chunk (or Zarr shard) holding shard ``shard``'s rows of ``array``, or
    shard ``shard``'s completion mark in a mark array: chunk ``(shard, 0, ..., 0)`` in both (see
    the module docstring)."""
    coords = (shard,) + (0,) * (array.ndim - 1)
    return f"{array.store_path.path}/{array.metadata.encode_chunk_key(coords)}"


def missing_chunks(arrays: Sequence[zarr.Array], shard: int) -> list[zarr.Array]:
    """The arrays whose chunk of ``shard`` is not stored: one ``exists`` per array, issued
    together (on an object store that is one round trip, not one per array)."""
    found = sync(_exists_all(arrays, shard))
    return [array for array, ok in zip(arrays, found, strict=True) if not ok]


async def _exists_all(arrays: Sequence[zarr.Array], shard: int) -> list[bool]:
    return await asyncio.gather(
        *(array.store_path.store.exists(chunk_key(array, shard)) for array in arrays)
    )


def stored_shards(array: zarr.Array, num_shards: int) -> set[int]:
    """The shards whose chunk of ``array`` is stored, from one listing of the array's prefix."""
    wanted = {chunk_key(array, shard): shard for shard in range(num_shards)}
    listed = sync(_list_prefix(array))
    return {wanted[key] for key in listed if key in wanted}


async def _list_prefix(array: zarr.Array) -> list[str]:
    store = array.store_path.store
    return [key async for key in store.list_prefix(array.store_path.path)]


def read_marks(array: zarr.Array) -> tuple[np.ndarray, list[int]]:
    """A completion-mark array as booleans, and the shards whose mark chunk cannot be decoded
    (those read as not done)."""
    try:
        return np.asarray(array[:]) > 0, []
    except OSError:  # unreachable, not damaged: see _damaged
        raise
    except Exception:  # a damaged chunk among them: find which, one by one
        pass
    marks = np.zeros(array.shape[0], dtype=bool)
    unreadable = []
    for shard in range(array.shape[0]):
        if _damaged(array, shard) is None:
            marks[shard] = bool(array[shard] > 0)
        else:
            unreadable.append(shard)
    return marks, unreadable


def _damaged(array: zarr.Array, selection: slice | int) -> str | None:
    """Why ``array[selection]`` fails to decode (damage), or None when it decodes. A store that
    cannot be read (OSError) is no evidence of damage: that propagates, so an outage never
    clears a mark."""
    try:
        array[selection]
    except OSError:
        raise
    except Exception as exc:  # the crc32c codec raises ValueError, decompressors RuntimeError
        return f"{type(exc).__name__}: {str(exc)[:120]}"
    return None


# ---- the parts of a shard -------------------------------------------------------------------


def part_arrays(store: CacheStore, part: str) -> dict[str, zarr.Array]:
    """The arrays holding a chunk of ``part`` (views or a teacher) per shard, by path."""
    if part == VIEWS:
        views = ["image_hw", *param_arrays(store.meta.recipe)]
        paths = ["keys", "labels", "status", "errors", *(f"{VIEWS}/{name}" for name in views)]
    else:
        meta = store.teacher_meta(part)
        names = meta.arrays(store.meta.num_classes)
        paths = [f"teachers/{part}/{name}" for name in names]
    return {path: store.array(path) for path in paths}


def mark_path(part: str) -> str:
    """The completion-mark array of ``views`` or of a teacher."""
    return "views_done" if part == VIEWS else f"teachers/{part}/done"


def part_marks(store: CacheStore, part: str) -> tuple[np.ndarray, list[int]]:
    """Which shards are marked complete for ``part``, and which marks cannot be read."""
    return read_marks(store.array(mark_path(part)))


# ---- a whole cache --------------------------------------------------------------------------


def find_damage(
    store: CacheStore, teachers: list[str] | None = None, *, check: bool = False
) -> list[Damage]:
    """Every damaged chunk of the shards marked complete, for the views and each teacher
    (default: all of the cache's): unreadable marks, missing chunks (one listing per array) and,
    with ``check``, chunks that fail their checksum or cannot be decoded (reads every one)."""
    teachers = store.teachers if teachers is None else teachers
    try:
        return [d for part in [VIEWS, *teachers] for d in _part_damage(store, part, check)]
    except CacheReadError:  # already names what (an OSError too)
        raise
    except OSError as exc:
        raise CacheReadError(
            f"cache {store.path!r}: cannot check its chunks ({type(exc).__name__}: "
            f"{str(exc)[:200]}): the store could not be read; no mark was changed"
        ) from exc


def _part_damage(store: CacheStore, part: str, check: bool) -> list[Damage]:
    """:func:`find_damage` of one part (views or a teacher)."""
    marks, unreadable = part_marks(store, part)
    found = [
        _damage(store, part, shard, mark_path(part), "(completion mark) cannot be decoded")
        for shard in unreadable
    ]
    marked = [int(shard) for shard in np.flatnonzero(marks)]
    for path, array in part_arrays(store, part).items():
        stored = stored_shards(array, store.num_shards)
        found += [
            _damage(store, part, shard, path, LOST) for shard in marked if shard not in stored
        ]
        if check:
            present = [shard for shard in marked if shard in stored]
            found += _undecodable(store, part, path, array, present)
    return found


LOST = (
    "has no chunk file for the shard, which is marked complete (lost after it was written: "
    "Zarr would read fill values)"
)


def _damage(store: CacheStore, part: str, shard: int, path: str, reason: str) -> Damage:
    return Damage(part, shard, store.meta.fingerprint.shards[shard], path, reason)


def _undecodable(
    store: CacheStore, part: str, path: str, array: zarr.Array, shards: list[int]
) -> list[Damage]:
    """The shards among ``shards`` whose chunk of ``array`` fails to decode: runs of consecutive
    shards are read together, and a run that fails is read again shard by shard."""
    found = []
    for run in _runs(shards, CHECK_BATCH):
        if _damaged(array, slice(run[0] * store.cap, (run[-1] + 1) * store.cap)) is None:
            continue
        for shard in run:
            why = _damaged(array, slice(shard * store.cap, (shard + 1) * store.cap))
            if why is not None:
                found.append(_damage(store, part, shard, path, f"cannot be decoded ({why})"))
    return found


def _runs(shards: list[int], size: int) -> Iterator[list[int]]:
    """``shards`` (sorted) cut into runs of consecutive numbers, at most ``size`` long."""
    run: list[int] = []
    for shard in shards:
        if run and (shard != run[-1] + 1 or len(run) == size):
            yield run
            run = []
        run.append(shard)
    if run:
        yield run
