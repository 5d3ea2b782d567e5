"""``python -m benchmarks gpu``: precompute on one CUDA GPU against the teacher's bare forward.

What a GPU-lent machine runs in a few minutes (well under 8 at the defaults), on synthetic
ImageNet-like shards (500x375 RGB JPEGs at quality 90, written once into ``--out``) with a
timm ResNet-50 teacher (random weights: speed only) at 224 px, bf16 autocast, channels_last,
A=8 views:

* **bare forward**: the teacher (through :class:`~kdcache.teacher.ModelRunner`, as precompute
  calls it) on replayed views already on the device, batch 256;
* **data path alone**, with one process and with every core: read the tar, decode each image
  once, replay its A views (the public replay functions precompute uses), collate; views/s;
* **pipeline**: precompute's own :class:`~kdcache.pipeline.worker.ShardWorker` over the shards
  (read, decode, replay in its background data path, forward, top-k, chunk writes), with one and
  with all data workers where the worker has a ``data_workers`` setting (else its single data
  thread, said in the JSON).

The JSON adds ``cores_per_gpu``: CPU cores whose data path feeds the bare forward (forward
views/s over the one-process data path's). Where CUDA is absent it prints why and writes a JSON
with ``skipped`` (exit 0). ``--device cpu --quick`` runs every step on the CPU at tiny sizes, so
the code path is exercised without a GPU (the test suite does).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine, per_second, table

IMAGE_HW = (375, 500)
JPEG_QUALITY = 90
WARMUP_BATCHES = 5
"""Forward batches before the clock (cuDNN picks its kernels, bf16 kernels are built)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench/gpu"), help="shards and caches"
    )
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cuda (default) or cpu"
    )
    parser.add_argument("--samples", type=int, default=4096, help="images (default 4096)")
    parser.add_argument(
        "--shard-size", type=int, default=128, help="images per shard (default 128)"
    )
    parser.add_argument("--views", type=int, default=8, help="A, views per image (default 8)")
    parser.add_argument("--size", type=int, default=224, help="view side in pixels (224)")
    parser.add_argument("--model", default="resnet50", help="timm teacher (default resnet50)")
    parser.add_argument("--batch-size", type=int, default=256, help="views per forward (256)")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="data workers of the 'all' runs (default 0: every core)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests; with cpu)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measure in turn (see the module docstring), or ``skipped`` without CUDA."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return {
            "bench": "gpu",
            "skipped": "CUDA is not available on this machine (torch.cuda.is_available() is "
            "False): run it where a GPU is, or `--device cpu --quick` to exercise the code",
            "machine": machine(),
        }
    if args.quick:
        args.samples = 16
        args.shard_size = 8
        args.views = 2
        args.size = 64
        args.batch_size = 8
    start = time.perf_counter()
    everyone = args.workers or os.cpu_count() or 1
    shards = imagenet_like_shards(args.out / f"shards-{args.samples}", args)
    cfg = gpu_config(args, shards, args.out / "cache")
    forward = bare_forward(cfg, args)
    datapath = [datapath_run(cfg, n) for n in sorted({1, everyone})]
    pipeline = [pipeline_run(cfg, n) for n in pipeline_workers(everyone)]
    return summarise(args, forward, datapath, pipeline, time.perf_counter() - start)


# ---- data ----------------------------------------------------------------------------------------


def imagenet_like_shards(out: Path, args: argparse.Namespace) -> str:
    """``out/train-NNNNNN.tar`` of 500x375 JPEGs (quality 90) and their manifest (reused)."""
    from kdcache.manifest import load_manifest
    from kdcache.pipeline.make_shards import write_split

    manifest = out / "train-manifest.json"
    if not (manifest.is_file() and load_manifest(manifest).num_samples == args.samples):
        write_split(
            photo_like_samples(args.samples),
            out,
            "train",
            num_classes=1000,
            shard_size=args.shard_size,
            image_format="jpg",
            quality=JPEG_QUALITY,
            overwrite=True,
            total=args.samples,
        )
    return str(out / "train-*.tar")


def photo_like_samples(num: int, seed: int = 0):
    """Smooth colour fields with fine noise: JPEG sizes and decode costs like photos'."""
    from PIL import Image

    from kdcache.pipeline.make_shards import Sample

    rng = np.random.default_rng(seed)
    height, width = IMAGE_HW
    for index in range(num):
        coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
        noise = rng.normal(0.0, 12.0, (height, width, 1))
        image = np.clip(field + noise, 0, 255).astype(np.uint8)
        yield Sample(key=f"img_{index:08d}", label=int(index % 1000), image=image)


def gpu_config(args: argparse.Namespace, shards: str, cache: Path):
    """The precompute config of every run: the teacher, A views at ``size``, bf16."""
    from kdcache.config import validate
    from kdcache.pipeline.config import PrecomputeConfig

    return validate(
        PrecomputeConfig,
        {
            "data": {"shards": shards},
            "cache": {
                "path": str(cache),
                "overwrite": True,
                "num_views": args.views,
                "recipe": {"size": args.size, "scale": [0.08, 1.0]},
            },
            "teachers": [{"name": "teacher", "model": {"name": args.model}, "k": 10}],
            "runtime": {
                "batch_size": args.batch_size,
                "device": args.device,
                "amp": "bf16",
                "channels_last": True,
            },
        },
    )


# ---- the bare forward ----------------------------------------------------------------------------


def bare_forward(cfg, args: argparse.Namespace) -> dict[str, Any]:
    """views/s of the teacher alone on uint8 views already on the device (warm-up excluded)."""
    import torch

    from kdcache.models import build_teacher
    from kdcache.teacher import ModelRunner

    recipe = cfg.cache.recipe
    model = build_teacher(cfg.teachers[0].model, 1000, recipe.channels)
    runner = ModelRunner(
        model, recipe.rendering(), device=args.device, amp="bf16", channels_last=True
    )
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, recipe.channels, recipe.size, recipe.size)
    views = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    views = views.to(runner.device)
    batches = max(3, args.samples * args.views // args.batch_size)
    for _ in range(WARMUP_BATCHES):
        runner(views)
    _sync(runner.device)
    start = time.perf_counter()
    for _ in range(batches):
        runner(views)
    _sync(runner.device)
    seconds = time.perf_counter() - start
    return {"views": batches * args.batch_size, "seconds": seconds}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the data path alone -------------------------------------------------------------------------


def datapath_run(cfg, workers: int) -> dict[str, Any]:
    """views/s of read + decode + replay + collate over every shard with ``workers`` processes
    (started and warmed before the clock)."""
    from kdcache.shards import expand_shards

    urls = expand_shards(cfg.data.shards)
    recipe = cfg.cache.recipe
    jobs = [(url, recipe, cfg.cache.num_views, cfg.cache.seed) for url in urls]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread) as pool:
        list(pool.map(_ready, range(workers)))
        start = time.perf_counter()
        views = sum(pool.map(_shard_views, jobs))
        seconds = time.perf_counter() - start
    return {"workers": workers, "views": views, "seconds": seconds}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _ready(_: int) -> int:
    import kdcache.shards  # noqa: F401  (imports done before the clock)
    import kdcache.views  # noqa: F401

    return os.getpid()


def _shard_views(job: tuple) -> int:
    """One shard's views, made as precompute makes them; how many."""
    import torch

    from kdcache.shards import decode_image, iter_shard
    from kdcache.views import ViewParams, draw_group, render_rows

    url, recipe, num_views, seed = job
    made = []
    for sample in iter_shard(url):
        image = decode_image(sample.image, recipe.channels)
        params = ViewParams.empty(recipe, 1, num_views)
        draw_group(params, recipe, seed, [0], {0: sample.key}, {0: tuple(image.shape[-2:])})
        made.append(render_rows({0: image}, params, [0], recipe, recipe.rendering()))
    return len(torch.cat(made))


# ---- the pipeline --------------------------------------------------------------------------------


def pipeline_workers(everyone: int) -> list[int]:
    """Data-worker counts of the pipeline runs: 1 and all where the worker has the setting."""
    from kdcache.pipeline.worker import WorkerSettings

    names = {f.name for f in dataclasses.fields(WorkerSettings)}
    return sorted({1, everyone}) if "data_workers" in names else [1]


def pipeline_run(cfg, workers: int) -> dict[str, Any]:
    """views/s of precompute's ShardWorker in-process over every shard but the first, which
    warms it up (teacher built, kernels chosen)."""
    from kdcache.pipeline.plan import make_plan
    from kdcache.pipeline.runner import worker_settings
    from kdcache.pipeline.worker import ShardWorker, WorkerSettings

    plan = make_plan(cfg)
    settings = worker_settings(cfg, plan)
    supported = "data_workers" in {f.name for f in dataclasses.fields(WorkerSettings)}
    if supported:
        settings = dataclasses.replace(settings, data_workers=workers)
    worker = ShardWorker(settings)
    worker(plan.tasks[0])
    start = time.perf_counter()
    views = sum(worker(task).views for task in plan.tasks[1:])
    seconds = time.perf_counter() - start
    return {
        "data_workers": workers,
        "data_workers_setting": supported,
        "views": views,
        "seconds": seconds,
    }


# ---- results -------------------------------------------------------------------------------------


def summarise(
    args: argparse.Namespace,
    forward: dict[str, Any],
    datapath: list[dict[str, Any]],
    pipeline: list[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    forward_vps = per_second(forward["views"], forward["seconds"])
    for row in datapath + pipeline:
        row["vps"] = per_second(row["views"], row["seconds"])
    for row in pipeline:
        row["over_forward"] = row["vps"] / forward_vps
    one = datapath[0]["vps"]
    return {
        "bench": "gpu",
        "machine": machine(),
        "settings": {
            "device": args.device,
            "model": args.model,
            "samples": args.samples,
            "shard_size": args.shard_size,
            "views": args.views,
            "size": args.size,
            "image_hw": list(IMAGE_HW),
            "jpeg_quality": JPEG_QUALITY,
            "batch_size": args.batch_size,
            "amp": "bf16",
            "channels_last": True,
            "quick": args.quick,
        },
        "forward_vps": forward_vps,
        "datapath": datapath,
        "datapath_vps_per_core": one,
        "datapath_scaling_all": datapath[-1]["vps"] / one,
        "pipeline": pipeline,
        "pipeline_vps": pipeline[-1]["vps"],
        "pipeline_over_forward": pipeline[-1]["over_forward"],
        "cores_per_gpu": forward_vps / one,
        "seconds": seconds,
    }


def format_result(result: dict[str, Any]) -> str:
    """The lines printed by ``python -m benchmarks gpu``."""
    if "skipped" in result:
        return f"gpu bench skipped: {result['skipped']}"
    s = result["settings"]
    head = (
        f"gpu bench on {result['machine']['gpu'] or s['device']}: {s['model']} at {s['size']} px, "
        f"A={s['views']}, {s['samples']} JPEGs {s['image_hw'][1]}x{s['image_hw'][0]} "
        f"q{s['jpeg_quality']}, bf16, channels_last; bare forward {result['forward_vps']:.0f} "
        f"views/s, which {result['cores_per_gpu']:.1f} cores' data path would feed"
    )
    datapath = table(
        ["data path processes", "views/s", "vs 1"],
        [
            [r["workers"], r["vps"], r["vps"] / result["datapath_vps_per_core"]]
            for r in result["datapath"]
        ],
    )
    pipeline = table(
        ["pipeline data workers", "views/s", "over bare forward", "worker setting"],
        [
            [r["data_workers"], r["vps"], r["over_forward"], str(r["data_workers_setting"])]
            for r in result["pipeline"]
        ],
    )
    return "\n\n".join([head, datapath, pipeline, f"{result['seconds']:.0f} s in all"])
