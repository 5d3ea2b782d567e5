"""Requests that planning a precompute makes on an object store (a local moto S3 server).

The same shards (``kdcache shards synthetic``) are uploaded three times: beside their kdcache
manifest, beside a WebDataset (wids) ``shardindex.json`` only, and alone. For each, a fresh s3fs
client runs precompute's whole planning (:func:`kdcache.pipeline.plan.plan_precompute`: list, read
the manifest or index, create the cache, on local disk) while the server's own request log counts
the requests, by kind, and the reads of shard objects (GETs of ``.tar`` keys: payload bytes sent).
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.objectstore import LocalS3, RequestLog

BUCKET = "kdbench"
LAYOUTS = ("manifest", "wids_index", "headers")
"""What lies beside the shards: the kdcache manifest, a wids shard index, nothing."""


def make_planning_shards(out: Path, num_shards: int, per_shard: int) -> Path:
    """``num_shards`` synthetic shards of ``per_shard`` 28x28 grey PNGs and their manifest
    (reused when the manifest matches)."""
    from kdcache.shards.manifest import load_manifest
    from kdcache.shards.writing import make_synthetic_shards

    manifest = out / "train-manifest.json"
    if manifest.is_file() and load_manifest(manifest).counts == [per_shard] * num_shards:
        return out
    make_synthetic_shards(
        out,
        num_shards * per_shard,
        0,
        classes=10,
        size=28,
        channels=1,
        seed=0,
        shard_size=per_shard,
        overwrite=True,
    )
    return out


def wids_index(manifest_path: Path) -> dict[str, Any]:
    """The wids shard index (``widsindex create``'s format) of the shards a manifest lists."""
    from kdcache.shards.manifest import load_manifest

    manifest = load_manifest(manifest_path)
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "shardlist": [
            {"url": name, "nsamples": count, "filesize": size}
            for name, count, size in zip(
                manifest.shards, manifest.counts, manifest.sizes or [], strict=True
            )
        ],
    }


def upload(s3: LocalS3, shards: Path) -> dict[str, str]:
    """The three layouts on the server, under a prefix of their own (moto's state is shared by
    every server of a process); their shard patterns (brace-expanded, no listing)."""
    fs = s3.filesystem()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    run = f"{BUCKET}/run-{uuid.uuid4().hex[:12]}"
    tars = sorted(shards.glob("train-*.tar"))
    for layout in LAYOUTS:
        fs.put([str(t) for t in tars], f"{run}/{layout}/")
    fs.put(str(shards / "train-manifest.json"), f"{run}/manifest/train-manifest.json")
    index = json.dumps(wids_index(shards / "train-manifest.json")).encode()
    fs.pipe(f"{run}/wids_index/shardindex.json", index)
    last = len(tars) - 1
    return {layout: f"s3://{run}/{layout}/train-{{000000..{last:06d}}}.tar" for layout in LAYOUTS}


def count_planning(s3: LocalS3, pattern: str, cache: Path) -> dict[str, Any]:
    """Plan a precompute over ``pattern`` with a fresh client; the requests it made."""
    from kdcache.core.config import validate
    from kdcache.pipeline.config import PrecomputeConfig
    from kdcache.pipeline.plan import plan_precompute

    cfg = validate(
        PrecomputeConfig,
        {
            "data": {"shards": pattern, "storage_options": s3.options, "num_classes": 10},
            "cache": {
                "path": str(cache),
                "overwrite": True,
                "num_views": 2,
                "recipe": {"size": 28, "channels": 1, "mean": [0.5], "std": [0.25]},
            },
            "teachers": [{"name": "t", "model": {"name": "kd_cnn_tiny"}, "k": 3}],
        },
    )
    s3.filesystem()  # no listing cached from the upload or an earlier layout
    with RequestLog() as log:
        plan = plan_precompute(cfg)
    shards = len(plan.data.urls)
    tars = log.reads_of(".tar")
    return {
        "shards": shards,
        "requests": len(log.requests),
        "requests_per_shard": len(log.requests) / shards,
        "by_kind": dict(Counter(r.kind for r in log.requests)),
        "shard_reads": len(tars),
        "whole_shard_reads": sum(r.status == 200 for r in tars),
        "planned_from": plan.data.sources,
    }


def measure(out: Path, num_shards: int = 64, per_shard: int = 20) -> dict[str, Any]:
    """Requests of planning ``num_shards`` shards per layout (see the module docstring)."""
    shards = make_planning_shards(
        out / f"plan-shards-{num_shards}x{per_shard}", num_shards, per_shard
    )
    with LocalS3() as s3:
        patterns = upload(s3, shards)
        layouts = {
            layout: count_planning(s3, patterns[layout], out / "plan-caches" / layout)
            for layout in LAYOUTS
        }
    return {"shards": num_shards, "samples_per_shard": per_shard, **layouts}
