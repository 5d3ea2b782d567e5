"""Whether a Ray cluster answers at an address, within a bounded time.

``ray.init(address=...)`` at a port where something other than Ray listens (or a Ray that does
not answer) retries for minutes, printing a GCS connection line each time. So before joining,
the driver connects once in a child process that it stops after ``ray.connect_timeout_s``: the
child's retries and log lines stay in the child, and a cluster that does not answer is one error
naming the address.
"""

from __future__ import annotations

import subprocess
import sys

PROBE = "import sys, ray\nray.init(address=sys.argv[1])\nray.shutdown()\n"
"""The child's program: join the cluster at ``argv[1]`` and leave it."""


def probe_cluster(address: str, timeout_s: float) -> str | None:
    """Why no Ray cluster answered at ``address`` within ``timeout_s`` seconds; None if one did."""
    command = [sys.executable, "-c", PROBE, address]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return (
            f"no Ray cluster answered within ray.connect_timeout_s={timeout_s:g} s "
            "(something else may listen on that port)"
        )
    if done.returncode == 0:
        return None
    return f"joining it failed: {last_error_line(done.stderr)}"


def last_error_line(stderr: str) -> str:
    """The last line of a child's error output that says something (its exception, usually)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no error output"
