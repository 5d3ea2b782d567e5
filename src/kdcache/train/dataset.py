"""The trainer's data path as a per-sample dataset for any DataLoader.

:class:`CacheDataset` yields one :class:`DistillSample` at a time: the view of this epoch,
rendered at the student's size and normalised, its label (and for Mixup/CutMix views the
partner's label and lam) and the cached targets of the chosen teachers. :func:`collate` stacks
samples into a :class:`~kdcache.train.data.Batch`. Underneath it is the trainer's own stream
(:class:`~kdcache.train.data.ShardStream` over the same :class:`~kdcache.train.data.StreamSpec`,
planned by the same code from a train config): for the same seed, epoch, rank and DataLoader
worker count it yields exactly the trainer's samples, in the trainer's order within each worker,
with the same views and targets, so a DataLoader with the config's batch size delivers the
trainer's batches.

**Epochs** are explicit: the constructor's ``epoch`` (default 0) or :meth:`CacheDataset.set_epoch`
arms one pass; a second pass without a new ``set_epoch`` is an error, not a silent replay of the
same views. The epoch lives in shared memory, so persistent DataLoader workers see it too.

**Ranks and workers.** Each rank (``rank``/``world_size``, default from ``torch.distributed``
or torchrun's environment) and each DataLoader worker streams its own slot of the epoch's
samples (see :mod:`kdcache.train.data`); nothing else is needed for DDP. Every rank gets the same
number of batches from a DataLoader with the dataset's ``batch_size``; in the one plan where the
trainer evens the ranks with a batch of ``batch_size + 1`` (the smaller slots hold a multiple of
the batch size), which a DataLoader cannot make, a multi-rank dataset refuses to start and says
which batch sizes work.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdcache.cache.store import CacheStore
from kdcache.core.config import validate
from kdcache.core.errors import ConfigError, DataError
from kdcache.targets.sparse import SparseTargets
from kdcache.train.config import (
    StageConfig,
    TeacherConfig,
    TrainConfig,
    load_train_config,
    stage_teacher,
)
from kdcache.train.data import (
    Batch,
    ShardStream,
    StreamSpec,
    build_eval_data,
    build_train_data,
    slot_sizes,
)
from kdcache.views.recipe import Rendering, normalize

MAX_WORKERS = 1024
"""DataLoader workers per rank the epoch guard has room for."""


@dataclass
class DistillSample:
    """One sample of a :class:`CacheDataset`: the view and what a loss needs."""

    image: torch.Tensor
    """``float32[C, S, S]``: the view in the student's rendering, normalised (``uint8`` when the
    dataset was made with ``normalized=False``)."""
    label: torch.Tensor
    """``int64`` scalar: the sample's label."""
    key: str
    view: int
    """The cached view replayed this epoch (0 for evaluation)."""
    targets: dict[str, SparseTargets]
    """Teacher name -> the view's sparse targets (``idx``/``logit`` ``[k]``, the rest scalars)."""
    partner_label: torch.Tensor | None = None
    """Mixup/CutMix recipes: the label of the image mixed in (the own label if not mixed)."""
    lam: torch.Tensor | None = None
    """Mixup/CutMix recipes: the weight of the own label (1 if not mixed)."""


def collate(samples: Sequence[DistillSample]) -> Batch:
    """Stack :class:`DistillSample` s into a :class:`~kdcache.train.data.Batch`: ``images``,
    ``labels``, ``targets`` (teacher -> :class:`~kdcache.targets.sparse.SparseTargets` ``[B,
    ...]``), ``keys``, ``views`` and, for mixing recipes, ``partner_labels``/``lam``
    (``batch.hard_labels()`` is then a :class:`~kdcache.targets.sparse.MixedLabels`)."""
    if not samples:
        raise ValueError("collate: no samples")
    first = samples[0]
    targets = {}
    for name, kind in first.targets.items():
        rows = [s.targets[name].tensors() for s in samples]
        # type(kind): sampled targets keep their draws
        targets[name] = type(kind)(*(torch.stack(field) for field in zip(*rows, strict=True)))
    batch = Batch(
        images=torch.stack([s.image for s in samples]),
        labels=torch.stack([s.label for s in samples]),
        targets=targets,
        keys=[s.key for s in samples],
        views=torch.tensor([s.view for s in samples], dtype=torch.int64),
    )
    if first.lam is not None:
        batch.partner_labels = torch.stack(_every([s.partner_label for s in samples], "partner"))
        batch.lam = torch.stack(_every([s.lam for s in samples], "lam"))
    return batch


def _every(values: list[torch.Tensor | None], what: str) -> list[torch.Tensor]:
    """``values``, each one set: a batch's samples are all mixed or none is."""
    present = [value for value in values if value is not None]
    if len(present) < len(values):
        raise ValueError(f"a batch mixes samples with and without a {what}")
    return present


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's rank and the world size: given, else torch.distributed's, else torchrun's
    environment, else a single process."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _teachers_of(teacher: TeacherConfig, *, stages: list[StageConfig]) -> list[str]:
    """The teachers ``stages`` read from the cache (none unless the ``teacher`` section's mode is
    cache)."""
    if teacher.mode != "cache":
        return []
    return sorted({t for stage in stages if (t := stage_teacher(stage, teacher=teacher))})


class CacheDataset(IterableDataset):
    """Shards + cache as a per-sample ``IterableDataset``, planned like ``kdcache train``.

    Two ways to make one::

        train = CacheDataset("shards/train-{000000..000009}.tar", "cache.zarr", teachers=["t"])
        train = CacheDataset.from_config("student.yaml")   # the train config's data, cache, seed

    Iterate it with a DataLoader and :func:`collate` (:meth:`loader` makes one with the
    dataset's batch size), and call :meth:`set_epoch` before every epoch after the first.
    :meth:`eval_dataset` gives the validation stream (center views, every sample once over the
    ranks, no targets).
    """

    def __init__(
        self,
        shards: str | list[str],
        cache: str | None = None,
        *,
        teachers: Iterable[str] = (),
        seed: int = 0,
        epoch: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        shard_shuffle: bool = True,
        shard_subset: bool = False,
        input_size: int | None = None,
        render: dict[str, Any] | None = None,
        val_shards: str | list[str] | None = None,
        num_classes: int | None = None,
        views: dict[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_storage_options: dict[str, Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        normalized: bool = True,
    ):
        """The keywords are the train config's keys of the same names (``data.*``, ``cache.*``,
        ``run.seed``, ``student.input_size``/``student.render``, ``views`` without a cache);
        ``teachers`` are the cache's teachers whose targets each sample carries. ``batch_size``
        and ``num_workers`` are the DataLoader's (:meth:`loader` uses them; the plan follows the
        worker count of the DataLoader that runs it)."""
        teachers = list(teachers)
        raw = {
            "run": {"seed": seed},
            "data": {
                "shards": shards,
                "val_shards": val_shards,
                "batch_size": batch_size,
                "num_workers": num_workers,
                "shuffle_buffer": shuffle_buffer,
                "shard_shuffle": shard_shuffle,
                "num_classes": num_classes,
                "storage_options": storage_options or {},
            },
            "cache": {
                "path": cache,
                "storage_options": cache_storage_options or {},
                "shard_subset": shard_subset,
            },
            "views": views or {},
            # the student section only says how views are rendered: no model is built
            "student": {"name": "-", "input_size": input_size, "render": render or {}},
            "teacher": {"mode": "none"},
            "stages": [{"epochs": 1}],
        }
        config = validate(TrainConfig, raw, source="CacheDataset")
        super().__init__()
        self._setup(config, teachers, rank, world_size, epoch, normalized)

    @classmethod
    def from_config(
        cls,
        config: TrainConfig | dict[str, Any] | str | Path,
        overrides: list[str] | None = None,
        *,
        teachers: Iterable[str] | None = None,
        epoch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        normalized: bool = True,
    ) -> CacheDataset:
        """The training data of a ``kdcache train`` config (a path with ``dotted.key=value``
        overrides, a dict or a :class:`TrainConfig`): its shards, cache, seed, shuffles, batch size,
        worker count and student rendering. ``teachers`` default to those its stages read from the
        cache."""
        if isinstance(config, (str, Path)):
            config = load_train_config(config, overrides)
        elif isinstance(config, dict):
            config = validate(TrainConfig, config, source="CacheDataset.from_config")
        dataset = cls.__new__(cls)
        IterableDataset.__init__(dataset)
        stages = config.stages
        chosen = _teachers_of(config.teacher, stages=stages) if teachers is None else list(teachers)
        dataset._setup(config, chosen, rank, world_size, epoch, normalized)
        return dataset

    def _setup(
        self,
        config: TrainConfig,
        teachers: list[str],
        rank: int | None,
        world_size: int | None,
        epoch: int,
        normalized: bool,
    ) -> None:
        rank, world_size = _world(rank, world_size)
        data = build_train_data(config, rank, world_size, teachers, pin_memory=False)
        self.config = config
        self.spec: StreamSpec = data.spec
        self.store: CacheStore | None = data.store
        self.teachers = tuple(teachers)
        self.normalized = normalized
        self.num_classes = data.num_classes
        self.invalid = data.invalid
        """Rows of these shards marked invalid in the cache (skipped every epoch)."""
        # [epoch, generation, generation each worker last started]: shared with the workers
        self._epoch = torch.zeros(2 + MAX_WORKERS, dtype=torch.int64).share_memory_()
        self._epoch[2:] = -1
        self.set_epoch(epoch)
        _check_even_ranks(self.spec, self.spec.num_workers)

    def __getstate__(self) -> dict[str, Any]:
        """What a spawned DataLoader worker gets: everything but the open cache (the stream opens
        its own in each worker)."""
        return {**self.__dict__, "store": None}

    # ---- what it holds ----------------------------------------------------------------------

    @property
    def rendering(self) -> Rendering:
        """How views are rendered for the student: size, interpolation, mean and std."""
        return self.spec.rendering

    @property
    def channels(self) -> int:
        return self.spec.recipe.channels

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def world_size(self) -> int:
        return self.spec.world_size

    def num_samples(self, num_workers: int | None = None) -> int:
        """Samples this rank streams per epoch with ``num_workers`` DataLoader workers."""
        spec = self._planned(num_workers)
        first = spec.rank * spec.workers
        return sum(slot_sizes(spec)[first : first + spec.workers])

    def batches_per_epoch(
        self, batch_size: int | None = None, num_workers: int | None = None
    ) -> int:
        """Batches this rank's DataLoader delivers per epoch (default: the dataset's batch size and
        worker count); the same on every rank."""
        spec = self._planned(num_workers)
        size = batch_size or spec.batch_size
        first = spec.rank * spec.workers
        return sum(math.ceil(n / size) for n in slot_sizes(spec)[first : first + spec.workers])

    def _planned(self, num_workers: int | None) -> StreamSpec:
        workers = self.spec.num_workers if num_workers is None else num_workers
        return replace(self.spec, num_workers=workers)

    # ---- epochs -------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Arm one pass over ``epoch`` (its shard order, shuffle and views); call it before each
        epoch, from the process that owns the DataLoader."""
        if epoch < 0:
            raise ValueError(f"set_epoch: epoch must be >= 0, found {epoch}")
        self._epoch[0] = epoch
        self._epoch[1] += 1

    def _claim(self, worker: int) -> int:
        """The epoch this worker streams now; refuses a second pass over one ``set_epoch``."""
        if worker >= MAX_WORKERS:
            raise DataError(f"CacheDataset supports up to {MAX_WORKERS} DataLoader workers")
        generation = int(self._epoch[1])
        if self.spec.train and int(self._epoch[2 + worker]) == generation:
            raise DataError(
                f"CacheDataset: epoch {self.epoch} was already iterated; call "
                "dataset.set_epoch(epoch) before every epoch (set_epoch with the same epoch "
                "repeats it)"
            )
        self._epoch[2 + worker] = generation
        return self.epoch

    # ---- iteration ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[DistillSample]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        workers = 0 if info is None else info.num_workers
        epoch = self._claim(worker)
        spec = replace(self.spec, num_workers=workers)
        _check_samples_per_slot(spec)
        _check_even_ranks(spec, workers)
        stream = ShardStream(spec)
        stream.set_epoch(epoch, self.teachers if spec.train else ())
        for batch in stream:
            yield from self._samples(batch)

    def _samples(self, batch: Batch) -> Iterator[DistillSample]:
        images = normalize(batch.images, self.spec.rendering) if self.normalized else batch.images
        for i, key in enumerate(batch.keys):
            yield DistillSample(
                image=images[i],
                label=batch.labels[i],
                key=key,
                view=int(batch.views[i]) if batch.views is not None else 0,
                targets={name: t.map(lambda x, i=i: x[i]) for name, t in batch.targets.items()},
                partner_label=None if batch.partner_labels is None else batch.partner_labels[i],
                lam=None if batch.lam is None else batch.lam[i],
            )

    # ---- loaders and evaluation ---------------------------------------------------------------

    def loader(self, **kwargs: Any) -> DataLoader:
        """A DataLoader over this dataset with :func:`collate`, its batch size and worker count
        (``kwargs`` override them, e.g. ``pin_memory=True``)."""
        workers = kwargs.pop("num_workers", self.spec.num_workers)
        options = {
            "batch_size": self.spec.batch_size,
            "collate_fn": collate,
            "num_workers": workers,
            "generator": torch.Generator().manual_seed(self.spec.seed),
            "prefetch_factor": self.config.data.prefetch_factor if workers > 0 else None,
            **kwargs,
        }
        return DataLoader(self, **options)

    def eval_dataset(
        self, val_shards: str | list[str] | None = None, batch_size: int | None = None
    ) -> CacheDataset:
        """The validation data (``data.val_shards`` unless given): center views in the student's
        rendering, file order, split over ranks and workers, labels only."""
        data = self.config.data.model_copy(
            update={
                "val_shards": val_shards or self.config.data.val_shards,
                "eval_batch_size": batch_size or self.config.data.eval_batch_size,
            }
        )
        if data.val_shards is None:
            raise ConfigError("eval_dataset: no validation shards (data.val_shards or val_shards=)")
        config = self.config.model_copy(update={"data": data})
        spec = self.spec
        built = build_eval_data(
            data,
            spec.rank,
            spec.world_size,
            spec.recipe,
            self.num_classes,
            pin_memory=False,
            student=config.student,
        )
        if built is None:  # not with val_shards set, checked above
            raise ConfigError("eval_dataset: no validation shards (data.val_shards or val_shards=)")
        evaluation = CacheDataset.__new__(CacheDataset)
        IterableDataset.__init__(evaluation)
        evaluation.__dict__.update(self.__dict__)
        evaluation.config = config
        evaluation.spec = built[0].spec
        evaluation.teachers = ()
        evaluation._epoch = torch.zeros(2 + MAX_WORKERS, dtype=torch.int64).share_memory_()
        return evaluation


def _check_samples_per_slot(spec: StreamSpec) -> None:
    slots = spec.world_size * spec.workers
    if sum(spec.counts) < slots:
        raise ConfigError(
            f"{sum(spec.counts)} sample(s) cannot feed {spec.world_size} rank(s) x "
            f"{spec.workers} DataLoader worker(s); use fewer workers"
        )


def _check_even_ranks(spec: StreamSpec, num_workers: int) -> None:
    """Refuse a multi-rank plan whose ranks would get different batch counts from a DataLoader of
    the dataset's batch size (DDP would hang at the first step one rank lacks)."""
    if spec.world_size == 1 or not spec.train:
        return
    spec = replace(spec, num_workers=num_workers)
    sizes = slot_sizes(spec)
    w = spec.workers
    per_rank = [
        sum(math.ceil(n / spec.batch_size) for n in sizes[r * w : (r + 1) * w])
        for r in range(spec.world_size)
    ]
    if len(set(per_rank)) > 1:
        base = min(sizes)
        raise ConfigError(
            f"batch_size {spec.batch_size}: the ranks would get {min(per_rank)} to "
            f"{max(per_rank)} batches per epoch ({sum(spec.counts)} samples in slots of {base} "
            f"and {base + 1}; the trainer evens them with one batch of {spec.batch_size + 1}, a "
            f"DataLoader cannot): use a batch size that does not divide {base}, e.g. "
            f"{spec.batch_size - 1} or {spec.batch_size + 1}"
        )
