"""``python -m benchmarks NAME [--json FILE] [--quick] ...``: measure, print tables, write JSON.

Run from a source checkout (``kdcache bench NAME`` is a front for this). Each benchmark module
exposes ``add_arguments(parser)``, ``run(args) -> dict`` and ``format_result(dict) -> str``; the
run's typed result (:class:`benchmarks.common.BenchResult`: the bench, its arguments, versions and
the numbers under ``results``) is what ``--json`` writes.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks import (
    cache_bench,
    gpu_bench,
    inspect_bench,
    papers_bench,
    parity_bench,
    precompute_bench,
    train_bench,
)
from benchmarks.common import BenchResult
from kdcache.core.errors import KdcacheError
from kdcache.core.results import iso, utc_now, versions

BENCHES: dict[str, tuple[ModuleType, str]] = {
    "train": (train_bench, "images/s of plain CE, KD from the cache and online KD, interleaved"),
    "precompute": (
        precompute_bench,
        "precompute views/s vs the bare teacher forward; A and actors",
    ),
    "cache": (
        cache_bench,
        "bytes per view, read throughput and error of the fp16 and q8 encodings",
    ),
    "inspect": (
        inspect_bench,
        "seconds per teacher and peak memory of kdcache inspect on a 1M-view cache",
    ),
    "parity": (
        parity_bench,
        "Fashion-MNIST accuracy: online KD vs cached KD at k = C and smaller k",
    ),
    "papers": (
        papers_bench,
        "each source paper's headline claim in miniature on Fashion-MNIST, 3 seeds, a CNN student",
    ),
    "gpu": (
        gpu_bench,
        "on a CUDA GPU: ResNet-50 precompute views/s vs its bare forward, data path per core "
        "(skipped without CUDA)",
    ),
}
"""Benchmark name -> (its module, one-line help)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdcache bench", description="kdcache's benchmarks")
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, help_text) in BENCHES.items():
        bench = sub.add_parser(name, help=help_text, description=help_text)
        bench.add_argument(
            "--json", type=Path, metavar="FILE", help="also write the results as JSON to FILE"
        )
        module.add_arguments(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark, print its tables, write its JSON; a KdcacheError is one line, exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    started = iso(utc_now())
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module = BENCHES[args.bench][0]
    try:
        result = module.run(args)
    except KdcacheError as exc:
        print(f"kdcache bench {args.bench}: error: {exc}", file=sys.stderr)
        return 2
    print(module.format_result(result))
    if args.json:
        typed = BenchResult(
            bench=args.bench,
            argv=list(argv),
            started=started,
            versions=versions(),
            results=jsonable(result),
        )
        typed.write(args.json)
        print(f"results: {args.json}")
    return 0


def jsonable(value: Any) -> Any:
    """Plain JSON: NaN and inf become null, paths strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


if __name__ == "__main__":
    sys.exit(main())
