"""``kdcache verify CACHE``: recompute random stored views with the teacher; exit 1 beyond the encoding's rounding."""

from __future__ import annotations

import argparse

from cache_tools.store import open_store
from cache_tools.verify import verify_cache


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cache", help="cache path or fsspec URL")
    parser.add_argument("--teacher", action="append", help="verify only this teacher (repeatable)")
    parser.add_argument("--num", type=int, default=64, help="views to recompute (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed choosing the views")
    parser.add_argument("--shards", help="shard pattern, when the shards moved since precompute")
    parser.add_argument("--checkpoint", help="teacher checkpoint, when it moved since precompute")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    parser.add_argument("--atol", type=float, default=1e-3, help="absolute slack per logit on top of the encoding's rounding (raise it for caches made under bf16 autocast)")


def run(args: argparse.Namespace) -> int:
    store = open_store(args.cache)
    results = verify_cache(
        store, teachers=args.teacher, num=args.num, seed=args.seed, shards=args.shards,
        checkpoint=args.checkpoint, device=args.device, amp=args.amp, atol=args.atol,
    )
    print(f"{'teacher':<16}{'views':>7}{'max|dlogit|':>13}{'max|dlse|':>11}{'max|dtail|':>12}{'top-k agree':>13}"
          f"{'top-1 agree':>13}  result")
    for r in results:
        verdict = "ok" if r.ok else f"FAIL ({r.failures} views beyond tolerance)"
        print(f"{r.teacher:<16}{r.views:>7}{r.max_abs_delta:>13.2e}{r.max_lse_delta:>11.2e}{r.max_tail_delta:>12.2e}"
              f"{r.topk_agreement:>13.1%}{r.top1_agreement:>13.1%}  {verdict}")
    return 0 if all(r.ok for r in results) else 1
