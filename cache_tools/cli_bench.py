"""``kdcache bench {train,precompute,cache,inspect,parity} [--json FILE] ...``: measure, print tables, write JSON.

The benchmarks live in ``benchmarks/`` of a source checkout (not in the installed packages: they
import both ``pipeline`` and ``train``, which never import each other). This module names them as
strings, like the dispatcher does, and imports only the one asked for. Each exposes
``add_arguments(parser)``, ``run(args) -> dict`` and ``format_result(dict) -> str``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

BENCHES: dict[str, tuple[str, str]] = {
    "train": ("benchmarks.train_bench", "images/s of plain CE, KD from the cache and online KD, interleaved"),
    "precompute": ("benchmarks.precompute_bench", "precompute views/s vs the bare teacher forward; A and actors"),
    "cache": ("benchmarks.cache_bench", "bytes per view, read throughput and error of the fp16 and q8 encodings"),
    "inspect": ("benchmarks.inspect_bench", "seconds per teacher and peak memory of kdcache inspect on a 1M-view cache"),
    "parity": ("benchmarks.parity_bench", "Fashion-MNIST accuracy: online KD vs cached KD at k = C and smaller k"),
}
CHECKOUT = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module_name, help_text) in BENCHES.items():
        bench = sub.add_parser(name, help=help_text, description=help_text)
        bench.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON to FILE")
        load(module_name, parser).add_arguments(bench)


def load(module_name: str, parser: argparse.ArgumentParser | None = None) -> ModuleType:
    """Import a bench module, from the source checkout beside ``cache_tools`` when not importable."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != "benchmarks":
            raise
    if not (CHECKOUT / "benchmarks" / "__init__.py").is_file():
        message = f"kdcache bench needs a source checkout: no benchmarks/ package in {CHECKOUT}"
        if parser is not None:
            parser.error(message)
        raise ModuleNotFoundError(message)
    sys.path.insert(0, str(CHECKOUT))
    return importlib.import_module(module_name)


def run(args: argparse.Namespace) -> int:
    module = load(BENCHES[args.bench][0])
    result = module.run(args)
    print(module.format_result(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
        print(f"results: {args.json}")
    return 0


def _jsonable(value: Any) -> Any:
    """Plain JSON: NaN and inf become null, paths strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
