"""A lean streaming reader of a tar's regular files: (name, bytes) in archive order.

Every epoch streams every shard, and Python's ``tarfile`` parses all twenty header fields of
each member into a ``TarInfo`` (about 60 us a member; two members a sample). This reader takes
what a shard needs: the name, the size, the type and the checksum, and the long-name records of
GNU (``L``) and POSIX pax (``x``/``g``: ``path`` and ``size``) archives, so names of any length
and any writer (webdataset, GNU tar, Python's tarfile in each format) read as ``tarfile`` reads
them. ``tests/shards/test_tarstream.py`` compares the two over those formats.

It is stricter than ``tarfile``'s stream mode, which ends quietly at a damaged header: a bad
checksum, a truncated header or member, or a member type that cannot be streamed (GNU sparse,
multi-volume) is a :class:`TarStreamError` naming the byte offset. An archive that stops at a
header boundary without its end-of-archive blocks ends there, as with ``tarfile``.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import IO

BLOCK = 512
"""Tar block size: headers are one block, member data is padded to whole blocks."""
REGULAR = frozenset(b"07\x00")
"""Type flags of regular files: ``0``, ``7`` (contiguous) and NUL (old archives)."""
UNSTREAMABLE = frozenset(b"SM")
"""GNU sparse and multi-volume members: their data cannot be taken as it stands."""
USTAR_MAGIC = b"ustar\x0000"
"""POSIX ustar magic and version: only then does the header carry a name prefix."""


class TarStreamError(tarfile.ReadError):
    """The archive cannot be read on (a ``tarfile.ReadError``: callers handle both alike)."""


def tar_files(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of each regular file in ``stream``, in archive order (directories,
    links and other special members skipped)."""
    reader = _Reader(stream)
    pending: dict[str, str] = {}  # a pax or GNU record for the next member
    defaults: dict[str, str] = {}  # pax global records, for every following member
    while True:
        offset = reader.offset
        header = reader.header()
        if header is None:
            return
        kind = header[156]
        size = _size(header, offset)
        if kind in UNSTREAMABLE:
            raise TarStreamError(f"member type {chr(kind)!r} at byte {offset} cannot be streamed")
        if kind in b"xgLK":
            data = reader.data(size, offset)
            if kind == ord("x"):
                pending.update(_pax_records(data, offset))
            elif kind == ord("g"):
                defaults.update(_pax_records(data, offset))
            elif kind == ord("L"):  # GNU long name: the next member's name, NUL-terminated
                pending["path"] = _text(data)
            continue  # K: a GNU long link name, which regular files do not use
        records = {**defaults, **pending}
        pending = {}
        size = int(records["size"]) if "size" in records else size
        name = records.get("path") or _header_name(header)
        if kind not in REGULAR or name.endswith("/"):  # old tars mark directories by a slash
            reader.skip(size, offset)
            continue
        yield name, reader.data(size, offset)


class _Reader:
    """Exact reads over a stream that may return less than asked (pipes, object stores)."""

    def __init__(self, stream: IO[bytes]):
        self.stream = stream
        self.offset = 0

    def read(self, count: int) -> bytes:
        parts = []
        left = count
        while left > 0:
            part = self.stream.read(left)
            if not part:
                break
            parts.append(part)
            left -= len(part)
        data = b"".join(parts)
        self.offset += len(data)
        return data

    def header(self) -> bytes | None:
        """The next member's header; None at the end-of-archive block or the stream's end."""
        offset = self.offset
        block = self.read(BLOCK)
        if not block or block.count(0) == BLOCK:
            return None
        if len(block) < BLOCK:
            raise TarStreamError(f"truncated header at byte {offset}")
        if not _checksum_ok(block):
            raise TarStreamError(f"invalid header at byte {offset} (bad checksum)")
        return block

    def data(self, size: int, offset: int) -> bytes:
        """A member's ``size`` bytes, its padding to a whole block skipped."""
        data = self.read(size)
        if len(data) < size:
            raise TarStreamError(f"unexpected end of data in the member at byte {offset}")
        self.discard(-size % BLOCK, offset)
        return data

    def skip(self, size: int, offset: int) -> None:
        """Skip a member's ``size`` bytes and their padding."""
        self.discard(size + (-size % BLOCK), offset)

    def discard(self, count: int, offset: int) -> None:
        if len(self.read(count)) < count:
            raise TarStreamError(f"unexpected end of data in the member at byte {offset}")


def _checksum_ok(header: bytes) -> bool:
    """The stored checksum equals the header's byte sum with its own field read as spaces
    (unsigned, or signed as some old writers made it)."""
    try:
        stored = _number(header[148:156])
    except ValueError:
        return False
    rest = header[:148] + header[156:]
    if stored == 256 + sum(rest):  # 256: the checksum field's eight spaces
        return True
    return stored == 256 + sum(b - 256 if b > 127 else b for b in rest)


def _size(header: bytes, offset: int) -> int:
    try:
        return _number(header[124:136])
    except ValueError:
        raise TarStreamError(f"invalid size field in the header at byte {offset}") from None


def _number(field: bytes) -> int:
    """An octal field (NUL or space terminated), or GNU's base-256 form (first byte 0x80/0xff)."""
    if field[0] in (0x80, 0xFF):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    text = field.split(b"\x00", 1)[0].strip()
    return int(text, 8) if text else 0


def _header_name(header: bytes) -> str:
    """The member name; a ustar header may hold its leading directories in the prefix field."""
    name = _text(header[:100])
    if header[257:265] == USTAR_MAGIC:
        prefix = _text(header[345:500])
        if prefix:
            return f"{prefix}/{name}"
    return name


def _text(field: bytes) -> str:
    """A NUL-terminated name, decoded as ``tarfile`` does (UTF-8, undecodable bytes escaped)."""
    return field.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    """A pax header's ``"<length> <key>=<value>\\n"`` records."""
    records: dict[str, str] = {}
    at = 0
    while at < len(data) and data[at] != 0:
        space = data.find(b" ", at)
        try:
            length = int(data[at:space])
        except ValueError:
            raise TarStreamError(f"invalid pax record in the header at byte {offset}") from None
        if length <= 0 or space < 0 or at + length > len(data):
            raise TarStreamError(f"invalid pax record in the header at byte {offset}")
        key, _, value = data[space + 1 : at + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        at += length
    return records
