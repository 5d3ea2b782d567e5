"""Precompute's data path alone, on ImageNet-like JPEG shards: views per CPU-second and scaling.

Shared by ``kdcache bench precompute`` (``datapath_*`` keys) and the GPU check. The shards are
synthetic photos (smooth colour fields with fine noise, 500x375, JPEG quality 90: the sizes and
decode costs of ImageNet's), written once and reused. The measure runs precompute's own
:class:`~kdcache.pipeline.datapath.DataPath` over every shard (read, decode each image once,
draw A views from ``(seed, key, view)``, render them at the teacher's size, collate batches of
256) with no teacher behind it, once per data-worker count per round, the counts rotated over
the rounds; each count's pool of worker processes is started and warmed before the clock.

* **views per CPU-second**: views over the CPU seconds of the data path: those of the worker
  processes (measured in them) and of the actor's process (reading the tar, receiving the
  results, collating; ``time.process_time``, nothing else runs in it meanwhile); near
  load-independent;
* **views/s**: over the wall time, so it shows how the data path scales with processes, and also
  how busy the machine is (its load averages are reported beside it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import per_second, rotated

IMAGE_HW = (375, 500)
JPEG_QUALITY = 90


def imagenet_like_shards(out: Path, samples: int, shard_size: int) -> str:
    """``out/train-NNNNNN.tar`` of 500x375 JPEGs (quality 90) and their manifest (reused)."""
    from kdcache.shards.manifest import load_manifest
    from kdcache.shards.writing import ShardOptions, write_split

    manifest = out / "train-manifest.json"
    if not (manifest.is_file() and load_manifest(manifest).num_samples == samples):
        write_split(
            photo_like_samples(samples),
            out,
            "train",
            ShardOptions(
                shard_size=shard_size, image_format="jpg", quality=JPEG_QUALITY, overwrite=True
            ),
            num_classes=1000,
            total=samples,
        )
    return str(out / "train-*.tar")


def photo_like_samples(num: int, seed: int = 0):
    """Smooth colour fields with fine noise: JPEG sizes and decode costs like photos'."""
    from PIL import Image

    from kdcache.shards.writing import SourceSample

    rng = np.random.default_rng(seed)
    height, width = IMAGE_HW
    for index in range(num):
        coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
        noise = rng.normal(0.0, 12.0, (height, width, 1))
        image = np.clip(field + noise, 0, 255).astype(np.uint8)
        yield SourceSample(key=f"img_{index:08d}", label=int(index % 1000), image=image)


def shard_tasks(shards: str) -> list:
    """One fresh shard task per shard (views made, one teacher), planned from the manifest."""
    from kdcache.pipeline.plan import ShardTask, scan_data

    data = scan_data(shards)
    return [
        ShardTask(
            index=i,
            url=url,
            name=shard.name,
            count=shard.count,
            keys=shard.keys,
            make_views=True,
            teachers=("teacher",),
            key_digest=shard.key_digest,
        )
        for i, (url, shard) in enumerate(zip(data.urls, data.indexes, strict=True))
    ]


def data_settings(views: int, size: int):
    """The default recipe at ``size`` (random-resized crop + flip), as a teacher renders it."""
    from kdcache.pipeline.datapath import DataSettings, rendering_key
    from kdcache.views.recipe import ViewRecipe

    recipe = ViewRecipe(size=size)
    rendering = recipe.rendering()
    return DataSettings(
        recipe=recipe,
        num_views=views,
        seed=0,
        num_classes=1000,
        on_error="raise",
        renderings=((rendering_key(rendering), rendering),),
    )


def one_pass(path, tasks: list) -> dict[str, float]:
    """Every task's batches through ``path`` (nothing behind it): views, wall and CPU seconds."""
    from kdcache.pipeline.datapath import ShardRows
    from kdcache.pipeline.plan import ShardKeys

    settings = path.settings
    views = path.stats.views
    worker_cpu = path.stats.worker_cpu_seconds
    own_cpu = time.process_time()  # every thread of this process: reading, results, collating
    start = time.perf_counter()
    for task in tasks:
        rows = ShardRows.fresh(settings.recipe, task.count, settings.num_views)
        for _ in path.batches(task, rows, ShardKeys(task)):
            pass
    seconds = time.perf_counter() - start
    own_cpu = time.process_time() - own_cpu
    worker_cpu = path.stats.worker_cpu_seconds - worker_cpu
    return {
        "views": path.stats.views - views,
        "seconds": seconds,
        "cpu_seconds": own_cpu + worker_cpu,
        "worker_cpu_seconds": worker_cpu,
    }


def measure(
    shards: str, workers: list[int], rounds: int, views: int, size: int, batch_size: int = 256
) -> dict[str, Any]:
    """Each data-worker count over every shard, ``rounds`` times, the counts rotated: views/s,
    views per CPU-second, and the load averages before and after."""
    import torch

    from kdcache.pipeline.datapath import DataPath

    tasks = shard_tasks(shards)
    settings = data_settings(views, size)
    paths = {n: DataPath(settings, workers=n, batch_size=batch_size) for n in workers}
    load_before = os.getloadavg()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actor's thread as on a 1-CPU actor (0 workers), collation
    try:
        for path in paths.values():
            path.start()
        one_pass(paths[workers[0]], tasks[:1])  # imports and first allocations, off the clock
        runs: dict[int, list[dict[str, float]]] = {n: [] for n in workers}
        for round_ in range(rounds):
            for n in rotated(tuple(map(str, workers)), round_):
                runs[int(n)].append(one_pass(paths[int(n)], tasks))
    finally:
        torch.set_num_threads(threads)
        for path in paths.values():
            path.close()
    load_after = os.getloadavg()
    rows = [_row(n, runs[n]) for n in workers]
    return {
        "workers": rows,
        "load_before": list(load_before),
        "load_after": list(load_after),
        "cpu_count": os.cpu_count(),
    }


def _row(workers: int, runs: list[dict[str, float]]) -> dict[str, Any]:
    views = sum(r["views"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    cpu = sum(r["cpu_seconds"] for r in runs)
    worker_cpu = sum(r["worker_cpu_seconds"] for r in runs)
    return {
        "data_workers": workers,
        "rounds": len(runs),
        "views": views,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "worker_cpu_seconds": worker_cpu,
        "vps": per_second(views, seconds),
        "vps_per_cpu_second": per_second(views, cpu),
        "vps_rounds": [per_second(r["views"], r["seconds"]) for r in runs],
    }
