"""Reading WebDataset shards: listing, planning (keys and counts), decoding samples.

Both halves use these helpers: precompute plans and reads shards with them, the trainer decodes
samples with the same :func:`decode_image` so teacher and student see identical pixels.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import braceexpand
import fsspec
import torch
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as tv_decode_image

from kdcache.errors import ConfigError, DataError, DuplicateKeyError
from kdcache.manifest import shard_key_digest  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_EXT = "cls"


def expand_shards(
    spec: str | list[str], key: str = "data.shards", storage_options: dict | None = None
) -> list[str]:
    """Shard URLs from a brace pattern, a glob, or a list of either (order kept, no duplicates).

    Remote URLs (``s3://...``) use ``storage_options`` if given, else fsspec's defaults: for S3 the
    standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL`` ...), which Ray actors and
    DataLoader workers inherit."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for pattern in patterns:
        for item in braceexpand.braceexpand(pattern):
            urls.extend(_glob_one(item, storage_options))
    if not urls:
        raise ConfigError(f"{key}: no shard matches {spec!r}")
    seen: set[str] = set()
    return [u for u in urls if not (u in seen or seen.add(u))]


def _glob_one(item: str, storage_options: dict | None = None) -> list[str]:
    if "://" in item:
        if any(ch in item for ch in "*?["):
            # one listing (an object store's LIST per 1000 keys); files only, from its details
            # (not an existence check per match), and the listing stays cached for planning
            fs, path = fsspec.core.url_to_fs(item, **(storage_options or {}))
            found = fs.glob(path, detail=True)
            return sorted(fs.unstrip_protocol(p) for p, e in found.items() if e["type"] == "file")
        return [item]
    if any(ch in item for ch in "*?["):
        return sorted(glob.glob(item))
    return [item]


def shard_name(url: str) -> str:
    """The shard's file name, which identifies it in the cache wherever the files move."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def split_member(name: str) -> tuple[str, str]:
    """``dir/key.ext`` -> (``dir/key``, ``ext``), splitting at the first dot of the base name."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


@dataclass(frozen=True)
class ShardIndex:
    """Keys of one shard, in file order."""

    url: str
    keys: list[str]

    @property
    def name(self) -> str:
        return shard_name(self.url)

    def __len__(self) -> int:
        return len(self.keys)


SCAN_BLOCK_SIZE = 4096
"""Bytes fetched per request while scanning a remote tar's headers: a header (512 B) plus a small
member's data (``.cls``) and the next header, so about one range request per sample, while the
large payloads (images) are seeked over, never read."""


def _open_for_scan(url: str, storage_options: dict | None):
    """The shard opened for header scanning: a remote file fetches small ranges on demand
    (fsspec's default read-ahead of several MB would read whole tars); a local file as usual."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if "file" in fs.protocol or "local" in fs.protocol:
        return fs.open(path, "rb")
    return fs.open(path, "rb", block_size=SCAN_BLOCK_SIZE, cache_type="readahead")


def scan_shard(url: str, storage_options: dict | None = None) -> ShardIndex:
    """Read a shard's tar headers (not its data) and return its keys, checking each sample.

    ``tarfile`` seeks from one header to the next over the member data, and remote files are
    opened to fetch :data:`SCAN_BLOCK_SIZE` bytes per request, so payloads are skipped: about one
    range request per sample on an object store. A tar cut short (even inside its last member's
    data) is a DataError naming the shard."""
    name = shard_name(url)
    entries: dict[str, set[str]] = {}
    order: list[str] = []
    try:
        with (
            _open_for_scan(url, storage_options) as handle,
            tarfile.open(fileobj=handle, mode="r:") as tar,
        ):
            for member in tar:
                if not member.isfile() or member.name.startswith("__"):
                    continue
                key, ext = split_member(member.name)
                _add_entry(entries, order, key, ext, name)
            _check_end(handle, tar.offset, name, order[-1] if order else None)
    except FileNotFoundError:
        raise DataError(f"shard {url!r} does not exist") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"shard {name!r} is not a readable tar ({exc})") from None
    for key in order:
        _check_sample(entries[key], key, name)
    return ShardIndex(url=url, keys=order)


def _check_end(handle, offset: int, shard: str, last_key: str | None) -> None:
    """tarfile stops quietly at a cut or damaged header; a whole tar has a zero block there."""
    handle.seek(offset)
    block = handle.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        after = f" after key {last_key!r}" if last_key else ""
        raise DataError(
            f"shard {shard!r} is truncated or damaged at byte {offset}{after}: no end-of-archive "
            "marker where the next header should be"
        )


def _add_entry(
    entries: dict[str, set[str]], order: list[str], key: str, ext: str, shard: str
) -> None:
    if key not in entries:
        entries[key] = set()
        order.append(key)
    elif order[-1] != key or ext in entries[key]:
        raise DuplicateKeyError(f"shard {shard!r}: key {key!r} occurs twice")
    entries[key].add(ext)


def _check_sample(exts: set[str], key: str, shard: str) -> None:
    images = [e for e in exts if e.lower() in IMAGE_EXTS]
    if len(images) != 1:
        odd = sorted(e for e in exts if e.lower() not in IMAGE_EXTS and e != LABEL_EXT)
        hint = f"; entries {odd} suggest a dot in the key (keys must be dot-free)" if odd else ""
        raise DataError(
            f"shard {shard!r}, key {key!r}: expected one image entry ({'/'.join(IMAGE_EXTS)}), "
            f"found {sorted(exts)}{hint}"
        )


SCAN_LOG_SECONDS = 10.0
"""While scanning many shards, a progress line at most this often (remote tars can take minutes)."""


def scan_shards(
    urls: list[str], threads: int = 8, storage_options: dict | None = None
) -> list[ShardIndex]:
    """Scan every shard (in parallel threads) and refuse duplicate keys across shards."""
    started = last = time.monotonic()
    indexes: list[ShardIndex] = []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(urls)))) as pool:
        for index in pool.map(lambda url: scan_shard(url, storage_options), urls):
            indexes.append(index)
            if time.monotonic() - last >= SCAN_LOG_SECONDS:
                last = time.monotonic()
                rate = len(indexes) / (last - started)
                log.info(
                    "scanning shard headers: %d/%d shards, %.1f shards/s, ETA %.0f s",
                    len(indexes),
                    len(urls),
                    rate,
                    (len(urls) - len(indexes)) / rate,
                )
    if time.monotonic() - started >= SCAN_LOG_SECONDS:
        log.info("scanned %d shards in %.0f s", len(urls), time.monotonic() - started)
    check_unique_keys(indexes)
    check_unique_names([index.name for index in indexes])
    return indexes


def check_unique_keys(indexes: list[ShardIndex]) -> None:
    """Refuse a key that occurs in two shards, naming both (within a shard the scan refuses it)."""
    owner: dict[str, str] = {}
    for index in indexes:
        for key in index.keys:
            if key in owner:
                raise DuplicateKeyError(
                    f"key {key!r} occurs in shard {owner[key]!r} and in shard {index.name!r}"
                )
            owner[key] = index.name


def check_unique_names(names: list[str]) -> None:
    """Shards are identified by file name in a cache: two with the same name are refused."""
    if len(set(names)) != len(names):
        raise DataError(
            f"two shards share a file name: {sorted({n for n in names if names.count(n) > 1})}"
        )


def key_digest(indexes: list[ShardIndex]) -> str:
    """The dataset's key digest (the fingerprint's): every shard's name and keys, in order."""
    digest = hashlib.sha256()
    for index in indexes:
        digest.update(index.name.encode() + b"\x00")
        for key in index.keys:
            digest.update(key.encode() + b"\n")
    return digest.hexdigest()


@dataclass
class Sample:
    """One raw sample of a shard: its key, encoded image bytes and label (None if unusable)."""

    key: str
    image: bytes
    label: int | None
    extras: dict[str, bytes] = field(default_factory=dict)
    label_problem: str | None = None
    """Why ``label`` is None: no ``.cls`` entry, or one that is not an integer."""

    def require_label(self, shard: str, num_classes: int) -> int:
        """The label, or a DataError naming shard and key (missing, not an integer, out of
        range)."""
        if self.label is None:
            raise DataError(
                f"shard {shard!r}, key {self.key!r}: {self.label_problem or 'no label'}"
            )
        if not 0 <= self.label < num_classes:
            raise DataError(
                f"shard {shard!r}, key {self.key!r}: label {self.label} is not in "
                f"0..{num_classes - 1}"
            )
        return self.label


def iter_shard(url: str, storage_options: dict | None = None) -> Iterator[Sample]:
    """The samples of one shard in file order (tar streamed once)."""
    name = shard_name(url)
    current: dict[str, bytes] = {}
    current_key: str | None = None
    try:
        with (
            fsspec.open(url, "rb", **(storage_options or {})) as handle,
            tarfile.open(fileobj=handle, mode="r|") as tar,
        ):
            for member in tar:
                if not member.isfile() or member.name.startswith("__"):
                    continue
                key, ext = split_member(member.name)
                if key != current_key and current_key is not None:
                    yield to_sample(current_key, current, name)
                    current = {}
                current_key = key
                current[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"shard {name!r} could not be read to the end ({exc})") from None
    if current_key is not None:
        yield to_sample(current_key, current, name)


def to_sample(key: str, entries: dict[str, bytes], shard: str) -> Sample:
    """Build a :class:`Sample` from a sample's tar entries (ext -> bytes)."""
    image_ext = next((e for e in entries if e.lower() in IMAGE_EXTS), None)
    if image_ext is None:
        raise DataError(f"shard {shard!r}, key {key!r}: no image entry (found {sorted(entries)})")
    label, problem = parse_label(entries.get(LABEL_EXT))
    extras = {e: v for e, v in entries.items() if e not in (image_ext, LABEL_EXT)}
    return Sample(
        key=key, image=entries[image_ext], label=label, extras=extras, label_problem=problem
    )


def parse_label(raw: bytes | None) -> tuple[int | None, str | None]:
    """(label, None), or (None, why) so the caller's error policy decides what to do."""
    if raw is None:
        return None, "no label (no .cls entry)"
    try:
        return int(raw.decode("ascii").strip()), None
    except (UnicodeDecodeError, ValueError):
        return None, f"label {raw[:20]!r} is not an integer"


def decode_image(data: bytes, channels: int) -> torch.Tensor:
    """Encoded image bytes -> ``uint8[channels, H, W]`` (torchvision's decoder, both sides).

    Images of more than 8 bits per channel (16-bit PNGs decode to uint16) are scaled to uint8, so
    the teacher never sees values 256 times too large."""
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    image = tv_decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    if image.dtype != torch.uint8:
        from torchvision.transforms.v2.functional import to_dtype

        image = to_dtype(image, torch.uint8, scale=True)
    return image


def read_image_size(data: bytes) -> tuple[int, int]:
    """(H, W) of encoded image bytes without decoding all pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.height, img.width
