"""Test fixtures: WebDataset tars written sample by sample, and tars with exactly the members given.

The precompute and input tests' shards: RGB ``SIZE`` x ``SIZE`` PNGs from a seed, labels in
``.cls`` entries (``good``, ``write_tar``), or any member names at all (``write_members``).
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

SIZE = 16  # side of the images png() makes


def png(seed: int, channels: int = 3) -> bytes:
    """A PNG of ``SIZE`` x ``SIZE`` random pixels drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (SIZE, SIZE, channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes whose header claims ``width`` x ``height`` grey pixels (a
    decompression bomb's header; its pixel data is cut short)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    body = chunk(b"IDAT", zlib.compress(bytes(1000)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + body + chunk(b"IEND", b"")


def write_tar(path: Path, samples: list[tuple[str, bytes, bytes | None]]) -> str:
    """A plain WebDataset tar: ``<key>.png`` and, unless None, ``<key>.cls``."""
    with wds.TarWriter(str(path), encoder=False) as sink:
        for key, image, label in samples:
            sample = {"__key__": key, "png": image}
            if label is not None:
                sample["cls"] = label
            sink.write(sample)
    return str(path)


def good(prefix: str, n: int = 6) -> list[tuple[str, bytes, bytes]]:
    """``n`` valid samples for :func:`write_tar`: keys ``<prefix>_NNN``, images seeded by the
    prefix, labels 0..9."""
    return [
        (f"{prefix}_{i:03d}", png(zlib.crc32(prefix.encode()) % 1000 + i), str(i % 10).encode())
        for i in range(n)
    ]


def write_members(path: Path, members: list[tuple[str, bytes]]) -> str:
    """A tar with exactly these member names (WebDataset's writer would refuse some of them)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)
