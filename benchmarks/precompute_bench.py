"""``kdcache bench precompute``: precompute's views/s against the teacher's bare forward pass.

**In-process** (one :class:`~kdcache.pipeline.worker.ShardWorker`, the code every Ray actor runs):
for each teacher and each A, one shard task end to end — read the tar, decode each image once,
replay A views, forward, top-k / logsumexp, write the chunks and marks — against the bare
forward of the same teacher (the same :class:`~kdcache.models.runner.ModelRunner`) over the same
views, already decoded and batched the same way. The pipeline runs with its background view
thread (``prefetch_batches`` 2, the default) and without it (0, serial). Rounds rotate the order
of A values and kinds, so load drifts over all alike.

**Ray**: whole precomputes (all shards) with 1 and 2 CPU actors on an already started local Ray:
views/s once the actors were up (the runner's own measure) and over the wall time.

**Data path** (:mod:`benchmarks.datapath`): precompute's data path alone (read, decode once,
draw and render A=8 views at 224 px, collate) on ImageNet-like JPEG shards (500x375, quality 90)
in one actor's process with 0 (its own thread), 1 and 2 data worker processes:
``datapath_vps_per_core`` (views per CPU-second with one worker process) and
``datapath_scaling_2`` (views/s with 2 workers over 1, same run, the machine's load averages
beside it).

**Planning** (:mod:`benchmarks.planning`): requests per shard that planning makes on a local S3
server (moto, counted by the server's request log) for ``--plan-shards`` shards beside their
manifest (``plan_requests_per_shard``), beside a wids shard index, and alone (tar headers).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    default_source,
    machine,
    make_shards,
    median,
    per_second,
    precompute_config,
    rotated,
    table,
    timed,
    write_yaml,
)
from kdcache.cache.reader import read_block
from kdcache.core.config import load_config
from kdcache.pipeline.config import PrecomputeConfig
from kdcache.pipeline.plan import ShardTask, plan_precompute
from kdcache.pipeline.worker import PREFETCH_BATCHES, ShardWorker
from kdcache.shards.reading import decode_image, iter_shard
from kdcache.views.recipe import render_rows

KINDS = ("pipeline", "serial", "forward")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench/precompute"), help="shards, caches, configs"
    )
    parser.add_argument(
        "--source",
        choices=("fashion-mnist", "synthetic"),
        default=None,
        help="data (default fashion-mnist when installed, else synthetic 28x28 grey)",
    )
    parser.add_argument("--samples", type=int, default=2000, help="samples (default 2000)")
    parser.add_argument(
        "--shard-size", type=int, default=500, help="samples per shard (default 500)"
    )
    parser.add_argument(
        "--teachers",
        default="resnet18,kd_cnn_small",
        help=(
            "timm teachers, comma-separated; the first gives the headline "
            "(default resnet18,kd_cnn_small)"
        ),
    )
    parser.add_argument(
        "--views", default="1,2,4,8", help="A values, comma-separated (default 1,2,4,8)"
    )
    parser.add_argument(
        "--headline-views", type=int, default=4, help="A of the headline numbers (default 4)"
    )
    parser.add_argument("--k", type=int, default=10, help="top-k stored (default 10)")
    parser.add_argument(
        "--batch-size", type=int, default=256, help="views per forward (default 256)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1, as one CPU actor)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="timed rounds per A (default 3, after one warm-up)"
    )
    parser.add_argument(
        "--actors",
        default="1,2",
        help="Ray actor counts, comma-separated; '' skips Ray (default 1,2)",
    )
    parser.add_argument(
        "--actor-rounds", type=int, default=2, help="Ray rounds, the counts rotated (default 2)"
    )
    parser.add_argument(
        "--plan-shards",
        type=int,
        default=64,
        help="shards planned on the local S3 server (default 64; 0 skips the planning measure)",
    )
    parser.add_argument(
        "--plan-samples", type=int, default=20, help="samples per planned shard (default 20)"
    )
    parser.add_argument(
        "--datapath-images",
        type=int,
        default=256,
        help="ImageNet-like JPEGs of the data-path measure (default 256; 0 skips it)",
    )
    parser.add_argument(
        "--datapath-rounds", type=int, default=3, help="data-path rounds (default 3)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """In-process sweep over teachers x A, then the Ray actor sweep; return the results."""
    if args.quick:
        args.samples = 200
        args.shard_size = 100
        args.rounds = 1
        args.actor_rounds = 1
        args.teachers = "kd_cnn_small"
        args.views = "1,2"
        args.headline_views = 2
        args.plan_samples = 4
        args.datapath_images = min(args.datapath_images, 4)
        args.datapath_rounds = 1
    source = args.source or default_source()
    shards, _ = make_shards(
        args.out / f"shards-{source}-{args.samples}", source, args.samples, args.shard_size
    )
    teachers = [t for t in args.teachers.split(",") if t]
    views = [int(a) for a in args.views.split(",") if a]
    sweep = [row for t in teachers for row in inprocess_sweep(args, shards, t, views)]
    actors = actor_sweep(args, shards, teachers[0], [int(n) for n in args.actors.split(",") if n])
    result = summarise(args, source, sweep, actors, teachers[0])
    return result | datapath_result(args) | planning_result(args)


# ---- the data path -------------------------------------------------------------------------------

DATAPATH_VIEWS = 8
DATAPATH_SIZE = 224
DATAPATH_SHARD_SIZE = 64
DATAPATH_WORKERS = [0, 1, 2]


def datapath_result(args: argparse.Namespace) -> dict[str, Any]:
    """``datapath_*`` keys: the data path alone with 0, 1 and 2 data workers (see the module
    docstring and :mod:`benchmarks.datapath`)."""
    if args.datapath_images <= 0:
        return {}
    from benchmarks.datapath import imagenet_like_shards, measure

    images = args.datapath_images
    shard_size = min(DATAPATH_SHARD_SIZE, max(1, images // 2))
    shards = imagenet_like_shards(args.out / f"datapath-shards-{images}", images, shard_size)
    measured = measure(
        shards, DATAPATH_WORKERS, args.datapath_rounds, DATAPATH_VIEWS, DATAPATH_SIZE
    )
    by_workers = {row["data_workers"]: row for row in measured["workers"]}
    return {
        "datapath_vps_per_core": by_workers[1]["vps_per_cpu_second"],
        "datapath_vps_per_core_inline": by_workers[0]["vps_per_cpu_second"],
        "datapath_scaling_2": by_workers[2]["vps"] / by_workers[1]["vps"],
        "datapath_load": {"before": measured["load_before"], "after": measured["load_after"]},
        "datapath": measured
        | {"images": images, "views": DATAPATH_VIEWS, "size": DATAPATH_SIZE, "quality": 90},
    }


# ---- planning ------------------------------------------------------------------------------------


def planning_result(args: argparse.Namespace) -> dict[str, Any]:
    """``plan_*`` keys: requests per shard of planning on a local S3 server, by what lies beside
    the shards (None with the reason where moto or s3fs is missing)."""
    if args.plan_shards <= 0:
        return {}
    from benchmarks.objectstore import ObjectStoreUnavailable
    from benchmarks.planning import measure

    try:
        planning = measure(args.out, args.plan_shards, args.plan_samples)
    except ObjectStoreUnavailable as exc:
        return {"plan_requests_per_shard": None, "planning": {"skipped": str(exc)}}
    return {
        "plan_requests_per_shard": planning["manifest"]["requests_per_shard"],
        "plan_payload_reads": planning["manifest"]["shard_reads"],
        "plan_index_requests_per_shard": planning["wids_index"]["requests_per_shard"],
        "plan_headers_requests_per_shard": planning["headers"]["requests_per_shard"],
        "planning": planning,
    }


# ---- in-process ----------------------------------------------------------------------------------


def config_path(args: argparse.Namespace, shards: str, teacher: str, views: int, name: str) -> Path:
    cache = args.out / "caches" / f"{name}-{teacher}-a{views}"
    data = precompute_config(
        shards,
        cache,
        {"name": teacher},
        views=views,
        k=args.k,
        threads=args.threads,
        batch_size=args.batch_size,
    )
    return write_yaml(args.out / "configs" / f"{name}-{teacher}-a{views}.yaml", data)


def shard_worker(
    args: argparse.Namespace, shards: str, teacher: str, views: int
) -> tuple[ShardWorker, ShardTask]:
    """A worker and the first shard's task, its views made once (warm-up) so forward batches can
    replay them."""
    from kdcache.pipeline.runner import worker_settings

    cfg = load_config(PrecomputeConfig, config_path(args, shards, teacher, views, "inprocess"))
    plan = plan_precompute(cfg)
    worker = ShardWorker(worker_settings(cfg, plan))
    task = plan.tasks[0]
    worker(task)
    return worker, task


def forward_batches(worker: ShardWorker, task: ShardTask, batch_size: int) -> list[torch.Tensor]:
    """The task's views, decoded and replayed from the stored parameters, batched as the worker
    batches them."""
    recipe = worker.settings.recipe
    params = read_block(worker.store, task.index).view_params
    images = {
        row: decode_image(s.image, recipe.channels) for row, s in enumerate(iter_shard(task.url))
    }
    rendering = worker.settings.teachers[0].rendering
    views = render_rows(images, params, sorted(images), recipe, rendering)
    return list(torch.split(views, batch_size))


def time_kind(
    worker: ShardWorker, task: ShardTask, batches: list[torch.Tensor], kind: str
) -> float:
    """Seconds of one shard task (pipeline / serial) or of the bare forward over its views."""
    if kind == "forward":
        runner = next(iter(worker.runners.values()))
        return timed(lambda: [runner(b) for b in batches])[1]
    depth = 0 if kind == "serial" else PREFETCH_BATCHES
    worker.settings = dataclasses.replace(worker.settings, prefetch_batches=depth)
    return timed(worker, task)[1]


def inprocess_sweep(
    args: argparse.Namespace, shards: str, teacher: str, views: list[int]
) -> list[dict[str, Any]]:
    """views/s of each kind per A for one teacher, rounds interleaved."""
    setups = {a: shard_worker(args, shards, teacher, a) for a in views}
    batches = {a: forward_batches(w, t, args.batch_size) for a, (w, t) in setups.items()}
    seconds: dict[tuple[int, str], list[float]] = {(a, k): [] for a in views for k in KINDS}
    for round_ in range(args.rounds):
        for a in rotated(tuple(views), round_):
            for kind in rotated(KINDS, round_):
                seconds[(a, kind)].append(time_kind(*setups[a], batches[a], kind))
    rows = []
    for a in views:
        n = setups[a][1].count * a
        vps = {kind: per_second(n * args.rounds, sum(seconds[(a, kind)])) for kind in KINDS}
        rows.append(
            {
                "teacher": teacher,
                "views": a,
                "views_per_task": n,
                **{f"{k}_vps": v for k, v in vps.items()},
                "pipeline_over_forward": vps["pipeline"] / vps["forward"],
                "serial_over_forward": vps["serial"] / vps["forward"],
                "pipeline_over_forward_median": median(
                    f / p
                    for p, f in zip(seconds[(a, "pipeline")], seconds[(a, "forward")], strict=True)
                ),
            }
        )
    return rows


# ---- Ray -----------------------------------------------------------------------------------------


def actor_sweep(
    args: argparse.Namespace, shards: str, teacher: str, counts: list[int]
) -> list[dict[str, Any]]:
    """Whole precomputes with each actor count on one local Ray (started here, stopped at the
    end)."""
    if not counts:
        return []
    import ray

    from kdcache.pipeline.runner import ensure_ray

    path = config_path(args, shards, teacher, args.headline_views, "ray")
    started = ensure_ray(load_config(PrecomputeConfig, path).ray)
    try:
        runs = [
            actor_run(path, n)
            for round_ in range(args.actor_rounds)
            for n in rotated(tuple(map(str, counts)), round_)
        ]
    finally:
        if started:
            ray.shutdown()
    return [_actor_row(int(n), [r for r in runs if r["actors"] == int(n)]) for n in counts]


def actor_run(path: Path, actors: str) -> dict[str, Any]:
    from kdcache.pipeline.runner import run_precompute

    cfg = load_config(PrecomputeConfig, path, [f"ray.num_actors={actors}", "cache.overwrite=true"])
    summary = run_precompute(cfg, plan_precompute(cfg), progress=False)
    return {
        "actors": int(actors),
        "views": summary.views,
        "wall_s": summary.wall_seconds,
        "busy_s": summary.busy_seconds,
    }


def _actor_row(actors: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    views = sum(r["views"] for r in runs)
    return {
        "actors": actors,
        "runs": len(runs),
        "views": views,
        "vps_busy": per_second(views, sum(r["busy_s"] for r in runs)),
        "vps_wall": per_second(views, sum(r["wall_s"] for r in runs)),
    }


# ---- results -------------------------------------------------------------------------------------


def summarise(
    args: argparse.Namespace,
    source: str,
    sweep: list[dict[str, Any]],
    actors: list[dict[str, Any]],
    teacher: str,
) -> dict[str, Any]:
    head = next(
        (r for r in sweep if r["teacher"] == teacher and r["views"] == args.headline_views),
        sweep[0],
    )
    one = next((r["vps_busy"] for r in actors if r["actors"] == 1), None)
    return {
        "bench": "precompute",
        "machine": machine(),
        "settings": {
            "source": source,
            "samples": args.samples,
            "shard_size": args.shard_size,
            "teachers": args.teachers,
            "views": args.views,
            "headline_views": head["views"],
            "k": args.k,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "rounds": args.rounds,
            "actor_rounds": args.actor_rounds,
            "quick": args.quick,
        },
        "pipeline_vps": head["pipeline_vps"],
        "forward_vps": head["forward_vps"],
        "pipeline_over_forward": head["pipeline_over_forward"],
        "serial_vps": head["serial_vps"],
        "overlap_gain": head["pipeline_vps"] / head["serial_vps"],
        "headline_teacher": teacher,
        "sweep": sweep,
        "actors": [r | {"scaling": r["vps_busy"] / one if one else None} for r in actors],
    }


def format_result(result: dict[str, Any]) -> str:
    """The tables printed by ``kdcache bench precompute``."""
    s = result["settings"]
    head = (
        f"precompute bench: {s['samples']} samples in shards of {s['shard_size']}, "
        f"k={s['k']}, batch {s['batch_size']}, {s['threads']} torch thread(s); "
        f"headline: {result['headline_teacher']} at "
        f"A={s['headline_views']}: pipeline {result['pipeline_vps']:.0f} views/s = "
        f"{result['pipeline_over_forward']:.2f} x the bare forward "
        f"({result['forward_vps']:.0f} views/s)"
    )
    sweep = table(
        [
            "teacher",
            "A",
            "pipeline views/s",
            "serial views/s",
            "bare forward views/s",
            "pipeline/forward",
            "serial/forward",
        ],
        [
            [
                r["teacher"],
                r["views"],
                r["pipeline_vps"],
                r["serial_vps"],
                r["forward_vps"],
                r["pipeline_over_forward"],
                r["serial_over_forward"],
            ]
            for r in result["sweep"]
        ],
    )
    parts = [head, sweep]
    if "datapath" in result:
        parts.append(datapath_table(result))
    planning = result.get("planning")
    if planning and "skipped" not in planning:
        parts.append(planning_table(planning))
    if result["actors"]:
        parts.append(
            table(
                ["Ray CPU actors", "views/s (actors up)", "views/s (wall)", "vs 1 actor"],
                [
                    [
                        r["actors"],
                        r["vps_busy"],
                        r["vps_wall"],
                        r["scaling"] if r["scaling"] is not None else float("nan"),
                    ]
                    for r in result["actors"]
                ],
            )
        )
    return "\n\n".join(parts)


def datapath_table(result: dict[str, Any]) -> str:
    """The data path alone, per data-worker count, with the machine's load."""
    d = result["datapath"]
    rows = [
        [r["data_workers"], r["vps"], r["vps_per_cpu_second"], r["vps"] / d["workers"][1]["vps"]]
        for r in d["workers"]
    ]
    load = ", ".join(
        f"{when} {' / '.join(f'{v:.1f}' for v in d[f'load_{when}'])}"
        for when in ("before", "after")
    )
    return (
        f"data path alone: {d['images']} JPEGs 500x375 q{d['quality']}, A={d['views']} at "
        f"{d['size']} px, batches of 256; {d['cpu_count']} CPUs, load averages (1/5/15 min) "
        f"{load}:\n"
        + table(
            ["data workers (0: actor thread)", "views/s", "views per CPU-second", "vs 1 worker"],
            rows,
        )
    )


def planning_table(planning: dict[str, Any]) -> str:
    """Requests of planning per layout (what lies beside the shards)."""
    rows = [
        [
            layout,
            planning[layout]["requests"],
            planning[layout]["requests_per_shard"],
            planning[layout]["shard_reads"],
            ", ".join(f"{k} {v}" for k, v in sorted(planning[layout]["by_kind"].items())),
        ]
        for layout in ("manifest", "wids_index", "headers")
    ]
    return (
        f"planning {planning['shards']} shards x {planning['samples_per_shard']} samples on a "
        "local S3 server (requests counted by the server):\n"
        + table(["beside the shards", "requests", "per shard", "shard GETs", "kinds"], rows)
    )
