"""Write image-classification data as WebDataset shards plus a manifest (``kdcache shards``).

Sources yield :class:`SourceSample` objects (a key, a label and either a uint8 array or the bytes
of a PNG/JPEG file; :class:`kdcache.shards.reading.Sample` is one read back from a shard);
:func:`write_split` encodes arrays, groups samples into plain tar shards named
``<prefix>-NNNNNN.tar`` with entries ``<key>.png|jpg`` and ``<key>.cls``, and writes
``<prefix>-manifest.json`` last, as the split's completion mark.

Sources: :func:`synthetic_samples` (seeded, learnable class patterns), :func:`idx_splits`
(MNIST / Fashion-MNIST IDX files) and :func:`folder_splits` (ImageFolder trees).
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import logging
import os
import re
import struct
import sys
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm
from webdataset.writer import TarWriter  # the package stub does not re-export it

from kdcache.core.errors import ConfigError, DataError, DuplicateKeyError
from kdcache.shards.manifest import (
    MANIFEST_SUFFIX,
    Manifest,
    manifest_path,
    save_manifest,
    shard_key_digest,
)

logger = logging.getLogger(__name__)

IMAGE_FORMATS = ("png", "jpg")
SHARD_PATTERN = "{prefix}-{index:06d}.tar"
SYNTHETIC_VERSION = 1
"""Bump when the synthetic generator changes, so old and new data are told apart."""
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IDX_NAME = re.compile(r"^(train|t10k)-(images|labels)[-.]idx([13])-ubyte(\.gz)?$")
IDX_SPLITS = {"train": "train", "t10k": "test"}
FOLDER_EXTENSIONS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}
FOLDER_SPLITS = ("train", "val", "test")
FILE_MAP_SUFFIX = "-files.tsv"
TIMM_INFO = "_info.json"
"""timm's WebDataset reader (``create_dataset("wds/NAME", root=DIR, split=...)``) reads the
splits' shard names and sample counts from this file beside the shards."""
_TAR_MTIME = 0  # fixed entry time: the same data gives byte-identical shards
_PROGRESS_MIN = 5000  # show a progress bar from this many samples on (and only on a tty)


class ShardsExistError(DataError, FileExistsError):
    """Shards or a manifest already exist where a split would be written."""


@dataclass(frozen=True, slots=True)
class SourceSample:
    """One sample to write: a uint8 image (H×W or H×W×C) or encoded PNG/JPEG bytes, and a label."""

    key: str
    label: int
    image: np.ndarray | None = None
    data: bytes | None = None
    ext: str | None = None
    """``png`` or ``jpg``: the format of ``data``."""
    origin: str | None = None
    """Where the sample came from (a file), for error messages."""


@dataclass(frozen=True, slots=True)
class ShardOptions:
    """How to write shards; shared by every source."""

    shard_size: int = 1000
    """Samples per shard (the last shard of a split may hold fewer)."""
    image_format: str = "png"
    """Encoding of array images (``png`` or ``jpg``); target format of mixed image folders."""
    quality: int = 95
    """JPEG quality when ``image_format`` is ``jpg``."""
    prefix: str | None = None
    """Shard name prefix; default the split name. With several splits, ``-<split>`` is appended
    unless the prefix contains ``{split}``."""
    limit: int | None = None
    """Write only the first ``limit`` samples of each split."""
    overwrite: bool = False
    """Replace existing shards and manifest of the same prefix instead of refusing."""

    def __post_init__(self) -> None:
        _check_positive("shard_size", self.shard_size)
        if self.limit is not None:
            _check_positive("limit", self.limit)
        if self.image_format not in IMAGE_FORMATS:
            raise ConfigError(
                f"image_format: expected one of {IMAGE_FORMATS}, found {self.image_format!r}"
            )
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"quality: expected 1..100, found {self.quality}")
        if self.prefix is not None and not re.fullmatch(r"[\w{}-]+", self.prefix):
            raise ConfigError(
                f"prefix: expected letters, digits, '_' or '-', found {self.prefix!r}"
            )

    def prefix_for(self, split: str, num_splits: int) -> str:
        """The shard prefix of ``split`` when ``num_splits`` splits are written together."""
        if self.prefix is None:
            return split
        if "{split}" in self.prefix:
            return self.prefix.replace("{split}", split)
        return f"{self.prefix}-{split}" if num_splits > 1 else self.prefix


@dataclass(slots=True)
class _SplitStats:
    """What :func:`write_split` learns about a split while writing it."""

    keys: set[str] = field(default_factory=set)
    sizes: set[tuple[int, int]] = field(default_factory=set)
    channels: set[int | None] = field(default_factory=set)
    reencoded: int = 0
    files: list[tuple[str, str, int]] = field(default_factory=list)
    """(key, the file or record it came from, label) of samples that name their origin."""


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: expected a positive integer, found {value!r}")


# --------------------------------------------------------------------------------------------
# Encoding


def encode_image(image: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    """PNG or JPEG bytes of a uint8 H×W (grey, mode L) or H×W×3 (RGB) array."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if (
        image.dtype != np.uint8
        or image.ndim not in (2, 3)
        or (image.ndim == 3 and image.shape[2] != 3)
    ):
        raise DataError(f"expected a uint8 H×W or H×W×3 image, found {image.dtype} {image.shape}")
    return _save(Image.fromarray(image), image_format, quality)


def _save(pil: Image.Image, image_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpg":
        if pil.mode not in ("L", "RGB"):
            pil = pil.convert("L" if pil.mode in ("LA", "I", "I;16") else "RGB")
        pil.save(buffer, format="JPEG", quality=quality)
    else:
        pil.save(buffer, format="PNG")
    return buffer.getvalue()


def sniff_format(data: bytes) -> str | None:
    """``png`` or ``jpg`` from the file's magic bytes, else ``None``."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    return None


def _channels_of_mode(mode: str) -> int | None:
    return {"L": 1, "I": 1, "I;16": 1, "1": 1, "RGB": 3, "YCbCr": 3}.get(mode)


def _encode_sample(
    sample: SourceSample, image_format: str, quality: int, stats: _SplitStats
) -> bytes:
    """The sample's image as ``image_format`` bytes; records its size and channels in ``stats``."""
    if sample.data is None:
        if sample.image is None:
            raise DataError(f"sample {sample.key!r}: has neither an image nor data")
        stats.sizes.add(sample.image.shape[:2])
        stats.channels.add(1 if sample.image.ndim == 2 else sample.image.shape[2])
        return encode_image(sample.image, image_format, quality)
    try:
        pil = Image.open(io.BytesIO(sample.data))
        stats.sizes.add((pil.height, pil.width))
        stats.channels.add(_channels_of_mode(pil.mode))
        if sample.ext == image_format:
            return sample.data
        stats.reencoded += 1
        return _save(pil, image_format, quality)
    except (OSError, ValueError) as exc:
        raise DataError(
            f"sample {sample.key!r} ({sample.origin}): cannot read image: {exc}"
        ) from exc


# --------------------------------------------------------------------------------------------
# Writing


def shard_file_name(prefix: str, index: int) -> str:
    return SHARD_PATTERN.format(prefix=prefix, index=index)


def shard_url(out_dir: str | Path, manifest: Manifest) -> str:
    """A WebDataset brace URL of a split's shards, e.g. ``DIR/train-{000000..000009}.tar``."""
    first = manifest.shards[0]
    last = manifest.shards[-1]
    if first == last:
        return str(Path(out_dir) / first)
    prefix = first[: -len("000000.tar")]
    return str(
        Path(out_dir) / f"{prefix}{{{first[len(prefix) : -4]}..{last[len(prefix) : -4]}}}.tar"
    )


def existing_outputs(out_dir: str | Path, prefix: str) -> list[Path]:
    """Shards ``<prefix>-NNNNNN.tar`` and the manifest of ``prefix`` already in ``out_dir``."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    pattern = re.compile(re.escape(prefix) + r"-\d{6}\.tar")
    found = sorted(p for p in out_dir.iterdir() if pattern.fullmatch(p.name))
    manifest = manifest_path(out_dir, prefix)
    return ([manifest] if manifest.exists() else []) + found


def check_writable(out_dir: str | Path, prefix: str, overwrite: bool) -> None:
    """Refuse (:class:`ShardsExistError`) to write over existing outputs unless ``overwrite``."""
    existing = existing_outputs(out_dir, prefix)
    if existing and not overwrite:
        raise ShardsExistError(
            f"{existing[0]} already exists ({len(existing)} file(s) of prefix {prefix!r} in "
            f"{out_dir}); pass --overwrite (overwrite=True) to replace them, "
            "or choose --prefix/--out"
        )


def write_split(
    samples: Iterable[SourceSample],
    out_dir: str | Path,
    prefix: str,
    options: ShardOptions,
    *,
    num_classes: int,
    split: str | None = None,
    class_names: Sequence[str] = (),
    source: Mapping[str, Any] | None = None,
    total: int | None = None,
) -> Manifest:
    """Write ``samples`` as ``out_dir/<prefix>-NNNNNN.tar`` shards, then the manifest; return it.

    ``options`` says how (shard size, image format, quality, overwrite) and how many (``limit``:
    the first samples only); ``prefix`` is the shard name itself (``options.prefix`` is the
    template :func:`write_splits` makes it from)."""
    if options.limit is not None:
        samples = itertools.islice(samples, options.limit)
        total = min(total, options.limit) if total is not None else options.limit
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_writable(out_dir, prefix, options.overwrite)
    manifest_path(out_dir, prefix).unlink(missing_ok=True)  # the manifest comes back last
    file_map_path(out_dir, prefix).unlink(missing_ok=True)
    start = time.perf_counter()
    stats = _SplitStats()
    written = _write_shards(samples, out_dir, prefix, options, num_classes, stats, total)
    if not written:
        raise DataError(f"split {split or prefix!r}: no samples to write to {out_dir}")
    _remove_stale_shards(out_dir, prefix, keep={w.name for w in written})
    source = {**(source or {})}
    if stats.files:
        source["files"] = write_file_map(out_dir, prefix, stats.files).name
    image_format = options.image_format
    manifest = _manifest(
        split or prefix, written, num_classes, class_names, image_format, stats, source
    )
    save_manifest(manifest, out_dir, prefix)
    update_timm_info(out_dir, manifest)
    logger.info(
        "%s: %d samples in %d shard(s) %s in %.1f s%s",
        manifest.split,
        manifest.num_samples,
        len(written),
        shard_url(out_dir, manifest),
        time.perf_counter() - start,
        f" ({stats.reencoded} re-encoded to {image_format})" if stats.reencoded else "",
    )
    return manifest


def _write_shards(
    samples: Iterable[SourceSample],
    out_dir: Path,
    prefix: str,
    options: ShardOptions,
    num_classes: int,
    stats: _SplitStats,
    total: int | None,
) -> list[WrittenShard]:
    """Write shards of ``options.shard_size`` samples each (images encoded as ``options`` says);
    return what the manifest records of each."""
    shard_size = options.shard_size
    image_format = options.image_format
    quality = options.quality
    written: list[WrittenShard] = []
    iterator = iter(samples)
    show = sys.stderr.isatty() and (total or 0) >= _PROGRESS_MIN
    with tqdm(total=total, unit="img", desc=prefix, disable=not show, leave=False) as bar:
        while (first := next(iterator, None)) is not None:
            name = shard_file_name(prefix, len(written))
            chunk = itertools.chain([first], itertools.islice(iterator, shard_size - 1))
            encoded = (_checked(s, name, num_classes, image_format, quality, stats) for s in chunk)
            written.append(_write_tar(out_dir / name, encoded, bar))
    return written


def _checked(
    sample: SourceSample,
    shard: str,
    num_classes: int,
    image_format: str,
    quality: int,
    stats: _SplitStats,
) -> dict[str, Any]:
    """The tar entries of ``sample`` after checking its key and label."""
    key = sample.key
    if not key or "." in key or "/" in key:
        raise DataError(f"shard {shard}: key {key!r} must be non-empty and contain no '.' or '/'")
    if key in stats.keys:
        raise DuplicateKeyError(
            f"shard {shard}: key {key!r} occurs twice ({sample.origin or 'no origin'})"
        )
    if not 0 <= sample.label < num_classes:
        raise DataError(
            f"shard {shard}: key {key!r}: label {sample.label} is not in 0..{num_classes - 1}"
        )
    stats.keys.add(key)
    if sample.origin is not None:
        stats.files.append((key, sample.origin, int(sample.label)))
    data = _encode_sample(sample, image_format, quality, stats)
    return {"__key__": key, image_format: data, "cls": str(int(sample.label)).encode("ascii")}


def update_timm_info(out_dir: Path, manifest: Manifest) -> None:
    """Record a split in ``_info.json`` (timm's format: name, sample count, shard names and
    lengths per split), keeping the other splits already recorded there."""
    path = out_dir / TIMM_INFO
    try:
        info = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        info = {}  # not ours or damaged: rewritten whole
    info.setdefault("name", out_dir.resolve().name)
    info.setdefault("splits", {})[manifest.split] = {
        "name": manifest.split,
        "num_samples": manifest.num_samples,
        "filenames": list(manifest.shards),
        "shard_lengths": list(manifest.counts),
    }
    path.write_text(json.dumps(info, indent=1) + "\n")


def file_map_path(out_dir: str | Path, prefix: str) -> Path:
    """``<out>/<prefix>-files.tsv``: which file (or record) each key of a split came from."""
    return Path(out_dir) / f"{prefix}{FILE_MAP_SUFFIX}"


def write_file_map(out_dir: Path, prefix: str, files: list[tuple[str, str, int]]) -> Path:
    """The key -> origin map of a split, one ``key<TAB>origin<TAB>label`` line per sample in
    shard order, so a suspicious target can be traced back to its image."""
    path = file_map_path(out_dir, prefix)
    lines = ["key\tfile\tlabel", *(f"{key}\t{origin}\t{label}" for key, origin, label in files)]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_file_map(path: str | Path) -> dict[str, str]:
    """key -> origin, from a ``<prefix>-files.tsv`` map."""
    rows = Path(path).read_text().splitlines()[1:]
    return dict(tuple(row.split("\t")[:2]) for row in rows if row)  # type: ignore[misc]


@dataclass(frozen=True)
class WrittenShard:
    """What the manifest records of a shard: planning uses it instead of reading the tar."""

    name: str
    count: int
    size: int
    key_digest: str


def _write_tar(path: Path, entries: Iterable[dict[str, Any]], bar: tqdm) -> WrittenShard:
    """Write one shard atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    keys: list[str] = []
    try:
        with (
            open(tmp, "wb") as stream,
            TarWriter(stream, encoder=False, mtime=_TAR_MTIME) as tar,
        ):
            for entry in entries:
                tar.write(entry)
                keys.append(entry["__key__"])
                bar.update(1)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return WrittenShard(path.name, len(keys), path.stat().st_size, shard_key_digest(keys))


def _remove_stale_shards(out_dir: Path, prefix: str, keep: set[str]) -> None:
    for path in existing_outputs(out_dir, prefix):
        if path.name not in keep and not path.name.endswith(MANIFEST_SUFFIX):
            logger.info("removing stale shard %s", path)
            path.unlink()


def _manifest(
    split: str,
    written: list[WrittenShard],
    num_classes: int,
    class_names: Sequence[str],
    image_format: str,
    stats: _SplitStats,
    source: Mapping[str, Any] | None,
) -> Manifest:
    size = next(iter(stats.sizes)) if len(stats.sizes) == 1 else None
    channels = next(iter(stats.channels)) if len(stats.channels) == 1 else None
    return Manifest(
        split=split,
        shards=[w.name for w in written],
        counts=[w.count for w in written],
        num_samples=sum(w.count for w in written),
        num_classes=num_classes,
        class_names=list(class_names),
        image_format=image_format,
        image_size=list(size) if size else None,
        channels=channels,
        source=dict(source or {}),
        sizes=[w.size for w in written],
        key_digests=[w.key_digest for w in written],
    )


def write_splits(
    splits: Mapping[str, tuple[Iterable[SourceSample], int | None]],
    out_dir: str | Path,
    options: ShardOptions,
    *,
    num_classes: int,
    class_names: Sequence[str] = (),
    source: Mapping[str, Any] | None = None,
) -> dict[str, Manifest]:
    """Write several splits (name -> (samples, count)) with the same options; checks all first."""
    prefixes = {name: options.prefix_for(name, len(splits)) for name in splits}
    if len(set(prefixes.values())) < len(prefixes):
        raise ConfigError(
            f"prefix: {options.prefix!r} gives several splits the same prefix: {prefixes}"
        )
    for prefix in prefixes.values():
        check_writable(out_dir, prefix, options.overwrite)
    manifests = {}
    for name, (samples, total) in splits.items():
        manifests[name] = write_split(
            samples,
            out_dir,
            prefixes[name],
            options,
            split=name,
            num_classes=num_classes,
            class_names=class_names,
            source={**(source or {}), "limit": options.limit},
            total=total,
        )
    return manifests


# --------------------------------------------------------------------------------------------
# Synthetic data


def parse_size(text: str | int | Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` from ``"28x28"``, ``"32"``, ``32`` or ``(28, 28)``; ConfigError otherwise."""
    if isinstance(text, int):
        parts: list[Any] = [text, text]
    elif isinstance(text, str):
        parts = re.split(r"[xX×]", text.strip())
        parts = parts * 2 if len(parts) == 1 else parts
    else:
        parts = list(text)
    try:
        height, width = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(
            f"size: expected HxW or one integer (e.g. 28x28 or 32), found {text!r}"
        ) from None
    if height < 4 or width < 4:
        raise ConfigError(f"size: expected at least 4x4, found {text!r}")
    return height, width


def synthetic_prototypes(
    classes: int, size: tuple[int, int], channels: int, seed: int
) -> np.ndarray:
    """Per class a smooth random pattern, float32 ``(classes, channels, H + 2m, W + 2m)``.

    Each pattern is an upsampled coarse random grid (low frequency), zero mean and unit std, plus
    a share of a group pattern common to every ``classes // 3``-th class, so some classes look
    alike.
    """
    height, width = size
    margin = _margin(size)
    grid = int(np.clip(round(min(height, width) / 6), 3, 8))
    rng = np.random.default_rng([seed, 0x5EED])
    groups = rng.normal(size=(max(1, classes // 3), 1, grid, grid))
    coarse = (
        rng.normal(size=(classes, 1, grid, grid)) + 0.8 * groups[np.arange(classes) % len(groups)]
    )
    if channels > 1:  # colour: mostly the same pattern in every channel, plus some hue
        coarse = coarse + 0.3 * rng.normal(size=(classes, channels, grid, grid))
    out = np.empty((classes, channels, height + 2 * margin, width + 2 * margin), np.float32)
    for c, ch in itertools.product(range(classes), range(channels)):
        pil = Image.fromarray(coarse[c, ch].astype(np.float32))
        out[c, ch] = np.asarray(
            pil.resize((width + 2 * margin, height + 2 * margin), Image.Resampling.BICUBIC)
        )
    out -= out.mean(axis=(1, 2, 3), keepdims=True)
    out /= out.std(axis=(1, 2, 3), keepdims=True) + 1e-6
    return out


def _margin(size: tuple[int, int]) -> int:
    """How far (pixels) a synthetic sample may shift its class pattern."""
    return max(1, min(size) // 5)


def synthetic_samples(
    split: str, num: int, *, classes: int, size: tuple[int, int], channels: int, seed: int
) -> Iterator[SourceSample]:
    """``num`` samples of ``split``: balanced labels, each its class pattern (partly mixed with
    another class), shifted, scaled in contrast and brightness, plus Gaussian noise.

    A pure function of the arguments; splits draw from independent streams of the same classes.
    """
    if channels not in (1, 3) or classes < 1:
        raise ConfigError(
            f"synthetic: expected channels 1 or 3 and classes >= 1, found {channels}, {classes}"
        )
    prototypes = synthetic_prototypes(classes, size, channels, seed)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    labels = rng.permutation(np.arange(num) % classes)
    chunk = 1024
    for start in range(0, num, chunk):
        images = _synthetic_images(prototypes, labels[start : start + chunk], size, rng)
        for offset, image in enumerate(images):
            index = start + offset
            yield SourceSample(key=f"{split}_{index:08d}", label=int(labels[index]), image=image)


def _synthetic_images(
    prototypes: np.ndarray, labels: np.ndarray, size: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """uint8 images ``(n, H, W)`` or ``(n, H, W, 3)`` of the given labels."""
    n = len(labels)
    classes = len(prototypes)
    height, width = size
    other = (labels + rng.integers(1, max(classes, 2), n)) % classes
    mix = rng.uniform(0.0, 0.45, n)[:, None, None, None]
    base = (1 - mix) * prototypes[labels] + mix * prototypes[other]
    shifts = rng.integers(0, 2 * _margin(size) + 1, (n, 2))
    crops = np.stack(
        [b[:, y : y + height, x : x + width] for b, (y, x) in zip(base, shifts, strict=True)]
    )
    contrast = rng.uniform(15.0, 45.0, n)[:, None, None, None]
    brightness = rng.uniform(-30.0, 30.0, n)[:, None, None, None]
    noise = rng.normal(0.0, 45.0, crops.shape)
    if crops.shape[1] > 1:  # colour noise is mostly luminance noise, as in photos
        noise = 0.8 * noise[:, :1] + 0.6 * noise
    images = np.clip(128 + brightness + contrast * crops + noise, 0, 255).astype(np.uint8)
    images = images.transpose(0, 2, 3, 1)
    return images[..., 0] if images.shape[3] == 1 else images


def make_synthetic_shards(
    out_dir: str | Path,
    num: int,
    test_num: int = 0,
    classes: int = 10,
    size: int | str | tuple[int, int] = 28,
    channels: int = 1,
    seed: int = 0,
    shard_size: int = 1000,
    image_format: str = "png",
    *,
    quality: int = 95,
    prefix: str | None = None,
    overwrite: bool = False,
    limit: int | None = None,
) -> dict[str, Manifest]:
    """Synthetic ``train`` (``num`` samples) and, if ``test_num``, ``test`` shards in
    ``out_dir``."""
    options = ShardOptions(
        shard_size=shard_size,
        image_format=image_format,
        quality=quality,
        prefix=prefix,
        overwrite=overwrite,
        limit=limit,
    )
    _check_positive("num", num)
    _check_positive("classes", classes)
    hw = parse_size(size)
    counts = {"train": num, **({"test": test_num} if test_num else {})}
    splits = {
        name: (
            synthetic_samples(name, count, classes=classes, size=hw, channels=channels, seed=seed),
            count,
        )
        for name, count in counts.items()
    }
    source = {
        "kind": "synthetic",
        "version": SYNTHETIC_VERSION,
        "counts": counts,
        "classes": classes,
        "size": list(hw),
        "channels": channels,
        "seed": seed,
        "format": image_format,
    }
    names = [f"class_{i}" for i in range(classes)]
    return write_splits(
        splits, out_dir, options, num_classes=classes, class_names=names, source=source
    )


# --------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)


def read_idx(path: str | Path) -> np.ndarray:
    """The uint8 array in an IDX file (gzip or not); DataError naming the file if malformed."""
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            raw = stream.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read IDX file: {exc}") from exc
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype = raw[2]
    ndim = raw[3]
    if dtype != 0x08:
        raise DataError(
            f"{path}: IDX element type 0x{dtype:02x} is not supported (only 0x08, unsigned byte)"
        )
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({ndim} dimensions, {len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(
            f"{path}: IDX shape {shape} needs {int(np.prod(shape))} data bytes, "
            f"found {len(raw) - header}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def find_idx_files(inputs: Sequence[str | Path]) -> dict[str, tuple[Path, Path]]:
    """Split (``train``/``test``) -> (images file, labels file) from directories and/or files."""
    found: dict[tuple[str, str], Path] = {}
    for item in map(Path, inputs):
        if not item.exists():
            raise DataError(f"{item}: no such file or directory")
        for path in sorted(item.iterdir()) if item.is_dir() else [item]:
            match = IDX_NAME.match(path.name)
            if match is None and not item.is_dir():
                raise DataError(
                    f"{path}: not an IDX file name (expected e.g. train-images-idx3-ubyte[.gz])"
                )
            if match is not None and ((match[1], match[2]) not in found or match[4] is None):
                found[(match[1], match[2])] = path  # the uncompressed file wins over .gz
    if not found:
        raise DataError(
            f"{', '.join(map(str, inputs))}: no IDX files "
            "(train|t10k)-(images|labels)-idx?-ubyte[.gz]"
        )
    splits = {}
    for stem, split in IDX_SPLITS.items():
        images = found.get((stem, "images"))
        labels = found.get((stem, "labels"))
        if (images is None) != (labels is None):
            have = images or labels
            raise DataError(
                f"{have}: found no matching {stem}-{'labels' if images else 'images'} "
                "file beside it"
            )
        if images is not None and labels is not None:
            splits[split] = (images, labels)
    return splits


def idx_splits(inputs: Sequence[str | Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split -> (uint8 images ``(N, H, W)`` or ``(N, H, W, 3)``, int64 labels ``(N,)``)."""
    return _load_idx(find_idx_files(inputs))


def _load_idx(files: Mapping[str, tuple[Path, Path]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    splits = {}
    for split, (images_path, labels_path) in files.items():
        images = read_idx(images_path)
        labels = read_idx(labels_path)
        if images.ndim == 4 and images.shape[3] == 1:
            images = images[..., 0]
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
            raise DataError(
                f"{images_path}: expected images of shape (N, H, W[, 3]), found {images.shape}"
            )
        if labels.ndim != 1:
            raise DataError(f"{labels_path}: expected labels of shape (N,), found {labels.shape}")
        if len(images) != len(labels):
            raise DataError(
                f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
            )
        splits[split] = (images, labels.astype(np.int64))
    return splits


def array_samples(split: str, images: np.ndarray, labels: np.ndarray) -> Iterator[SourceSample]:
    """Samples ``<split>_NNNNNNNN`` of in-memory uint8 images and their labels."""
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        yield SourceSample(key=f"{split}_{index:08d}", label=int(label), image=image)


def make_idx_shards(
    out_dir: str | Path,
    inputs: Sequence[str | Path],
    options: ShardOptions | None = None,
    *,
    class_names: Sequence[str] | None = None,
    kind: str = "idx",
) -> dict[str, Manifest]:
    """Shards of every split found among IDX ``inputs`` (directories or files)."""
    options = options or ShardOptions()
    files = find_idx_files(inputs)
    arrays = _load_idx(files)
    tops = {split: int(labels.max(initial=-1)) for split, (_, labels) in arrays.items()}
    top_split = max(tops, key=tops.__getitem__)
    if class_names and tops[top_split] >= len(class_names):
        raise DataError(
            f"{files[top_split][1]}: label {tops[top_split]} but only {len(class_names)} "
            "class names given"
        )
    names = list(class_names) if class_names else [str(i) for i in range(tops[top_split] + 1)]
    splits = {
        split: (array_samples(split, images, labels), len(labels))
        for split, (images, labels) in arrays.items()
    }
    source = {
        "kind": kind,
        "files": {s: [str(p.resolve()) for p in pair] for s, pair in files.items()},
        "format": options.image_format,
    }
    return write_splits(
        splits, out_dir, options, num_classes=len(names), class_names=names, source=source
    )


def make_fashion_mnist_shards(
    out_dir: str | Path,
    directory: str | Path = FASHION_MNIST_DIR,
    options: ShardOptions | None = None,
) -> dict[str, Manifest]:
    """Fashion-MNIST ``train``/``test`` shards from the Debian package's IDX files."""
    directory = Path(directory)
    if not directory.is_dir() or not any(IDX_NAME.match(p.name) for p in directory.iterdir()):
        raise DataError(
            f"{directory}: no Fashion-MNIST IDX files; install the Debian package "
            "dataset-fashion-mnist "
            "with `apt-get install dataset-fashion-mnist` (as root, after apt-get update), "
            "or pass --dir with train-images-idx3-ubyte.gz etc."
        )
    return make_idx_shards(
        out_dir, [directory], options, class_names=FASHION_MNIST_CLASSES, kind="fashion-mnist"
    )


# --------------------------------------------------------------------------------------------
# Image folders


def folder_splits(root: str | Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names and split -> sorted (file, class index) of an ImageFolder tree.

    ``ROOT/<class>/**/*.{png,jpg,jpeg}`` is one split ``train``; when every subfolder of ROOT is
    one of train/val/test holding class folders, each is a split. Class index = position in the
    sorted union of class folder names.
    """
    root = Path(root)
    layout = _folder_layout(root)
    class_dirs = {split: _subdirs(path) for split, path in layout.items()}
    class_names = sorted({d.name for dirs in class_dirs.values() for d in dirs})
    if not class_names:
        raise DataError(
            f"{root}: no class folders "
            "(expected ROOT/<class>/*.png|jpg or ROOT/<split>/<class>/...)"
        )
    index = {name: i for i, name in enumerate(class_names)}
    splits = {}
    for split, dirs in class_dirs.items():
        files = [(p, index[d.name]) for d in dirs for p in sorted(d.rglob("*")) if _is_image(p)]
        if not files:
            raise DataError(f"{layout[split]}: no .png/.jpg/.jpeg files in its class folders")
        splits[split] = files
    return class_names, splits


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in FOLDER_EXTENSIONS and path.is_file()


def _folder_layout(root: Path) -> dict[str, Path]:
    """Split -> folder holding class folders."""
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    subdirs = _subdirs(root)
    split_dirs = [d for d in subdirs if d.name in FOLDER_SPLITS and _subdirs(d)]
    if not split_dirs:
        return {"train": root}
    if len(split_dirs) != len(subdirs):
        others = [d.name for d in subdirs if d not in split_dirs]
        raise DataError(
            f"{root}: mixes split folders {[d.name for d in split_dirs]} "
            f"with other folders {others}"
        )
    return {d.name: d for d in split_dirs}


def file_samples(
    split: str,
    files: Sequence[tuple[Path, int]],
    seed: int | None = 0,
    base: Path | None = None,
) -> Iterator[SourceSample]:
    """Samples of image files yielded in a seeded random order (sorted order when ``seed`` is
    None), so shards mix classes. Keys come from each file's path relative to ``base``
    (:func:`path_keys`); without ``base``, ``<split>_NNNNNNNN`` by sorted position. Each
    sample's origin is that relative path (the split's key -> file map)."""
    order = range(len(files))
    if seed is not None:
        order = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(len(files))
    relative = [p.relative_to(base).as_posix() if base else str(p) for p, _ in files]
    keys = path_keys(relative) if base else [f"{split}_{i:08d}" for i in range(len(files))]
    for index in order:
        path, label = files[index]
        data = _read_bytes(path)
        ext = sniff_format(data)
        if ext is None:
            raise DataError(f"{path}: not a PNG or JPEG file (magic bytes {data[:4].hex()})")
        yield SourceSample(keys[index], label, data=data, ext=ext, origin=relative[index])


def path_keys(paths: Sequence[str]) -> list[str]:
    """WebDataset keys that keep file paths readable: ``cat/sub/x.1.jpg`` -> ``cat-sub-x_1``
    (extension dropped, ``/`` -> ``-``, any other character outside ``[A-Za-z0-9_-]`` -> ``_``:
    keys hold no '.' or '/'). A key two paths share gets the path's position appended."""
    stems = [PurePosixPath(p).with_suffix("").as_posix() for p in paths]
    keys = [re.sub(r"[^A-Za-z0-9_-]", "_", s.replace("/", "-")) for s in stems]
    counts: dict[str, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return [f"{k}-{i}" if counts[k] > 1 else k for i, k in enumerate(keys)]


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc


def make_folder_shards(
    out_dir: str | Path,
    root: str | Path,
    options: ShardOptions | None = None,
    *,
    seed: int | None = 0,
) -> dict[str, Manifest]:
    """Shards of an ImageFolder tree; PNG/JPEG bytes are stored as they are.

    When a tree mixes PNG and JPEG, files not in ``options.image_format`` are re-encoded to it,
    so every sample of the dataset has the same image entry.
    """
    options = options or ShardOptions()
    class_names, files = folder_splits(root)
    formats = sorted(
        {FOLDER_EXTENSIONS[p.suffix.lower()] for pairs in files.values() for p, _ in pairs}
    )
    image_format = formats[0] if len(formats) == 1 else options.image_format
    if len(formats) > 1:
        logger.warning(
            "%s mixes PNG and JPEG files: those not %s are re-encoded", root, image_format
        )
    options = replace(options, image_format=image_format)
    layout = _folder_layout(Path(root))
    splits = {
        split: (file_samples(split, pairs, seed, base=layout[split]), len(pairs))
        for split, pairs in files.items()
    }
    source = {
        "kind": "folder",
        "root": str(Path(root).resolve()),
        "seed": seed,
        "format": image_format,
        "counts": {split: len(pairs) for split, pairs in files.items()},
    }
    return write_splits(
        splits,
        out_dir,
        options,
        num_classes=len(class_names),
        class_names=class_names,
        source=source,
    )
