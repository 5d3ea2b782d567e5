"""``kdcache bench inspect``: seconds per teacher and peak memory of ``kdcache inspect`` on a large
cache.

A cache of ``--shards`` x ``--samples`` samples x A views (default 125 x 2000 x 4 = one million
views), C = 1000, top-``--k``, with two teachers, is written once through the real writer from
:func:`benchmarks.cache_bench.teacher_logits` (the second teacher is the first with other seeds:
another confident teacher over the same views). Then, interleaved over ``--rounds``:

- **in-process**: :func:`kdcache.cache_tools.stats.inspect_cache` over one teacher, and over
  both (which adds the teacher-vs-teacher figures), at the temperatures asked for. Seconds per
  teacher and views per second are what the issue's "a million views in seconds per teacher" is
  about;
- **the CLI in a fresh process**: ``kdcache inspect CACHE --json ...`` over both teachers of the
  large cache and of a second cache a quarter its size, with each process's peak RSS: bounded
  memory means the two peaks are about equal although one cache holds four times the views.

Caches under ``--out`` are reused when complete; delete the directory to write them again.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.cache_bench import imagenet_like_params, teacher_logits
from benchmarks.common import machine, rotated, table
from kdcache.cache.store import STATUS_VALID, CacheStore, Fingerprint, TeacherSpec, open_store
from kdcache.cache.writer import add_teacher, create_store, write_targets, write_views
from kdcache.cache_tools.stats import inspect_cache
from kdcache.core.results import InspectResult
from kdcache.targets.sparse import from_logits
from kdcache.views.recipe import ViewRecipe

TEACHERS = ("t0", "t1")
PEAK_RSS = (
    "import json, resource, sys\nfrom kdcache.cli import main\nrc = main(sys.argv[2:])\n"
    "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "open(sys.argv[1], 'w').write(json.dumps({'peak_rss_kb': peak}))\nsys.exit(rc)"
)
"""``python -c PEAK_RSS RSS_FILE kdcache-args...``: run the CLI, write its peak RSS to RSS_FILE."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench/inspect"), help="where the caches are written"
    )
    parser.add_argument(
        "--shards", type=int, default=125, help="shards of the large cache (default 125)"
    )
    parser.add_argument(
        "--samples", type=int, default=2000, help="samples per shard (default 2000)"
    )
    parser.add_argument(
        "--views", type=int, default=4, help="A, views per sample (default 4: 1M views in all)"
    )
    parser.add_argument("--classes", type=int, default=1000, help="C (default 1000)")
    parser.add_argument("--k", type=int, default=10, help="stored top-k (default 10)")
    parser.add_argument(
        "--encoding", choices=("fp16", "q8"), default="fp16", help="cache encoding (default fp16)"
    )
    parser.add_argument(
        "--temperatures", default="1,4", help="comma-separated entropy temperatures (default 1,4)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (default 2)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Write (or reuse) the two caches, time inspect in-process and through the CLI; return the
    results."""
    if args.quick:
        args.shards = 4
        args.samples = 50
        args.views = 2
        args.classes = 50
        args.rounds = 1
    temperatures = [float(t) for t in str(args.temperatures).split(",")]
    large = cache_for(args, args.shards)
    small = cache_for(args, max(1, args.shards // 4))
    timings = time_inspect(large, temperatures, args.rounds)
    cli = {
        name: cli_inspect(store, args.out / f"{name}.json", temperatures)
        for name, store in (("quarter", small), ("full", large))
    }
    return summarise(args, large, timings, cli, temperatures)


# ---- the caches ----------------------------------------------------------------------------------


def cache_for(args: argparse.Namespace, shards: int) -> CacheStore:
    """The cache of ``shards`` shards under ``--out``, written unless a complete one with these
    settings is there."""
    path = (
        args.out
        / f"cache-{shards}x{args.samples}x{args.views}-c{args.classes}-k{args.k}-{args.encoding}"
    )
    if path.exists():
        store = open_store(str(path))
        if store.incomplete_shards(list(TEACHERS)) == {}:
            return store
        shutil.rmtree(path)
    return write_cache(path, args, shards)


def write_cache(path: Path, args: argparse.Namespace, shards: int) -> CacheStore:
    """Views plus two teachers through the real writer, shard by shard (memory of one shard's
    logits)."""
    keys = [[f"s{s:04d}_{i:06d}" for i in range(args.samples)] for s in range(shards)]
    fingerprint = Fingerprint(
        shards=[f"train-{s:06d}.tar" for s in range(shards)],
        counts=[args.samples] * shards,
        key_digest="bench",
    )
    store = create_store(
        str(path),
        fingerprint=fingerprint,
        keys=keys,
        recipe=ViewRecipe(),
        num_views=args.views,
        num_classes=args.classes,
        class_names=[],
        seed=0,
        config={"bench": "inspect"},
    )
    for teacher in TEACHERS:
        add_teacher(
            store,
            TeacherSpec(
                name=teacher,
                model={"name": "generator"},
                weights_digest=f"bench-{teacher}",
                k=args.k,
                rendering=ViewRecipe().rendering(),
                encoding=args.encoding,
            ),
        )
    started = time.perf_counter()
    for s in tqdm(range(shards), desc=f"writing {path.name}", unit="shard", leave=False):
        labels = None
        for t, teacher in enumerate(TEACHERS):
            z, y = teacher_logits(args.samples, args.views, args.classes, seed=s + 100_000 * t)
            # both teachers are scored against the first's labels
            labels = y if labels is None else labels
            targets = from_logits(
                torch.from_numpy(z.reshape(-1, args.classes)),
                torch.from_numpy(labels).repeat_interleave(args.views),
                args.k,
            )
            write_targets(store, s, teacher, targets)
        write_views(
            store,
            s,
            labels=labels,
            status=np.full(args.samples, STATUS_VALID),
            errors=[""] * args.samples,
            params=imagenet_like_params(ViewRecipe(), keys[s], args.views, seed=s),
        )
    print(
        f"inspect bench: wrote {path} "
        f"({shards * args.samples * args.views:,} views x {len(TEACHERS)} teachers) "
        f"in {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )
    return store


# ---- measuring -----------------------------------------------------------------------------------


def time_inspect(
    store: CacheStore, temperatures: list[float], rounds: int
) -> dict[str, dict[str, float]]:
    """Wall and CPU seconds of inspect_cache over one teacher and over both, interleaved, after a
    warm-up."""
    variants = {"one_teacher": [TEACHERS[0]], "two_teachers": list(TEACHERS)}
    inspect_cache(store, [TEACHERS[0]], temperatures=temperatures)  # warm-up: imports, page cache
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for r in range(rounds):
        for name in rotated(tuple(variants), r):
            w = time.perf_counter()
            c = time.process_time()
            inspect_cache(store, variants[name], temperatures=temperatures)
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return {
        name: {
            "wall_s": float(np.median(wall[name])),
            "cpu_s": float(np.median(cpu[name])),
            "teachers": len(variants[name]),
        }
        for name in variants
    }


def cli_inspect(store: CacheStore, json_path: Path, temperatures: list[float]) -> dict[str, float]:
    """``kdcache inspect`` over both teachers in a fresh process: wall seconds (imports included)
    and peak RSS, read from what the process wrote (its result and its RSS file), not its output."""
    argv = [
        "inspect",
        store.path,
        "--json",
        str(json_path),
        "--temperature",
        ",".join(map(str, temperatures)),
    ]
    rss_path = json_path.with_suffix(".rss.json")
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(rss_path), *argv], capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"kdcache inspect failed ({done.returncode}): {done.stderr[-2000:]}")
    report = InspectResult.read(json_path)
    return {
        "views": report.cache.samples * report.cache.num_views,
        "shards_read": report.cache.shards_read,
        "wall_s": wall,
        "peak_rss_mb": json.loads(rss_path.read_text())["peak_rss_kb"] / 1024,
    }


# ---- results -------------------------------------------------------------------------------------


def summarise(
    args: argparse.Namespace,
    store: CacheStore,
    timings: dict[str, dict[str, float]],
    cli: dict[str, dict[str, float]],
    temperatures: list[float],
) -> dict[str, Any]:
    views = store.meta.fingerprint.num_samples * store.meta.num_views
    one = timings["one_teacher"]
    two = timings["two_teachers"]
    return {
        "bench": "inspect",
        "machine": machine(),
        "settings": {
            "shards": args.shards,
            "samples_per_shard": args.samples,
            "views": args.views,
            "classes": args.classes,
            "k": args.k,
            "encoding": args.encoding,
            "temperatures": temperatures,
            "rounds": args.rounds,
            "quick": args.quick,
        },
        "cache_views": views,
        "seconds_per_teacher": one["wall_s"],
        "views_per_s_per_teacher": views / one["wall_s"],
        "two_teachers_s": two["wall_s"],
        "timings": timings,
        "cli": cli,
        "peak_rss_full_over_quarter": cli["full"]["peak_rss_mb"] / cli["quarter"]["peak_rss_mb"],
        "max_rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def format_result(result: dict[str, Any]) -> str:
    """The tables printed by ``kdcache bench inspect``."""
    s = result["settings"]
    head = (
        f"inspect bench: {result['cache_views']:,} views (A={s['views']}), C={s['classes']}, "
        f"k={s['k']}, {s['encoding']}, entropy at T={s['temperatures']}; "
        f"{result['machine'].get('cpus', '?')} CPUs (inspect runs on 1 torch thread)"
    )
    inproc = table(
        ["inspect_cache", "teachers", "wall s", "CPU s", "views/s per teacher"],
        [
            [
                name,
                t["teachers"],
                t["wall_s"],
                t["cpu_s"],
                result["cache_views"] * t["teachers"] / t["wall_s"],
            ]
            for name, t in result["timings"].items()
        ],
    )
    cli = table(
        [
            "kdcache inspect (fresh process, 2 teachers)",
            "views",
            "wall s (imports included)",
            "peak RSS MB",
        ],
        [[name, c["views"], c["wall_s"], c["peak_rss_mb"]] for name, c in result["cli"].items()],
    )
    note = (
        f"{result['seconds_per_teacher']:.1f} s per teacher for {result['cache_views']:,} views; "
        "peak memory, full cache over a quarter of it: "
        f"{result['peak_rss_full_over_quarter']:.2f}x"
    )
    return "\n\n".join([head, inproc, cli, note])
