"""The shard worker: teachers over every view of one shard, written as that shard's chunks.

:class:`ShardWorker` is a plain callable class. The runner wraps it as a Ray actor (one per GPU, or
N on CPUs); tests and debugging call it in-process: ``ShardWorker(settings)(task)``. It builds each
teacher once, then per shard task streams the tar, checks the keys against the plan (learning them
when planning counted the shard from a manifest), decodes each image once, replays A views (from
``(seed, key, a)``, or from the parameters already stored when an earlier run made the shard's
views) a few batches ahead on its data path (:mod:`kdcache.pipeline.datapath`: a background
thread, or ``runtime.data_workers`` processes), runs every teacher per batch under
``inference_mode`` meanwhile, reduces the logits to top-k / logsumexp / label logit on the device,
and writes the shard's keys and views (if needed) and each teacher's targets, each completion mark
last. It never writes group attributes. On a grown cache (:mod:`kdcache.cache.growth`) a task draws
the new views only and runs each teacher on the view blocks it has not done.

Test-only fault hook: with ``KDCACHE_FAULT_CRASH_SHARD=<shard name>:<marker file>`` set, the
worker processing that shard, if the marker file does not exist, creates it and calls
``os._exit(1)`` right after its first batch's teacher forward (mid-shard, before writing). The
runner passes this variable on to Ray actors when the driver sees it set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.cache.integrity import VIEWS, ViewBlock
from kdcache.cache.reader import read_block
from kdcache.cache.store import STATUS_VALID, TeacherMeta, open_store
from kdcache.cache.writer import write_keys, write_teacher, write_view_block, write_views
from kdcache.core.errors import TeacherError
from kdcache.models.build import build_teacher, weights_digest
from kdcache.models.ensemble import combine_logits
from kdcache.models.runner import ModelRunner, check_finite
from kdcache.pipeline.config import RuntimeSection
from kdcache.pipeline.datapath import (
    PREFETCH_BATCHES,
    DataPath,
    DataSettings,
    ShardRows,
    ViewBatch,
    ViewWork,
    background,
    checked_samples,
    rendering_key,
)
from kdcache.pipeline.plan import ResolvedMember, ResolvedTeacher, ShardKeys, ShardTask
from kdcache.shards.reading import DEFAULT_LABEL_KEY, MAX_PIXELS
from kdcache.targets.encoding import sample_slots
from kdcache.targets.sampling import sampled_from_logits, uniforms
from kdcache.targets.sparse import MixedLabels, SampledTargets, SparseTargets, from_logits
from kdcache.views.recipe import Rendering, ViewRecipe

__all__ = ["ShardWorker", "WorkerSettings", "ShardResult", "background", "checked_samples"]

logger = logging.getLogger(__name__)

FAULT_ENV = "KDCACHE_FAULT_CRASH_SHARD"


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs (picklable; the same for every actor of a run)."""

    cache_path: str
    storage_options: dict = field(repr=False)
    """fsspec storage options of the cache (``cache.storage_options``)."""
    data_storage_options: dict = field(repr=False)
    """fsspec storage options of the shards (``data.storage_options``)."""
    recipe: ViewRecipe
    num_views: int
    seed: int
    num_classes: int
    on_error: str
    teachers: tuple[ResolvedTeacher, ...]
    runtime: RuntimeSection
    torch_threads: int
    label_key: str = DEFAULT_LABEL_KEY
    """The label's key in ``.json`` entries (``data.label_key``)."""
    max_pixels: int | None = MAX_PIXELS
    """Pixel limit of one image (``data.max_pixels``)."""
    prefetch_batches: int = PREFETCH_BATCHES
    """Batches of views the data path makes ahead while the teachers run (0: in line, one after
    the other, in this thread; with data worker processes their jobs still run meanwhile)."""
    cpus: float = 1.0
    """The actor's CPUs (``ray.cpus_per_actor`` as resolved): the default of ``data_workers``."""
    data_workers: int | None = None
    """Data worker processes (``runtime.data_workers``); None: :attr:`workers` decides."""

    @property
    def workers(self) -> int:
        """Data worker processes: ``data_workers``, else the actor's CPUs when 2 or more, else 0
        (the actor's own background thread)."""
        if self.data_workers is not None:
            return self.data_workers
        return int(self.cpus) if self.cpus >= 2 else 0

    def for_actor(self, cpus: float) -> WorkerSettings:
        """These settings in an actor of ``cpus`` CPUs (its default torch threads and data
        workers)."""
        threads = self.runtime.torch_threads or max(1, int(cpus))
        return dataclasses.replace(self, cpus=cpus, torch_threads=threads)


@dataclass(frozen=True)
class ShardResult:
    """What one shard task did."""

    shard: str
    views: int
    invalid_views: int
    seconds: float
    forward_seconds: float
    made_views: bool
    teachers: tuple[str, ...]
    top1: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    """Teacher -> (correct, checked, unmixed correct, unmixed checked) over the shard's labelled
    views: the teacher check's counts (:mod:`kdcache.pipeline.teachercheck`)."""


@dataclass
class TeacherArrays:
    """One teacher's targets for a shard, filled batch by batch: ``[n, A, k]`` and ``[n, A]``
    (encoding ``sampled``: also the draws, ``[n, A, slots]``, ``lse_t`` ``[n, A, T]`` and the
    draws' tail logsumexp ``[n, A]``)."""

    topk_idx: np.ndarray
    topk_logit: np.ndarray
    lse: np.ndarray
    label_logit: np.ndarray
    tail_lse: np.ndarray
    samples: tuple[np.ndarray, ...] | None = None
    """Encoding ``sampled``: (classes, logits, counts, lse_t, draw_tail_lse)."""

    @classmethod
    def zeros(
        cls, n: int, num_views: int, k: int, slots: int | None = None, temperatures: int = 0
    ) -> TeacherArrays:
        scalars = [np.zeros((n, num_views), np.float32) for _ in range(3)]
        samples = None
        if slots is not None:
            shapes = [(slots, np.int64), (slots, np.float32), (slots, np.uint8)]
            samples = tuple(np.zeros((n, num_views, m), dtype) for m, dtype in shapes)
            samples += (np.zeros((n, num_views, temperatures), np.float32),)
            samples += (np.zeros((n, num_views), np.float32),)
        return cls(
            np.zeros((n, num_views, k), np.int32),
            np.zeros((n, num_views, k), np.float32),
            *scalars,
            samples=samples,
        )

    def block_targets(self, start: int, stop: int) -> dict[str, Any]:
        """The targets of views ``[start, stop)`` (one block), as :func:`write_teacher` takes
        them."""
        samples = None
        if self.samples is not None:
            samples = tuple(values[:, start:stop] for values in self.samples)
        return {
            "topk_idx": self.topk_idx[:, start:stop],
            "topk_logit": self.topk_logit[:, start:stop],
            "lse": self.lse[:, start:stop],
            "label_logit": self.label_logit[:, start:stop],
            "tail_lse": self.tail_lse[:, start:stop],
            "samples": samples,
        }

    def put(self, flat: np.ndarray, targets: SparseTargets) -> None:
        """Store a batch at flat view indices ``row * A + a`` (copies the small arrays to CPU)."""
        k = self.topk_idx.shape[-1]
        # The arrays are C-contiguous [n, A, ...], so reshape returns a view of the same memory
        # (row * A + a addresses view a of row) and these assignments land in place.
        self.topk_idx.reshape(-1, k)[flat] = targets.idx.cpu().numpy()
        self.topk_logit.reshape(-1, k)[flat] = targets.logit.cpu().numpy()
        self.lse.reshape(-1)[flat] = targets.lse.cpu().numpy()
        self.label_logit.reshape(-1)[flat] = targets.label_logit.cpu().numpy()
        self.tail_lse.reshape(-1)[flat] = targets.tail_lse.cpu().numpy()
        if isinstance(targets, SampledTargets):
            samples = self.samples
            if samples is None:  # allocated for every teacher whose encoding is sampled
                raise ValueError("sampled targets for a teacher not stored as sampled")
            drawn = (targets.sample_idx, targets.sample_logit, targets.sample_count, targets.lse_t)
            for out, values in zip(samples[:4], drawn, strict=True):
                # rows x views spelled out: lse_t may have no column (no stored temperature)
                out.reshape(out.shape[0] * out.shape[1], out.shape[-1])[flat] = values.cpu().numpy()
            samples[-1].reshape(-1)[flat] = targets.draw_tail_lse.cpu().numpy()


def model_key(member: ResolvedMember) -> str:
    """A hashable name of a model as it runs: its weights digest and rendering."""
    return f"{member.weights_digest}:{rendering_key(member.rendering)}"


class ShardWorker:
    """Runs a run's teachers over shard tasks; one instance per Ray actor (or in-process)."""

    def __init__(self, settings: WorkerSettings):
        torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.teachers = {t.name: t for t in settings.teachers}
        self.runners: dict[str, ModelRunner] = {}
        """Model key (:func:`model_key`) -> its runner: a model that several teachers run (a
        teacher and an ensemble holding it) is built once and runs once per batch."""
        for t in settings.teachers:
            for member in t.models():
                if model_key(member) not in self.runners:
                    self.runners[model_key(member)] = self._runner(t.name, member)
        models = [m for t in settings.teachers for m in t.models()]
        self.renderings = {rendering_key(m.rendering): m.rendering for m in models}
        self.store = open_store(settings.cache_path, "r+", settings.storage_options or None)
        self.metas = {t.name: self.store.teacher_meta(t.name) for t in settings.teachers}
        self.data = DataPath(
            data_settings(settings, self.renderings),
            workers=settings.workers,
            batch_size=settings.runtime.batch_size,
            prefetch_batches=settings.prefetch_batches,
            pin_memory=any(r.device.type == "cuda" for r in self.runners.values()),
        )
        self.data.start()  # the data worker processes are up before the actor is ready
        self.writer = ThreadPoolExecutor(len(settings.teachers), thread_name_prefix="kdcache-write")
        self.hits: dict[str, np.ndarray] = {}
        """Teacher -> the current task's :func:`top1_counts` so far."""

    def _runner(self, teacher: str, member: ResolvedMember) -> ModelRunner:
        s = self.settings
        model = build_teacher(member.spec, s.num_classes, s.recipe.channels)
        digest = weights_digest(model)
        if digest != member.weights_digest:
            raise TeacherError(
                f"teacher {teacher!r}: the weights built here (digest {digest}) "
                "differ from the driver's "
                f"({member.weights_digest}); is the checkpoint file the same on every node?"
            )
        return ModelRunner(
            model,
            member.rendering,
            device=s.runtime.device,
            amp=s.runtime.amp,
            channels_last=s.runtime.channels_last,
            name=teacher,
        )

    def ready(self) -> int:
        """The actor's process id, once the teachers are built (the runner waits on this)."""
        return os.getpid()

    def close(self) -> None:
        """Stop the data worker processes (an actor's end stops them too)."""
        self.data.close()
        self.writer.shutdown()

    def __call__(self, task: ShardTask) -> ShardResult:
        """Process one shard task and write its chunks and marks."""
        start = time.perf_counter()
        rows = self._initial_rows(task)
        n = task.count
        a = self.settings.num_views
        out = {name: self._arrays(name, n, a) for name in task.teachers}
        forward = 0.0
        self.hits = {name: np.zeros(4, np.int64) for name in task.teachers}
        keys = ShardKeys(task)
        self.data.prefetch_batches = self.settings.prefetch_batches
        options = self.settings.data_storage_options or None
        batches = self.data.batches(task, rows, keys, options, self.settings.label_key)
        # closed on failure too: its producer thread must stop before this actor's next shard
        # uses the same data path (slots, batch memory), whatever still holds the traceback
        with contextlib.closing(batches):
            for index, batch in enumerate(batches):
                forward += self._forward(task, batch, out, keys.keys)
                if index == 0:
                    maybe_crash(task.name)
        self._write(task, rows, out, keys)
        per_row = len(ViewWork.of(task, a).render)
        invalid = int((rows.status != STATUS_VALID).sum()) * per_row
        seconds = time.perf_counter() - start
        result = ShardResult(
            task.name,
            n * per_row,
            invalid,
            seconds,
            forward,
            task.make_views,
            task.teachers,
            {name: (int(a), int(b), int(c), int(d)) for name, (a, b, c, d) in self.hits.items()},
        )
        logger.debug("%s", result)
        return result

    def _arrays(self, name: str, n: int, num_views: int) -> TeacherArrays:
        meta = self.metas[name]
        if meta.encoding != "sampled":
            return TeacherArrays.zeros(n, num_views, meta.k)
        slots = sample_slots(meta.samples, meta.k, self.settings.num_classes)
        return TeacherArrays.zeros(n, num_views, meta.k, slots, len(meta.sample_temperatures))

    def _initial_rows(self, task: ShardTask) -> ShardRows:
        """Fresh rows, or the labels, status and view params stored by an earlier run (a grown
        cache's new views not made yet read as fill values: this task draws them)."""
        if task.make_views:
            return ShardRows.fresh(self.settings.recipe, task.count, self.settings.num_views)
        # the views drawn here are not read: after a repair their chunks are the damage
        draw = ViewWork.of(task, self.settings.num_views).draw
        block = read_block(self.store, task.index, require_complete=False, skip_views=draw)
        return ShardRows(
            np.asarray(block.labels),
            np.asarray(block.status),
            [str(e) for e in block.errors],
            block.view_params,
            stored=True,
        )

    def _forward(
        self, task: ShardTask, batch: ViewBatch, out: dict[str, TeacherArrays], keys: list[str]
    ) -> float:
        """Every teacher on one batch (on the views it runs on here), in its rendering; top-k,
        logsumexp and label logit on the device (a stored ensemble: its models' logits combined
        first; each model runs once per batch on the same views, whichever teachers hold it)."""
        start = time.perf_counter()
        view = batch.flat % self.settings.num_views
        ran: dict[tuple[str, bytes], torch.Tensor] = {}
        for name in task.teachers:
            runs_on = self._runs_on(task, name)
            part = batch.select(runs_on[view])
            if not len(part):
                continue
            logits = self._logits(task, name, part, ran, runs_on.tobytes())
            labels = part.mixed_labels()
            self.hits[name] += top1_counts(logits, labels)
            out[name].put(part.flat, self._targets(name, logits, labels, part.flat, keys))
        return time.perf_counter() - start

    def _runs_on(self, task: ShardTask, name: str) -> np.ndarray:
        """bool per view: whether teacher ``name`` runs on it in this task."""
        wanted = np.zeros(self.settings.num_views, dtype=bool)
        wanted[task.views_of(name, self.settings.num_views)] = True
        return wanted

    def _logits(
        self,
        task: ShardTask,
        name: str,
        part: ViewBatch,
        ran: dict[tuple[str, bytes], torch.Tensor],
        view_mask: bytes,
    ) -> torch.Tensor:
        """A teacher's logits of its part of the batch: its model's, or its ensemble's
        combination (``ran``: the logits each model already gave on the same views)."""
        teacher = self.teachers[name]
        logits = []
        for member in teacher.models():
            key = (model_key(member), view_mask)
            if key not in ran:
                runner = self.runners[key[0]]
                ran[key] = runner(part.pixels[rendering_key(member.rendering)])
                check_finite(ran[key], f"shard {task.name!r}, teacher {name!r}")
            logits.append(ran[key])
        weights = [m.weight for m in teacher.models()]
        return combine_logits(logits, weights, teacher.combine)

    def _targets(
        self,
        name: str,
        logits: torch.Tensor,
        labels: MixedLabels,
        flat: np.ndarray,
        keys: list[str],
    ) -> SparseTargets:
        """The stored form of a batch's logits: top-k, plus the draws for encoding ``sampled``."""
        meta: TeacherMeta = self.metas[name]
        labels = labels.to(logits.device)
        if meta.encoding != "sampled":
            return from_logits(logits, labels, meta.k)
        a = self.settings.num_views
        # flat = row * A + view: the draws are keyed by each view's sample key and view index.
        view_keys = [keys[i] for i in flat // a]
        u = uniforms(self.settings.seed, view_keys, flat % a, name, meta.samples)
        return sampled_from_logits(
            logits, labels, meta.k, u, meta.sample_temperatures, meta.draw_temperature
        )

    def _write(
        self, task: ShardTask, rows: ShardRows, out: dict[str, TeacherArrays], keys: ShardKeys
    ) -> None:
        """Keys and views first (if made here), then each teacher, view block by view block;
        every writer sets its mark last."""
        if task.make_views:
            write_keys(self.store, task.index, keys.keys)
            write_views(
                self.store,
                task.index,
                labels=rows.labels,
                status=rows.status,
                errors=rows.errors,
                params=rows.params,
            )
        for start, stop in task.new_views:
            write_view_block(self.store, task.index, ViewBlock(VIEWS, start, stop), rows.params)
        # each teacher writes its own chunks and marks: they go out together (one round trip
        # on an object store instead of one per teacher)
        writes = [
            self.writer.submit(self._write_teacher, task, name, out[name]) for name in task.teachers
        ]
        wait(writes)  # all settled before the task returns or raises
        for write in writes:
            write.result()

    def _write_teacher(self, task: ShardTask, name: str, arrays: TeacherArrays) -> None:
        for block in self._teacher_blocks(task, name):
            write_teacher(
                self.store,
                task.index,
                name,
                **arrays.block_targets(block.start, block.stop),
                start=block.start,
            )

    def _teacher_blocks(self, task: ShardTask, name: str) -> list[ViewBlock]:
        """The teacher's view blocks this task runs it on."""
        listed = task.teacher_blocks(name, self.settings.num_views)
        blocks = self.store.blocks(name)
        if listed == ((0, self.settings.num_views),):  # all of its views
            return blocks
        return [block for block in blocks if (block.start, block.stop) in listed]


def top1_counts(logits: torch.Tensor, labels: MixedLabels) -> np.ndarray:
    """(correct, checked, unmixed correct, unmixed checked) of a batch: top-1 against each view's
    dominant label, over the views whose labels are known (>= 0)."""
    labels = labels.to(logits.device)
    known = (labels.labels >= 0) & (labels.partner >= 0)
    correct = (logits.argmax(dim=-1) == labels.dominant()) & known
    unmixed = known & ~labels.mixed
    counts = torch.stack([correct.sum(), known.sum(), (correct & unmixed).sum(), unmixed.sum()])
    return counts.cpu().numpy().astype(np.int64)


def data_settings(settings: WorkerSettings, renderings: dict[str, Rendering]) -> DataSettings:
    """What the data path needs of a worker's settings."""
    return DataSettings(
        recipe=settings.recipe,
        num_views=settings.num_views,
        seed=settings.seed,
        num_classes=settings.num_classes,
        on_error=settings.on_error,
        renderings=tuple(renderings.items()),
        max_pixels=settings.max_pixels,
    )


def maybe_crash(shard: str) -> None:
    """The test-only fault hook (see the module docstring)."""
    spec = os.environ.get(FAULT_ENV, "")
    name, _, marker = spec.partition(":")
    if spec and name == shard and marker and not os.path.exists(marker):
        Path(marker).touch()
        logger.warning("fault hook: crashing the worker in shard %s", shard)
        os._exit(1)
