"""``kdcache pack CACHE ARCHIVE``: a cache (its card, optionally its teachers' weights) as one
tar with a SHA-256 list, to publish or copy (any fsspec URL)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cache", metavar="CACHE", help="cache path or fsspec URL")
    parser.add_argument("archive", metavar="ARCHIVE", help="the tar to write (path or URL)")
    parser.add_argument(
        "--weights",
        action="store_true",
        help="ship the teachers' local checkpoints in the archive's weights/",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace ARCHIVE")


def run(args: argparse.Namespace) -> int:
    from kdcache.cache_tools.portable import pack_cache

    packed = pack_cache(args.cache, args.archive, weights=args.weights, overwrite=args.overwrite)
    shipped = ", ".join(f"{t}: {f}" for t, f in packed.weights.items()) or "none"
    print(
        f"kdcache pack: {packed.archive}: {packed.files} files, {packed.bytes / 1e6:.1f} MB, "
        f"with its card (README.md) and SHA-256 list; weights shipped: {shipped}"
    )
    return 0
