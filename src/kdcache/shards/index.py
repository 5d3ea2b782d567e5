"""What planning knows of each shard, read without the payloads: a manifest, an index, or headers.

A precompute plans from per-shard sample counts. Reading every tar to count its samples costs a
full read of the dataset on an object store, so the counts come, in this order, from

1. the index named by ``data.index``: a WebDataset shard index (wids' ``shardindex.json``:
   ``{"wids_version": 1, "shardlist": [{"url", "nsamples", "filesize"}, ...]}``) or a kdcache
   manifest;
2. the kdcache manifest beside the first shard (``<prefix>-manifest.json``, which ``kdcache
   shards`` writes, with sizes and per-shard key digests since version 2);
3. a wids ``shardindex.json`` beside the first shard;
4. the tar headers of each shard, read with range requests that skip the member payloads
   (:func:`kdcache.shards.reading.scan_shard`): about one request per sample on an object store.

A shard planned from an index is checked against one listing of its directory (an object store's
LIST: one request per 1000 objects, none when the glob of ``data.shards`` listed it already): a
missing shard is refused, and a shard whose size differs from the size the index records is
scanned from its headers instead (the index is stale for it). Its keys are unknown until a worker
reads it: the worker checks the count, duplicate keys and, where the manifest records it, the
shard's key digest, and stores the keys with the shard's views (see :mod:`kdcache.pipeline.plan`
for what the fingerprint does with them).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, cast

import fsspec
from fsspec.core import OpenFile

from kdcache.core.errors import ConfigError, DataError
from kdcache.shards.manifest import (
    Manifest,
    find_manifest,
    manifest_candidate,
    parse_manifest,
    read_remote_text,
)
from kdcache.shards.reading import (
    check_unique_names,
    is_pipe,
    pipe_local_file,
    scan_shards,
    shard_key_digest,
    shard_name,
)

log = logging.getLogger(__name__)

WIDS_INDEX_NAME = "shardindex.json"
"""The file name wids' ``widsindex create`` writes by default."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard as planning knows it: its sample count, and its keys when its headers were read."""

    url: str
    count: int
    keys: tuple[str, ...] | None = None
    """The keys in file order (headers read), or None: learned when a worker reads the shard."""
    key_digest: str = ""
    """:func:`~kdcache.shards.reading.shard_key_digest` of the keys, when known ("" otherwise)."""
    source: str = "headers"
    """Where the count came from: ``headers``, or the path of the manifest or index."""

    @property
    def name(self) -> str:
        return shard_name(self.url)

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class IndexEntry:
    """One shard's record in a manifest or index."""

    count: int
    size: int | None = None
    key_digest: str = ""


@dataclass
class CountSource:
    """A manifest or index read once: its path and its records by shard file name."""

    path: str
    entries: dict[str, IndexEntry]
    manifest: Manifest | None = None


@dataclass
class ShardListing:
    """Every shard of ``data.shards`` in order, and the manifest beside them (if any)."""

    shards: list[ShardInfo]
    manifest: Manifest | None = None
    sources: dict[str, int] = field(default_factory=dict)
    """How many shards each source planned (``headers`` or a path)."""


def index_shards(
    urls: list[str],
    storage_options: dict[str, Any] | None = None,
    index: str | None = None,
    threads: int = 8,
) -> ShardListing:
    """Plan every shard from the first source that covers it (see the module docstring)."""
    source = find_counts(urls, storage_options, index)
    planned = _from_source(urls, source, storage_options) if source else {}
    rest = [u for u in urls if u not in planned]
    for scanned in scan_shards(rest, threads, storage_options) if rest else []:
        keys = tuple(scanned.keys)
        planned[scanned.url] = ShardInfo(
            scanned.url, len(keys), keys, shard_key_digest(keys), "headers"
        )
    shards = [planned[u] for u in urls]
    check_unique_names([s.name for s in shards])
    sources: dict[str, int] = {}
    for shard in shards:
        sources[shard.source] = sources.get(shard.source, 0) + 1
    return ShardListing(shards, source.manifest if source else None, sources)


def _from_source(
    urls: list[str], source: CountSource, storage_options: dict[str, Any] | None
) -> dict[str, ShardInfo]:
    """The shards the source records whose listed size matches (or is not recorded)."""
    known = [u for u in urls if shard_name(u) in source.entries]
    planned: dict[str, ShardInfo] = {}
    stale: list[str] = []
    for url, size in zip(known, shard_sizes(known, storage_options), strict=True):
        entry = source.entries[shard_name(url)]
        if entry.size is not None and size is not None and entry.size != size:
            stale.append(f"{shard_name(url)} ({size} bytes, {entry.size} recorded)")
            continue
        planned[url] = ShardInfo(url, entry.count, None, entry.key_digest, source.path)
    if stale:
        log.warning(
            "%d shard(s) differ in size from %s, e.g. %s: reading their tar headers instead",
            len(stale),
            source.path,
            ", ".join(stale[:3]),
        )
    return planned


# ---- sources of counts ---------------------------------------------------------------------------


def find_counts(
    urls: list[str], storage_options: dict[str, Any] | None, index: str | None = None
) -> CountSource | None:
    """The first source of counts: ``index`` (``data.index``), the manifest beside the first shard,
    a ``shardindex.json`` beside it; None: read the headers."""
    if index is not None:
        return read_index(index, storage_options)
    manifest = find_manifest(urls[0], storage_options)
    if manifest is not None:
        return manifest_counts(manifest, manifest_candidate(urls[0]) or "manifest")
    beside = f"{urls[0].rpartition('/')[0]}/{WIDS_INDEX_NAME}"
    text = read_remote_text(beside, storage_options, "shard index")
    return None if text is None else wids_counts(text, beside)


def read_index(path: str, storage_options: dict[str, Any] | None) -> CountSource:
    """``data.index``: a wids shard index or a kdcache manifest (told apart by their keys)."""
    try:
        # a cast: fsspec.open is unannotated, so pyright infers a list too (one path: one file)
        opened = cast(OpenFile, fsspec.open(path, "rt", **(storage_options or {})))
        with opened as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"data.index: {path!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(
            f"data.index: cannot read {path!r} ({type(exc).__name__}: {exc})"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"data.index: {path!r} is not JSON ({exc})") from None
    if isinstance(data, dict) and "shardlist" not in data and "shards" in data:
        return manifest_counts(parse_manifest(text, path), path)
    return wids_counts(text, path)


def manifest_counts(manifest: Manifest, path: str) -> CountSource:
    sizes = manifest.sizes or [None] * len(manifest.shards)
    digests = manifest.key_digests or [""] * len(manifest.shards)
    entries = {
        name: IndexEntry(count, size, digest)
        for name, count, size, digest in zip(
            manifest.shards, manifest.counts, sizes, digests, strict=True
        )
    }
    return CountSource(path, entries, manifest)


def wids_counts(text: str, path: str) -> CountSource:
    """A WebDataset (wids) shard index: ``shardlist`` entries with ``url`` and ``nsamples``, and
    ``filesize`` when ``widsindex create`` wrote it. Shards are matched by file name."""
    try:
        data = json.loads(text)
        entries = {
            shard_name(str(item["url"])): IndexEntry(
                int(item["nsamples"]),
                int(item["filesize"]) if item.get("filesize") is not None else None,
            )
            for item in data["shardlist"]
        }
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"shard index {path!r} is not a WebDataset shard index (expected "
            '{"shardlist": [{"url": ..., "nsamples": N, "filesize": B}, ...]}; '
            f"{type(exc).__name__}: {exc})"
        ) from None
    return CountSource(path, entries)


# ---- sizes ---------------------------------------------------------------------------------------


def shard_sizes(urls: list[str], storage_options: dict[str, Any] | None = None) -> list[int | None]:
    """Each shard's size in bytes; a missing shard is a DataError naming it. A ``pipe:`` command
    has the size of the local file it reads, else None (unknown: the worker that runs it checks
    the shard's count and keys against the index).

    Local files are stat'ed; remote shards come from one listing of each directory (fsspec caches
    listings, so a directory that the glob of ``data.shards`` listed costs no request), falling
    back to one metadata request per shard where a directory cannot be listed (plain HTTP)."""
    if not urls:
        return []
    if any(is_pipe(u) for u in urls):  # a list mixing commands and files: each on its own
        return [_pipe_size(u) if is_pipe(u) else shard_sizes([u], storage_options)[0] for u in urls]
    if "://" not in urls[0] or urls[0].startswith("file://"):
        return [_local_size(u) for u in urls]
    fs, _ = fsspec.core.url_to_fs(urls[0], **(storage_options or {}))
    listings: dict[str, dict[str, int] | None] = {}
    return [_remote_size(fs, url, listings) for url in urls]


def _pipe_size(url: str) -> int | None:
    path = pipe_local_file(url)
    return None if path is None else os.stat(path).st_size


def _local_size(url: str) -> int:
    path = url.removeprefix("file://")
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise DataError(f"shard {url!r} does not exist") from None


def _remote_size(fs, url: str, listings: dict[str, dict[str, int] | None]) -> int:
    parent = url.rpartition("/")[0]
    if parent not in listings:
        listings[parent] = _listing(fs, parent)
    listing = listings[parent]
    if listing is not None:
        if shard_name(url) not in listing:
            raise DataError(f"shard {url!r} does not exist")
        return listing[shard_name(url)]
    try:
        return int(fs.size(fs._strip_protocol(url)))
    except FileNotFoundError:
        raise DataError(f"shard {url!r} does not exist") from None


def _listing(fs, parent: str) -> dict[str, int] | None:
    """``{file name: size}`` of a remote directory, None if it cannot be listed."""
    try:
        entries = fs.ls(fs._strip_protocol(parent), detail=True)
    except FileNotFoundError:
        return {}
    except (NotImplementedError, OSError, ValueError):
        return None
    return {
        shard_name(e["name"]): int(e["size"])
        for e in entries
        if e.get("type") == "file" and e.get("size") is not None
    }
