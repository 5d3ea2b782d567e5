"""Caches that travel: the cache card, ``kdcache pack`` / ``unpack`` (every file checked), and
checkpoints shipped in the cache found by ``verify`` on another path."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from kdcache.cache.reader import read_block
from kdcache.cache.store import open_store
from kdcache.cache_tools.portable import cache_card, pack_cache, unpack_cache
from kdcache.cli import main
from kdcache.core.errors import CacheError, ConfigError
from tests.support.cachebuild import build_cache, write_shards


@pytest.fixture
def made(tmp_path) -> tuple[Path, list[str]]:
    """A cache of two teachers whose checkpoints lie beside it (``<cache>.<name>.pt``)."""
    urls = write_shards(tmp_path / "shards", num_shards=2)
    cache = tmp_path / "origin" / "cache.zarr"
    cache.parent.mkdir()
    build_cache(cache, urls, teachers={"a": 4, "b": 2})
    return cache, urls


def test_the_card_names_each_teacher_with_its_accuracy_on_the_cached_views(made) -> None:
    cache, _ = made
    store = open_store(str(cache))
    card = cache_card(store)
    for teacher in ("a", "b"):
        hits = total = 0
        for shard in range(store.num_shards):
            block = read_block(store, shard, [teacher])
            top = block.teachers[teacher].topk_idx[..., 0]
            valid = (block.status == 1) & (block.labels >= 0)
            hits += int((top == block.labels[:, None])[valid].sum())
            total += int(valid.sum()) * store.meta.num_views
        row = next(line for line in card.splitlines() if line.startswith(f"| {teacher} |"))
        assert row.endswith(f"| {100 * hits / total:.2f} % |"), row
        assert f"cache.zarr.{teacher}.pt" in row
    assert "kdcache train config" in card


def test_pack_unpack_verify_on_another_path(made, tmp_path, capsys) -> None:
    cache, _ = made
    archive = tmp_path / "cache.tar"
    assert main(["pack", str(cache), str(archive), "--weights"]) == 0
    assert "weights shipped: a: weights/" in capsys.readouterr().out
    shutil.rmtree(cache.parent)  # the recorded checkpoints are gone with the origin
    out = tmp_path / "elsewhere" / "cache"
    assert main(["unpack", str(archive), str(out)]) == 0
    assert (out / "README.md").is_file()
    assert main(["verify", str(out), "--num", "8"]) == 0
    assert main(["validate", str(out)]) == 0


def test_without_shipped_weights_verify_names_the_missing_checkpoint(made, tmp_path) -> None:
    cache, _ = made
    pack_cache(str(cache), str(tmp_path / "c.tar"))
    shutil.rmtree(cache.parent)
    out = unpack_cache(str(tmp_path / "c.tar"), tmp_path / "u")
    from kdcache.cache_tools.verify import verify_cache
    from kdcache.core.errors import WeightsError

    with pytest.raises(WeightsError, match=r"cache\.zarr\.a\.pt' does not exist"):
        verify_cache(open_store(str(out)), num=4)


def test_a_damaged_archive_is_refused_and_leaves_nothing(made, tmp_path) -> None:
    cache, _ = made
    archive = tmp_path / "c.tar"
    pack_cache(str(cache), str(archive))
    data = bytearray(archive.read_bytes())
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith("teachers/a/topk_logit"))
    data[member.offset_data + 3] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"1 file\(s\) damaged \(e.g. 'teachers/a/topk_logit"):
        unpack_cache(str(archive), tmp_path / "u")
    assert not (tmp_path / "u").exists()


def test_unpack_refuses_members_outside_the_directory(tmp_path) -> None:
    evil = tmp_path / "evil.tar"
    (tmp_path / "x").write_text("x")
    with tarfile.open(evil, "w") as tar:
        tar.add(tmp_path / "x", arcname="../escape")
    with pytest.raises(CacheError, match=r"refusing member '\.\./escape'"):
        unpack_cache(str(evil), tmp_path / "u")
    assert not (tmp_path / "escape").exists()


def test_pack_refuses_to_overwrite_and_unpack_a_non_empty_directory(made, tmp_path) -> None:
    cache, _ = made
    pack_cache(str(cache), str(tmp_path / "c.tar"))
    with pytest.raises(ConfigError, match="exists: pass --overwrite"):
        pack_cache(str(cache), str(tmp_path / "c.tar"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        unpack_cache(str(tmp_path / "c.tar"), tmp_path / "full")
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me"


def test_a_written_card_leaves_the_cache_readable(made, capsys) -> None:
    cache, _ = made
    assert main(["card", str(cache), "--write"]) == 0
    assert (cache / "README.md").read_text().startswith("# kdcache cache `cache.zarr`")
    assert main(["validate", str(cache)]) == 0
    assert main(["inspect", str(cache)]) == 0
    store = open_store(str(cache))
    assert np.all(store.views_done() > 0)
