"""``python -m benchmarks gpu``: precompute on one CUDA GPU against the teacher's bare forward.

What a GPU-lent machine runs in a few minutes (well under 8 at the defaults), on synthetic
ImageNet-like shards (500x375 RGB JPEGs at quality 90, written once into ``--out``) with a
timm ResNet-50 teacher (random weights: speed only) at 224 px, bf16 autocast, channels_last,
A=8 views:

* **bare forward**: the teacher (through :class:`~kdcache.models.runner.ModelRunner`, as precompute
  calls it) on replayed views already on the device, batch 256;
* **data path alone** (:mod:`benchmarks.datapath`), with one data worker process and with one
  per core: precompute's :class:`~kdcache.pipeline.datapath.DataPath` reads the tars, decodes
  each image once, draws and renders its A views and collates batches, with no teacher behind
  it; views/s and views per CPU-second;
* **pipeline**: precompute's own :class:`~kdcache.pipeline.worker.ShardWorker` over the shards
  (data path, pinned batches, forward, top-k, chunk writes), with one data worker process
  and with one per core (``runtime.data_workers``).

The JSON adds ``cores_per_gpu``: CPU cores whose data path feeds the bare forward (forward
views/s over the data path's views per CPU-second). Where CUDA is absent it prints why and
writes a JSON with ``skipped`` (exit 0). ``--device cpu --quick`` runs every step on the CPU at
tiny sizes, so the code path is exercised without a GPU (the test suite does).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine, per_second, table
from benchmarks.datapath import IMAGE_HW, JPEG_QUALITY, imagenet_like_shards

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
    shards = imagenet_like_shards(
        args.out / f"shards-{args.samples}", args.samples, args.shard_size
    )
    cfg = gpu_config(args, shards, args.out / "cache")
    forward = bare_forward(cfg, args)
    datapath = datapath_runs(cfg, everyone)
    pipeline = [pipeline_run(cfg, n) for n in sorted({1, everyone})]
    return summarise(args, forward, datapath, pipeline, time.perf_counter() - start)


# ---- data ----------------------------------------------------------------------------------------


def gpu_config(args: argparse.Namespace, shards: str, cache: Path):
    """The precompute config of every run: the teacher, A views at ``size``, bf16."""
    from kdcache.core.config import validate
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

    from kdcache.models.build import build_teacher
    from kdcache.models.runner import ModelRunner

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


def datapath_runs(cfg, everyone: int) -> list[dict[str, Any]]:
    """views/s of precompute's data path alone (read, decode once, draw and render A views,
    collate; :mod:`benchmarks.datapath`) with one data worker process and with ``everyone``,
    their pools started and warmed before the clock."""
    from benchmarks.datapath import measure

    counts = sorted({1, everyone})
    size = cfg.cache.recipe.size
    batch = cfg.runtime.batch_size
    measured = measure(cfg.data.shards, counts, 1, cfg.cache.num_views, size, batch)
    return [
        {
            "workers": row["data_workers"],
            "views": row["views"],
            "seconds": row["seconds"],
            "cpu_seconds": row["cpu_seconds"],
            "vps_per_cpu_second": row["vps_per_cpu_second"],
        }
        for row in measured["workers"]
    ]


# ---- the pipeline --------------------------------------------------------------------------------


def pipeline_run(cfg, workers: int) -> dict[str, Any]:
    """views/s of precompute's ShardWorker in-process over every shard but the first, which
    warms it up (teacher built, kernels chosen)."""
    from kdcache.pipeline.plan import plan_precompute
    from kdcache.pipeline.runner import worker_settings
    from kdcache.pipeline.worker import ShardWorker

    plan = plan_precompute(cfg)
    settings = dataclasses.replace(worker_settings(cfg, plan), data_workers=workers)
    worker = ShardWorker(settings)
    try:
        worker(plan.tasks[0])
        start = time.perf_counter()
        views = sum(worker(task).views for task in plan.tasks[1:])
        seconds = time.perf_counter() - start
    finally:
        worker.close()
    return {"data_workers": workers, "views": views, "seconds": seconds}


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
    per_core = datapath[0]["vps_per_cpu_second"]
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
        "datapath_vps_per_core": per_core,
        "datapath_scaling_all": datapath[-1]["vps"] / one,
        "pipeline": pipeline,
        "pipeline_vps": pipeline[-1]["vps"],
        "pipeline_over_forward": pipeline[-1]["over_forward"],
        "cores_per_gpu": forward_vps / per_core,
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
        ["data worker processes", "views/s", "views per CPU-second", "vs 1"],
        [
            [
                r["workers"],
                r["vps"],
                r["vps_per_cpu_second"],
                r["vps"] / result["datapath"][0]["vps"],
            ]
            for r in result["datapath"]
        ],
    )
    pipeline = table(
        ["pipeline data workers", "views/s", "over bare forward"],
        [[r["data_workers"], r["vps"], r["over_forward"]] for r in result["pipeline"]],
    )
    return "\n\n".join([head, datapath, pipeline, f"{result['seconds']:.0f} s in all"])
