"""``kdcache verify CACHE``: recompute random stored views with the teacher;
exit 1 beyond the encoding's rounding; ``--json`` writes the
:class:`~kdcache.core.results.VerifyResult`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from kdcache.core.errors import ConfigError

if TYPE_CHECKING:
    from kdcache.core.results import VerifyResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cache", help="cache path or fsspec URL")
    parser.add_argument("--teacher", action="append", help="verify only this teacher (repeatable)")
    parser.add_argument(
        "--num", type=_positive_int, default=64, help="views to recompute (default 64)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed choosing the views")
    parser.add_argument("--shards", help="shard pattern, when the shards moved since precompute")
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option for the shards, e.g. endpoint_url=http://host:9000, key=..., "
        "secret=..., client_kwargs.region_name=... (repeatable; dotted keys nest; values are "
        "strings, true/false booleans)",
    )
    parser.add_argument("--checkpoint", help="teacher checkpoint, when it moved since precompute")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="also write the result as JSON to FILE"
    )
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-3,
        help="absolute slack per logit on top of the encoding's rounding "
        "(raise it for caches made under bf16 autocast)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, found {value}")
    return value


def parse_storage_options(items: list[str]) -> dict:
    """``KEY=VALUE`` items -> fsspec storage options (dotted keys nest; ``true``/``false`` are
    booleans, other values strings). Errors name the key, never the value (it may be a secret)."""
    options: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep:
            raise ConfigError("--storage-option: expected KEY=VALUE, found an item without '='")
        if not all(parts):
            raise ConfigError(
                f"--storage-option: expected KEY=VALUE, found the key {key!r} with an empty part"
            )
        node = options
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"--storage-option: {'.'.join(parts[: depth + 1])} is a value, "
                    f"cannot set {key!r}"
                )
        node[parts[-1]] = {"true": True, "false": False}.get(value.lower(), value)
    return options


def run(args: argparse.Namespace) -> int:
    from kdcache.cache.store import open_store
    from kdcache.cache_tools.verify import verify_cache
    from kdcache.core.outputs import check_output_file

    if args.json is not None:
        check_output_file(args.json, "--json")
    result = verify_cache(
        open_store(args.cache),
        teachers=args.teacher,
        num=args.num,
        seed=args.seed,
        shards=args.shards,
        checkpoint=args.checkpoint,
        device=args.device,
        amp=args.amp,
        atol=args.atol,
        storage_options=parse_storage_options(args.storage_option) or None,
    )
    print(format_result(result))
    if args.json is not None:
        result.write(args.json)
        print(f"wrote {args.json}")
    return 0 if result.ok else 1


def format_result(result: VerifyResult) -> str:
    """One row per teacher."""
    lines = [
        f"{'teacher':<16}{'views':>7}{'max|dlogit|':>13}{'max|dlse|':>11}{'max|dtail|':>12}"
        f"{'top-k agree':>13}{'top-1 agree':>13}  result"
    ]
    for r in result.teachers:
        verdict = "ok" if r.ok else f"FAIL ({r.failures} views beyond tolerance)"
        if r.draws_agreement is not None:
            verdict += f"; draws the same in {r.draws_agreement:.1%} of views"
        lines.append(
            f"{r.teacher:<16}{r.views:>7}{r.max_abs_delta:>13.2e}{r.max_lse_delta:>11.2e}"
            f"{r.max_tail_delta:>12.2e}{r.topk_agreement:>13.1%}{r.top1_agreement:>13.1%}"
            f"  {verdict}"
        )
    return "\n".join(lines)
