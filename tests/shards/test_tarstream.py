"""The lean tar reader reads what ``tarfile`` reads, over every archive format a shard may come
in, and refuses damage that ``tarfile``'s stream mode would pass over quietly."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from kdcache.shards.reading import iter_shard
from kdcache.shards.tarstream import TarStreamError, tar_files

LONG = "d" * 60 + "/" + "e" * 70 + "/" + "k" * 120  # over ustar's 100 + 155 split for GNU/pax


def _members() -> list[tuple[str, bytes]]:
    return [
        ("a.png", b"x" * 10),
        ("a.cls", b"3"),
        ("empty.txt", b""),
        ("block.bin", bytes(range(256)) * 2),  # exactly one block, no padding
        ("sub/dir/b.png", b"y" * 513),
        ("sub/" + "p" * 120 + "/c.png", b"z" * 7),  # ustar: needs the prefix field
        (LONG + ".png", b"w" * 3),
        ("ünï/çødé.json", b'{"label": 1}'),
    ]


def _archive(fmt: int, members: list[tuple[str, bytes]], extras: bool = True) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        if extras:
            folder = tarfile.TarInfo("sub")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
            link = tarfile.TarInfo("link.png")
            link.type = tarfile.SYMTYPE
            link.linkname = "a.png"
            tar.addfile(link)
        for name, data in members:
            if fmt == tarfile.USTAR_FORMAT and len(name.encode()) > 200:
                continue  # ustar cannot hold it
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _with_tarfile(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        out = []
        for member in tar:
            if member.isfile():
                content = tar.extractfile(member)
                assert content is not None
                out.append((member.name, content.read()))
        return out


class _Trickle(io.RawIOBase):
    """A stream that returns at most a few bytes a read, as a pipe or an object store may."""

    def __init__(self, data: bytes, step: int = 37):
        self.data = io.BytesIO(data)
        self.step = step

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self.data.read(min(self.step, size) if size >= 0 else self.step)


@pytest.mark.parametrize(
    "fmt",
    [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
    ids=["ustar", "gnu", "pax"],
)
def test_reads_what_tarfile_reads(fmt: int) -> None:
    data = _archive(fmt, _members())
    want = _with_tarfile(data)
    assert len(want) >= 7
    assert list(tar_files(io.BytesIO(data))) == want
    assert list(tar_files(_Trickle(data))) == want  # short reads


def test_reads_gnu_tar_and_webdataset_writers(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    for name, data in _members():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    made = tmp_path / "gnu.tar"
    subprocess.run(["tar", "-cf", str(made), "-C", str(folder), "."], check=True)
    assert list(tar_files(io.BytesIO(made.read_bytes()))) == _with_tarfile(made.read_bytes())
    shard = tmp_path / "wds-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(3):
            sink.write({"__key__": f"s{i}", "png": b"p" * (i * 300), "cls": str(i).encode()})
    assert list(tar_files(io.BytesIO(shard.read_bytes()))) == _with_tarfile(shard.read_bytes())
    assert [s.key for s in iter_shard(str(shard))] == ["s0", "s1", "s2"]


def test_an_archive_without_its_end_blocks_ends_at_the_last_member() -> None:
    data = _archive(tarfile.GNU_FORMAT, _members()[:3], extras=False)
    cut = data.rstrip(b"\x00")
    cut += b"\x00" * (-len(cut) % 512)
    assert [n for n, _ in tar_files(io.BytesIO(cut))] == ["a.png", "a.cls", "empty.txt"]


def test_damage_is_an_error_naming_the_byte() -> None:
    data = bytearray(_archive(tarfile.GNU_FORMAT, _members()[:3], extras=False))
    bad = bytearray(data)
    bad[1024 + 10] ^= 0xFF  # the second member's header (the first has one block of data)
    with pytest.raises(TarStreamError, match=r"invalid header at byte 1024 \(bad checksum\)"):
        list(tar_files(io.BytesIO(bytes(bad))))
    with pytest.raises(TarStreamError, match=r"unexpected end of data in the member at byte 0"):
        list(tar_files(io.BytesIO(bytes(data[:520]))))
    with pytest.raises(TarStreamError, match=r"truncated header at byte 1024"):
        list(tar_files(io.BytesIO(bytes(data[:1100]))))


def test_a_damaged_shard_is_a_data_error_naming_it(tmp_path: Path) -> None:
    from kdcache.core.errors import DataError

    shard = tmp_path / "bad-000000.tar"
    data = bytearray(_archive(tarfile.GNU_FORMAT, [("k.png", b"1"), ("k.cls", b"2")], False))
    data[512 * 2 + 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard 'bad-000000.tar' could not be read to the end"):
        list(iter_shard(str(shard)))
