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

from kdcache.cli.checkout import PACKAGE, source_checkout
from kdcache.core.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        metavar="BENCH [OPTIONS]",
        help="train, precompute, cache, inspect or parity, and its options "
        "(`kdcache bench NAME --help`)",
    )


def run(args: argparse.Namespace) -> int:
    checkout = source_checkout()
    if checkout is None or not (checkout / "benchmarks" / "__main__.py").is_file():
        raise ConfigError(
            f"kdcache bench runs the benchmarks of a source checkout, and this kdcache is "
            f"installed from a wheel ({PACKAGE}): clone the repository, `make setup` there "
            f"(an editable install), then run `kdcache bench NAME` or `python -m benchmarks NAME`"
        )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(checkout), env.get("PYTHONPATH")) if p)
    return subprocess.call([sys.executable, "-m", "benchmarks", *args.args], env=env)
