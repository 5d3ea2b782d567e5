"""``kdcache card CACHE``: the cache card (data, recipe, teachers with accuracy and rendering,
bytes per view, how to use it), printed or written as CACHE/README.md."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cache", metavar="CACHE", help="cache path or fsspec URL")
    parser.add_argument(
        "--write", action="store_true", help="also write it as CACHE/README.md (the cache card)"
    )


def run(args: argparse.Namespace) -> int:
    from kdcache.cache.store import open_store
    from kdcache.cache_tools.portable import cache_card, write_card

    text = write_card(args.cache) if args.write else cache_card(open_store(args.cache))
    print(text)
    return 0
