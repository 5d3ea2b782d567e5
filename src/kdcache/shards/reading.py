"""Reading WebDataset shards: listing, planning (keys and counts), decoding samples.

Both halves use these helpers: precompute plans and reads shards with them, the trainer decodes
samples with the same :func:`decode_image` so teacher and student see identical pixels.

Shard URLs are what WebDataset users write: local paths, fsspec URLs (``s3://...``, opened with the
storage options), globs, brace lists (``train-{000000..000099}.tar``) and ``pipe:`` commands
(``pipe:curl -s https://host/train-000000.tar``), which open through webdataset's own opener
(:func:`webdataset.gopen`) and run as written wherever shards are read (the precompute driver, Ray
actors, DataLoader workers: use absolute paths). A shard is known by its file name: for a command,
the base name of its last word naming a ``.tar``.

A sample's label comes from the first of its ``.cls``, ``.json`` and ``.txt`` entries: ``.cls`` and
``.txt`` hold the integer as text, ``.json`` an object whose key ``label_key`` (``data.label_key``,
default ``label``) holds it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import re
import shlex
import shutil
import struct
import tarfile
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, cast

import braceexpand
import fsspec
import torch
from fsspec.core import OpenFile
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as tv_decode_image
from webdataset.gopen import Pipe, gopen  # the package stub does not re-export gopen

from kdcache.core.errors import ConfigError, DataError, DuplicateKeyError
from kdcache.shards.manifest import shard_key_digest  # noqa: F401  (re-exported)
from kdcache.shards.tarstream import tar_files

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTS = ("cls", "json", "txt")
"""Entries a label is read from, in this order of preference."""
DEFAULT_LABEL_KEY = "label"
"""The label's key in a ``.json`` entry, unless the config names another (``data.label_key``)."""
PIPE = "pipe:"
SPOOL_BYTES = 64 << 20
"""Planning reads a ``pipe:`` shard whole (a pipe cannot seek): in memory up to this size, then in
a temporary file."""
MAX_PIXELS = 89_478_485
"""Default pixel limit of one image (``data.max_pixels``): PIL's decompression-bomb threshold
(``PIL.Image.MAX_IMAGE_PIXELS``), about 89.5 Mpx, 0.25 GiB as RGB uint8."""
INT64 = (-(2**63), 2**63 - 1)


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
    for url in urls:
        if is_pipe(url) and not _pipe_names(url):
            raise ConfigError(
                f"{key}: the command {url!r} names no .tar file: kdcache knows a shard by its file "
                "name, the base name of the command's last word naming a .tar"
            )
    seen: set[str] = set()
    return [u for u in urls if not (u in seen or seen.add(u))]


def is_pipe(url: str) -> bool:
    """A WebDataset ``pipe:`` command (read from the command's standard output)."""
    return url.startswith(PIPE)


def is_url(path: str) -> bool:
    """An fsspec URL or a ``pipe:`` command: never made absolute or globbed as a local path."""
    return "://" in path or is_pipe(path)


def _glob_one(item: str, storage_options: dict | None = None) -> list[str]:
    if is_pipe(item):
        return [item]
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
    """The shard's file name, which identifies it in the cache wherever the files move (for a
    ``pipe:`` command, the base name of its last word naming a ``.tar``)."""
    if is_pipe(url):
        names = _pipe_names(url)
        return names[-1] if names else url
    return url.rstrip("/").rsplit("/", 1)[-1]


def pipe_local_file(url: str) -> str | None:
    """The local file a ``pipe:`` command reads (its last word naming a ``.tar``, e.g.
    ``pipe:cat /d/x.tar``), None when that word is a URL or no file of this machine."""
    try:
        words = shlex.split(url[len(PIPE) :])
    except ValueError:
        words = url[len(PIPE) :].split()
    tars = [w for w in words if ".tar" in w]
    if not tars or "://" in tars[-1] or not os.path.isfile(tars[-1]):
        return None
    return tars[-1]


def _pipe_names(url: str) -> list[str]:
    """Base names of the words of a ``pipe:`` command that name a ``.tar`` (URL queries cut)."""
    try:
        words = shlex.split(url[len(PIPE) :])
    except ValueError:  # unbalanced quotes: the shell will say so when it runs
        words = url[len(PIPE) :].split()
    names = [w.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] for w in words]
    return [n for n in names if ".tar" in n]


@contextlib.contextmanager
def open_shard(url: str, storage_options: dict | None = None) -> Iterator[IO[bytes]]:
    """The shard's bytes: a ``pipe:`` command through :func:`webdataset.gopen`, anything else
    through fsspec (with ``storage_options``). A command that fails is a DataError naming the
    shard, the command and its exit status."""
    if not is_pipe(url):
        # a cast: fsspec.open is unannotated, so pyright infers a list too (one path: one file)
        opened = cast(OpenFile, fsspec.open(url, "rb", **(storage_options or {})))
        with opened as handle:
            yield handle
        return
    pipe = cast(Pipe, gopen(url, "rb"))  # the stub returns a union; a pipe: URL gives a Pipe
    try:
        yield cast(IO[bytes], pipe)  # a Pipe reads as a binary stream; its stub is no IO subclass
        shutil.copyfileobj(pipe, _Discard())  # the tar's zero padding: let the command finish
        pipe.close()
    except (Exception, GeneratorExit) as exc:
        _stop(pipe)
        status = pipe.proc.returncode
        if isinstance(exc, (OSError, tarfile.TarError, EOFError)) and status not in (None, 0):
            raise DataError(
                f"shard {shard_name(url)!r}: the command {url[len(PIPE) :]!r} failed "
                f"(exit status {status})"
            ) from None
        raise


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def _stop(pipe: Pipe) -> None:
    """Close a pipe read in part (the consumer stopped early, or failed): the command is killed,
    its exit status (a signal) is no error."""
    if pipe.proc.poll() is None:
        pipe.proc.kill()
    pipe.ignore_errors = True
    with contextlib.suppress(Exception):
        pipe.close()


@contextlib.contextmanager
def _seekable(handle: IO[bytes], url: str) -> Iterator[IO[bytes]]:
    """``handle``, or for a ``pipe:`` command (which cannot seek) a spooled copy of it."""
    if not is_pipe(url):
        yield handle
        return
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as copy:
        shutil.copyfileobj(handle, copy)
        copy.seek(0)
        yield copy


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


@contextmanager
def _open_for_scan(url: str, storage_options: dict | None) -> Iterator[IO[bytes]]:
    """The shard opened for header scanning: a remote file fetches small ranges on demand
    (fsspec's default read-ahead of several MB would read whole tars); a local file as usual; a
    ``pipe:`` command's output spooled so tarfile can seek."""
    if is_pipe(url):
        with open_shard(url, storage_options) as raw, _seekable(raw, url) as handle:
            yield handle
        return
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    local = "file" in fs.protocol or "local" in fs.protocol
    options = {} if local else {"block_size": SCAN_BLOCK_SIZE, "cache_type": "readahead"}
    with fs.open(path, "rb", **options) as handle:
        yield handle


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
        odd = sorted(e for e in exts if e.lower() not in IMAGE_EXTS and e not in LABEL_EXTS)
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
    """Why ``label`` is None: no label entry, or one that holds no integer label."""

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


def iter_shard(
    url: str, storage_options: dict | None = None, label_key: str = DEFAULT_LABEL_KEY
) -> Iterator[Sample]:
    """The samples of one shard in file order (tar streamed once, by the lean reader of
    :mod:`~kdcache.shards.tarstream`); ``label_key``: the label's key in ``.json`` entries."""
    name = shard_name(url)
    current: dict[str, bytes] = {}
    current_key: str | None = None
    try:
        with open_shard(url, storage_options) as handle:
            for member, data in tar_files(handle):
                if member.startswith("__"):
                    continue
                key, ext = split_member(member)
                if key != current_key and current_key is not None:
                    yield to_sample(current_key, current, name, label_key)
                    current = {}
                current_key = key
                current[ext] = data
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"shard {name!r} could not be read to the end ({exc})") from None
    if current_key is not None:
        yield to_sample(current_key, current, name, label_key)


def to_sample(
    key: str, entries: dict[str, bytes], shard: str, label_key: str = DEFAULT_LABEL_KEY
) -> Sample:
    """Build a :class:`Sample` from a sample's tar entries (ext -> bytes)."""
    image_ext = next((e for e in entries if e.lower() in IMAGE_EXTS), None)
    if image_ext is None:
        raise DataError(f"shard {shard!r}, key {key!r}: no image entry (found {sorted(entries)})")
    label_ext = next((e for e in LABEL_EXTS if e in entries), None)
    raw_label = None if label_ext is None else entries[label_ext]
    label, problem = parse_label(raw_label, label_ext or "cls", label_key)
    extras = {e: v for e, v in entries.items() if e not in (image_ext, label_ext)}
    return Sample(
        key=key, image=entries[image_ext], label=label, extras=extras, label_problem=problem
    )


def parse_label(
    raw: bytes | None, ext: str = "cls", label_key: str = DEFAULT_LABEL_KEY
) -> tuple[int | None, str | None]:
    """The label in a sample's ``.<ext>`` entry: (label, None), or (None, why) so the caller's
    error policy decides what to do."""
    if raw is None:
        return None, "no label (no .cls, .json or .txt entry)"
    if ext == "json":
        return _json_label(raw, label_key)
    where = "" if ext == "cls" else f" (in the .{ext} entry)"
    try:
        return _int64(int(raw.decode("ascii").strip()), where)
    except (UnicodeDecodeError, ValueError):
        return None, f"label {raw[:20]!r}{where} is not an integer"


def _int64(label: int, where: str) -> tuple[int | None, str | None]:
    """The label if it fits int64 (the cache's and torch's label type), else why not."""
    if INT64[0] <= label <= INT64[1]:
        return label, None
    text = str(label)
    shown = text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"
    return None, f"label {shown}{where} is outside int64"


def _json_label(raw: bytes, label_key: str) -> tuple[int | None, str | None]:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"the .json entry is not JSON ({str(exc)[:80]})"
    if not isinstance(data, dict) or label_key not in data:
        found = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        return None, f"the .json entry has no key {label_key!r} (data.label_key; found {found})"
    value = data[label_key]
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    where = f" (key {label_key!r} of the .json entry)"
    if isinstance(value, bool) or not isinstance(value, int):
        return None, f"label {value!r}{where} is not an integer"
    return _int64(value, where)


def decode_image(data: bytes, channels: int, max_pixels: int | None = MAX_PIXELS) -> torch.Tensor:
    """Encoded image bytes -> ``uint8[channels, H, W]`` (torchvision's decoder, both sides).

    Images of more than 8 bits per channel (16-bit PNGs decode to uint16) are scaled to uint8, so
    the teacher never sees values 256 times too large. An image whose header gives more than
    ``max_pixels`` pixels is a ValueError before any pixel is decoded (a few KB of PNG can claim
    30000 x 30000 px; None: no limit)."""
    if max_pixels is not None:
        check_pixels(data, max_pixels)
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    image = tv_decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    if image.dtype != torch.uint8:
        from torchvision.transforms.v2.functional import to_dtype

        image = to_dtype(image, torch.uint8, scale=True)
    return image


def check_pixels(data: bytes, max_pixels: int) -> None:
    """ValueError when the image's header gives more than ``max_pixels`` pixels. A header PIL
    cannot read is left to the decoder, which refuses what it cannot decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        height, width = read_image_size(data)
        size = f"{width} x {height} = {height * width}"
        pixels = height * width
    except Image.DecompressionBombError as exc:  # over twice PIL's limit: PIL gives the count
        found = re.search(r"\((\d+) pixels\)", str(exc))
        if found is None:
            raise ValueError(f"{exc} (data.max_pixels={max_pixels})") from None
        pixels = int(found.group(1))
        size = str(pixels)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return
    if pixels > max_pixels:
        raise ValueError(
            f"the image is {size} pixels, over the limit of {max_pixels} "
            "(data.max_pixels; checked from its header, before decoding)"
        )


def read_image_size(data: bytes) -> tuple[int, int]:
    """(H, W) of encoded image bytes without decoding any pixel: from a PNG's IHDR or a JPEG's
    frame header directly (a few microseconds: the trainer checks every image it streams), else
    PIL's header reader (its decompression-bomb warning silenced: the caller decides)."""
    size = _png_size(data) or _jpeg_size(data)
    if size is not None:
        return size
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            return img.height, img.width


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
"""JPEG start-of-frame markers (SOF0..SOF15 less DHT, JPG and DAC, which share the range)."""


def _png_size(data: bytes) -> tuple[int, int] | None:
    """A PNG's (H, W): the IHDR chunk comes first, width and height big-endian at bytes 16..24."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return height, width


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """A JPEG's (H, W) from its first frame header (SOFn: length, precision, height, width);
    None when the markers do not lead to one (PIL then reads the file)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    at = 2
    while at + 9 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker in JPEG_FRAMES:
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            return (height, width) if height and width else None
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            at += 2
            continue
        at += 2 + struct.unpack(">H", data[at + 2 : at + 4])[0]
    return None
