"""The ``kdcache`` command line: the top layer, which may import every part of kdcache.

Each sub-command is a module of this package with ``add_arguments(parser)`` and
``run(args) -> int``; its heavy imports (torch, Ray, zarr) happen inside ``run``, so
``kdcache --help`` and argument errors stay fast. Nothing in kdcache imports this package.
"""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType

from kdcache import __version__
from kdcache.cli import (
    bench,
    card,
    demo,
    inspect,
    pack,
    precompute,
    shards,
    train,
    unpack,
    validate,
    verify,
)
from kdcache.cli import config as config_command
from kdcache.core.errors import KdcacheError, user_message

COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "shards": (shards, "write WebDataset shards from IDX files, an image folder or synthetic data"),
    "precompute": (precompute, "run teachers over shards x views and write the cache"),
    "validate": (validate, "check a cache's integrity"),
    "verify": (verify, "recompute stored views with the teacher and compare"),
    "inspect": (inspect, "teacher statistics of a cache: tables, JSON, plots"),
    "card": (card, "a cache's card: data, recipe, teachers and their accuracy, how to use it"),
    "pack": (pack, "a cache (and its teachers' weights) as one archive with SHA-256 sums"),
    "unpack": (unpack, "extract a `kdcache pack` archive, verifying every file and the cache"),
    "train": (train, "train a student from the cache (or online, or plain CE)"),
    "config": (
        config_command,
        "print a complete, commented config (a template, or what a run of yours uses)",
    ),
    "demo": (demo, "the whole flow on Fashion-MNIST, end to end"),
    "bench": (
        bench,
        "benchmarks (from a source checkout): train, precompute, cache, inspect, parity",
    ),
}
"""Sub-command -> (its module, one-line help)."""
DESCRIPTION = (
    "kdcache: run teachers once over WebDataset shards x augmented views into a top-k logit "
    "cache, then train students from it. `kdcache COMMAND --help` for each command."
)


def build_parser(names: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the sub-commands in ``names`` (default all) get their own arguments."""
    parser = argparse.ArgumentParser(prog="kdcache", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"kdcache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if names is None or name in names:
            module.add_arguments(sub_parser)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The arguments, with ``KEY=VALUE`` overrides also after options (``cfg.yaml --overwrite
    cache.seed=1``: argparse alone takes positionals in one run and refuses the late ones)."""
    args, extra = parser.parse_known_args(argv)
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    if late and isinstance(getattr(args, "overrides", None), list):
        args.overrides += late
        extra = [a for a in extra if a not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; a :class:`KdcacheError` is one line on stderr and exit status 2 (also
    when a DataLoader worker raised it: torch wraps it in the worker's traceback, shown only with
    ``--verbose``)."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser([command] if command else [])
    args = parse(parser, argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module = COMMANDS[args.command][0]
    try:
        return int(module.run(args) or 0)
    except KdcacheError as exc:
        message = user_message(exc)
        if message != str(exc):
            logging.getLogger(__name__).debug("%s", exc)
        print(f"kdcache {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kdcache {args.command}: interrupted", file=sys.stderr)
        return 130
