"""Random access to a cache, for a loop of one's own: the targets of (key, view), a view's pixels
rendered from its image, and a map-style dataset over any indexable source (FKD's
``ImageFolder_FKD`` style: the source yields images, the cache the views and targets).

:class:`CacheReader` reads one shard's block at a time (kept in a small LRU) and finds a key's
shard through an index of every key, built on first use from the cache's ``keys`` array (one
read per shard). What it returns is what the trainer's stream gives for the same (key, view):
the same stored view replayed by the same rendering code, the same stored targets.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcache.cache.reader import ShardBlock, read_block, read_path
from kdcache.cache.store import CacheStore, open_store
from kdcache.core.errors import CacheMismatchError, ConfigError, DataError
from kdcache.shards.reading import decode_image
from kdcache.targets.sparse import SparseTargets, targets_from_arrays
from kdcache.train.config import TrainConfig, load_train_config
from kdcache.train.data import student_rendering
from kdcache.train.dataset import DistillSample, _teachers_of
from kdcache.views.recipe import Rendering, View, epoch_view, mix_weight, normalize, render

ImageLike = Any
"""Encoded bytes, a PIL image, a ``uint8`` tensor ``[C, H, W]`` or array ``[H, W(, C)]``."""


def as_uint8_chw(image: ImageLike, channels: int) -> torch.Tensor:
    """An image as the ``uint8[channels, H, W]`` tensor the renderer takes (PIL and bytes decoded
    as the shards are: grey or RGB)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), channels)
    if hasattr(image, "convert"):  # a PIL image: re-encode losslessly, decode as the shards are
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return decode_image(buffer.getvalue(), channels)
    tensor = torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image)
    if tensor.dtype != torch.uint8:
        raise DataError(f"an image array must be uint8, found {tensor.dtype}")
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    elif tensor.ndim == 3 and tensor.shape[0] not in (1, 3) and tensor.shape[-1] in (1, 3):
        tensor = tensor.permute(2, 0, 1)  # HWC (numpy, PIL arrays) -> CHW
    if tensor.shape[0] != channels:
        raise DataError(
            f"the recipe renders {channels} channel(s), the image has {tensor.shape[0]}"
        )
    return tensor.contiguous()


class CacheReader:
    """One cache, read by key: :meth:`targets`, :meth:`view`, :meth:`partner`, :meth:`render`.

    ``rendering``: the student's (default: the recipe's); ``teachers``: those :meth:`targets`
    reads (default: every finished teacher); ``seed``: the run seed of :meth:`epoch_view` (the
    trainer's ``run.seed``)."""

    def __init__(
        self,
        cache: str | CacheStore,
        *,
        teachers: Sequence[str] | None = None,
        rendering: Rendering | None = None,
        seed: int = 0,
        storage_options: dict[str, Any] | None = None,
        max_blocks: int = 8,
    ):
        self.store = open_store(cache, "r", storage_options) if isinstance(cache, str) else cache
        meta = self.store.meta
        self.recipe = meta.recipe
        self.num_views = meta.num_views
        self.num_classes = meta.num_classes
        self.rendering = rendering or self.recipe.rendering()
        self.teachers = list(teachers) if teachers is not None else self.store.teachers
        self.seed = seed
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[int, ShardBlock] = OrderedDict()
        self._index: dict[str, tuple[int, int]] | None = None

    @classmethod
    def from_config(cls, config: TrainConfig | str, overrides: Sequence[str] = ()) -> CacheReader:
        """The reader of a train config: its cache, its stages' teachers, the student's
        rendering and the run seed."""
        if not isinstance(config, TrainConfig):
            config = load_train_config(config, list(overrides))
        if not config.cache.path:
            raise ConfigError("cache.path: a CacheReader reads a cache, and the config names none")
        store = open_store(config.cache.path, "r", config.cache.storage_options or None)
        rendering = student_rendering(config.student, store.meta.recipe)
        teachers = _teachers_of(config.teacher, stages=config.stages)
        return cls(store, teachers=teachers, rendering=rendering, seed=config.run.seed)

    # ---- where a key lives ----------------------------------------------------------------------

    def locate(self, key: str) -> tuple[int, int]:
        """(shard index, row in the shard) of ``key``; an unknown key is a one-line error."""
        if self._index is None:
            self._index = self._key_index()
        try:
            return self._index[key]
        except KeyError:
            raise CacheMismatchError(f"key {key!r} is not in cache {self.store.path!r}") from None

    def _key_index(self) -> dict[str, tuple[int, int]]:
        index: dict[str, tuple[int, int]] = {}
        shards = self.store.meta.fingerprint.shards
        for shard, name in enumerate(shards):
            keys = read_path(self.store, "keys", self.store.rows(shard), name)
            index.update({str(k): (shard, row) for row, k in enumerate(keys)})
        return index

    def block(self, shard: int) -> ShardBlock:
        """The shard's rows with the reader's teachers (the last ``max_blocks`` are kept)."""
        if shard in self._blocks:
            self._blocks.move_to_end(shard)
            return self._blocks[shard]
        block = read_block(self.store, shard, self.teachers)
        self._blocks[shard] = block
        if len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)
        return block

    def _row(self, key: str, view: int) -> tuple[ShardBlock, int]:
        if not 0 <= view < self.num_views:
            raise ValueError(
                f"view {view} of key {key!r}: the cache holds views 0..{self.num_views - 1}"
            )
        shard, row = self.locate(key)
        block = self.block(shard)
        if not block.valid(row):
            raise CacheMismatchError(
                f"shard {block.shard!r}, key {key!r}: the row is invalid "
                f"({str(block.errors[row]) or 'skipped in precompute'})"
            )
        return block, row

    # ---- what the cache holds -------------------------------------------------------------------

    def epoch_view(self, key: str, epoch: int) -> int:
        """The view the trainer replays for ``key`` in ``epoch`` (with the reader's ``seed``)."""
        return epoch_view(self.seed, epoch, key, self.num_views)

    def label(self, key: str) -> int:
        shard, row = self.locate(key)
        return int(self.block(shard).labels[row])

    def targets(self, key: str, view: int, teacher: str | None = None) -> SparseTargets:
        """The teacher's stored targets of (key, view) as a batch of one (``[1, k]``, ``[1]``),
        exactly the stream's; ``teacher`` defaults to the reader's first."""
        name = teacher or self.teachers[0]
        block, row = self._row(key, view)
        if name not in block.teachers:
            raise KeyError(f"teacher {name!r} is not read (reader teachers: {self.teachers})")
        return targets_from_arrays([a[row : row + 1, view] for a in block.teachers[name].fields()])

    def view(self, key: str, view: int) -> View:
        """The stored parameters of (key, view): crop, flip, ops, mixing."""
        block, row = self._row(key, view)
        return block.view_params.view(row, view)

    def partner(self, key: str, view: int) -> tuple[str, float] | None:
        """For a mixed view: the key of the image mixed in and the weight of the own image and
        label (CutMix: one minus the clipped box's area); None for an unmixed view."""
        block, row = self._row(key, view)
        params = block.view_params.view(row, view)
        if not params.mixed:
            return None
        lam = mix_weight(params.mix_partner, params.mix_lam, params.mix_center)
        return str(block.keys[row + params.mix_partner]), float(lam)

    def render(
        self,
        key: str,
        view: int,
        image: ImageLike,
        partner_image: ImageLike | None = None,
        *,
        normalized: bool = True,
    ) -> torch.Tensor:
        """The pixels of (key, view) from the key's image: ``float32[C, S, S]`` normalised (or
        ``uint8`` with ``normalized=False``), the stream's bytes. A mixed view needs
        ``partner_image``, the image of :meth:`partner`'s key."""
        block, row = self._row(key, view)
        params = block.view_params.view(row, view)
        channels = self.recipe.channels
        partner = None
        if params.mixed:
            if partner_image is None:
                other_key = str(block.keys[row + params.mix_partner])  # as partner() names it
                raise DataError(
                    f"key {key!r}, view {view}: mixed with {other_key!r}; pass its image"
                )
            other = block.view_params.view(row + params.mix_partner, view)
            partner = (as_uint8_chw(partner_image, channels), other)
        try:
            pixels = render(
                as_uint8_chw(image, channels), params, self.recipe, self.rendering, partner
            )
        except DataError as exc:
            raise DataError(f"shard {block.shard!r}, key {key!r}: {exc}") from None
        return normalize(pixels.unsqueeze(0), self.rendering)[0] if normalized else pixels


class ViewDataset(Dataset):
    """A map-style dataset over any indexable source, its views and targets from a cache.

    ``source[i]`` is ``(image, label)`` (torchvision's ``ImageFolder``; the key then comes from
    ``keys``) or ``(image, label, key)``; ``keys`` is a sequence or a function of the index
    (``kdcache shards folder`` keys the sorted files ``<split>_NNNNNNNN``). Each item is a
    :class:`~kdcache.train.dataset.DistillSample` of the epoch's view (:meth:`set_epoch`; the
    trainer's per-key view schedule), collated by :func:`kdcache.collate`. Mixed views read the
    partner's image from the source through the key index."""

    def __init__(
        self,
        source: Sequence[Any],
        reader: CacheReader,
        keys: Sequence[str] | Callable[[int], str] | None = None,
        *,
        epoch: int = 0,
        normalized: bool = True,
    ):
        self.source = source
        self.reader = reader
        self.keys = keys
        self.epoch = epoch
        self.normalized = normalized
        self._positions: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose views the items replay."""
        self.epoch = epoch

    def key(self, index: int) -> str:
        if callable(self.keys):
            return self.keys(index)
        if self.keys is not None:
            return str(self.keys[index])
        item = self.source[index]
        if len(item) < 3:
            raise DataError(f"source item {index} has no key: pass keys= (a list or a function)")
        return str(item[2])

    def _image_of(self, key: str) -> ImageLike:
        if self._positions is None:
            self._positions = {self.key(i): i for i in range(len(self))}
        if key not in self._positions:
            raise CacheMismatchError(f"the partner image {key!r} is not in the source")
        return self.source[self._positions[key]][0]

    def __getitem__(self, index: int) -> DistillSample:
        item = self.source[index]
        key = self.key(index)
        reader = self.reader
        view = reader.epoch_view(key, self.epoch)
        mixed = reader.partner(key, view)
        partner_image = None if mixed is None else self._image_of(mixed[0])
        image = reader.render(key, view, item[0], partner_image, normalized=self.normalized)
        label = int(item[1])
        if label != reader.label(key):
            raise CacheMismatchError(
                f"key {key!r}: label {label} in the source but {reader.label(key)} in the cache"
            )
        targets = {t: _one(reader.targets(key, view, t)) for t in reader.teachers}
        sample = DistillSample(image, torch.tensor(label), key, view, targets)
        if reader.recipe.mixes:
            partner_label = label if mixed is None else reader.label(mixed[0])
            sample.partner_label = torch.tensor(partner_label)
            sample.lam = torch.tensor(1.0 if mixed is None else mixed[1], dtype=torch.float32)
        return sample


def _one(targets: SparseTargets) -> SparseTargets:
    """A batch of one as one sample's targets (``[k]`` and scalars), as a DistillSample holds."""
    return targets.map(lambda x: x[0])
