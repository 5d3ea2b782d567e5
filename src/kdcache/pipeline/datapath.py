"""The producer side of a shard task: read, decode once, draw or replay views, render, batch.

A shard task's views are made group by group (a mixing group is decoded and rendered in one
place, so every view's partner is at hand; without mixing a group is one row). :class:`DataPath`
streams the shard's tar, checks its keys against the plan, and hands the groups to
:func:`make_group`, the one function that turns a group's samples into its rows' labels and
status, its views' parameters (drawn from ``(seed, key, view)``, or the stored ones) and the views
rendered in every rendering the run's teachers need. It runs either

* **in the actor's own process** (``data_workers`` 0): one background thread, a few batches ahead
  of the teachers (``prefetch_batches``); or
* **on a pool of data worker processes** (``data_workers`` N >= 1), started once per actor with
  one torch thread each: consecutive groups go out as jobs of about ``VIEWS_PER_JOB`` views, at
  most ``JOBS_PER_WORKER`` per worker in flight, and come back as tensors in shared memory
  (torch's multiprocessing reductions), in the order they were sent. The background thread reads
  the tar, sends the jobs and gathers the results while the teachers run.

Either way the rows are merged and the views batched in shard order, so the batches, and the
cache, are the same for every worker count (views depend on ``(seed, key, view)`` only). On CUDA
the batches are collated into pinned memory, so the teachers' host-to-device copies are
asynchronous (:class:`~kdcache.models.runner.ModelRunner` copies with ``non_blocking=True``); on CPU
into memory reused from earlier batches once nothing holds them (:class:`BatchMemory`).

A data worker process that raises fails the shard with its error (a :class:`DataError` names
shard and key; anything else is a :class:`DataWorkerError` naming the shard); one that dies
(killed, out of memory) breaks the pool, which fails the shard by name and is replaced for the
next one. Worker processes exit by themselves when the actor's process is gone.

Test-only fault hook: with ``KDCACHE_FAULT_DATA_WORKER=<shard name>:<exit|raise>`` set when the
pool starts, a data worker process given a job of that shard exits (``os._exit(1)``) or raises.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from kdcache.cache.store import STATUS_INVALID, STATUS_VALID
from kdcache.core.errors import DataError, KdcacheError
from kdcache.pipeline.plan import ShardKeys, ShardTask
from kdcache.shards.reading import (
    DEFAULT_LABEL_KEY,
    MAX_PIXELS,
    Sample,
    decode_image,
    iter_shard,
)
from kdcache.targets.sparse import MixedLabels
from kdcache.views.recipe import Rendering, ViewParams, ViewRecipe, draw_group, grouped, render_rows

logger = logging.getLogger(__name__)

T = TypeVar("T")
PREFETCH_BATCHES = 2
VIEWS_PER_JOB = 64
"""Views a data worker makes per job: enough to amortise the round trip (a few ms), few enough
that the first batch is ready soon and a job's results stay small in shared memory."""
JOBS_PER_WORKER = 2
"""Jobs in flight per data worker process: one running, one waiting, so none idles."""
BATCHES_HELD = 3
"""Batches beyond the prefetched ones that may be alive at once (the one the background thread
is filling, the one the teachers run on, one the caller still holds): the batch memory keeps
that many buffers more than ``prefetch_batches`` for reuse."""
SLOT_BYTES_MAX = 2 << 30
"""Shared memory the view slots may take (:class:`ViewSlots`); beyond it (large mixing groups,
many workers, large renderings) jobs send their views in new shared memory instead."""
FAULT_ENV = "KDCACHE_FAULT_DATA_WORKER"
PARENT_POLL_S = 1.0
"""How often a data worker process checks that the actor's process is still there."""


class DataWorkerError(KdcacheError, RuntimeError):
    """A data worker process died, or raised something other than a DataError, on a shard."""


# ---- what a run and a task make ----------------------------------------------------------------


@dataclass(frozen=True)
class DataSettings:
    """How views are made (picklable; the same for every shard task of a run)."""

    recipe: ViewRecipe
    num_views: int
    seed: int
    num_classes: int
    on_error: str
    renderings: tuple[tuple[str, Rendering], ...]
    """The renderings the run's teachers need, by :func:`rendering_key`."""
    max_pixels: int | None = MAX_PIXELS
    """Pixel limit of one image (``data.max_pixels``), checked before decoding."""


ViewRange = tuple[int, int]


@dataclass(frozen=True)
class ViewWork:
    """What a shard task makes of its rows: fresh rows or stored ones, which views' parameters
    are drawn here, and which views are rendered for the teachers."""

    fresh: bool
    """The rows are new: labels and status come from the samples (else from the cache)."""
    draw: tuple[int, ...]
    """Views whose parameters are drawn here (all of them for fresh rows; a grown cache's new
    views otherwise)."""
    render: tuple[int, ...]
    """Views rendered for the teachers (those of the teachers' unfinished view blocks)."""

    @classmethod
    def of(cls, task: ShardTask, num_views: int) -> ViewWork:
        if task.make_views:
            draw: tuple[int, ...] = tuple(range(num_views))
        else:
            draw = tuple(a for start, stop in task.new_views for a in range(start, stop))
        wanted = {a for name in task.teachers for a in task.views_of(name, num_views)}
        return cls(task.make_views, draw, tuple(sorted(wanted)))


def rendering_key(rendering: Rendering) -> str:
    """A hashable name of a rendering: teachers with equal renderings share their views."""
    return rendering.model_dump_json()


@dataclass
class ShardRows:
    """Per-row state of a shard: labels, status, reasons, view params (fresh or stored)."""

    labels: np.ndarray
    status: np.ndarray
    errors: list[str]
    params: ViewParams
    stored: bool

    @classmethod
    def fresh(cls, recipe: ViewRecipe, n: int, num_views: int) -> ShardRows:
        return cls(
            np.full(n, -1, np.int32),
            np.zeros(n, np.int8),
            [""] * n,
            ViewParams.empty(recipe, n, num_views),
            stored=False,
        )

    def group(self, start: int, size: int) -> GroupRows:
        """A copy of rows ``[start, start + size)``: what a data worker needs of them."""
        rows = slice(start, start + size)
        params = ViewParams(
            self.params.image_hw[rows].copy(),
            {name: array[rows].copy() for name, array in self.params.arrays.items()},
        )
        errors = list(self.errors[rows])
        return GroupRows(start, self.labels[rows].copy(), self.status[rows].copy(), errors, params)

    def merge(self, rows: GroupRows, work: ViewWork) -> None:
        """Take a group's rows back: labels and status of fresh rows, the views drawn."""
        span = slice(rows.start, rows.start + len(rows.labels))
        if work.fresh:
            self.labels[span] = rows.labels
            self.status[span] = rows.status
            self.errors[span] = rows.errors
            self.params.image_hw[span] = rows.params.image_hw
        drawn = list(work.draw)
        for name, array in self.params.arrays.items():
            array[span, drawn] = rows.params.arrays[name][:, drawn]


@dataclass
class GroupRows:
    """A group's rows (local row 0 is shard row ``start``): labels, status, reasons, params."""

    start: int
    labels: np.ndarray
    status: np.ndarray
    errors: list[str]
    params: ViewParams


# ---- batches -----------------------------------------------------------------------------------


@dataclass
class ViewBatch:
    """Views on their way to the teachers: flat view indices ``row * A + a``, the views' pixels in
    each rendering the run's teachers need, and each view's hard labels (mixed views have two)."""

    flat: np.ndarray
    pixels: dict[str, torch.Tensor]
    """Rendering key (:func:`rendering_key`) -> ``uint8[B, C, S, S]``."""
    labels: np.ndarray
    partner_labels: np.ndarray
    lam: np.ndarray
    """Weight of ``labels`` (1 for unmixed views), float32."""

    def __len__(self) -> int:
        return len(self.flat)

    def mixed_labels(self) -> MixedLabels:
        return MixedLabels(
            torch.from_numpy(self.labels.astype(np.int64)),
            torch.from_numpy(self.partner_labels.astype(np.int64)),
            torch.from_numpy(self.lam.astype(np.float32)),
        )

    @staticmethod
    def concat(
        parts: list[ViewBatch],
        pin_memory: bool = False,
        shared: bool = False,
        memory: BatchMemory | None = None,
    ) -> ViewBatch:
        """One batch of ``parts`` in order (``pin_memory``: its pixels in page-locked memory;
        ``shared``: in shared memory, so sending it to another process copies nothing;
        ``memory``: in CPU memory reused from earlier batches that nothing holds any more)."""
        pixels = {}
        for key in parts[0].pixels:
            tensors = [p.pixels[key] for p in parts]
            shape = (sum(len(t) for t in tensors), *tensors[0].shape[1:])
            dtype = tensors[0].dtype
            if memory is not None and not (pin_memory or shared):
                out = memory.empty(key, shape, dtype)
            else:
                out = torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
            pixels[key] = torch.cat(tensors, out=out.share_memory_() if shared else out)
        return ViewBatch(
            np.concatenate([p.flat for p in parts]),
            pixels,
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.partner_labels for p in parts]),
            np.concatenate([p.lam for p in parts]),
        )

    def slice(self, start: int, stop: int) -> ViewBatch:
        return ViewBatch(
            self.flat[start:stop],
            {key: pixels[start:stop] for key, pixels in self.pixels.items()},
            self.labels[start:stop],
            self.partner_labels[start:stop],
            self.lam[start:stop],
        )

    def without_pixels(self) -> ViewBatch:
        """The batch without its pixels (sent between processes when those are shared)."""
        return ViewBatch(self.flat, {}, self.labels, self.partner_labels, self.lam)

    def select(self, keep: np.ndarray) -> ViewBatch:
        """The views where ``keep`` (bool per view) is set."""
        if keep.all():
            return self
        index = torch.from_numpy(np.flatnonzero(keep))
        return ViewBatch(
            self.flat[keep],
            {key: pixels[index] for key, pixels in self.pixels.items()},
            self.labels[keep],
            self.partner_labels[keep],
            self.lam[keep],
        )


def storage_uses(tensor: torch.Tensor) -> int | None:
    """How many references hold ``tensor``'s storage: tensors, views and slices of it, numpy
    arrays and DLPack capsules over it (not a bare ``untyped_storage()`` object, nor a raw
    ``data_ptr``, which nothing in the data path keeps); None where this torch does not say."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    return use_count(tensor.untyped_storage()._cdata)


class BatchMemory:
    """CPU memory for collated batches, written again only once nothing else holds it.

    Copying a batch into freshly allocated memory pays a page fault per page: measured here,
    95 µs per 224 px RGB view against 25 µs into memory touched before, which made collation
    most of the actor's serial share of the data path. Each rendering gets up to ``limit``
    buffers of a full batch; a batch is a prefix of one. A buffer is reused only when its
    storage's reference count is back to the pool's own (a batch, or any view or slice of it,
    still alive keeps it out of use); with every buffer held, or where torch does not report
    the count, the batch gets fresh memory, as without the pool.
    """

    def __init__(self, limit: int, rows: int):
        self.limit = limit
        self.rows = rows
        """Views per pooled buffer (a full batch): a short last batch takes a prefix of one,
        and one allocated for it can serve full batches later."""
        self.buffers: dict[str, list[tuple[torch.Tensor, int]]] = {}
        """Rendering key -> (buffer, its storage's reference count while only the pool holds
        it)."""

    def empty(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Uninitialised ``shape`` memory that nothing else references."""
        buffers = self.buffers.setdefault(key, [])
        for buffer, idle in buffers:
            fits = len(buffer) >= shape[0] and buffer.shape[1:] == shape[1:]
            if fits and buffer.dtype == dtype and storage_uses(buffer) == idle:
                return buffer[: shape[0]]
        if len(buffers) >= self.limit:
            return torch.empty(shape, dtype=dtype)
        buffer = torch.empty((max(shape[0], self.rows), *shape[1:]), dtype=dtype)
        idle = storage_uses(buffer)
        if idle is not None:
            buffers.append((buffer, idle))
        # a view: holding it counts as a use of the storage, which the pool's own tensor does not
        return buffer[: shape[0]]


class ViewBatcher:
    """Collects groups' views into batches of exactly ``size`` views (the last one smaller),
    collated into pinned memory with ``pin_memory``, else into ``memory`` where given. A part may
    have an ``owner`` (a view slot): ``release(owner)`` is called once its last view is copied
    into a batch."""

    def __init__(
        self,
        size: int,
        pin_memory: bool = False,
        release: Callable[[int], None] = lambda owner: None,
        memory: BatchMemory | None = None,
    ):
        self.size = size
        self.pin_memory = pin_memory
        self.release = release
        self.memory = memory
        self.parts: list[tuple[ViewBatch, int | None]] = []
        self.count = 0

    def add(self, part: ViewBatch, owner: int | None = None) -> Iterator[ViewBatch]:
        self.parts.append((part, owner))
        self.count += len(part)
        while self.count >= self.size:
            yield self._take(self.size)

    def flush(self) -> Iterator[ViewBatch]:
        if self.count:
            yield self._take(self.count)

    def _take(self, n: int) -> ViewBatch:
        """The first ``n`` views of the parts collected (each view copied once)."""
        taken: list[ViewBatch] = []
        rest: list[tuple[ViewBatch, int | None]] = []
        done: list[int] = []
        count = 0
        for part, owner in self.parts:
            need = n - count
            if need <= 0:
                rest.append((part, owner))
            elif len(part) <= need:
                taken.append(part)
                count += len(part)
                if owner is not None:
                    done.append(owner)
            else:
                taken.append(part.slice(0, need))
                rest.append((part.slice(need, len(part)), owner))
                count = n
        self.parts = rest
        self.count -= n
        batch = ViewBatch.concat(taken, self.pin_memory, memory=self.memory)
        for owner in done:  # copied out: the slot can take another job
            self.release(owner)
        return batch


# ---- one group ---------------------------------------------------------------------------------


@dataclass
class GroupJob:
    """A mixing group of a shard: its samples and the state of its rows."""

    shard: str
    samples: list[Sample]
    rows: GroupRows


@dataclass
class GroupViews:
    """What :func:`make_group` made of a group: its rows, and its views (None: no valid row or
    nothing to render)."""

    rows: GroupRows
    batch: ViewBatch | None
    slot: int | None = None
    """The view slot holding ``batch``'s pixels (None: their own memory)."""


Place = Callable[[int], "dict[str, torch.Tensor] | None"]
"""Where to render ``n`` views, by rendering key (None: new memory)."""


def make_group(
    settings: DataSettings, work: ViewWork, job: GroupJob, place: Place | None = None
) -> GroupViews:
    """Decode each image of a group once, draw the views ``work.draw`` of its valid rows and
    render ``work.render`` in every rendering (into ``place(n)`` when it gives buffers): the one
    function behind every worker count."""
    rows = job.rows
    images = {}
    for local, sample in enumerate(job.samples):
        image = _image(settings, work, job, local, sample)
        if image is not None:
            images[local] = image
    if not images:
        return GroupViews(rows, None)
    valid = sorted(images)
    if work.draw:
        keys = {local: job.samples[local].key for local in valid}
        hw = {
            local: (int(images[local].shape[-2]), int(images[local].shape[-1])) for local in valid
        }
        draw_group(rows.params, settings.recipe, settings.seed, valid, keys, hw, work.draw)
    if not work.render:
        return GroupViews(rows, None)
    out = place(len(valid) * len(work.render)) if place is not None else None
    return GroupViews(rows, _render(settings, work, valid, images, rows, out))


def _image(
    settings: DataSettings, work: ViewWork, job: GroupJob, local: int, sample: Sample
) -> torch.Tensor | None:
    """The decoded image of a valid row, or None for an invalid one (recorded under ``skip``; a
    stored invalid row stays invalid)."""
    rows = job.rows
    if not work.fresh:
        return _stored_image(settings, job, local, sample)
    rows.labels[local] = sample.label if sample.label is not None else -1
    try:
        sample.require_label(job.shard, settings.num_classes)
        image = decode_sample(sample, job.shard, settings.recipe.channels, settings.max_pixels)
    except DataError as exc:
        if settings.on_error == "raise":
            raise
        rows.status[local] = STATUS_INVALID
        rows.errors[local] = str(exc)
        return None
    rows.status[local] = STATUS_VALID
    return image


def _stored_image(
    settings: DataSettings, job: GroupJob, local: int, sample: Sample
) -> torch.Tensor | None:
    rows = job.rows
    if int(rows.status[local]) != STATUS_VALID:
        return None
    if sample.label != int(rows.labels[local]):
        raise DataError(
            f"shard {job.shard!r}, key {sample.key!r}: label {sample.label} but the cache "
            f"stored {int(rows.labels[local])}: the shard changed after its views were made"
        )
    image = decode_sample(sample, job.shard, settings.recipe.channels, settings.max_pixels)
    stored = tuple(int(v) for v in rows.params.image_hw[local])
    if tuple(image.shape[-2:]) != stored:
        raise DataError(
            f"shard {job.shard!r}, key {sample.key!r}: image is {image.shape[-2]}x"
            f"{image.shape[-1]} but its views were made from a {stored[0]}x{stored[1]} "
            "image: the shard changed after the cache was built"
        )
    return image


def _render(
    settings: DataSettings,
    work: ViewWork,
    valid: list[int],
    images: dict[int, torch.Tensor],
    rows: GroupRows,
    out: dict[str, torch.Tensor] | None = None,
) -> ViewBatch:
    """The views ``work.render`` of the ``valid`` local rows in every rendering (into ``out``
    when given), with their labels."""
    recipe = settings.recipe
    pixels = {
        key: render_rows(
            images, rows.params, valid, recipe, rendering, work.render, out[key] if out else None
        )
        for key, rendering in settings.renderings
    }
    wanted = np.asarray(work.render)
    own = np.repeat(np.asarray(valid), len(wanted))  # (row, view) order, as render_rows gives
    view = np.tile(wanted, len(valid))
    partner, lam = rows.params.mixing(own, view)
    # shard row * A + view: the teachers' [n, A, ...] arrays are filled through this flat index
    flat = (rows.start + own) * settings.num_views + view
    return ViewBatch(flat, pixels, rows.labels[own], rows.labels[partner], lam)


def decode_sample(
    sample: Sample, shard: str, channels: int, max_pixels: int | None = MAX_PIXELS
) -> torch.Tensor:
    """Decode once; a corrupt or too large image is a DataError naming shard and key."""
    try:
        return decode_image(sample.image, channels, max_pixels)
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"shard {shard!r}, key {sample.key!r}: cannot decode the image ({reason})"
        ) from None


# ---- data worker processes ---------------------------------------------------------------------

_SETTINGS: DataSettings | None = None
"""The run's settings in a data worker process (set once, when it starts)."""
_SLOTS: dict[str, torch.Tensor] = {}
"""The actor's view slots (:class:`ViewSlots`), mapped once into a data worker process."""


def _start_worker(settings: DataSettings, slots: dict[str, torch.Tensor], parent: int) -> None:
    """A data worker process starts: one torch thread, the settings and slots, a watch on the
    actor."""
    global _SETTINGS, _SLOTS
    torch.set_num_threads(1)
    _SETTINGS = settings
    _SLOTS = slots
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    """Exit when the actor's process is gone (a killed Ray actor leaves no orphan workers)."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(0)


def _ready() -> int:
    return os.getpid()


@dataclass
class JobViews:
    """What a data worker process made of a job: its groups' rows, all their views as one batch
    (in the job's slot, sent without its pixels, or else in new shared memory), and the CPU
    seconds it took."""

    rows: list[GroupRows]
    batch: ViewBatch | None
    in_slot: bool
    """The pixels are in the job's slot (``batch.pixels`` is empty: the actor has them)."""
    cpu_seconds: float


def _run_jobs(work: ViewWork, jobs: list[GroupJob], slot: int | None) -> JobViews:
    """A job in a data worker process (see :class:`JobViews`): its groups rendered one after the
    other into the slot while they fit."""
    start = time.process_time()
    if jobs:
        _fault_hook(jobs[0].shard)
    if _SETTINGS is None:
        raise DataWorkerError("a data worker process was not started with its settings")
    placed = SlotPlacer(_SLOTS, slot)
    made = [make_group(_SETTINGS, work, job, placed) for job in jobs]
    parts = [group.batch for group in made if group.batch is not None]
    rows = [group.rows for group in made]
    seconds = time.process_time() - start
    if not parts:
        return JobViews(rows, None, False, seconds)
    if placed.whole:  # every view is in the slot: send the rest
        batch = ViewBatch.concat([p.without_pixels() for p in parts])
        return JobViews(rows, batch, True, time.process_time() - start)
    batch = ViewBatch.concat(parts, shared=True)  # did not fit: new shared memory
    return JobViews(rows, batch, False, time.process_time() - start)


class SlotPlacer:
    """Hands out consecutive views of one slot to the groups of a job while they fit; once one
    does not, the job's views go to new memory (``whole`` is False)."""

    def __init__(self, slots: dict[str, torch.Tensor], slot: int | None):
        self.slots = slots
        self.slot = slot
        self.used = 0
        self.whole = slot is not None and bool(slots)

    def __call__(self, n: int) -> dict[str, torch.Tensor] | None:
        if not self.whole or self.slot is None:
            return None
        capacity = next(iter(self.slots.values())).shape[1]
        if self.used + n > capacity:
            self.whole = False
            return None
        out = {
            key: buffer[self.slot, self.used : self.used + n] for key, buffer in self.slots.items()
        }
        self.used += n
        return out


def _fault_hook(shard: str) -> None:
    """The test-only fault hook (see the module docstring)."""
    name, _, kind = os.environ.get(FAULT_ENV, "").partition(":")
    if name == shard and kind == "exit":
        os._exit(1)
    if name == shard and kind == "raise":
        raise RuntimeError(f"fault hook: a data worker fails on shard {shard}")


# ---- the data path -----------------------------------------------------------------------------


@dataclass
class ViewSlots:
    """The actor's view slots: buffers in shared memory, mapped once into every data worker
    process, that a job's views are rendered into and collated from; so views cross between the
    processes without a copy or fresh pages (each costs more than rendering a view's crop).

    A slot goes with one job at a time: taken when the job is sent, given back once every view of
    it has been copied into a batch (or at once when the job made none)."""

    buffers: dict[str, torch.Tensor]
    """Rendering key -> ``uint8[slots, capacity, C, S, S]``."""
    free: deque[int] = field(default_factory=deque)

    @classmethod
    def allocate(cls, settings: DataSettings, count: int, capacity: int) -> ViewSlots | None:
        """``count`` slots of ``capacity`` views; None when they would take more than
        ``SLOT_BYTES_MAX`` (jobs then send their views in new shared memory)."""
        channels = settings.recipe.channels
        shapes = {
            key: (count, capacity, channels, r.size, r.size) for key, r in settings.renderings
        }
        size = sum(int(np.prod(shape)) for shape in shapes.values())
        if size > SLOT_BYTES_MAX:
            logger.info(
                "view slots would take %.1f GB of shared memory (over %.1f): jobs send their "
                "views in new shared memory instead",
                size / 1e9,
                SLOT_BYTES_MAX / 1e9,
            )
            return None
        buffers = {
            key: torch.empty(shape, dtype=torch.uint8).share_memory_()
            for key, shape in shapes.items()
        }
        return cls(buffers)

    def reset(self) -> None:
        """Every slot free (a new shard; no job of the last one is running any more)."""
        count = next(iter(self.buffers.values())).shape[0]
        self.free = deque(range(count))

    def pixels(self, slot: int, count: int) -> dict[str, torch.Tensor]:
        """The pixels of the first ``count`` views of a slot, by rendering key."""
        return {key: buffer[slot, :count] for key, buffer in self.buffers.items()}


@dataclass
class DataStats:
    """What the data path did, for the benchmarks: views batched, and the CPU seconds the data
    worker processes spent on them (this process's share is the caller's to measure)."""

    views: int = 0
    worker_cpu_seconds: float = 0.0


@dataclass
class DataPath:
    """A shard task's views in batches, made in a background thread or by data worker processes
    (see the module docstring). One per actor: its worker processes live as long as it does."""

    settings: DataSettings
    workers: int
    batch_size: int
    prefetch_batches: int = PREFETCH_BATCHES
    pin_memory: bool = False
    stats: DataStats = field(default_factory=DataStats)
    _pool: ProcessPoolExecutor | None = field(default=None, repr=False)
    _slots: ViewSlots | None = field(default=None, repr=False)
    _memory: BatchMemory | None = field(default=None, repr=False)

    def start(self) -> None:
        """Start the data worker processes and wait until each has imported what it needs
        (``workers`` 0: nothing to start)."""
        if self.workers > 0 and self._pool is None:
            if self._slots is None:
                # every job in flight, and those whose views wait to fill a batch, hold a slot
                count = self.workers * JOBS_PER_WORKER + -(-self.batch_size // VIEWS_PER_JOB) + 1
                group = self.settings.recipe.group_size * self.settings.num_views
                self._slots = ViewSlots.allocate(self.settings, count, VIEWS_PER_JOB + group)
            buffers = self._slots.buffers if self._slots is not None else {}
            context = multiprocessing.get_context("spawn")  # fork is unsafe in a threaded actor
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=context,
                initializer=_start_worker,
                initargs=(self.settings, buffers, os.getpid()),
            )
            futures = [self._pool.submit(_ready) for _ in range(self.workers)]
            for future in futures:
                future.result()

    def close(self) -> None:
        """Stop the data worker processes."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def batches(
        self,
        task: ShardTask,
        rows: ShardRows,
        keys: ShardKeys,
        storage_options: dict | None = None,
        label_key: str = DEFAULT_LABEL_KEY,
    ) -> Generator[ViewBatch, None, None]:
        """The task's views in batches of ``batch_size``, in shard order, produced up to
        ``prefetch_batches`` ahead; ``rows`` gets the labels, status and drawn parameters."""
        work = ViewWork.of(task, self.settings.num_views)
        samples = checked_samples(task, storage_options, keys, label_key)
        return background(self._produce(task, samples, rows, work), self.prefetch_batches)

    def _produce(
        self, task: ShardTask, samples: Iterator[Sample], rows: ShardRows, work: ViewWork
    ) -> Iterator[ViewBatch]:
        if self._memory is None:
            self._memory = BatchMemory(self.prefetch_batches + BATCHES_HELD, self.batch_size)
        batcher = ViewBatcher(self.batch_size, self.pin_memory, self._release, self._memory)
        if self.workers == 0:
            results = self._inline(task, samples, rows, work)
        else:
            results = self._pooled(task, samples, rows, work)
        for result in results:
            rows.merge(result.rows, work)
            if result.batch is not None:
                for batch in batcher.add(result.batch, result.slot):
                    self.stats.views += len(batch)
                    yield batch
        for batch in batcher.flush():
            self.stats.views += len(batch)
            yield batch

    def _jobs(
        self, samples: Iterator[Sample], rows: ShardRows, work: ViewWork, name: str
    ) -> Iterator[list[GroupJob]]:
        """The shard's groups in file order, gathered into jobs of about ``VIEWS_PER_JOB``
        views."""
        per_row = max(1, len(work.render))
        job: list[GroupJob] = []
        count = 0
        for start, group in grouped(samples, self.settings.recipe.group_size):
            job.append(GroupJob(name, group, rows.group(start, len(group))))
            count += len(group) * per_row
            if count >= VIEWS_PER_JOB:
                yield job
                job = []
                count = 0
        if job:
            yield job

    def _inline(
        self, task: ShardTask, samples: Iterator[Sample], rows: ShardRows, work: ViewWork
    ) -> Iterator[GroupViews]:
        for start, group in grouped(samples, self.settings.recipe.group_size):
            job = GroupJob(task.name, group, rows.group(start, len(group)))
            yield make_group(self.settings, work, job)

    def _pooled(
        self, task: ShardTask, samples: Iterator[Sample], rows: ShardRows, work: ViewWork
    ) -> Iterator[GroupViews]:
        """The groups' results from the worker processes, in the order the jobs were sent."""
        self.start()
        if self._slots is not None:
            self._slots.reset()
        pending: deque[tuple[Future, int | None]] = deque()
        try:
            for jobs in self._jobs(samples, rows, work, task.name):
                while pending and self._slots is not None and not self._slots.free:
                    yield from self._collect(task, *pending.popleft())  # frees slots as it goes
                slot = self._slots.free.popleft() if self._slots and self._slots.free else None
                pending.append((self._submit(task, work, jobs, slot), slot))
                while len(pending) >= self.workers * JOBS_PER_WORKER:
                    yield from self._collect(task, *pending.popleft())
            while pending:
                yield from self._collect(task, *pending.popleft())
        finally:
            # the shard failed or was abandoned: drop what is queued, and wait for the jobs
            # still running, so none writes into a slot the next shard uses
            running = [future for future, _ in pending if not future.cancel()]
            wait(running)

    def _submit(
        self, task: ShardTask, work: ViewWork, jobs: list[GroupJob], slot: int | None
    ) -> Future:
        if self._pool is None:
            raise DataWorkerError(f"shard {task.name!r}: the data worker processes are gone")
        try:
            return self._pool.submit(_run_jobs, work, jobs, slot)
        except BrokenProcessPool as exc:
            raise self._broken(task, exc) from exc

    def _release(self, slot: int) -> None:
        if self._slots is not None:
            self._slots.free.append(slot)

    def _collect(self, task: ShardTask, future: Future, slot: int | None) -> Iterator[GroupViews]:
        """A job's rows group by group, its views with the last group (order is all the batcher
        needs); a slot its views are not in is free again at once."""
        try:
            job: JobViews = future.result()
        except BrokenProcessPool as exc:
            raise self._broken(task, exc) from exc
        except (DataError, DataWorkerError):
            raise
        except Exception as exc:
            raise DataWorkerError(
                f"shard {task.name!r}: a data worker process raised {type(exc).__name__}: {exc}"
            ) from exc
        self.stats.worker_cpu_seconds += job.cpu_seconds
        batch = job.batch
        if job.in_slot and batch is not None and self._slots is not None and slot is not None:
            batch.pixels = self._slots.pixels(slot, len(batch))
        elif slot is not None:
            self._release(slot)
            slot = None
        for rows in job.rows[:-1]:
            yield GroupViews(rows, None)
        yield GroupViews(job.rows[-1], batch, slot)

    def _broken(self, task: ShardTask, exc: BaseException) -> DataWorkerError:
        """The pool lost a process: drop it (the next shard starts a fresh one)."""
        pool = self._pool
        self._pool = None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        logger.error("shard %s: a data worker process died (%s)", task.name, exc)
        return DataWorkerError(
            f"shard {task.name!r}: a data worker process died while making its views "
            f"({exc}); the shard's marks are not set, so a rerun redoes it"
        )


def checked_samples(
    task: ShardTask,
    storage_options: dict | None = None,
    keys: ShardKeys | None = None,
    label_key: str = DEFAULT_LABEL_KEY,
) -> Iterator[Sample]:
    """The shard's samples, their keys checked against the plan (:class:`ShardKeys`: the planned
    keys in order, or the count, uniqueness and the manifest's digest) and collected in ``keys``."""
    keys = ShardKeys(task) if keys is None else keys
    for sample in iter_shard(task.url, storage_options, label_key):
        keys.add(sample.key)
        yield sample
    keys.finish()


# ---- a background producer ---------------------------------------------------------------------


def background(items: Iterator[T], depth: int) -> Generator[T, None, None]:
    """``items``, produced by a background thread up to ``depth`` ahead of the consumer.

    The producer's exception is raised here, in the consumer; a consumer that stops early (its own
    exception, ``close``) stops the producer before returning. ``depth`` 0: no thread.
    """
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    thread = threading.Thread(
        target=_produce, args=(items, slots, stop), name="kdcache-views", daemon=True
    )
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value
    finally:
        stop.set()
        thread.join()


def _produce(items: Iterator[T], slots: queue.Queue, stop: threading.Event) -> None:
    """The producer thread of :func:`background`: items, then an end mark or the exception."""

    def put(kind: str, value: object) -> bool:
        while not stop.is_set():
            try:
                slots.put((kind, value), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in items:
            if not put("item", item):
                return
        put("end", None)
    except BaseException as exc:  # handed to the consumer, which raises it
        put("error", exc)
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()  # a generator's cleanup (pending jobs cancelled) runs in this thread
