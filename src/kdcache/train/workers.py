"""A DataLoader worker process that died: one line saying what happened and what to do.

torch reports a worker killed under it (the kernel's out-of-memory killer, a ``kill -9``) as a
``RuntimeError`` raised from its SIGCHLD handler or from the queue read, with the main process's
traceback: dozens of lines that name neither the run nor a way on. The trainer turns it into a
:class:`DataLoaderWorkerError` naming the worker, the signal, ``run.dir`` and the resume.
"""

from __future__ import annotations

import re

from kdcache.core.errors import KdcacheError

_DEATH = re.compile(
    r"DataLoader worker \(pid(?:\(s\))? (?P<pids>[\d, ]+)\) "
    r"(?:is killed by signal: (?P<signal>[^.\n]*)"
    r"|exited unexpectedly(?P<code> with exit code -?\d+)?)"
)


class DataLoaderWorkerError(KdcacheError, RuntimeError):
    """A DataLoader worker process died (killed, or exited) while the run streamed its data."""


def worker_death(exc: BaseException, run_dir: str) -> DataLoaderWorkerError | None:
    """The one-line error for torch's report of a dead DataLoader worker; None for anything else."""
    found = None
    link: BaseException | None = exc  # down the chain of causes and contexts
    while link is not None and found is None:
        found = _DEATH.search(str(link)) if isinstance(link, RuntimeError) else None
        link = link.__cause__ or link.__context__
    if found is None:
        return None
    how = (
        f"killed by signal {found['signal'].strip()}"
        if found["signal"]
        else "exited unexpectedly" + (found["code"] or "")
    )
    return DataLoaderWorkerError(
        f"a DataLoader worker process (pid {found['pids'].strip()}) {how} while the run streamed "
        "its data (SIGKILL is also what the out-of-memory killer sends); rerun with --resume to "
        f"continue {run_dir!r} from its last checkpoint, and if it recurs lower data.num_workers, "
        "data.shuffle_buffer or data.batch_size"
    )
