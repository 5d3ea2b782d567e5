"""``kdcache unpack ARCHIVE DIR``: extract a `kdcache pack` archive, checking every file and the
cache's integrity."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("archive", metavar="ARCHIVE", help="a tar of `kdcache pack` (path or URL)")
    parser.add_argument("out", type=Path, metavar="DIR", help="the cache directory to create")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")


def run(args: argparse.Namespace) -> int:
    from kdcache.cache_tools.portable import unpack_cache

    out = unpack_cache(args.archive, args.out, overwrite=args.overwrite)
    print(
        f"kdcache unpack: {out}: every file matches its SHA-256 and the cache is valid; "
        f"`kdcache verify {out}` recomputes views with the teachers"
    )
    return 0
