"""``kdcache validate CACHE``: exit 0 when the cache is complete and sound,
1 listing every problem.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cache", help="cache path or fsspec URL")
    parser.add_argument("--teacher", action="append", help="check only this teacher (repeatable)")


def run(args: argparse.Namespace) -> int:
    from kdcache.store import open_store
    from kdcache.tools.validate import validate_cache

    store = open_store(args.cache)
    report = validate_cache(store, args.teacher)
    teachers = args.teacher or store.teachers
    print(
        f"cache {args.cache}: {report.shards} shards, {report.views} valid views, "
        f"{report.invalid_rows} invalid rows, teachers: {', '.join(teachers) or 'none'}"
    )
    if report.ok:
        print("valid: every shard complete, every check passed")
        return 0
    print(f"INVALID: {len(report.problems)} problem(s)")
    for problem in report.problems:
        print(f"  - {problem}")
    return 1
