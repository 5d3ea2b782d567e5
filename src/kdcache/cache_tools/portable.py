"""Caches that travel: a generated cache card, and one archive to publish or fetch a cache.

A cache directory may hold, beside its Zarr arrays (which Zarr and kdcache never mistake for
data): ``runs/`` (precompute's run records), ``README.md`` (the cache card: data, recipe,
teachers with their accuracy on the cached views, rendering and bytes per view, how to use it)
and ``weights/`` (teachers' checkpoints shipped with the cache). A teacher whose recorded
checkpoint path does not exist on this machine is looked up in ``weights/<digest>/`` (its
weights digest is checked either way), so ``kdcache verify`` runs on an unpacked cache as it
ran where the cache was made.

``kdcache pack`` writes the cache directory (its card regenerated, the teachers' checkpoints
with ``--weights``) as one uncompressed tar (the chunks are compressed already) to a path or any
fsspec URL, ending with ``kdcache-pack.json``: every file's size and SHA-256. ``kdcache unpack``
extracts it, refusing absolute paths, ``..`` and links, checks every file against that list and
then the cache's integrity, and removes what it wrote when a check fails.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import cast

import fsspec
import numpy as np
from fsspec.core import OpenFile

from kdcache.cache.reader import read_block
from kdcache.cache.store import CacheStore, TeacherMeta, open_store
from kdcache.core.errors import CacheError, ConfigError
from kdcache.models.weights import needs_local_copy

CARD = "README.md"
WEIGHTS = "weights"
PACK_MANIFEST = "kdcache-pack.json"
PACK_FORMAT = 1
_CHUNK = 1 << 20


# ---- the cache card ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherCard:
    """What the card says of one teacher."""

    name: str
    model: str
    checkpoint: str | None
    digest: str
    k: int
    encoding: str
    rendering: str
    bytes_per_view: float
    top1: float | None
    """Top-1 (%) of its top class against the label, over labelled unmixed views."""


def teacher_cards(store: CacheStore) -> list[TeacherCard]:
    """Each finished teacher's card entry; accuracy from one pass over the shards' blocks."""
    hits, counted = _top1_counts(store)
    views = max(1, sum(store.meta.fingerprint.counts) * store.meta.num_views)
    cards = []
    for name in store.teachers:
        meta = store.teacher_meta(name)
        top1 = 100.0 * hits[name] / counted if counted else None
        cards.append(_card_of(name, meta, _stored_bytes(store, name) / views, top1))
    return cards


def _card_of(name: str, meta: TeacherMeta, bytes_per_view: float, top1: float | None):
    checkpoint = meta.model.get("checkpoint")
    r = meta.rendering
    rendering = f"{r.size}px {r.interpolation}, mean {list(r.mean)}, std {list(r.std)}"
    model = (
        "ensemble of " + str(len(meta.ensemble.members)) if meta.ensemble else meta.model["name"]
    )
    return TeacherCard(
        name=name,
        model=model,
        checkpoint=PurePosixPath(checkpoint).name if checkpoint else None,
        digest=meta.weights_digest,
        k=meta.k,
        encoding=meta.encoding,
        rendering=rendering,
        bytes_per_view=bytes_per_view,
        top1=top1,
    )


def _top1_counts(store: CacheStore) -> tuple[dict[str, int], int]:
    """Per teacher: views whose top class is the label; and how many views were counted
    (labelled, valid, not mixed with another sample)."""
    teachers = store.teachers
    hits = dict.fromkeys(teachers, 0)
    counted = 0
    for shard in range(store.num_shards):
        block = read_block(store, shard, teachers)
        mask = _countable(block)
        counted += int(mask.sum())
        for name in teachers:
            top = block.teachers[name].topk_idx[..., 0]
            hits[name] += int(((top == block.labels[:, None]) & mask).sum())
    return hits, counted


def _countable(block) -> np.ndarray:
    """``[n, A]``: valid, labelled, unmixed views."""
    partner = block.view_params.arrays.get("mix_partner")
    shape = (len(block), block.view_params.num_views)
    unmixed = np.ones(shape, bool) if partner is None else partner == 0
    rows = (block.status == 1) & (block.labels >= 0)
    return unmixed & rows[:, None]


def _stored_bytes(store: CacheStore, teacher: str) -> int:
    """Bytes a teacher's arrays take in storage (compressed chunks, metadata)."""
    fs, root = fsspec.core.url_to_fs(store.path)
    return int(fs.du(f"{root.rstrip('/')}/teachers/{teacher}"))


def cache_card(store: CacheStore) -> str:
    """The cache card, Markdown."""
    meta = store.meta
    created = meta.created
    cards = teacher_cards(store)
    lines = [
        f"# kdcache cache `{PurePosixPath(store.path.rstrip('/')).name}`",
        "",
        f"Teacher soft labels (top-k logits) for {sum(meta.fingerprint.counts)} samples x "
        f"{meta.num_views} augmented views, {meta.num_classes} classes, made by kdcache "
        f"{created.get('kdcache', '?')} on {created.get('time', '?')} "
        f"(format version {meta.format_version}).",
        "",
        "## Data",
        "",
        f"{len(meta.fingerprint.shards)} WebDataset shards: "
        f"{_span(meta.fingerprint.shards)}; key digest `{meta.fingerprint.key_digest}`.",
    ]
    if meta.class_names:
        shown = ", ".join(meta.class_names[:20])
        lines.append(f"Classes: {shown}{' ...' if len(meta.class_names) > 20 else ''}.")
    lines += [
        "",
        "## Views",
        "",
        f"Recipe: {meta.recipe.describe()}; seed {meta.seed}. The view parameters are stored, so",
        "every view replays exactly (docs/format.md in the kdcache repository).",
        "",
        "## Teachers",
        "",
        "| teacher | model | checkpoint | weights digest | k | encoding | rendering "
        "| bytes/view | top-1 on its views |",
        "|---|---|---|---|---|---|---|---|---|",
        *(_teacher_row(card) for card in cards),
        "",
        "Top-1: the teacher's top class against the label, over labelled views not mixed with "
        "another sample.",
        "",
        "## Use it",
        "",
        "```yaml",
        "# kdcache train config (the same shards, in any order or subset)",
        f"cache: {{path: {store.path}}}",
        f"teacher: {{mode: cache, name: {cards[0].name if cards else 'TEACHER'}}}",
        "```",
        "",
        "`kdcache verify CACHE` recomputes a sample of views (checkpoints are found at their",
        "recorded path or in this cache's `weights/`); `kdcache inspect CACHE` shows the",
        "teachers' statistics.",
        "",
    ]
    return "\n".join(lines)


def _span(names: list[str]) -> str:
    return f"`{names[0]}`" if len(names) == 1 else f"`{names[0]}` ... `{names[-1]}`"


def _teacher_row(card: TeacherCard) -> str:
    top1 = "n/a" if card.top1 is None else f"{card.top1:.2f} %"
    cells = [
        card.name,
        card.model,
        card.checkpoint or "-",
        f"`{card.digest[:12]}`",
        str(card.k),
        card.encoding,
        card.rendering,
        f"{card.bytes_per_view:.1f}",
        top1,
    ]
    return "| " + " | ".join(cells) + " |"


def write_card(cache_path: str) -> str:
    """Write ``<cache>/README.md``; returns its text."""
    text = cache_card(open_store(cache_path))
    # a cast: fsspec.open is unannotated, so pyright infers a list too (one path: one file)
    with cast(OpenFile, fsspec.open(f"{cache_path.rstrip('/')}/{CARD}", "w")) as stream:
        stream.write(text)
    return text


# ---- checkpoints shipped with a cache ------------------------------------------------------------


def shipped_name(checkpoint: str, digest: str) -> str:
    """Where a checkpoint ships in a cache: ``weights/<weights digest>/<file name>`` (teachers'
    files are often all ``model_final.pt``; the digest tells them apart)."""
    return f"{WEIGHTS}/{digest}/{PurePosixPath(checkpoint.removeprefix('file://')).name}"


def shipped_checkpoint(cache_path: str, checkpoint: str | None, digest: str) -> str | None:
    """``checkpoint`` when it exists here (or is a URL), else its copy shipped in the cache's
    ``weights/`` when there is one, else ``checkpoint`` (whose error then names it)."""
    if not checkpoint or needs_local_copy(checkpoint):
        return checkpoint
    if Path(checkpoint.removeprefix("file://")).is_file():
        return checkpoint
    candidate = f"{cache_path.rstrip('/')}/{shipped_name(checkpoint, digest)}"
    fs, path = fsspec.core.url_to_fs(candidate)
    return candidate if fs.isfile(path) else checkpoint


# ---- pack and unpack ----------------------------------------------------------------------------


@dataclass
class Packed:
    """What ``kdcache pack`` wrote: the archive, its files and bytes, the weights it ships."""

    archive: str
    files: int
    bytes: int
    weights: dict[str, str] = field(default_factory=dict)
    """Teacher -> its checkpoint's name in the archive (``weights/<digest>/<file>``)."""


def pack_cache(
    cache_path: str, archive: str, *, weights: bool = False, overwrite: bool = False
) -> Packed:
    """Write the cache (and with ``weights`` its teachers' local checkpoints) as one tar."""
    store = open_store(cache_path)
    card = cache_card(store).encode()
    extra = _weight_files(store) if weights else {}
    fs, target = fsspec.core.url_to_fs(archive)
    if fs.exists(target) and not overwrite:
        raise ConfigError(f"{archive} exists: pass --overwrite to replace it")
    digests: dict[str, dict[str, int | str]] = {}
    shipped = {teacher: name for teacher, (_, name) in extra.items()}
    with fs.open(target, "wb") as stream, tarfile.open(fileobj=stream, mode="w|") as tar:
        _add_bytes(tar, CARD, card, digests)
        for name, opener, size in _members(cache_path, extra):
            _add_stream(tar, name, opener, size, digests)
        manifest = {"format": PACK_FORMAT, "files": digests, "weights": shipped}
        _add_bytes(tar, PACK_MANIFEST, json.dumps(manifest, indent=1).encode(), None)
    total = sum(int(d["size"]) for d in digests.values())
    return Packed(archive, len(digests), total, shipped)


def _weight_files(store: CacheStore) -> dict[str, tuple[str, str]]:
    """Teacher -> (its local checkpoint file, its name in the archive); teachers from the hub and
    stored ensembles' members are not shipped."""
    out = {}
    for name in store.teachers:
        meta = store.teacher_meta(name)
        recorded = meta.model.get("checkpoint")
        if not recorded:  # from the hub: no file to ship
            continue
        found = shipped_checkpoint(store.path, recorded, meta.weights_digest)
        if found and not needs_local_copy(found) and Path(found.removeprefix("file://")).is_file():
            local = found.removeprefix("file://")
            out[name] = (local, shipped_name(recorded, meta.weights_digest))
    return out


def _members(
    cache_path: str, extra: dict[str, tuple[str, str]]
) -> Iterator[tuple[str, Callable, int]]:
    """The archive's files but the card: the cache's own (its old card and weights left out),
    then the shipped checkpoints."""
    for name, opener, size in _cache_files(cache_path):
        if name != CARD and not name.startswith(f"{WEIGHTS}/"):
            yield name, opener, size
    for local, name in sorted(set(extra.values()), key=lambda pair: pair[1]):
        path = Path(local)
        yield name, (lambda p=path: p.open("rb")), path.stat().st_size


def _cache_files(cache_path: str) -> Iterator[tuple[str, Callable, int]]:
    """(name relative to the cache, opener, size) of every file under the cache, sorted."""
    fs, root = fsspec.core.url_to_fs(cache_path)
    root = root.rstrip("/")
    for path in sorted(fs.find(root)):
        name = path[len(root) + 1 :]
        yield name, (lambda p=path: fs.open(p, "rb")), int(fs.size(path))


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, digests: dict | None) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
    if digests is not None:
        digests[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _add_stream(tar: tarfile.TarFile, name: str, opener, size: int, digests: dict) -> None:
    """Add a file, hashing it as the tar reads it (one pass over its bytes)."""
    info = tarfile.TarInfo(name)
    info.size = size
    digest = hashlib.sha256()
    with opener() as source:
        tar.addfile(info, _Hashing(source, digest))
    digests[name] = {"size": size, "sha256": digest.hexdigest()}


class _Hashing(io.RawIOBase):
    """A reader that feeds what passes through it to a hash."""

    def __init__(self, source, digest):
        self.source = source
        self.digest = digest

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.digest.update(data)
        return data


def unpack_cache(archive: str, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Extract an archive of ``kdcache pack`` into ``out_dir`` (a new cache directory), check
    every file's size and SHA-256 against its list, then the cache's integrity."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty: pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        seen, manifest = _extract(archive, out)
        _check_files(archive, seen, manifest)
        _check_integrity(out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def _extract(archive: str, out: Path) -> tuple[dict[str, dict], dict]:
    seen: dict[str, dict] = {}
    manifest: dict | None = None
    opened = cast(OpenFile, fsspec.open(archive, "rb"))  # unannotated: see write_card
    with opened as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            name = _safe_name(archive, member)
            source = tar.extractfile(member)
            if source is None:  # _safe_name admits regular files only, which always extract
                raise CacheError(f"{archive}: member {name!r} cannot be read")
            if name == PACK_MANIFEST:
                manifest = json.loads(source.read())
                continue
            seen[name] = _write_member(source, out / name)
    if manifest is None:
        raise CacheError(
            f"{archive}: no {PACK_MANIFEST} (not an archive of `kdcache pack`, or cut)"
        )
    return seen, manifest


def _safe_name(archive: str, member: tarfile.TarInfo) -> str:
    name = member.name
    parts = PurePosixPath(name).parts
    if not member.isfile() or name.startswith("/") or ".." in parts or not parts:
        raise CacheError(f"{archive}: refusing member {name!r} (not a plain relative file)")
    return name


def _write_member(source, path: Path) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with open(path, "wb") as target:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            target.write(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _check_files(archive: str, seen: dict[str, dict], manifest: dict) -> None:
    listed = manifest.get("files", {})
    missing = sorted(set(listed) - set(seen))
    extra = sorted(set(seen) - set(listed))
    wrong = sorted(n for n in set(seen) & set(listed) if seen[n] != listed[n])
    for problem, names in (("missing", missing), ("not listed", extra), ("damaged", wrong)):
        if names:
            raise CacheError(
                f"{archive}: {len(names)} file(s) {problem} (e.g. {names[0]!r}): the archive is "
                "not what `kdcache pack` wrote; fetch it again"
            )


def _check_integrity(out: Path) -> None:
    from kdcache.cache_tools.validate import validate_cache

    result = validate_cache(open_store(str(out)))
    if result.problems:
        raise CacheError(f"{out}: the unpacked cache fails validation: {result.problems[0]}")
