"""The ``kdcache`` command line: one sub-command per job, each living beside its library.

``pipeline`` and ``train`` never import each other, so this dispatcher names each sub-command's
module as a string and imports only the one that runs. Each such module exposes
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cache_tools.errors import KdcacheError

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "shards": ("pipeline.cli_shards", "write WebDataset shards from IDX files, an image folder or synthetic data"),
    "precompute": ("pipeline.cli_precompute", "run teachers over shards x views and write the cache"),
    "validate": ("cache_tools.cli_validate", "check a cache's integrity"),
    "verify": ("cache_tools.cli_verify", "recompute stored views with the teacher and compare"),
    "inspect": ("cache_tools.cli_inspect", "teacher statistics of a cache: tables, JSON, plots"),
    "train": ("train.cli", "train a student from the cache (or online, or plain CE)"),
    "demo": ("cache_tools.demo", "the whole flow on Fashion-MNIST, end to end"),
    "bench": ("cache_tools.cli_bench", "benchmarks: train, precompute, cache, parity"),
}


def build_parser(names: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdcache", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if names is None or name in names:
            module = _load(module_name)
            if module is not None:
                module.add_arguments(sub_parser)
    return parser


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None  # sub-command not built in this version
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser([command] if command else [])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module = _load(COMMANDS[args.command][0])
    if module is None:
        parser.error(f"command {args.command!r} is not available in this version")
    try:
        return int(module.run(args) or 0)
    except KdcacheError as exc:
        print(f"kdcache {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kdcache {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
