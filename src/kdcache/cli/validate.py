"""``kdcache validate CACHE [--json FILE]``: exit 0 when the cache is complete and sound,
1 listing every problem; ``--json`` writes the :class:`~kdcache.core.results.ValidateResult`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdcache.core.results import ValidateResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cache", help="cache path or fsspec URL")
    parser.add_argument("--teacher", action="append", help="check only this teacher (repeatable)")
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="also write the result as JSON to FILE"
    )


def run(args: argparse.Namespace) -> int:
    from kdcache.cache.store import open_store
    from kdcache.cache_tools.validate import validate_cache
    from kdcache.core.outputs import check_output_file

    if args.json is not None:
        check_output_file(args.json, "--json")
    result = validate_cache(open_store(args.cache), args.teacher)
    print(format_result(args.cache, result))
    if args.json is not None:
        result.write(args.json)
        print(f"wrote {args.json}")
    return 0 if result.ok else 1


def format_result(cache: str, result: ValidateResult) -> str:
    lines = [
        f"cache {cache}: {result.shards} shards, {result.views} valid views, "
        f"{result.invalid_rows} invalid rows, teachers: {', '.join(result.teachers) or 'none'}"
    ]
    if result.ok:
        return "\n".join([*lines, "valid: every shard complete, every check passed"])
    lines.append(f"INVALID: {len(result.problems)} problem(s)")
    return "\n".join(lines + [f"  - {problem}" for problem in result.problems])
