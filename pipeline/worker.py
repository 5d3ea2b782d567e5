"""The shard worker: teachers over every view of one shard, written as that shard's chunks.

:class:`ShardWorker` is a plain callable class. The runner wraps it as a Ray actor (one per GPU, or
N on CPUs); tests and debugging call it in-process: ``ShardWorker(settings)(task)``. It builds each
teacher once, then per shard task streams the tar, checks the keys against the plan (learning them
when planning counted the shard from a manifest), decodes each image once, replays A views (from
``(seed, key, a)``, or from the parameters already stored when an earlier run made the shard's
views) in a background thread a few batches ahead, runs every teacher per batch under
``inference_mode`` meanwhile, reduces the logits to top-k / logsumexp / label logit on the device,
and writes the shard's keys and views (if needed) and each teacher's targets, each completion mark
last. It never writes group attributes.

Test-only fault hook: with ``KDCACHE_FAULT_CRASH_SHARD=<shard name>:<marker file>`` set, the
worker processing that shard, if the marker file does not exist, creates it and calls
``os._exit(1)`` right after its first batch's teacher forward (mid-shard, before writing). The
runner passes this variable on to Ray actors when the driver sees it set.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from kdcache.encoding import sample_slots
from kdcache.ensemble import combine_logits
from kdcache.errors import DataError, TeacherError
from kdcache.models import build_teacher, weights_digest
from kdcache.pipeline.config import RuntimeSection
from kdcache.pipeline.plan import MemberPlan, ShardKeys, ShardTask, TeacherPlan
from kdcache.reader import read_block
from kdcache.sampling import sampled_from_logits, uniforms
from kdcache.shards import DEFAULT_LABEL_KEY, Sample, decode_image, iter_shard
from kdcache.store import STATUS_INVALID, STATUS_VALID, TeacherMeta, open_store
from kdcache.targets import MixedLabels, SampledTargets, SparseTargets, from_logits
from kdcache.teacher import ModelRunner, check_finite
from kdcache.views import (
    Rendering,
    ViewParams,
    ViewRecipe,
    draw_group,
    grouped,
    render_rows,
)
from kdcache.writer import write_keys, write_teacher, write_views

logger = logging.getLogger(__name__)

FAULT_ENV = "KDCACHE_FAULT_CRASH_SHARD"
PREFETCH_BATCHES = 2
T = TypeVar("T")


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
    teachers: tuple[TeacherPlan, ...]
    runtime: RuntimeSection
    torch_threads: int
    label_key: str = DEFAULT_LABEL_KEY
    """The label's key in ``.json`` entries (``data.label_key``)."""
    prefetch_batches: int = PREFETCH_BATCHES
    """Batches of views a background thread decodes and replays ahead while the teachers run
    (0: in line, one after the other)."""


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
            drawn = (targets.sample_idx, targets.sample_logit, targets.sample_count, targets.lse_t)
            for out, values in zip(self.samples[:4], drawn, strict=True):
                # rows x views spelled out: lse_t may have no column (no stored temperature)
                out.reshape(out.shape[0] * out.shape[1], out.shape[-1])[flat] = values.cpu().numpy()
            self.samples[-1].reshape(-1)[flat] = targets.draw_tail_lse.cpu().numpy()


@dataclass
class ViewBatch:
    """Views on their way to the teachers: flat view indices ``row * A + a``, the views in each
    rendering the run's teachers need, and each view's hard labels (mixed views have two)."""

    flat: np.ndarray
    views: dict[str, torch.Tensor]
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
    def concat(parts: list[ViewBatch]) -> ViewBatch:
        return ViewBatch(
            np.concatenate([p.flat for p in parts]),
            {key: torch.cat([p.views[key] for p in parts]) for key in parts[0].views},
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.partner_labels for p in parts]),
            np.concatenate([p.lam for p in parts]),
        )

    def slice(self, start: int, stop: int) -> ViewBatch:
        return ViewBatch(
            self.flat[start:stop],
            {key: views[start:stop] for key, views in self.views.items()},
            self.labels[start:stop],
            self.partner_labels[start:stop],
            self.lam[start:stop],
        )


def rendering_key(rendering: Rendering) -> str:
    """A hashable name of a rendering: teachers with equal renderings share their views."""
    return rendering.model_dump_json()


def model_key(member: MemberPlan) -> str:
    """A hashable name of a model as it runs: its weights digest and rendering."""
    return f"{member.weights_digest}:{rendering_key(member.rendering)}"


class ViewBatcher:
    """Collects groups' views into batches of exactly ``size`` views (the last one smaller)."""

    def __init__(self, size: int):
        self.size = size
        self.parts: list[ViewBatch] = []
        self.count = 0

    def add(self, views: ViewBatch) -> Iterator[ViewBatch]:
        self.parts.append(views)
        self.count += len(views)
        while self.count >= self.size:
            yield self._take(self.size)

    def flush(self) -> Iterator[ViewBatch]:
        if self.count:
            yield self._take(self.count)

    def _take(self, n: int) -> ViewBatch:
        joined = ViewBatch.concat(self.parts)
        self.parts = [joined.slice(n, len(joined))]
        self.count = self.count - n
        return joined.slice(0, n)


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

    def _runner(self, teacher: str, member: MemberPlan) -> ModelRunner:
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

    def __call__(self, task: ShardTask) -> ShardResult:
        """Process one shard task and write its chunks and marks."""
        start = time.perf_counter()
        rows = self._initial_rows(task)
        n = task.count
        a = self.settings.num_views
        out = {name: self._arrays(name, n, a) for name in task.teachers}
        forward = 0.0
        keys = ShardKeys(task)
        batches = background(self._batches(task, rows, keys), self.settings.prefetch_batches)
        for index, batch in enumerate(batches):
            forward += self._forward(task, batch, out, keys.keys)
            if index == 0:
                maybe_crash(task.name)
        self._write(task, rows, out, keys)
        invalid = int((rows.status != STATUS_VALID).sum()) * a
        seconds = time.perf_counter() - start
        result = ShardResult(
            task.name, n * a, invalid, seconds, forward, task.make_views, task.teachers
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
        """Fresh rows, or the labels, status and view params stored by an earlier run."""
        if task.make_views:
            return ShardRows.fresh(self.settings.recipe, task.count, self.settings.num_views)
        block = read_block(self.store, task.index)
        return ShardRows(
            np.asarray(block.labels),
            np.asarray(block.status),
            [str(e) for e in block.errors],
            block.views,
            stored=True,
        )

    def _batches(self, task: ShardTask, rows: ShardRows, keys: ShardKeys) -> Iterator[ViewBatch]:
        """The shard's views in batches, group by group (a mixing group's rows are decoded
        together, so every view's partner is at hand; without mixing a group is one row)."""
        batcher = ViewBatcher(self.settings.runtime.batch_size)
        options = self.settings.data_storage_options or None
        samples = checked_samples(task, options, keys, self.settings.label_key)
        for start, group in grouped(samples, self.settings.recipe.group_size):
            views = self._group_views(task, start, group, rows)
            if views is not None:
                yield from batcher.add(views)
        yield from batcher.flush()

    def _group_views(
        self, task: ShardTask, start: int, group: list[Sample], rows: ShardRows
    ) -> ViewBatch | None:
        """Every view of a group's valid rows, in each rendering the teachers need."""
        images = {}
        for row, sample in enumerate(group, start=start):
            image = self._image(task, row, sample, rows)
            if image is not None:
                images[row] = image
        if not images:
            return None
        valid = sorted(images)
        if not rows.stored:
            self._draw(group, start, valid, images, rows)
        return self._render(valid, images, rows)

    def _image(
        self, task: ShardTask, row: int, sample: Sample, rows: ShardRows
    ) -> torch.Tensor | None:
        """The decoded image of a valid row, or None for an invalid one (recorded under
        ``skip``; a stored invalid row stays invalid)."""
        if rows.stored:
            return self._stored_image(task, row, sample, rows)
        s = self.settings
        rows.labels[row] = sample.label if sample.label is not None else -1
        try:
            sample.require_label(task.name, s.num_classes)
            image = decode(sample, task.name, s.recipe.channels)
        except DataError as exc:
            if s.on_error == "raise":
                raise
            rows.status[row] = STATUS_INVALID
            rows.errors[row] = str(exc)
            return None
        rows.status[row] = STATUS_VALID
        return image

    def _stored_image(
        self, task: ShardTask, row: int, sample: Sample, rows: ShardRows
    ) -> torch.Tensor | None:
        if int(rows.status[row]) != STATUS_VALID:
            return None
        if sample.label != int(rows.labels[row]):
            raise DataError(
                f"shard {task.name!r}, key {sample.key!r}: label {sample.label} but the cache "
                f"stored {int(rows.labels[row])}: the shard changed after its views were made"
            )
        image = decode(sample, task.name, self.settings.recipe.channels)
        stored = tuple(int(v) for v in rows.params.image_hw[row])
        if tuple(image.shape[-2:]) != stored:
            raise DataError(
                f"shard {task.name!r}, key {sample.key!r}: image is {image.shape[-2]}x"
                f"{image.shape[-1]} but its views were made from a {stored[0]}x{stored[1]} "
                "image: the shard changed after the cache was built"
            )
        return image

    def _draw(
        self,
        group: list[Sample],
        start: int,
        valid: list[int],
        images: dict[int, torch.Tensor],
        rows: ShardRows,
    ) -> None:
        """Draw every view of the group's valid rows from ``(seed, key, view)``."""
        keys = {row: group[row - start].key for row in valid}
        hw = {row: (int(images[row].shape[-2]), int(images[row].shape[-1])) for row in valid}
        draw_group(rows.params, self.settings.recipe, self.settings.seed, valid, keys, hw)

    def _render(
        self, valid: list[int], images: dict[int, torch.Tensor], rows: ShardRows
    ) -> ViewBatch:
        """The views of ``valid`` rows in every rendering, with their labels."""
        a = self.settings.num_views
        recipe = self.settings.recipe
        views = {
            key: render_rows(images, rows.params, valid, recipe, rendering)
            for key, rendering in self.renderings.items()
        }
        own = np.repeat(np.asarray(valid), a)  # (row, view) order, as render_rows gives them
        view = np.tile(np.arange(a), len(valid))
        partner, lam = rows.params.mixing(own, view)
        labels = rows.labels
        return ViewBatch(own * a + view, views, labels[own], labels[partner], lam)

    def _forward(
        self, task: ShardTask, batch: ViewBatch, out: dict[str, TeacherArrays], keys: list[str]
    ) -> float:
        """Every teacher on one batch, in its rendering; top-k, logsumexp and label logit on the
        device (a stored ensemble: its models' logits combined first; each model runs once per
        batch, whichever teachers hold it)."""
        start = time.perf_counter()
        labels = batch.mixed_labels()
        ran: dict[str, torch.Tensor] = {}
        for name in task.teachers:
            logits = self._logits(task, name, batch, ran)
            targets = self._targets(task, name, logits, labels, batch.flat, keys)
            out[name].put(batch.flat, targets)
        return time.perf_counter() - start

    def _logits(
        self, task: ShardTask, name: str, batch: ViewBatch, ran: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """A teacher's logits of the batch: its model's, or its ensemble's combination."""
        teacher = self.teachers[name]
        logits = []
        for member in teacher.models():
            key = model_key(member)
            if key not in ran:
                ran[key] = self.runners[key](batch.views[rendering_key(member.rendering)])
                check_finite(ran[key], f"shard {task.name!r}, teacher {name!r}")
            logits.append(ran[key])
        weights = [m.weight for m in teacher.models()]
        return combine_logits(logits, weights, teacher.combine)

    def _targets(
        self,
        task: ShardTask,
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
        """Keys and views first (if made here), then each teacher; every writer sets its mark
        last."""
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
        for name in task.teachers:
            arrays = out[name]
            write_teacher(
                self.store,
                task.index,
                name,
                topk_idx=arrays.topk_idx,
                topk_logit=arrays.topk_logit,
                lse=arrays.lse,
                label_logit=arrays.label_logit,
                tail_lse=arrays.tail_lse,
                samples=arrays.samples,
            )


def background(items: Iterator[T], depth: int) -> Iterator[T]:
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


def decode(sample: Sample, shard: str, channels: int) -> torch.Tensor:
    """Decode once; a corrupt image is a DataError naming shard and key."""
    try:
        return decode_image(sample.image, channels)
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"shard {shard!r}, key {sample.key!r}: cannot decode the image ({reason})"
        ) from None


def maybe_crash(shard: str) -> None:
    """The test-only fault hook (see the module docstring)."""
    spec = os.environ.get(FAULT_ENV, "")
    name, _, marker = spec.partition(":")
    if spec and name == shard and marker and not os.path.exists(marker):
        Path(marker).touch()
        logger.warning("fault hook: crashing the worker in shard %s", shard)
        os._exit(1)
