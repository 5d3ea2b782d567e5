"""Listing a cache's Zarr subgroups when part of the hierarchy was deleted by hand.

Zarr lists a directory whose ``zarr.json`` is gone with a ``ZarrUserWarning`` ("Object at t1 is
not recognized ...") and skips it; a rerun then tries to create the group again over its arrays
(``ContainsArrayError``). Here such a member is a :class:`~kdcache.core.errors.CacheError` naming it
and what to do, and no warning reaches the user.
"""

from __future__ import annotations

import re
import warnings

import zarr
from zarr.errors import ZarrUserWarning

from kdcache.core.errors import CacheError

_UNRECOGNIZED = re.compile(r"Object at (\S+) is not recognized as a component of a Zarr hierarchy")


def subgroups(group: zarr.Group, path: str, cache_path: str) -> list[tuple[str, zarr.Group]]:
    """``(name, group)`` of the subgroups of ``group[path]``, sorted by name; a member directory
    without its ``zarr.json`` is a CacheError naming it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ZarrUserWarning)
        node = group[path]
        if not isinstance(node, zarr.Group):
            raise CacheError(f"cache {cache_path!r}: {path!r} is an array where a group belongs")
        members = sorted(node.groups())
    lost = [_UNRECOGNIZED.search(str(w.message)) for w in caught]
    for found, warning in zip(lost, caught, strict=True):
        if found is None:  # another warning than the one handled here: pass it on
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    names = [f"{path}/{m.group(1)}" for m in lost if m is not None]
    if names:
        raise CacheError(
            f"cache {cache_path!r}: {names[0]!r} holds arrays but no zarr.json (its group metadata "
            "was deleted), so what it held (e.g. a teacher's model, weights digest and k) is lost "
            f"and its data cannot be used. Delete {names[0]!r} from the cache to compute it again "
            "(kdcache precompute then redoes it), or rerun precompute with --overwrite"
        )
    return members
