"""Damage at rest: which chunks a cache must hold, and finding those lost or unreadable.

The layout this relies on (:mod:`kdcache.cache.store`, :mod:`kdcache.cache.writer`): shard ``s``
owns the chunks ``(s, j, 0, ..., 0)`` of every per-row array (its rows are one chunk along axis 0;
the view axis, where there is one, is cut into chunks of the view count the array was created with,
``j`` counting them; every other axis is a single chunk) and element ``s`` of a completion-mark
array, whose chunks hold one element, so chunk ``(s,)`` there too. The writer stores every chunk of
a shard it writes, even one equal to the fill value.

A part (the views, or one teacher) has one completion mark per *view block* (:class:`ViewBlock`):
views ``[0, A)`` as first made, then each range of views added when the cache grew
(:mod:`kdcache.cache.growth`); a part created after the cache grew starts with all its views in one
block. Hence:

- a shard marked complete for its first views block (``views_done``) holds its chunk of ``keys``
  (the worker writes them with the views; the driver may have written them at creation too),
  ``labels``, ``status``, ``errors``, ``views/image_hw`` and the block's chunks of every other
  ``views/*`` array; marked for a later views block (``views_done_from_<start>``), that block's
  chunks of the ``views/*`` arrays with a view axis; marked for a teacher's block
  (``teachers/<t>/done``, ``teachers/<t>/done_from_<start>``), that block's chunks of each of the
  teacher's arrays: a missing one there is damage, where Zarr would quietly read fill values;
- a missing completion-mark chunk means "not done": marks are written last, and only then; so
  does a missing mark array of a later block (the planner creates it when it finishes growing a
  cache whose growth was cut short).

Every chunk ends with a crc32c checksum, so a flipped or truncated byte fails decoding. Readers
check existence per block (:func:`missing_chunks`: one ``exists`` per array, all at once); the
precompute driver checks a whole cache (:func:`find_damage`: one listing per array, and with
``check`` a read of every marked chunk).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import zarr
from zarr.core.sync import sync
from zarr.storage import FsspecStore

from kdcache.core.errors import CacheReadError
from kdcache.views.recipe import param_arrays

if TYPE_CHECKING:  # the store imports this module
    from kdcache.cache.store import CacheStore

VIEWS = "views"
"""The part of a shard its views mark vouches for; any other part is a teacher's name."""
CHECK_BATCH = 16
"""Shards read at once when checking checksums (Zarr fetches their chunks concurrently)."""


@dataclass(frozen=True)
class ViewBlock:
    """Views ``[start, stop)`` of a part (``views`` or a teacher) under one completion mark."""

    part: str
    start: int
    stop: int

    @property
    def mark(self) -> str:
        """The path of the block's completion-mark array."""
        return mark_path(self.part, self.start)

    def describe(self) -> str:
        """``views 2..3`` (the views of the block, for messages)."""
        last = self.stop - 1
        return f"view {self.start}" if last == self.start else f"views {self.start}..{last}"


@dataclass(frozen=True)
class Held:
    """An array a block vouches for, and the view ids of it the block holds (None: no view axis)."""

    path: str
    array: zarr.Array
    view_range: slice | None


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
    start: int = 0
    """The first view of the part's damaged block (its mark is the one a repair clears)."""

    def __str__(self) -> str:
        return f"shard {self.name!r}: {self.array!r} {self.reason}"


# ---- chunks of one array --------------------------------------------------------------------


def array_path(array: zarr.Array) -> str:
    return array.path.lstrip("/")


def chunk_key(array: zarr.Array, shard: int, view_chunk: int = 0) -> str:
    """The store key of the chunk (or Zarr shard) holding shard ``shard``'s rows of ``array``
    (``view_chunk``: which chunk along the view axis), or shard ``shard``'s completion mark in a
    mark array: chunk ``(shard, view_chunk, 0, ..., 0)`` (see the module docstring)."""
    coords = (shard,) + ((view_chunk,) if array.ndim > 1 else ()) + (0,) * (array.ndim - 2)
    return f"{array.store_path.path}/{array.metadata.encode_chunk_key(coords)}"


def chunk_keys(array: zarr.Array, shard: int, view_range: slice | None = None) -> list[str]:
    """The keys of shard ``shard``'s chunks of ``array`` that hold the view ids ``view_range``
    (None: the array has no view axis, or all of its one chunk)."""
    if view_range is None:
        return [chunk_key(array, shard)]
    width = array.chunks[1]
    # the view axis is cut every ``width`` views: the block's views lie in these chunks
    first = view_range.start // width
    last = (view_range.stop - 1) // width
    return [chunk_key(array, shard, j) for j in range(first, last + 1)]


def missing_chunks(held: Sequence[Held], shard: int) -> list[Held]:
    """The arrays one of whose chunks of ``shard`` (for the views held) is not stored: one
    ``exists`` per chunk, issued together (on an object store that is one round trip)."""
    keys = [(item, key) for item in held for key in chunk_keys(item.array, shard, item.view_range)]
    found = sync(_exists_all([(item.array, key) for item, key in keys]))
    missing = {id(item) for (item, _), ok in zip(keys, found, strict=True) if not ok}
    return [item for item in held if id(item) in missing]


async def _exists_all(keys: Sequence[tuple[zarr.Array, str]]) -> list[bool]:
    return await asyncio.gather(*(array.store_path.store.exists(key) for array, key in keys))


def stored_shards(array: zarr.Array, num_shards: int, view_range: slice | None = None) -> set[int]:
    """The shards whose chunks of ``array`` (those holding ``view_range``) are all stored, from one
    listing of the array's prefix."""
    wanted = {shard: chunk_keys(array, shard, view_range) for shard in range(num_shards)}
    listed = set(sync(_list_prefix(array)))
    return {shard for shard, keys in wanted.items() if all(key in listed for key in keys)}


async def _list_prefix(array: zarr.Array) -> list[str]:
    """The array's stored chunk keys that hold bytes: a 0-byte chunk is damage (every chunk ends
    with its 4-byte checksum), left out as if lost. An fsspec store lists sizes in one listing;
    a local one stats each file; any other asks each key's size."""
    store = array.store_path.store
    prefix = array.store_path.path
    if isinstance(store, FsspecStore):
        # fsspec's _find is unannotated: its inferred return type joins the name list of
        # detail=False to the {path: info} dict that detail=True returns
        found = cast(
            "dict[str, dict[str, Any]]",
            await store.fs._find(f"{store.path}/{prefix}", detail=True, withdirs=False),
        )
        return [
            path.removeprefix(f"{store.path}/")
            for path, info in found.items()
            if info.get("size") is None or info["size"] > 0
        ]
    keys = [key async for key in store.list_prefix(prefix)]
    sizes = await asyncio.gather(*(store.getsize(key) for key in keys))
    return [key for key, size in zip(keys, sizes, strict=True) if size > 0]


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
            marks[shard] = bool(np.asarray(array[shard]) > 0)
        else:
            unreadable.append(shard)
    return marks, unreadable


def _damaged(array: zarr.Array, selection: slice | int | tuple) -> str | None:
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


def view_paths(store: CacheStore, part: str) -> list[str]:
    """The arrays of ``part`` (views or a teacher) with a view axis (``[R, A, ...]``)."""
    if part == VIEWS:
        return [f"{VIEWS}/{name}" for name in param_arrays(store.meta.recipe)]
    meta = store.teacher_meta(part)
    return [f"teachers/{part}/{name}" for name in meta.arrays(store.meta.num_classes)]


def row_paths(part: str) -> list[str]:
    """The arrays of ``part`` without a view axis (the views part's; a teacher has none)."""
    return ["keys", "labels", "status", "errors", f"{VIEWS}/image_hw"] if part == VIEWS else []


def part_blocks(store: CacheStore, part: str) -> list[ViewBlock]:
    """The view blocks of ``part``: its first block is the view count its arrays were created
    with (their chunk width along the view axis), then one block per growth of the cache past
    it (``store.meta.view_blocks``)."""
    width = store.array(view_paths(store, part)[0]).chunks[1]
    ends = [width, *(end for end in store.view_block_ends if end > width)]
    starts = [0, *ends[:-1]]
    return [ViewBlock(part, start, stop) for start, stop in zip(starts, ends, strict=True)]


def block_arrays(store: CacheStore, block: ViewBlock) -> list[Held]:
    """The arrays holding a chunk of ``block`` per shard, with the views of each it holds."""
    view_range = slice(block.start, block.stop)
    rows = row_paths(block.part) if block.start == 0 else []
    held = [Held(path, store.array(path), None) for path in rows]
    return held + [
        Held(path, store.array(path), view_range) for path in view_paths(store, block.part)
    ]


def part_arrays(store: CacheStore, part: str) -> dict[str, zarr.Array]:
    """Every array holding a chunk of ``part`` (views or a teacher) per shard, by path."""
    return {path: store.array(path) for path in row_paths(part) + view_paths(store, part)}


def mark_path(part: str, start: int = 0) -> str:
    """The completion-mark array of ``views`` or of a teacher, for its view block starting at
    view ``start`` (0: the first block)."""
    base = "views_done" if part == VIEWS else f"teachers/{part}/done"
    return base if start == 0 else f"{base}_from_{start}"


def block_marks(store: CacheStore, block: ViewBlock) -> tuple[np.ndarray, list[int]]:
    """Which shards are marked complete for ``block``, and which marks cannot be read; a later
    block whose mark array is not there yet (growth cut short) is done nowhere."""
    if block.start and not store.has(block.mark):
        return np.zeros(store.num_shards, dtype=bool), []
    return read_marks(store.array(block.mark))


def part_marks(store: CacheStore, part: str) -> tuple[np.ndarray, list[int]]:
    """Which shards are marked complete for every block of ``part``, and which marks cannot be
    read."""
    done = np.ones(store.num_shards, dtype=bool)
    unreadable: set[int] = set()
    for block in part_blocks(store, part):
        marks, bad = block_marks(store, block)
        done &= marks
        unreadable.update(bad)
    return done, sorted(unreadable)


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
    """:func:`find_damage` of one part (views or a teacher), block by block."""
    return [d for block in part_blocks(store, part) for d in _block_damage(store, block, check)]


def _block_damage(store: CacheStore, block: ViewBlock, check: bool) -> list[Damage]:
    marks, unreadable = block_marks(store, block)
    found = [
        _damage(store, block, shard, block.mark, "(completion mark) cannot be decoded")
        for shard in unreadable
    ]
    marked = [int(shard) for shard in np.flatnonzero(marks)]
    for held in block_arrays(store, block):
        stored = stored_shards(held.array, store.num_shards, held.view_range)
        found += [
            _damage(store, block, shard, held.path, LOST) for shard in marked if shard not in stored
        ]
        if check:
            present = [shard for shard in marked if shard in stored]
            found += _undecodable(store, block, held, present)
    return found


LOST = (
    "has no chunk file for the shard, which is marked complete (lost after it was written: "
    "Zarr would read fill values)"
)


def _damage(store: CacheStore, block: ViewBlock, shard: int, path: str, reason: str) -> Damage:
    name = store.meta.fingerprint.shards[shard]
    return Damage(block.part, shard, name, path, reason, block.start)


def _undecodable(
    store: CacheStore, block: ViewBlock, held: Held, shards: list[int]
) -> list[Damage]:
    """The shards among ``shards`` whose chunks of ``held`` fail to decode: runs of consecutive
    shards are read together, and a run that fails is read again shard by shard."""
    found = []

    def selection(first: int, last: int) -> tuple[slice, ...]:
        rows = slice(first * store.cap, (last + 1) * store.cap)
        return (rows,) if held.view_range is None else (rows, held.view_range)

    for run in _runs(shards, CHECK_BATCH):
        if _damaged(held.array, selection(run[0], run[-1])) is None:
            continue
        for shard in run:
            why = _damaged(held.array, selection(shard, shard))
            if why is not None:
                reason = f"cannot be decoded ({why})"
                found.append(_damage(store, block, shard, held.path, reason))
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
