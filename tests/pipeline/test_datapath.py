"""Precompute's data path on worker processes: the same cache for every data-worker count, and a
data worker that dies or raises fails its shard by name instead of hanging.

Real tars, a real Zarr cache, real spawned processes (each start imports torch: a few seconds,
so the tests share what they can)."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading

import numpy as np
import pytest
import torch

from kdcache.cache.store import open_store
from kdcache.core.errors import DataError, TeacherError
from kdcache.pipeline import datapath
from kdcache.pipeline.config import RuntimeSection
from kdcache.pipeline.datapath import (
    FAULT_ENV,
    BatchMemory,
    DataWorkerError,
    ViewBatch,
    ViewBatcher,
)
from kdcache.pipeline.plan import plan_precompute
from kdcache.pipeline.resources import cpu_share
from kdcache.pipeline.runner import worker_settings
from kdcache.pipeline.worker import ShardWorker, WorkerSettings
from kdcache.views.recipe import ViewRecipe
from tests.support.cachebuild import (
    assert_same_arrays,
    cache_arrays,
    precompute_config,
    tiny_recipe,
    tiny_teacher,
    write_shards,
)
from tests.support.tarbuild import good, write_tar

STRONG = {
    "policy": "rand-m9-mstd0.5-inc1",
    "color_jitter": {"brightness": 0.4, "contrast": 0.4},
    "erasing": {"prob": 0.25, "mode": "pixel"},
    "mix": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "group_size": 6},
}
HANG_LIMIT_S = 120
"""A shard that takes longer than this has hung (each takes well under a second here)."""


@contextlib.contextmanager
def no_hang(seconds: int = HANG_LIMIT_S):
    """Fail the test instead of hanging it."""

    def hung(*_):
        raise TimeoutError(f"no result within {seconds} s: the shard hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("datapath")
    urls = write_shards(root / "shards", per_shard=[14, 9, 12, 7], unlabelled=("train_000005",))
    spec, _ = tiny_teacher(4, save_to=root / "t.pt")
    return {
        "root": root,
        "urls": urls,
        "teacher": {"name": "t", "model": spec.model_dump(), "k": 3},
    }


def worker(cfg, data_workers: int | None, **kw) -> tuple[ShardWorker, list]:
    plan = plan_precompute(cfg)
    settings = dataclasses.replace(worker_settings(cfg, plan), data_workers=data_workers, **kw)
    return ShardWorker(settings), plan.tasks


def test_one_and_two_data_workers_make_the_same_cache_mixup_included(shards, tmp_path, monkeypatch):
    """Uneven shards (groups of 6 cut by shard ends, an invalid row in a mixing group), batches
    that cut groups, two teachers rendering at two sizes: the cache does not depend on how many
    processes made the views, nor on whether they came back through the view slots or new
    shared memory."""
    big = {**shards["teacher"], "name": "big", "render": {"size": 20, "interpolation": "bicubic"}}
    caches = {}
    for name, workers, slots in (("0", 0, True), ("1", 1, True), ("2", 2, True), ("1-", 1, False)):
        monkeypatch.setattr(datapath, "SLOT_BYTES_MAX", datapath.SLOT_BYTES_MAX if slots else 0)
        path = tmp_path / f"cache{name}"
        cfg = precompute_config(
            path,
            shards["urls"],
            [shards["teacher"], big],
            recipe=tiny_recipe(**STRONG),
            num_views=3,
        )
        cfg.runtime.batch_size = 10
        shard_worker, tasks = worker(cfg, workers, prefetch_batches=workers)
        try:
            assert (shard_worker.data._slots is not None) == (slots and workers > 0)
            with no_hang():
                results = [shard_worker(task) for task in tasks]
        finally:
            shard_worker.close()
        assert sum(r.views for r in results) == 42 * 3
        caches[name] = cache_arrays(path)
    assert_same_arrays(caches["1"], caches["2"])
    assert_same_arrays(caches["0"], caches["2"])
    assert_same_arrays(caches["1-"], caches["2"])
    assert open_store(str(tmp_path / "cache2")).incomplete_shards() == {}


def test_a_shard_whose_teacher_fails_stops_its_view_thread_before_the_next(shards, tmp_path):
    """A teacher error mid-shard, its exception (and traceback) still held: the background
    thread making that shard's views has stopped, so the actor's next shard has the data path
    (its batch memory and view slots) to itself."""
    spec, model = tiny_teacher(4, save_to=tmp_path / "nan.pt")
    state = model.state_dict()
    for value in state.values():
        if value.is_floating_point():
            value.fill_(float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    teacher = {"name": "t", "model": spec.model_dump(), "k": 3}
    cfg = precompute_config(tmp_path / "cache", shards["urls"], [teacher], recipe=tiny_recipe())
    cfg.runtime.batch_size = 4
    shard_worker, tasks = worker(cfg, 0, prefetch_batches=1)
    try:
        with pytest.raises(TeacherError, match="NaN or inf") as failed:
            shard_worker(tasks[0])
        alive = [t for t in threading.enumerate() if t.name == "kdcache-views"]
        assert failed.value is not None and alive == []
    finally:
        shard_worker.close()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("exit", r"shard 'train-000001.tar': a data worker process died while making its views"),
        (
            "raise",
            r"shard 'train-000001.tar': a data worker process raised RuntimeError: fault hook",
        ),
    ],
)
def test_a_data_worker_that_dies_or_raises_fails_its_shard_by_name(
    shards, tmp_path, monkeypatch, kind, message
):
    monkeypatch.setenv(FAULT_ENV, f"train-000001.tar:{kind}")  # read by the processes it starts
    cfg = precompute_config(tmp_path / "cache", shards["urls"], [shards["teacher"]], num_views=2)
    shard_worker, tasks = worker(cfg, 1)
    try:
        with no_hang():
            shard_worker(tasks[0])
            with pytest.raises(DataWorkerError, match=message):
                shard_worker(tasks[1])
            shard_worker(tasks[2])  # the next shard runs (on a fresh pool after a death)
    finally:
        shard_worker.close()
    done = open_store(str(tmp_path / "cache")).views_done()
    assert done.tolist() == [True, False, True, False]  # the failed shard's marks are not set


def test_a_bad_sample_in_a_data_worker_is_the_same_error_naming_shard_and_key(tmp_path):
    url = write_tar(
        tmp_path / "corrupt-000000.tar",
        good("c")[:3] + [("c_bad", b"not an image", b"1")] + good("c2", 2),
    )
    teacher = {"name": "t1", "model": {"name": "kd_cnn_tiny"}, "k": 5}
    cfg = precompute_config(tmp_path / "cache", [url], [teacher], classes=10)
    cfg.data.on_error = "raise"
    shard_worker, tasks = worker(cfg, 1)
    try:
        with no_hang(), pytest.raises(DataError, match=r"key 'c_bad': cannot decode the image"):
            shard_worker(tasks[0])
    finally:
        shard_worker.close()


def test_batches_are_collated_in_order_and_cut_at_their_size():
    def part(first: int, n: int) -> ViewBatch:
        flat = np.arange(first, first + n)
        pixels = {"r": torch.from_numpy(flat.astype(np.uint8)).view(n, 1, 1, 1)}
        return ViewBatch(flat, pixels, flat, flat, np.ones(n, np.float32))

    batcher = ViewBatcher(4)
    out = [b for p in (part(0, 3), part(3, 6), part(9, 1)) for b in batcher.add(p)]
    out += list(batcher.flush())
    assert [b.flat.tolist() for b in out] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [b.pixels["r"].flatten().tolist() for b in out] == [b.flat.tolist() for b in out]
    kept = out[0].select(np.array([False, True, False, True]))
    assert kept.flat.tolist() == [1, 3] and kept.pixels["r"].flatten().tolist() == [1, 3]


def _part(first: int, n: int) -> ViewBatch:
    """Views ``first .. first + n - 1``, each view's one pixel its own index."""
    flat = np.arange(first, first + n)
    pixels = {"r": torch.from_numpy(flat.astype(np.uint8)).view(n, 1, 1, 1)}
    return ViewBatch(flat, pixels, flat, flat, np.ones(n, np.float32))


def test_batch_memory_is_reused_only_once_nothing_holds_it():
    memory = BatchMemory(limit=2, rows=4)
    first = memory.empty("r", (4, 3), torch.uint8)
    address = first.data_ptr()
    second = memory.empty("r", (4, 3), torch.uint8)
    assert second.data_ptr() != address  # the first batch is still held
    corner = first[1:2]
    del first
    assert memory.empty("r", (4, 3), torch.uint8).data_ptr() != address  # a slice holds it
    del corner
    assert memory.empty("r", (4, 3), torch.uint8).data_ptr() == address  # nothing holds it
    last = memory.empty("r", (2, 3), torch.uint8)  # a last, smaller batch: a prefix
    assert last.shape == (2, 3) and last.data_ptr() == address
    assert memory.empty("r", (4, 5), torch.uint8).shape == (4, 5)  # another shape: fresh
    assert memory.empty("r", (4, 3), torch.float32).dtype == torch.float32
    small = BatchMemory(limit=1, rows=4)
    first_short = small.empty("r", (2, 3), torch.uint8)  # pooled at a full batch's size
    address = first_short.data_ptr()
    del first_short
    assert small.empty("r", (4, 3), torch.uint8).data_ptr() == address


def test_batches_in_reused_memory_keep_their_pixels_while_held():
    """Batches dropped as they are used share two buffers; those kept stay intact."""
    batcher = ViewBatcher(4, memory=BatchMemory(limit=2, rows=4))
    parts = [_part(4 * i, 4) for i in range(12)]
    pointers = set()
    kept = []
    for i, p in enumerate(parts):
        for batch in batcher.add(p):
            assert batch.pixels["r"].flatten().tolist() == batch.flat.tolist()
            pointers.add(batch.pixels["r"].data_ptr())
            if i % 4 == 0:
                kept.append(batch)
    assert [b.pixels["r"].flatten().tolist() for b in kept] == [b.flat.tolist() for b in kept]
    assert len(pointers) < len(parts)  # dropped batches' memory was written again


def test_a_gpu_actor_gets_its_share_of_its_nodes_cpus_and_as_many_data_workers():
    def node(cpus: float, gpus: float, alive: bool = True) -> dict:
        return {"Alive": alive, "Resources": {"CPU": cpus, "GPU": gpus}}

    nodes = [node(128, 8), node(96, 8), node(4, 0), node(8, 8, alive=False)]
    settings = WorkerSettings(
        cache_path="c",
        storage_options={},
        data_storage_options={},
        recipe=ViewRecipe(),
        num_views=1,
        seed=0,
        num_classes=2,
        on_error="raise",
        teachers=(),
        runtime=RuntimeSection(),
        torch_threads=1,
    )
    assert cpu_share(nodes, 1.0) == 12.0  # the smallest share: 96 CPUs over 8 GPUs
    assert settings.for_actor(12.0).workers == 12 and settings.for_actor(12.0).torch_threads == 12
    assert settings.for_actor(1.0).workers == 0  # one CPU: the actor's own thread
    assert dataclasses.replace(settings, data_workers=3).for_actor(12.0).workers == 3
    assert cpu_share(nodes, 0.5) == 6.0
    assert cpu_share([node(4, 8)], 1.0) == 1.0  # at least one
    assert cpu_share([node(64, 0)], 1.0) is None  # no GPU node up yet
