"""The JSON manifest written beside a split's shards by ``kdcache shards``.

A manifest lists the shards of one split in order, their sample counts, sizes and key digests, the
class names and where the data came from. Precompute plans from it without reading the shards
(names, counts, and sizes checked against one listing of the shard directory; see
:mod:`kdcache.shards.index`), and the trainer takes its counts and class names from it. The shards
stay the source of truth: workers check every shard's keys against the manifest as they read it.

Version 2 added ``sizes`` and ``key_digests``; version-1 manifests (without them) are still read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any, cast

import fsspec
from fsspec.core import OpenFile
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdcache.core.errors import DataError

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = "-manifest.json"
MANIFEST_VERSION = 2


class Manifest(BaseModel):
    """Shards of one split, written as ``<dir>/<prefix>-manifest.json``."""

    model_config = ConfigDict(extra="forbid")

    version: int = MANIFEST_VERSION
    split: str
    """Split name, e.g. ``train`` or ``test``; also the default shard prefix."""
    shards: list[str]
    """Shard file names (no directory), in order."""
    counts: list[int]
    """Samples per shard, same order as ``shards``."""
    num_samples: int
    num_classes: int
    class_names: list[str] = Field(default_factory=list)
    image_format: str
    """``png`` or ``jpg``: the extension of the image entry of every sample."""
    image_size: list[int] | None = None
    """``[H, W]`` when every image has the same size, else ``None``."""
    channels: int | None = None
    """1 (grey) or 3 (RGB) when known."""
    source: dict[str, Any] = Field(default_factory=dict)
    """What the shards were made from (kind, paths, seed ...)."""
    sizes: list[int] | None = None
    """Bytes per shard, same order as ``shards`` (version 2): planning compares them with a listing
    of the shards and scans the headers of any shard whose size changed."""
    key_digests: list[str] | None = None
    """Per-shard key digests (:func:`kdcache.shards.reading.shard_key_digest`, version 2): a worker
    refuses a shard whose keys do not match, and a rerun compares them with the cache's keys."""

    @model_validator(mode="after")
    def _same_lengths(self) -> Manifest:
        for name in ("counts", "sizes", "key_digests"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.shards):
                raise ValueError(f"{name}: {len(values)} entries for {len(self.shards)} shards")
        return self


def shard_key_digest(keys: list[str] | tuple[str, ...]) -> str:
    """One shard's key digest (``key_digests`` of a manifest): its keys, in order."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode() + b"\n")
    return digest.hexdigest()


def manifest_path(shard_dir: str | Path, prefix: str) -> Path:
    return Path(shard_dir) / f"{prefix}{MANIFEST_SUFFIX}"


def save_manifest(manifest: Manifest, shard_dir: str | Path, prefix: str) -> Path:
    path = manifest_path(shard_dir, prefix)
    path.write_text(json.dumps(manifest.model_dump(), indent=2) + "\n")
    return path


def load_manifest(path: str | Path) -> Manifest:
    return parse_manifest(Path(path).read_text(), str(path))


def parse_manifest(text: str, where: str) -> Manifest:
    """A manifest from its JSON text; a malformed one is a DataError naming the file and the first
    problems (the shards stay the source of truth: fix or remove it)."""
    try:
        return Manifest.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'JSON'}: {e['msg']}" for e in exc.errors()[:3]
        )
        more = f" (and {exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
        raise DataError(
            f"manifest {where!r} beside the shards is not a valid kdcache manifest: "
            f"{problems}{more}. Fix or remove it (the shards are read anyway; data.num_classes and "
            "data.class_names can be given in the config instead)"
        ) from None


def find_manifest(
    first_shard: str, storage_options: dict[str, Any] | None = None
) -> Manifest | None:
    """The manifest beside a shard named ``<prefix>-NNNNNN.tar``, if there is one: a local file, or
    for a URL (``s3://...``) the object beside it, read with ``storage_options`` (the shards').
    For a ``pipe:`` command, the manifest beside the local file it names (``pipe:cat /d/x.tar``),
    if any. A malformed manifest is a DataError naming it."""
    if first_shard.startswith("pipe:"):
        return _find_pipe_manifest(first_shard)
    candidate = manifest_candidate(first_shard)
    if candidate is None:
        return None
    if "://" not in candidate:
        return load_manifest(candidate) if Path(candidate).exists() else None
    text = read_remote_text(candidate, storage_options, "manifest")
    return None if text is None else parse_manifest(text, candidate)


def _find_pipe_manifest(command: str) -> Manifest | None:
    """The manifest beside the tar a ``pipe:`` command reads, when that is a local file."""
    words = [w for w in command[len("pipe:") :].split() if w.endswith(".tar")]
    if not words or "://" in words[-1] or not Path(words[-1]).is_file():
        return None
    return find_manifest(words[-1])


def manifest_candidate(first_shard: str) -> str | None:
    """Where the manifest of ``<dir>/<prefix>-NNNNNN.tar`` would be:
    ``<dir>/<prefix>-manifest.json`` (None for a name without a ``-`` or a URL with a query)."""
    parent, _, name = first_shard.rpartition("/")
    stem = PurePosixPath(name).stem
    if "?" in first_shard or "-" not in stem:
        return None
    manifest = f"{stem.rsplit('-', 1)[0]}{MANIFEST_SUFFIX}"
    return f"{parent}/{manifest}" if parent else manifest


def read_remote_text(
    url: str, storage_options: dict[str, Any] | None, what: str = "file"
) -> str | None:
    """The text of an object beside the shards, or None when it does not exist or cannot be read
    (a warning then: the shards stay the source of truth)."""
    try:
        # a cast: fsspec.open is unannotated, so pyright infers a list too (one path: one file)
        opened = cast(OpenFile, fsspec.open(url, "rt", **(storage_options or {})))
        with opened as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:  # e.g. no permission on this object alone
        log.warning(
            "cannot read the %s %s (%s); going on without it", what, url, type(exc).__name__
        )
        return None
