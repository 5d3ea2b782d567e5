"""One cache, many students: configs composed from a base (``base: other.yaml``), and training on a
subset of the cache's shards with validation shards from anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdcache.cli import main as kdcache
from kdcache.core.config import read_config
from kdcache.core.errors import CacheMismatchError, ConfigError
from kdcache.train.config import load_train_config
from kdcache.train.trainer import train
from tests.support.cachebuild import write_shards

ROOT = Path(__file__).resolve().parents[2]


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_later_keys_win_mappings_merge_and_lists_are_replaced(tmp_path):
    write(tmp_path / "a.yaml", {"run": {"seed": 1, "dir": "x"}, "stages": [1, 2], "keep": 0})
    write(tmp_path / "b.yaml", {"base": "a.yaml", "run": {"seed": 2}, "stages": [3]})
    child = write(tmp_path / "c.yaml", {"base": "b.yaml", "run": {"dir": "y"}})
    assert read_config(child) == {"run": {"seed": 2, "dir": "y"}, "stages": [3], "keep": 0}


def test_a_list_of_bases_is_merged_in_order(tmp_path):
    write(tmp_path / "one.yaml", {"x": 1, "y": {"a": 1}})
    write(tmp_path / "two.yaml", {"x": 2, "y": {"b": 2}})
    child = write(tmp_path / "c.yaml", {"base": ["one.yaml", "two.yaml"], "z": 3})
    assert read_config(child) == {"x": 2, "y": {"a": 1, "b": 2}, "z": 3}


def test_base_names_are_relative_to_the_including_file(tmp_path, monkeypatch):
    write(tmp_path / "shared" / "base.yaml", {"x": 1})
    write(tmp_path / "shared" / "mid.yaml", {"base": "base.yaml", "y": 2})
    child = write(tmp_path / "runs" / "c.yaml", {"base": "../shared/mid.yaml"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert read_config(child) == {"x": 1, "y": 2}


def test_cycles_are_refused_naming_the_chain(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match=r"base configs form a cycle: .*a.yaml -> .*b.yaml -> "):
        read_config(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", {"base": "self.yaml"})
    with pytest.raises(ConfigError, match="form a cycle"):
        read_config(tmp_path / "self.yaml")


@pytest.mark.parametrize(
    ("base", "match"),
    [
        ("missing.yaml", r"base 'missing.yaml' does not exist \(looked for "),
        (3, "base: expected a file name or a list of file names, found 3"),
        ([], "base: expected a file name or a list of file names, found"),
    ],
)
def test_bad_bases_are_named(tmp_path, base, match):
    with pytest.raises(ConfigError, match=match):
        read_config(write(tmp_path / "c.yaml", {"base": base}))


def test_overrides_apply_after_the_bases(tmp_path):
    demo = ROOT / "configs" / "demo"
    config = load_train_config(demo / "student_kd.yaml", ["optimizer.lr=0.2"])
    assert config.optimizer.lr == 0.2 and config.student.kwargs == {"img_size": 28, "hidden": 64}


def test_the_demo_students_share_one_base():
    demo = ROOT / "configs" / "demo"
    students = sorted(demo.glob("student_*.yaml"))
    bases = {p.name: yaml.safe_load(p.read_text()).get("base") for p in students}
    assert bases.pop("student_base.yaml") is None
    assert set(bases.values()) == {"student_base.yaml"} and len(bases) == 5
    for name in bases:
        config = load_train_config(demo / name)
        cache = "runs/demo/cache_strong" if "strong" in name else "runs/demo/cache"
        assert config.data.batch_size == 128 and config.cache.path == cache
    with pytest.raises(ConfigError, match="stages: required key is missing"):
        load_train_config(demo / "student_base.yaml")


# ---- a subset of the cache's shards --------------------------------------------------------------


def subset_config(world, tmp_path, **cache) -> dict:
    val = write_shards(tmp_path / "held_out", prefix="other", num_shards=1, per_shard=10)
    return {
        "run": {"dir": str(tmp_path / "run"), "log_every": 1, "progress": False},
        "data": {
            "shards": world["urls"][2:3],  # a quarter of the cache's shards
            "val_shards": val,  # from a folder the cache never saw
            "batch_size": 4,
            "num_workers": 0,
        },
        "cache": {"path": str(world["root"] / "cache.zarr"), **cache},
        "student": {"name": "kd_mlp", "kwargs": {"img_size": 12, "hidden": 16}},
        "teacher": {"name": "tiny"},
        "stages": [{"epochs": 1, "loss": {"name": "kd", "alpha": 0.5, "temperature": 2.0}}],
    }


def test_a_student_trains_on_a_subset_of_the_cache_shards(world, tmp_path):
    path = write(tmp_path / "sweep.yaml", subset_config(world, tmp_path, shard_subset=True))
    summary = train(load_train_config(path))
    assert summary.steps == 3  # 12 samples of one shard, batches of 4
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    evals = [line for line in map(json.loads, lines) if line["kind"] == "eval"]
    assert evals and evals[-1]["n"] == 10


def test_without_shard_subset_a_subset_is_refused_with_the_way_out(world, tmp_path, capsys):
    path = write(tmp_path / "sweep.yaml", subset_config(world, tmp_path))
    assert kdcache(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "shards differ: 3 in the cache but not given" in err
    assert "set cache.shard_subset: true" in err


def test_a_subset_keeps_every_other_refusal(world, tmp_path):
    raw = subset_config(world, tmp_path, shard_subset=True)
    foreign = write_shards(tmp_path / "foreign", prefix="foreign", num_shards=1)
    raw["data"]["shards"] = [*world["urls"][:1], *foreign]
    with pytest.raises(CacheMismatchError, match=r"1 shard\(s\) given but not in the cache"):
        train(load_train_config(write(tmp_path / "a.yaml", raw)))
    changed = write_shards(tmp_path / "changed", key_prefix="other", num_shards=1)
    raw["data"]["shards"] = changed
    raw["data"]["verify_keys"] = True
    with pytest.raises(CacheMismatchError, match="'train-000000.tar': the sample keys differ"):
        train(load_train_config(write(tmp_path / "b.yaml", raw)))
    raw["data"]["num_classes"] = 7
    raw["data"]["verify_keys"] = False
    raw["data"]["shards"] = world["urls"][:1]
    with pytest.raises(
        CacheMismatchError, match="num_classes: the cache has 4, the run asks for 7"
    ):
        train(load_train_config(write(tmp_path / "c.yaml", raw)))
