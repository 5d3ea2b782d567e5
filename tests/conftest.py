"""Fixtures shared by several test modules.

Module-scoped fixtures here are still set up once per test module that uses them, as when each
module defined (or imported) its own copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import ray

from kdcache.shards.writing import make_synthetic_shards
from tests.support.cachebuild import build_cache, write_shards
from tests.support.tarbuild import good, png, write_tar

SIZE = 16  # side of data_dir's images


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the whole module; precomputes reuse it (and kill their actors)."""
    temp = tempfile.mkdtemp(prefix="kdr", dir="/tmp")
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="WARNING")
    yield
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """4 synthetic shards of 40 RGB 16x16 samples, 10 classes, with a manifest."""
    out = tmp_path_factory.mktemp("shards")
    make_synthetic_shards(out, 160, 0, classes=10, size=SIZE, channels=3, seed=0, shard_size=40)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The trainer tests' world: 4 train shards x 12 grey samples (train_000005 invalid), a
    20-sample val shard, a cache with teachers ``tiny`` (k=4) and ``top2`` (k=2).

    A module that needs another world (test_bench.py, test_train_data.py, ...) defines its own
    ``world``, which overrides this one.
    """
    root = tmp_path_factory.mktemp("trainer")
    urls = write_shards(root / "shards", unlabelled=("train_000005",))
    val = write_shards(root / "shards", prefix="val", num_shards=1, per_shard=20)
    store = build_cache(root / "cache.zarr", urls, teachers={"tiny": 4, "top2": 2})
    clean = write_shards(root / "clean")  # every sample labelled: for runs without a cache
    return {"root": root, "urls": urls, "val": val, "store": store, "clean": clean}


@pytest.fixture
def bad_dir(tmp_path: Path) -> Path:
    """Shards without a manifest: one good, one per defect (corrupt image, no label, label 99)."""
    write_tar(tmp_path / "good-000000.tar", good("g"))
    write_tar(
        tmp_path / "corrupt-000000.tar",
        good("c")[:3] + [("c_bad", b"not an image", b"1")] + good("c2", 2),
    )
    write_tar(tmp_path / "nolabel-000000.tar", good("n")[:2] + [("n_bad", png(7), None)])
    write_tar(tmp_path / "range-000000.tar", good("r")[:2] + [("r_bad", png(8), b"99")])
    return tmp_path
