"""The JSON manifest written beside a split's shards by ``kdcache shards``.

A manifest lists the shards of one split in order, their sample counts, the class names and where
the data came from. Precompute and the trainer use it for class names and fast planning; the
shards themselves stay the source of truth (planning re-reads their headers).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kdcache.errors import DataError

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = "-manifest.json"
MANIFEST_VERSION = 1


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
    if "://" in first_shard:
        return _find_remote_manifest(first_shard, storage_options)
    path = Path(first_shard)
    if "-" not in path.stem:
        return None
    prefix = path.stem.rsplit("-", 1)[0]
    candidate = path.parent / f"{prefix}{MANIFEST_SUFFIX}"
    return load_manifest(candidate) if candidate.exists() else None


def _find_pipe_manifest(command: str) -> Manifest | None:
    """The manifest beside the tar a ``pipe:`` command reads, when that is a local file."""
    words = [w for w in command[len("pipe:") :].split() if w.endswith(".tar")]
    if not words or "://" in words[-1] or not Path(words[-1]).is_file():
        return None
    return find_manifest(words[-1])


def _find_remote_manifest(
    first_shard: str, storage_options: dict[str, Any] | None
) -> Manifest | None:
    parent, _, name = first_shard.rpartition("/")
    stem = PurePosixPath(name).stem
    if "?" in first_shard or "-" not in stem or "://" not in parent:
        return None
    candidate = f"{parent}/{stem.rsplit('-', 1)[0]}{MANIFEST_SUFFIX}"
    try:
        with fsspec.open(candidate, "rt", **(storage_options or {})) as handle:
            text = handle.read()
    except FileNotFoundError:
        return None
    except (
        OSError
    ) as exc:  # e.g. no permission on the manifest alone: the shards stay the source of truth
        log.warning(
            "cannot read the manifest %s (%s); going on without it", candidate, type(exc).__name__
        )
        return None
    return parse_manifest(text, candidate)
