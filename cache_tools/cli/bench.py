"""``kdcache bench NAME ...``: a front for ``python -m benchmarks NAME ...`` in a source checkout.

The benchmarks are not installed (they drive precompute and training together, and measure a
checkout); this runs them with the same Python, the checkout that this kdcache was installed
from (editable) put on the child's ``PYTHONPATH``, and the caller's working directory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from kdcache.errors import ConfigError

CHECKOUT = Path(__file__).resolve().parents[2]
"""The source checkout of an editable install: ``cache_tools/cli/bench.py`` -> the repository."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        metavar="BENCH [OPTIONS]",
        help="train, precompute, cache, inspect or parity, and its options "
        "(`kdcache bench NAME --help`)",
    )


def run(args: argparse.Namespace) -> int:
    if not (CHECKOUT / "benchmarks" / "__main__.py").is_file():
        raise ConfigError(
            f"kdcache bench needs a source checkout (an editable install): no benchmarks/ "
            f"in {CHECKOUT}; from a checkout, run `python -m benchmarks NAME`"
        )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CHECKOUT), env.get("PYTHONPATH")) if p)
    return subprocess.call([sys.executable, "-m", "benchmarks", *args.args], env=env)
