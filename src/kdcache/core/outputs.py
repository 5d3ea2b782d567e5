"""Checks of output paths before any work: a command that will write a file or a directory
refuses up front, naming the path and its option or config key, when it cannot write there (a
read-only filesystem, a file where a directory is needed or the reverse, no permission).

Local paths only: an fsspec URL (``s3://...``) is checked by its first write (for precompute, the
writer lock, taken before any work). Root ignores permission bits, but not a read-only mount:
``os.access`` reports both.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdcache.core.errors import OutputError


def is_fsspec_url(path: str | os.PathLike) -> bool:
    """True for an fsspec URL (``s3://...``), which these local checks leave alone."""
    return "://" in str(path)


def check_output_dir(path: str | os.PathLike, what: str) -> None:
    """``path`` is, or can be created as, a directory this process can write into."""
    if is_fsspec_url(path):
        return
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise OutputError(f"{what}: {str(path)!r} is a file, not a directory")
    _check_writable(target if target.is_dir() else _creatable_from(target, path, what), path, what)


def check_output_file(path: str | os.PathLike, what: str) -> None:
    """``path`` is, or can be created as, a file this process can write."""
    if is_fsspec_url(path):
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise OutputError(f"{what}: {str(path)!r} is a directory, not a file")
    if target.exists():
        _check_writable(target, path, what)
        return
    _check_writable(_creatable_from(target, path, what), path, what)


def check_not_symlink_to_overwrite(path: str, what: str) -> None:
    """Decided: an overwrite never deletes through a symbolic link (it would empty the link's
    target, which may be shared). The user passes the target itself, or removes the link."""
    if is_fsspec_url(path) or not os.path.islink(os.path.expanduser(path)):
        return
    target = os.path.realpath(os.path.expanduser(path))
    raise OutputError(
        f"{what}: {path!r} is a symbolic link to {target!r}; --overwrite does not delete through a "
        f"link: give the target itself ({what}={target}) or remove the link"
    )


def _creatable_from(target: Path, path: str | os.PathLike, what: str) -> Path:
    """The nearest existing ancestor of a path that does not exist yet: the directory in which it
    will be created (it must be a directory)."""
    parent = target.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{what}: {str(path)!r} cannot be created: {str(parent)!r} is a file")
    return parent


def _check_writable(place: Path, path: str | os.PathLike, what: str) -> None:
    if os.access(place, os.W_OK | (os.X_OK if place.is_dir() else 0)):
        return
    where = "" if place == Path(path).expanduser() else f" (in {str(place)!r})"
    raise OutputError(f"{what}: cannot write {str(path)!r}{where}: {_why_not_writable(place)}")


def _why_not_writable(place: Path) -> str:
    try:
        if os.statvfs(place).f_flag & os.ST_RDONLY:
            return "it is on a read-only filesystem"
    except OSError:
        pass
    return "permission denied"
