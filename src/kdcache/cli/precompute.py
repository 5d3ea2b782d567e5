"""``kdcache precompute CONFIG [dotted.key=value ...] [--overwrite]``:
teachers over shards x views.

Under the cache's writer lock (``<cache>.lock``; a second run on the same cache is refused naming
the holder): plan (scan shards, open or create the cache, list the shards still to do), run the
shard tasks on Ray actors, print a summary of its result (the run record the driver writes into
``<cache>/runs/`` holds the same as JSON). Rerunning the same command resumes: finished shards
are skipped, after a check that their chunks are stored (``--check``: and decode); damaged ones
are redone.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdcache.core.results import PrecomputeResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/smoke/precompute.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted-key overrides, e.g. cache.path=runs/cache ray.num_actors=2",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an existing cache at cache.path and start over",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="on an existing cache, read every finished shard's chunks and verify their "
        "checksums first; damaged shards are redone (without it, lost chunk files are found)",
    )
    parser.add_argument(
        "--grow",
        action="store_true",
        help="add views to an existing cache made with fewer than cache.num_views (its stored "
        "views and targets are kept); without it another view count is refused",
    )
    parser.add_argument(
        "--force-unlock",
        action="store_true",
        help="remove the cache's writer lock left by a run that is gone "
        "(e.g. killed on another host)",
    )


def run(args: argparse.Namespace) -> int:
    from kdcache.core.config import load_config
    from kdcache.core.outputs import check_not_symlink_to_overwrite
    from kdcache.pipeline.config import PrecomputeConfig

    overrides = list(args.overrides) + (["cache.overwrite=true"] if args.overwrite else [])
    overrides += ["cache.force_unlock=true"] if args.force_unlock else []
    overrides += ["cache.check=true"] if args.check else []
    overrides += ["cache.grow=true"] if args.grow else []
    cfg = load_config(PrecomputeConfig, args.config, overrides)
    from kdcache.pipeline.runner import precompute  # Ray, timm: once the config is valid

    if cfg.cache.overwrite:
        check_not_symlink_to_overwrite(cfg.cache.path, "cache.path")
    _, result = precompute(cfg)
    print("\n".join(summary_lines(result)))
    return 0


def summary_lines(result: PrecomputeResult) -> list[str]:
    """What a run did, for people (its run record holds the same as JSON)."""
    teachers = ", ".join(t.name for t in result.teachers)
    if result.status == "nothing_to_do":
        return [
            f"precompute: nothing to do: 0 shards to do, all {result.num_shards} shards are "
            f"complete for {teachers} in {result.cache_path}"
        ]
    where = "stored" if "://" in result.cache_path else "on disk"
    return [
        f"precompute: {result.done}/{result.tasks} shard task(s) done "
        f"in {result.wall_seconds:.1f} s -> {result.cache_path}",
        f"  views processed: {result.views} ({result.invalid_views} invalid), "
        f"{result.views_per_s:.0f} views/s overall, "
        f"{result.busy_views_per_s:.0f} views/s once actors were up; "
        f"views made for {result.made_view_shards} shard(s); "
        f"teacher forward {result.forward_seconds:.1f} s in actors",
        f"  cache: {_completeness(result, teachers)}; {result.store_bytes / 1e6:.2f} MB {where} "
        f"= {result.bytes_per_view:.1f} B per view per teacher "
        f"({result.cache_views} views x {result.cache_teachers} teacher(s))",
        *teacher_lines(result),
        f"  run record: {result.record_path()}",
    ]


def teacher_lines(result: PrecomputeResult) -> list[str]:
    """Each teacher's top-1 on the views of this run, its check and its rendering."""
    lines = []
    for run in result.teachers:
        if run.top1 is None:
            continue
        unmixed = ""
        if run.top1_unmixed is not None:  # None: every view of the run was mixed
            unmixed = f" ({run.top1_unmixed:.1%} on {run.unmixed_checked} unmixed)"
        lines.append(
            f"  teacher {run.name}: top-1 {run.top1:.1%} on {run.views_checked} views"
            f"{unmixed}; check: {run.check}; renders at {run.rendering}"
        )
    return lines


def _completeness(result: PrecomputeResult, teachers: str) -> str:
    if not result.incomplete:
        return f"all {result.num_shards} shards complete for {teachers}"
    counts = ", ".join(f"{part}: {len(names)}" for part, names in result.incomplete.items())
    return f"incomplete: {counts}"
