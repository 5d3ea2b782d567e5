"""Test fixtures: the processes of a run started in a session of its own, killed as in a crash."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def session_members(sid: int) -> list[int]:
    """Process ids in session ``sid`` (the subprocess started with ``start_new_session``)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def kill_session(sid: int, timeout: float = 30.0) -> None:
    """SIGKILL the driver and the Ray processes it started (Ray workers leave its process group)."""
    deadline = time.monotonic() + timeout
    while (members := session_members(sid)) and time.monotonic() < deadline:
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    assert not session_members(sid), "processes of the interrupted run survived SIGKILL"
