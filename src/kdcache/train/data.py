"""Streaming shards joined with the cache: the trainer's data path.

**Order.** Each epoch the shard order is a permutation drawn from ``(seed, epoch)``; the epoch's
stream of valid samples, in that order, is cut into ``ranks x workers`` consecutive *slots* whose
sizes differ by at most one (rank ``r`` takes slots ``r*workers .. r*workers + workers - 1``). A
slot is a list of pieces ``(shard, start, stop)``: whole shards, and at its two ends possibly part
of a shard that the neighbouring slot reads the rest of. Each DataLoader worker streams its slot
through a shuffle buffer seeded by ``(seed, epoch, rank, worker)`` and batches it itself; the
DataLoader interleaves its workers' batches round-robin. So the sequence of batches is a pure
function of ``(seed, epoch, rank, world size, workers)``, and every valid sample is in exactly one
batch of one rank per epoch, however the shards, ranks and workers divide.

**Per sample.** The view of ``key`` in ``epoch`` is ``epoch_view(seed, epoch, key, A)`` (a per-key
permutation cycle: every view once per A epochs, for any worker count); it is replayed from the
cache's *stored* parameters with the cache's recipe; its targets come from the shard's block,
read once per shard per worker (``read_block``). Rows marked invalid in the cache are skipped and
counted (the stream spec counts them ahead from the cache's ``status``). Without a cache (online or
supervised runs) views come from ``views.recipe`` and ``(views.seed, key, view)`` like a cache's.

**Equal steps per rank (DDP).** Every slot is cut into the same number of batches,
``ceil(base / batch_size)`` where ``base`` is the smaller slot size; only when ``base`` is a
multiple of the batch size does a slot one sample larger end with a batch of ``batch_size + 1``.
Every rank thus trains ``workers x`` that many steps per epoch, and no sample is dropped.

**Resumption.** A checkpoint stores ``(epoch, batches done)``. Resuming re-creates the epoch's
stream and each worker skips the samples of the batches it had delivered (computed from the
round-robin interleave) *before* decoding, so the next batches are bit-identical.

**Mixup/CutMix: each image decoded once.** A mixed view needs its partner's image, another sample
of its mixing group, so the shuffle keeps groups whole: a buffer of ``shuffle_buffer`` samples'
worth of groups gives out whole groups (:func:`shuffle_groups`), and a small pool of their items
(:func:`group_pool`: four groups, at least a batch) shuffles the items. The first item of a group
the pool gives out renders the whole group, decoding each image once (a view's own image and a
partner alike); the others wait, rendered, in the pool. Rendering thus goes at the pace of the
batches (an item-level buffer over the whole shuffle would render nearly every group it holds for
its first batch, and stall the training process at each epoch's start), and the buffer holds raw
samples, never decoded full-size images. Only a group cut by a slot boundary (at most one per
worker and end) has images decoded by both workers.

**Persistent workers.** Epoch and skip are set with :meth:`ShardStream.set_epoch` before each
epoch's iterator is created; they live in shared memory, so the DataLoader's workers, started once
(``persistent_workers``), read them at the start of every epoch. The teachers whose targets the
batches carry are copied at a worker's start: :meth:`RunData.epoch` starts new workers when they
change (a new stage's teacher).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdcache.cache.reader import (
    ShardBlock,
    incomplete_error,
    read_array,
    read_block,
    require_stored,
)
from kdcache.cache.store import (
    STATUS_VALID,
    CacheStore,
    Fingerprint,
    cache_identity,
    check_same_cache,
    open_store,
)
from kdcache.core.errors import CacheIncompleteError, CacheMismatchError, ConfigError, DataError
from kdcache.core.results import Selection
from kdcache.models.preprocess import RenderSpec
from kdcache.models.preprocess import resolve as resolve_rendering
from kdcache.shards.index import index_shards
from kdcache.shards.reading import (
    DEFAULT_LABEL_KEY,
    Sample,
    decode_image,
    expand_shards,
    iter_shard,
    key_digest,
    scan_shards,
    shard_name,
)
from kdcache.targets.sparse import MixedLabels, SparseTargets, targets_from_arrays
from kdcache.train.config import (
    CacheConfig,
    DataConfig,
    StageConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    ViewsConfig,
    stage_members,
)
from kdcache.train.selection import select_rows
from kdcache.views.augment import UnseenOps, apply_mix, apply_unseen
from kdcache.views.recipe import (
    Rendering,
    View,
    ViewRecipe,
    center_view,
    draw_mixing,
    draw_view,
    epoch_view,
    group_partners,
    grouped,
    mix_weight,
    render,
    render_base,
)

log = logging.getLogger(__name__)
STUDENT = ""
"""Key of the student's rendering among an item's rendered views."""


# ---- batches ----------------------------------------------------------------------------------


@dataclass
class Batch:
    """A training or evaluation batch: uint8 views, labels, and per-teacher sparse targets."""

    images: torch.Tensor
    """``uint8[B, C, S, S]`` in the student's rendering (normalised on the device); float32 and
    normalised already in batches of :func:`kdcache.train.dataset.collate`."""
    labels: torch.Tensor
    """``int64[B]``: each view's own label."""
    targets: dict[str, SparseTargets] = field(default_factory=dict)
    """Teacher name -> targets of the replayed view (teachers of the current stage only)."""
    keys: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    """Each sample's shard (training batches; errors about a batch name its shards)."""
    views: torch.Tensor | None = None
    """``int64[B]``: the view index replayed for each sample."""
    partner_labels: torch.Tensor | None = None
    """Mixup/CutMix recipes: ``int64[B]``, the label of the image mixed in (own label if none)."""
    lam: torch.Tensor | None = None
    """Mixup/CutMix recipes: ``float32[B]``, the weight of the own label (1 if not mixed)."""
    teacher_images: dict[str, torch.Tensor] = field(default_factory=dict)
    """Online teachers whose rendering differs from the student's: name -> ``uint8`` views."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def hard_labels(self) -> torch.Tensor | MixedLabels:
        """The labels the CE part uses: plain, or mixed by lam for Mixup/CutMix recipes."""
        if self.lam is None or self.partner_labels is None:
            return self.labels
        return MixedLabels(self.labels, self.partner_labels, self.lam)

    def pin_memory(self) -> Batch:
        return self._map(lambda x: x.pin_memory())

    def to(self, device: torch.device | str) -> Batch:
        device = torch.device(device)
        non_blocking = device.type == "cuda"
        return self._map(lambda x: x.to(device, non_blocking=non_blocking))

    def _map(self, fn: Any) -> Batch:
        """A copy with ``fn`` applied to every tensor."""
        optional = {name: getattr(self, name) for name in ("views", "partner_labels", "lam")}
        return replace(
            self,
            images=fn(self.images),
            labels=fn(self.labels),
            targets={n: t.map(fn) for n, t in self.targets.items()},
            teacher_images={n: fn(x) for n, x in self.teacher_images.items()},
            **{name: None if x is None else fn(x) for name, x in optional.items()},
        )

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickling for the DataLoader's queue: images through shared memory, the small tensors by
        value.

        Each shared tensor costs a file-descriptor round trip between the processes; the few KB of
        labels, view indices and sparse targets cost less as plain bytes (a 128-sample KD batch:
        1.7 ms -> 0.3 ms to send and receive, measured by ``kdcache bench train``'s author).
        """
        small = {
            "labels": self.labels,
            "views": self.views,
            "partner_labels": self.partner_labels,
            "lam": self.lam,
        }
        small = {name: None if x is None else _by_value(x) for name, x in small.items()}
        targets = {  # the fields in order: 5 top-k, 12 sampled (targets_from_arrays)
            name: tuple(_by_value(x) for x in t.tensors()) for name, t in self.targets.items()
        }
        args = (self.images, self.teacher_images, small, targets, self.keys, self.shards)
        return _rebuild_batch, args


def _by_value(tensor: torch.Tensor) -> np.ndarray | torch.Tensor:
    return tensor.numpy() if tensor.device.type == "cpu" and not tensor.requires_grad else tensor


def _as_tensor(value: np.ndarray | torch.Tensor | None) -> torch.Tensor | None:
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def _rebuild_batch(
    images: torch.Tensor,
    teacher_images: dict[str, torch.Tensor],
    small: dict[str, Any],
    targets: dict[str, tuple[Any, ...]],
    keys: list[str],
    shards: list[str],
) -> Batch:
    """The inverse of :meth:`Batch.__reduce__`."""
    tensors = {name: _as_tensor(value) for name, value in small.items()}
    labels = tensors.pop("labels")
    if labels is None:  # __reduce__ always sends them
        raise ValueError("a pickled batch without labels")
    return Batch(
        images=images,
        labels=labels,
        teacher_images=teacher_images,
        keys=keys,
        shards=shards,
        targets={name: targets_from_arrays(arrays) for name, arrays in targets.items()},
        **tensors,
    )


@dataclass
class _Item:
    """A raw sample waiting in the shuffle buffer (not decoded yet), with this epoch's view index
    and, for a mixed view, the partner sample of its group."""

    shard: str
    key: str
    sample: Sample
    row: int = -1
    """The sample's row in the cache's shard block (its position in the shard without a cache)."""
    block: ShardBlock | None = None
    view: int = 0
    partner: Sample | None = None
    partner_row: int = -1
    lam: float = 1.0
    """Weight of the sample's own image and label in a mixed view (1: not mixed)."""
    partners: tuple[int, ...] = ()
    """Without a cache: row offsets of the group's other samples (the mixing is drawn again)."""
    group: _Group | None = None
    """Mixup/CutMix recipes: the item's mixing group, rendered together (images decoded once)."""
    stored: View | None = None
    """The item's view as the cache stores it, once read (for its mixing; rendering reuses it)."""

    @property
    def image(self) -> bytes:
        return self.sample.image


@dataclass(eq=False)
class _Group:
    """The items of one mixing group in a worker's piece. The first item asked for renders them
    all, so every image of the group (own or partner) is decoded once; each item then takes its
    own rendered views."""

    items: list[_Item] = field(default_factory=list)
    rendered: dict[int, dict[str, torch.Tensor]] | None = None
    """``id(item)`` -> its rendered views, once the group is rendered."""

    def take(
        self, item: _Item, render_all: Callable[[list[_Item]], dict[int, dict[str, torch.Tensor]]]
    ) -> dict[str, torch.Tensor]:
        """The item's rendered views (``render_all(items)`` renders the group on first use)."""
        if self.rendered is None:
            self.rendered = render_all(self.items)
            self.items = []  # the items refer to the group: no cycle left to collect
        return self.rendered.pop(id(item))


# ---- the epoch order (pure functions) ------------------------------------------------------------


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to produce its part of an epoch (picklable)."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    """Samples streamed per shard (valid rows only)."""
    recipe: ViewRecipe
    num_classes: int
    batch_size: int
    rendering: Rendering
    """The student's rendering of every view (size, interpolation, mean, std)."""
    seed: int = 0
    """Run seed: shard order, shuffle buffer, view schedule."""
    teacher_renderings: tuple[tuple[str, Rendering], ...] = ()
    """Online teachers whose rendering differs from the student's: each gets its own views."""
    unseen: UnseenOps | None = None
    """Student-only augmentation (``student.unseen_augment``), after the view's own ops."""
    num_views: int | None = None
    """A; None: view index = epoch (fresh views, no cache)."""
    view_seed: int = 0
    """Seed of view parameters when there is no cache."""
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    shuffle_buffer: int = 0
    shard_shuffle: bool = False
    train: bool = True
    """False: evaluation (center views, file order, no targets)."""
    cache_path: str | None = None
    storage_options: tuple[tuple[str, Any], ...] = field(default=(), repr=False)
    """fsspec storage options of the cache (``cache.storage_options``), as sorted items."""
    data_storage_options: tuple[tuple[str, Any], ...] = field(default=(), repr=False)
    """fsspec storage options of the shards (``data.storage_options``), as sorted items."""
    label_key: str = DEFAULT_LABEL_KEY
    """The label's key in ``.json`` entries (``data.label_key``)."""
    keep: tuple[tuple[int, ...], ...] | None = None
    """Per shard, the cache rows streamed (``data.select`` / ``data.exclude_classes``: see
    :mod:`kdcache.train.selection`); None: every valid row."""
    max_pixels: int | None = None
    """Pixel limit of one image (``data.max_pixels``), checked before decoding."""
    cache_identity: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    """The cache's :func:`~kdcache.cache.store.cache_identity` when the run planned its stream:
    each shard block read checks the cache is still that one."""

    @property
    def workers(self) -> int:
        return max(1, self.num_workers)


def seeded_rng(*parts: Any) -> np.random.Generator:
    """A Philox generator keyed by the parts (order-, worker- and process-independent)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=16).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest, "little")))


def shard_order(num: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's shard order: a permutation from ``(seed, epoch)``, or file order."""
    if not shuffle:
        return list(range(num))
    return [int(i) for i in seeded_rng(seed, "shards", epoch).permutation(num)]


@dataclass(frozen=True)
class Piece:
    """Valid samples ``start .. stop - 1`` (counted in file order, invalid rows left out) of shard
    ``shard``."""

    shard: int
    start: int
    stop: int


def slot_sizes(spec: StreamSpec) -> list[int]:
    """Samples of each of the ``ranks x workers`` slots: the epoch's samples split as evenly as
    possible."""
    base, extra = divmod(sum(spec.counts), spec.world_size * spec.workers)
    return [base + (1 if j < extra else 0) for j in range(spec.world_size * spec.workers)]


def slots(spec: StreamSpec, epoch: int) -> list[list[list[Piece]]]:
    """``[rank][worker]`` -> the pieces that worker streams, in order: consecutive cuts of the
    epoch's stream."""
    order = shard_order(len(spec.urls), spec.seed, epoch, spec.shard_shuffle and spec.train)
    stream = ((shard, spec.counts[shard]) for shard in order if spec.counts[shard] > 0)
    cut: list[list[Piece]] = []
    shard = -1
    start = 0
    count = 0
    for size in slot_sizes(spec):
        pieces: list[Piece] = []
        while size > 0:
            if start == count:
                shard, count = next(stream)
                start = 0
            take = min(size, count - start)
            pieces.append(Piece(shard, start, start + take))
            start = start + take
            size = size - take
        cut.append(pieces)
    w = spec.workers
    return [cut[r * w : (r + 1) * w] for r in range(spec.world_size)]


def batch_sizes(spec: StreamSpec, slot: int) -> list[int]:
    """Sizes of the batches slot ``slot`` delivers. Training: the same count for every slot (the
    last batch of a slot one sample larger may hold ``batch_size + 1``); evaluation: plain
    ``ceil``."""
    sizes = slot_sizes(spec)
    size = spec.batch_size
    n = sizes[slot]
    batches = math.ceil((min(sizes) if spec.train else n) / size)
    if n == 0 or batches == 0:
        return []
    return [size] * (batches - 1) + [n - size * (batches - 1)]


def worker_batches(spec: StreamSpec) -> list[int]:
    """Batches each of this rank's workers delivers."""
    return [len(batch_sizes(spec, spec.rank * spec.workers + w)) for w in range(spec.workers)]


def steps_per_epoch(spec: StreamSpec) -> int:
    """Steps every rank trains per epoch (the same on every rank, and in every epoch)."""
    return sum(worker_batches(spec))


def round_robin(batches: list[int], steps: int) -> tuple[list[int], int]:
    """The DataLoader's interleave after ``steps`` batches: batches taken from each worker, and the
    worker it asks next (workers that ran out are passed over)."""
    taken = [0] * len(batches)
    position = 0
    remaining = steps
    while remaining > 0 and any(t < b for t, b in zip(taken, batches, strict=True)):
        if taken[position] < batches[position]:
            taken[position] += 1
            remaining -= 1
        position = (position + 1) % len(batches)
    return taken, position


def shuffle_buffer(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Seeded reservoir-style shuffle: fill ``size`` items, then swap each new item for a random
    one."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)):
        yield buffer[int(j)]


def shuffle_groups(
    items: Iterable[_Item], size: int, group_size: int, rng: np.random.Generator
) -> Iterator[_Item]:
    """Mixing recipes: :func:`shuffle_buffer` over whole mixing groups (``size`` items' worth
    of them), a group's items kept together (the stream yields them consecutively)."""
    runs = (list(run) for _, run in itertools.groupby(items, key=lambda item: id(item.group)))
    for run in shuffle_buffer(runs, max(1, size // group_size), rng):
        yield from run


def group_pool(spec: StreamSpec) -> int:
    """Items in the second, item-level shuffle of a mixing recipe: four groups, at least a batch
    (each batch mixes several groups) and at most ``shuffle_buffer``."""
    size = max(4 * spec.recipe.group_size, spec.batch_size)
    return min(size, spec.shuffle_buffer)


def view_index(spec: StreamSpec, epoch: int, key: str) -> int:
    """The view of ``key`` in ``epoch``: the cycle of A views, or a fresh view per epoch."""
    if spec.num_views is None:
        return epoch
    return epoch_view(spec.seed, epoch, key, spec.num_views)


# ---- the stream -------------------------------------------------------------------------------


class ShardStream(IterableDataset):
    """An epoch of batches for one rank; each DataLoader worker produces its own shards' batches."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec
        self.teachers: tuple[str, ...] = ()
        # [epoch, batches to skip]: shared with the workers, which persist across epochs
        self._state = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._store: CacheStore | None = None

    @property
    def epoch(self) -> int:
        return int(self._state[0])

    @property
    def skip_batches(self) -> int:
        return int(self._state[1])

    def set_epoch(self, epoch: int, teachers: Iterable[str] = (), skip_batches: int = 0) -> None:
        """Set before creating the epoch's iterator. Epoch and skip are shared with running
        workers; the teachers are copied when a worker starts (:meth:`RunData.epoch` restarts the
        workers when they change)."""
        self._state[0] = epoch
        self._state[1] = skip_batches
        self.teachers = tuple(teachers)

    def __iter__(self) -> Iterator[Batch]:
        spec = self.spec
        epoch = self.epoch  # read once: the main process sets the next one while batches queue
        loader_worker, workers = _worker()
        if workers != spec.workers:
            raise DataError(
                f"the stream was planned for {spec.workers} worker(s) but runs in {workers}"
            )
        skip_batches, first = self._resume_point()
        worker = (loader_worker + first) % workers  # the DataLoader asks its worker 0 first
        items = self._raw_items(slots(spec, epoch)[spec.rank][worker], epoch)
        if spec.train and spec.shuffle_buffer > 0:
            rng = seeded_rng(spec.seed, "buffer", epoch, spec.rank, worker)
            if spec.recipe.mixes:
                pool_rng = seeded_rng(spec.seed, "pool", epoch, spec.rank, worker)
                items = shuffle_groups(items, spec.shuffle_buffer, spec.recipe.group_size, rng)
                items = shuffle_buffer(items, group_pool(spec), pool_rng)
            else:
                items = shuffle_buffer(items, spec.shuffle_buffer, rng)
        sizes = batch_sizes(spec, spec.rank * workers + worker)
        items = itertools.islice(items, sum(sizes[: skip_batches[worker]]), None)
        for size in sizes[skip_batches[worker] :]:
            yield self._batch(list(itertools.islice(items, size)), epoch)

    def _resume_point(self) -> tuple[list[int], int]:
        """Batches each planned worker already delivered, and the planned worker to ask first."""
        if not self.skip_batches:
            return [0] * self.spec.workers, 0
        return round_robin(worker_batches(self.spec), self.skip_batches)

    def store(self) -> CacheStore | None:
        if self._store is None and self.spec.cache_path is not None:
            self._store = open_store(
                self.spec.cache_path, "r", dict(self.spec.storage_options) or None
            )
        return self._store

    def _raw_items(self, pieces: list[Piece], epoch: int) -> Iterator[_Item]:
        for piece in pieces:
            url = self.spec.urls[piece.shard]
            store = self.store() if self.spec.train else None
            block = None
            if store is not None:
                block = read_block(store, shard_name(url), list(self.teachers))
                self._check_same_cache(shard_name(url))
            yield from self._shard_items(url, block, piece, self.spec.counts[piece.shard], epoch)

    def _check_same_cache(self, shard: str) -> None:
        """After a block read: the cache must still be the one the run started with (a cache
        replaced under the run would mix two caches' targets)."""
        spec = self.spec
        if spec.cache_identity is None or spec.cache_path is None:
            return
        where = f"the block of shard {shard!r} (epoch {self.epoch + 1})"
        options = dict(spec.storage_options) or None
        check_same_cache(spec.cache_path, options, spec.cache_identity, where)

    def _shard_items(
        self, url: str, block: ShardBlock | None, piece: Piece, expected: int, epoch: int
    ) -> Iterator[_Item]:
        """The piece's samples, group by group (a mixed view's partner is in its group); the
        piece that ends the shard reads it to the end and checks its counts."""
        name = shard_name(url)
        seen = 0
        valid = 0
        options = dict(self.spec.data_storage_options) or None
        samples = iter_shard(url, options, self.spec.label_key)
        streamed = self._kept_rows(piece.shard)
        for _, group in grouped(samples, self.spec.recipe.group_size):
            seen += len(group)
            rows = [block.row(s.key) if block is not None else -1 for s in group]
            kept = [
                i
                for i, row in enumerate(rows)
                if block is None or (block.valid(row) and (streamed is None or row in streamed))
            ]
            together = _Group() if self.spec.train and self.spec.recipe.mixes else None
            out: list[_Item] = []
            for i in kept:
                if piece.start <= valid < piece.stop:
                    item = self._item(name, group, rows, i, block, epoch)
                    item.group = together
                    out.append(item)
                valid += 1
                if valid == piece.stop and piece.stop < expected:
                    break  # the rest of the shard is another slot's
            if together is not None:  # whole before its first item can leave the buffer
                together.items = out
            yield from out
            if valid == piece.stop and piece.stop < expected:
                return
        if block is not None and seen != len(block):
            raise CacheMismatchError(
                f"shard {name!r} has {seen} samples in the data but {len(block)} in the cache"
            )
        if valid != expected:
            raise DataError(
                f"shard {name!r}: streamed {valid} samples, the plan expected {expected} "
                "(the shard changed?)"
            )

    def _kept_rows(self, shard: int) -> frozenset[int] | None:
        """The rows of a shard the run streams (None: every valid row)."""
        keep = self.spec.keep
        return None if keep is None or not self.spec.train else frozenset(keep[shard])

    def _item(
        self,
        shard: str,
        group: list[Sample],
        rows: list[int],
        i: int,
        block: ShardBlock | None,
        epoch: int,
    ) -> _Item:
        """Sample ``i`` of a group, with its view this epoch and its partner if that is mixed."""
        spec = self.spec
        sample = group[i]
        a = view_index(spec, epoch, sample.key) if spec.train else 0
        item = _Item(shard, sample.key, sample, rows[i], block, a)
        if not spec.train or not spec.recipe.mixes:
            return item
        if block is None:  # rows are positions in the group: draw the mixing as a cache would
            item.row = i
            item.partners = tuple(group_partners(i, range(len(group))))
            mixing = draw_mixing(spec.recipe, spec.view_seed, sample.key, a, item.partners)
        else:
            view = block.view_params.view(rows[i], a)
            item.stored = view
            mixing = (view.mix_partner, view.mix_lam, view.mix_center)
        if mixing[0]:
            item.partner_row = item.row + mixing[0]
            item.partner = self._partner(shard, group, rows, item)
            item.lam = mix_weight(*mixing)  # CutMix: one minus the clipped box's area
        return item

    def _partner(self, shard: str, group: list[Sample], rows: list[int], item: _Item) -> Sample:
        """The sample at the item's partner row, which must be in the same group."""
        by_row = {row: sample for row, sample in zip(rows, group, strict=True)}
        partner = by_row.get(item.partner_row) if item.block is not None else None
        if item.block is None and 0 <= item.partner_row < len(group):
            partner = group[item.partner_row]
        if partner is None:
            raise CacheMismatchError(
                f"shard {shard!r}, key {item.key!r}: view {item.view} is mixed with row "
                f"{item.partner_row}, which is not in its group (the shard changed?)"
            )
        return partner

    def _batch(self, items: list[_Item], epoch: int) -> Batch:
        rendered = [self._render(item, epoch) for item in items]
        images = torch.stack([r[STUDENT] for r in rendered])
        teacher_images = {
            name: torch.stack([r[name] for r in rendered])
            for name, _ in self.spec.teacher_renderings
        }
        view_ids = [item.view for item in items]
        labels = torch.tensor([self._label(item) for item in items], dtype=torch.int64)
        targets = {t: _targets(items, view_ids, t) for t in self.teachers if self.spec.train}
        batch = Batch(
            images=images,
            labels=labels,
            targets=targets,
            keys=[i.key for i in items],
            shards=[i.shard for i in items],
            views=torch.tensor(view_ids, dtype=torch.int64),
            teacher_images=teacher_images,
        )
        if self.spec.train and self.spec.recipe.mixes:
            batch.partner_labels, batch.lam = self._mixing(items, labels)
        return batch

    def _render(self, item: _Item, epoch: int) -> dict[str, torch.Tensor]:
        """The item's view in the student's rendering and in each online teacher's: with its
        mixing group's (each image decoded once) or alone."""
        if item.group is not None:
            return item.group.take(item, lambda items: self._render_group(items, epoch))
        image = self._decode(item, item.sample)
        partner = self._decode(item, item.partner) if item.partner is not None else None
        return self._render_decoded(item, image, partner, epoch)

    def _render_group(self, items: list[_Item], epoch: int) -> dict[int, dict[str, torch.Tensor]]:
        """Every item of a mixing group rendered, each image (own or partner) decoded once, and
        each unmixed rendering of (key, view index) made once (a view's own and a partner's)."""
        images: dict[str, torch.Tensor] = {}
        bases: dict[tuple[str, int, str], torch.Tensor] = {}

        def decoded(item: _Item, sample: Sample) -> torch.Tensor:
            if sample.key not in images:  # keys are unique within a shard
                images[sample.key] = self._decode(item, sample)
            return images[sample.key]

        return {
            id(item): self._render_decoded(
                item,
                decoded(item, item.sample),
                decoded(item, item.partner) if item.partner is not None else None,
                epoch,
                bases,
            )
            for item in items
        }

    def _decode(self, item: _Item, sample: Sample) -> torch.Tensor:
        """Decode the item's own (or its partner's) image; a refusal names shard and key."""
        try:
            return decode_image(sample.image, self.spec.recipe.channels, self.spec.max_pixels)
        except (RuntimeError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"shard {item.shard!r}, key {sample.key!r}: cannot decode the image ({reason})"
            ) from None

    def _render_decoded(
        self,
        item: _Item,
        image: torch.Tensor,
        other: torch.Tensor | None,
        epoch: int,
        bases: dict[tuple[str, int, str], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The item's views from its decoded image (and its partner's, ``other``, if mixed);
        ``bases`` memoises unmixed renderings by (key, view index, rendering)."""
        spec = self.spec
        hw = (int(image.shape[-2]), int(image.shape[-1]))
        if not spec.train:
            return {
                STUDENT: render(image, center_view(hw, spec.recipe), spec.recipe, spec.rendering)
            }
        view = self._view(item, item.row, item.key, hw, item.partners)
        partner: tuple[str, torch.Tensor, View] | None = None  # its key, image and view if mixed
        if view.mixed:
            if item.partner is None or other is None:
                raise CacheMismatchError(f"key {item.key!r}: mixed view without its partner sample")
            other_hw = (int(other.shape[-2]), int(other.shape[-1]))
            partner_view = self._view(item, item.partner_row, item.partner.key, other_hw, ())
            partner = (item.partner.key, other, partner_view)
        bases = {} if bases is None else bases
        out = {}
        for name, rendering in ((STUDENT, spec.rendering), *spec.teacher_renderings):
            pixels = self._base(bases, item, item.key, image, view, (name, rendering))
            if partner is not None:  # mixed: views mix unmixed renderings, not the partner's
                theirs = self._base(bases, item, *partner, (name, rendering))
                pixels = apply_mix(pixels, theirs, view.mix_lam, view.mix_box)
            out[name] = pixels
        if spec.unseen is not None:  # on a copy: the memoised rendering may be a partner's too
            rng = seeded_rng(spec.seed, "unseen", epoch, item.key)
            out[STUDENT] = apply_unseen(out[STUDENT].clone(), spec.unseen, rng, spec.recipe.fill)
        return out

    def _base(
        self,
        bases: dict[tuple[str, int, str], torch.Tensor],
        item: _Item,
        key: str,
        image: torch.Tensor,
        view: View,
        named: tuple[str, Rendering],
    ) -> torch.Tensor:
        """The unmixed rendering of ``key``'s view ``item.view`` (memoised in ``bases``)."""
        memo = (key, item.view, named[0])
        if memo not in bases:
            try:
                bases[memo] = render_base(image, view, self.spec.recipe, named[1])
            except DataError as exc:
                raise DataError(f"shard {item.shard!r}, key {key!r}: {exc}") from None
        return bases[memo]

    def _view(self, item: _Item, row: int, key: str, hw: tuple[int, int], partners) -> View:
        """View ``item.view`` of a row: stored in the cache, or drawn from ``(seed, key, view)``."""
        if item.block is not None:
            if row == item.row and item.stored is not None:
                return item.stored
            return item.block.view_params.view(row, item.view)
        return draw_view(self.spec.recipe, self.spec.view_seed, key, item.view, hw, partners)

    def _mixing(
        self, items: list[_Item], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The partner labels and own-label weights of a batch's views."""
        partner_labels = labels.clone()
        for position, item in enumerate(items):
            if item.partner is not None:
                partner_labels[position] = self._label(item, item.partner, item.partner_row)
        lam = torch.tensor([item.lam for item in items], dtype=torch.float32)
        return partner_labels, lam

    def _label(self, item: _Item, sample: Sample | None = None, row: int | None = None) -> int:
        """The label of the item's sample (or of its partner), checked against the cache's."""
        sample = sample or item.sample
        row = item.row if row is None else row
        label = sample.require_label(item.shard, self.spec.num_classes)
        cached = int(item.block.labels[row]) if item.block is not None else label
        if cached != label:
            raise CacheMismatchError(
                f"shard {item.shard!r}, key {sample.key!r}: label {label} in the data "
                f"but {cached} in the cache"
            )
        return label


def _targets(items: list[_Item], view_ids: list[int], teacher: str) -> SparseTargets:
    """Gather one teacher's targets of the chosen views, one fancy-index per shard block in the
    batch: idx int64, logit as stored (fp16, or float32 from q8), lse/label_logit/tail_lse fp32
    (a sampled teacher: its draws too, :class:`~kdcache.targets.sparse.SampledTargets`)."""
    first = _cached(items[0]).teachers[teacher].fields()
    n = len(items)
    out = [np.empty((n, *a.shape[2:]), _batch_dtype(a.dtype)) for a in first]
    rows = np.array([item.row for item in items])
    chosen = np.asarray(view_ids)
    for block, positions in _by_block(items):
        r = rows[positions]
        a = chosen[positions]
        for gathered, stored in zip(out, block.teachers[teacher].fields(), strict=True):
            gathered[positions] = stored[r, a]
    return targets_from_arrays(out)


def _batch_dtype(dtype: np.dtype) -> np.dtype:
    """Class indices (uint16/int32 on disk) as int64; values as stored."""
    return np.dtype(np.int64) if np.issubdtype(dtype, np.integer) and dtype != np.uint8 else dtype


def _by_block(items: list[_Item]) -> list[tuple[ShardBlock, np.ndarray]]:
    """Each shard block in ``items`` with the positions of its samples (a shuffled batch spans a few
    shards)."""
    groups: dict[int, tuple[ShardBlock, list[int]]] = {}
    for position, item in enumerate(items):
        groups.setdefault(id(item.block), (_cached(item), []))[1].append(position)
    return [(block, np.asarray(positions)) for block, positions in groups.values()]


def _cached(item: _Item) -> ShardBlock:
    """The item's cache block: every item has one where targets come from the cache."""
    if item.block is None:
        raise ValueError(f"shard {item.shard!r}, key {item.key!r}: no cache block to read")
    return item.block


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _identity(batch: Batch) -> Batch:
    return batch


def make_loader(
    dataset: ShardStream, pin_memory: bool, prefetch_factor: int, persistent: bool = False
) -> DataLoader:
    """A DataLoader over the stream: batching happens in the workers (``batch_size=None``);
    ``persistent``: its workers are started once and serve every epoch (the training stream).

    It draws its workers' base seed from its own generator, never from the global torch RNG: a
    resumed run restores that RNG mid-epoch and then creates the epoch's iterator again, so a draw
    from it would shift every later dropout mask against the uninterrupted run."""
    workers = dataset.spec.num_workers
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        # torch types collate_fn for a list of samples; with batch_size None it gets one Batch
        collate_fn=_identity,  # pyright: ignore[reportArgumentType]
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        persistent_workers=persistent and workers > 0,
        generator=torch.Generator().manual_seed(dataset.spec.seed),
    )


def training_threads(threads: int | None, num_workers: int) -> int:
    """torch threads of a training process: ``threads`` (``run.threads``) if set, else the cores
    this process may use shared among this machine's ranks and each one's DataLoader workers plus
    itself, at least 1. Workers run one torch thread each, so the total never exceeds the cores
    (torch's own default, every core, oversubscribes a busy machine many times over)."""
    if threads:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, (cores or 1) // (max(1, local_ranks) * (num_workers + 1)))


def close_loader(loader: DataLoader) -> None:
    """Stop a DataLoader's persistent workers now (instead of whenever it is collected)."""
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    loader._iterator = None


# ---- the cache: opening and checking ------------------------------------------------------------


def open_cache(
    cache: CacheConfig, urls: list[str], teachers: list[str], *, data: DataConfig
) -> CacheStore:
    """Open the ``cache`` section's cache and refuse it, saying what differs, unless it fits the
    run: the shards ``urls`` (read with the ``data`` section's storage options, their keys
    scanned with its ``verify_keys``), its class count and ``teachers``."""
    path = cache.path
    if not path:  # callers open a cache only where cache.path is set
        raise ConfigError("cache.path: no cache to open")
    store = open_store(path, "r", cache.storage_options or None)
    options = data.storage_options or None
    if cache.shard_subset:
        check_shard_subset(store, urls, data.verify_keys, options)
        store.check_compatible(num_classes=data.num_classes)
    else:
        fingerprint = _fingerprint(store, urls, data.verify_keys, options)
        try:
            store.check_compatible(fingerprint=fingerprint, num_classes=data.num_classes)
        except CacheMismatchError as exc:
            names = {shard_name(u) for u in urls}
            if names < set(store.meta.fingerprint.shards):
                raise CacheMismatchError(
                    f"{exc}\n  (to train on a subset of the cache's shards, set "
                    "cache.shard_subset: true)"
                ) from None
            raise
    missing = [t for t in teachers if t not in store.teachers]
    if missing:
        raise CacheMismatchError(
            f"teacher(s) {missing} not in cache {store.path!r}; "
            f"it has {store.teachers or 'no teachers'} "
            "(set teacher.name or stages.N.teacher)"
        )
    incomplete = incomplete_error(store, teachers)
    if incomplete is not None:
        raise incomplete
    if not store.meta.fingerprint.key_digest:
        raise CacheIncompleteError(
            f"cache {store.path!r}: every shard is done but its keys were not yet checked across "
            "shards (the precompute stopped before its end): rerun precompute to finish it "
            "(nothing is recomputed)"
        )
    require_stored(store, teachers)  # lost chunk files: found before any work
    return store


def _fingerprint(
    store: CacheStore,
    urls: list[str],
    verify_keys: bool,
    storage_options: dict[str, Any] | None = None,
) -> Fingerprint:
    """The data's fingerprint: full (scanned keys) or names only (counts checked while
    streaming)."""
    names = [shard_name(u) for u in urls]
    if verify_keys:
        indexes = scan_shards(urls, storage_options=storage_options)
        return Fingerprint(
            shards=names, counts=[len(i) for i in indexes], key_digest=key_digest(indexes)
        )
    cached = store.meta.fingerprint
    if names != cached.shards:
        return Fingerprint(shards=names, counts=[0] * len(names), key_digest="")
    return cached


def check_shard_subset(
    store: CacheStore,
    urls: list[str],
    verify_keys: bool,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """``cache.shard_subset``: every shard must be one of the cache's; with ``verify_keys`` its
    keys (hence its count) must be the cache's rows of that shard. Without it, counts are checked
    while streaming, as for the full set."""
    cached = set(store.meta.fingerprint.shards)
    names = [shard_name(u) for u in urls]
    foreign = [n for n in names if n not in cached]
    if foreign:
        raise CacheMismatchError(
            f"cache {store.path!r} does not match:\n  {len(foreign)} shard(s) given but not in "
            f"the cache (e.g. {foreign[:3]}); cache.shard_subset trains on the cache's own "
            "shards only"
        )
    if not verify_keys:
        return
    for name, index in zip(names, scan_shards(urls, storage_options=storage_options), strict=True):
        rows = store.rows(store.shard_index(name))
        keys = [str(k) for k in np.asarray(store.array("keys")[rows])]
        if len(keys) != len(index):
            raise CacheMismatchError(
                f"cache {store.path!r} does not match:\n  shard {name!r} has {len(keys)} samples "
                f"in the cache but {len(index)} in the data"
            )
        if keys != list(index.keys):
            raise CacheMismatchError(
                f"cache {store.path!r} does not match:\n  shard {name!r}: the sample keys "
                "differ (same count, other keys or order)"
            )


def check_views_match(views: ViewsConfig, store: CacheStore) -> None:
    """The ``views`` section's keys set beside ``cache.path`` must agree with the cache, whose
    stored views are what is used."""
    cached = {
        "recipe": store.meta.recipe,
        "num_views": store.meta.num_views,
        "seed": store.meta.seed,
    }
    for name in sorted(views.model_fields_set):
        given = getattr(views, name)
        if given != cached[name]:
            shown = lambda v: v.model_dump(mode="json") if hasattr(v, "model_dump") else v  # noqa: E731
            raise CacheMismatchError(
                f"views.{name}: {shown(given)!r} differs from the cache's "
                f"{shown(cached[name])!r} ({store.path}); with "
                "cache.path the cache's stored views are used: leave views.* out or make it match"
            )


def shard_valid_counts(store: CacheStore, urls: list[str]) -> tuple[list[int], int]:
    """Valid rows of each of ``urls``' shards (in that order; all of the cache's shards or a
    subset) and their invalid rows in total."""
    valid, _ = valid_counts(store)
    indexes = [store.shard_index(shard_name(u)) for u in urls]
    counts = [valid[i] for i in indexes]
    invalid = sum(store.meta.fingerprint.counts[i] for i in indexes) - sum(counts)
    return counts, invalid


def valid_counts(store: CacheStore) -> tuple[list[int], int]:
    """Valid rows per shard (cache order) and the number of invalid rows, from ``status``."""
    status = read_array(store, "status")  # a marked shard's lost chunk is an error, not zeros
    valid = [int((status[store.rows(i)] == STATUS_VALID).sum()) for i in range(store.num_shards)]
    return valid, sum(store.meta.fingerprint.counts) - sum(valid)


def shard_counts(urls: list[str], storage_options: dict[str, Any] | None = None) -> list[int]:
    """Samples per shard without a cache, as precompute plans them: from the manifest or a wids
    shard index beside the shards where the listed sizes match, else from the tar headers."""
    if not urls:
        return []
    return [shard.count for shard in index_shards(urls, storage_options).shards]


# ---- building the run's data ---------------------------------------------------------------------


@dataclass
class RunData:
    """The run's training stream, its cache (if any) and what they imply."""

    spec: StreamSpec
    dataset: ShardStream
    loader: DataLoader
    store: CacheStore | None
    num_classes: int
    recipe: ViewRecipe
    invalid: int
    """Rows of the training shards marked invalid in the cache (skipped every epoch)."""
    rendering: Rendering
    """The student's rendering of the views."""
    teacher_renderings: dict[str, Rendering] = field(default_factory=dict)
    """Online teachers' renderings (batches carry their own views where they differ)."""
    selection: Selection | None = None
    """What the run trains on when not every sample (``data.select``/``exclude_classes``)."""

    def epoch(self, epoch: int, teachers: Iterable[str], skip_batches: int = 0) -> Iterator[Batch]:
        """The epoch's batches on this rank, from batch ``skip_batches`` on (at most the step
        count). The loader's workers persist across epochs; they are restarted only when the
        teachers change (workers copy them at start)."""
        teachers = tuple(teachers)
        if teachers != self.dataset.teachers and self.loader.persistent_workers:
            close_loader(self.loader)
        self.dataset.set_epoch(epoch, teachers, skip_batches)
        generator = self.loader.generator
        if generator is None:  # make_loader always gives one
            raise ValueError("the training loader has no generator to seed")
        generator.manual_seed(self.spec.seed * 100_003 + epoch)  # see make_loader
        steps = steps_per_epoch(self.spec) - skip_batches
        return itertools.islice(iter(self.loader), max(steps, 0))

    def close(self) -> None:
        """Stop the loader's workers (the end of a run)."""
        close_loader(self.loader)


def build_train_data(
    config: TrainConfig, rank: int, world_size: int, teachers: list[str], pin_memory: bool
) -> RunData:
    """Plan the training stream: shards, cache checks, counts, views. The one data builder that
    reads the whole config (as torchtitan's dataloader builders read the job config): the stream
    joins the ``data``, ``cache``, ``views``, ``student`` and ``teacher`` sections, the stages'
    teachers and ``run.seed``; each part it calls takes its own section(s)."""
    data_options = config.data.storage_options or None
    urls = expand_shards(config.data.shards, key="data.shards", storage_options=data_options)
    store = None
    if config.cache.path:
        store = open_cache(config.cache, urls, teachers, data=config.data)
    if store is not None:
        check_views_match(config.views, store)
        counts, invalid = shard_valid_counts(store, urls)
        recipe = store.meta.recipe
        num_views = store.meta.num_views
        view_seed = store.meta.seed
        num_classes = store.meta.num_classes
        kept = select_rows(config.data, store, urls, recipe, config.run.seed, config.teacher.name)
        if kept is not None:
            counts = [len(rows) for rows in kept.rows]
            log.info(
                "training on %d selected samples (per class: %s; classes excluded: %s)",
                kept.record.samples,
                kept.record.counts,
                kept.record.excluded_classes or "none",
            )
    else:
        kept = None
        counts = shard_counts(urls, data_options)
        invalid = 0
        recipe = config.views.recipe
        num_views = config.views.num_views
        view_seed = config.views.seed
        if config.data.num_classes is None:  # the config requires it where there is no cache
            raise ConfigError("data.num_classes: required when no cache.path is given")
        num_classes = int(config.data.num_classes)
    rendering = student_rendering(config.student, recipe)
    teachers_rendered = online_renderings(config.teacher, store, recipe, stages=config.stages)
    own = tuple((n, r) for n, r in sorted(teachers_rendered.items()) if r != rendering)
    spec = StreamSpec(
        urls=tuple(urls),
        counts=tuple(counts),
        recipe=recipe,
        num_classes=num_classes,
        batch_size=config.data.batch_size,
        rendering=rendering,
        teacher_renderings=own,
        unseen=_unseen(config.student),
        seed=config.run.seed,
        num_views=num_views,
        view_seed=view_seed,
        rank=rank,
        world_size=world_size,
        num_workers=config.data.num_workers,
        shuffle_buffer=config.data.shuffle_buffer,
        shard_shuffle=config.data.shard_shuffle,
        cache_path=config.cache.path,
        storage_options=tuple(sorted(config.cache.storage_options.items())),
        data_storage_options=tuple(sorted(config.data.storage_options.items())),
        label_key=config.data.label_key,
        keep=kept.rows if kept is not None else None,
        max_pixels=config.data.max_pixels,
        cache_identity=None if store is None else cache_identity(store, _held(store, teachers)),
    )
    _check_slots(spec)
    dataset = ShardStream(spec)
    loader = make_loader(
        dataset, pin_memory, config.data.prefetch_factor, config.data.persistent_workers
    )
    return RunData(
        spec,
        dataset,
        loader,
        store,
        num_classes,
        recipe,
        invalid,
        rendering,
        teachers_rendered,
        kept.record if kept is not None else None,
    )


def _held(store: CacheStore, teachers: list[str]) -> list[str]:
    """The run's teachers that the cache holds (online ones are not its)."""
    return sorted(t for t in teachers if t in store.teachers)


def _unseen(student: StudentConfig) -> UnseenOps | None:
    """``student.unseen_augment``, said in the log: the teacher did not see it."""
    ops = student.unseen_augment
    if ops is not None:
        log.warning(
            "student.unseen_augment: %s applied to the student's views only; the teacher did not "
            "see it, so its targets describe the view without it",
            ops.describe(),
        )
    return ops


def student_rendering(student: StudentConfig, recipe: ViewRecipe) -> Rendering:
    """The student's rendering: ``student.render`` over the recipe's (or its timm config's)."""
    return resolve_rendering(student.render, recipe, student, "student.render")


def online_renderings(
    teacher: TeacherConfig,
    store: CacheStore | None,
    recipe: ViewRecipe,
    *,
    stages: list[StageConfig],
) -> dict[str, Rendering]:
    """Each online teacher's rendering (the teachers ``stages`` read; ``teacher.render.<name>``
    if set, else the rendering the cache recorded for that teacher, so online targets match
    cached ones, else its defaults); empty unless ``teacher.mode`` is online."""
    if teacher.mode != "online":
        return {}
    names = sorted({t for stage in stages for t in stage_members(stage, teacher=teacher)})
    out = {}
    for name in names:
        key = f"teacher.render.{name}"
        model = teacher.models.get(name)
        if name in teacher.render:
            out[name] = resolve_rendering(teacher.render[name], recipe, model, key)
        elif store is not None and name in store.teachers:
            out[name] = store.teacher_meta(name).rendering
        else:
            out[name] = resolve_rendering(RenderSpec(), recipe, model, key)
    return out


def _check_slots(spec: StreamSpec) -> None:
    """Every rank's DataLoader worker needs at least one sample per epoch (its batches are counted
    on)."""
    total = sum(spec.counts)
    slots_ = spec.world_size * spec.workers
    if total < slots_:
        raise ConfigError(
            f"data.num_workers: {total} training sample(s) cannot feed {spec.world_size} rank(s) x "
            f"{spec.workers} DataLoader worker(s); use fewer workers (or ranks)"
        )


def eval_recipe(recipe: ViewRecipe) -> ViewRecipe:
    """The center view for evaluation, with the training recipe's crop_pct, channels and stats
    (no policy, jitter, erasing or mixing)."""
    return ViewRecipe(
        name="center",
        size=recipe.size,
        crop_pct=recipe.crop_pct,
        interpolation=recipe.interpolation,
        channels=recipe.channels,
        mean=recipe.mean,
        std=recipe.std,
    )


def build_eval_data(
    data: DataConfig,
    rank: int,
    world_size: int,
    recipe: ViewRecipe,
    num_classes: int,
    pin_memory: bool,
    *,
    student: StudentConfig,
) -> tuple[ShardStream, DataLoader] | None:
    """The validation stream of the ``data`` section's ``val_shards`` (center views, file order,
    split by rank and worker, rendered as the ``student`` section says), or None."""
    if data.val_shards is None:
        return None
    data_options = data.storage_options or None
    urls = expand_shards(data.val_shards, key="data.val_shards", storage_options=data_options)
    spec = StreamSpec(
        urls=tuple(urls),
        counts=tuple(shard_counts(urls, data_options)),
        recipe=eval_recipe(recipe),
        rendering=student_rendering(student, recipe),
        num_classes=num_classes,
        batch_size=data.eval_batch_size or data.batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=data.num_workers,
        train=False,
        data_storage_options=tuple(sorted(data.storage_options.items())),
        label_key=data.label_key,
    )
    dataset = ShardStream(spec)
    return dataset, make_loader(dataset, pin_memory, data.prefetch_factor)
