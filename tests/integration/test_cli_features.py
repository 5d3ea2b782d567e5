"""Every config feature the README documents, through the real command line (issue 25, item 1).

Each test runs ``kdcache shards`` / ``precompute`` / ``train`` / ``validate`` / ``verify`` /
``inspect`` as a user would, through ``kdcache.cli.main`` in this process (one local Ray for the
module, reused by every precompute), on tiny grey shards, tiny models and one epoch. The caches
are built by ``kdcache precompute`` itself, never by a test helper; results are read from the
``--json`` files and ``summary.json`` the commands write.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from kdcache.cli import main as cli_main
from kdcache.core.results import InspectResult, TrainResult, ValidateResult, VerifyResult
from tests.support.cachebuild import assert_same_arrays, cache_arrays

RECIPE = {"size": 12, "scale": [0.5, 1.0], "channels": 1, "mean": [0.5], "std": [0.25]}
STRONG = {
    "policy": "rand-m9-mstd0.5-inc1",
    "erasing": {"prob": 0.5, "mode": "pixel"},
    "mix": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "group_size": 4},
}
CNN = {"name": "kd_cnn_tiny"}
MLP = {"name": "kd_mlp", "kwargs": {"img_size": 12, "hidden": 16}}
BICUBIC_16 = {"size": 16, "interpolation": "bicubic"}
TEACHERS = [
    {"name": "plain", "model": CNN, "k": 3, "render": BICUBIC_16},  # its own rendering
    {"name": "other", "model": MLP, "k": 3},
    {"name": "samp", "model": CNN, "k": 1, "encoding": "sampled", "samples": 2},
    {
        "name": "ens",  # a stored ensemble: one teacher from two models, each in its rendering
        "k": 3,
        "ensemble": {
            "combine": "probs",
            "members": [
                {"model": CNN, "weight": 1, "render": BICUBIC_16},
                {"model": MLP, "weight": 2},
            ],
        },
    },
]


def kdcache(*argv: object) -> None:
    """Run one ``kdcache`` command as a user would; it must succeed."""
    assert cli_main([str(a) for a in argv]) == 0, argv


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def precompute_config(path: Path, shards, cache_path: Path, **sections) -> Path:
    data = {
        "data": {"shards": shards, "num_classes": 4},
        "cache": {"path": str(cache_path), "num_views": 1, "recipe": RECIPE},
        "teachers": [{"name": "t1", "model": CNN, "k": 2}],
        "ray": {"num_actors": 1},
        "runtime": {"batch_size": 16},
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return write_yaml(path, data)


def train_config(path: Path, shards, val, cache_path: Path | None, **sections) -> Path:
    data = {
        "run": {"dir": str(path.parent / "run"), "progress": False},
        "data": {
            "shards": shards,
            "val_shards": val,
            "batch_size": 4,
            "num_workers": 0,
            "shuffle_buffer": 0,
        },
        "cache": {"path": str(cache_path)} if cache_path else {},
        "student": MLP,
        "teacher": {"name": "t1"},
        "stages": [{"epochs": 1, "loss": {"name": "kd", "temperature": 2.0}}],
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return write_yaml(path, data)


def trained(config: Path) -> TrainResult:
    """``kdcache train CONFIG``: the run's summary, which must say it completed and evaluated."""
    kdcache("train", config)
    run_dir = Path(yaml.safe_load(config.read_text())["run"]["dir"])
    summary = TrainResult.read(str(run_dir / "summary.json"))
    assert summary.completed and summary.top1 is not None
    return summary


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, ray_session) -> Path:
    """``kdcache shards synthetic``: 2 train shards of 8 grey 12 px images, 1 test shard, and
    their manifests (the layout the README's commands write)."""
    out = tmp_path_factory.mktemp("cli_shards")
    kdcache(
        "shards", "synthetic", "--out", out, "--num", 16, "--test-num", 8, "--classes", 4,
        "--size", 12, "--channels", 1, "--shard-size", 8, "--seed", 0,
    )  # fmt: skip
    assert (out / "train-manifest.json").exists()
    return out


# ---- every shard URL form, with a manifest, a wids index or nothing beside the shards -----------


def url_forms(folder: Path) -> dict[str, tuple[object, str]]:
    """``data.shards`` and ``data.val_shards`` of each documented form over ``folder``."""
    d = folder.absolute()
    return {
        "paths": ([f"{d}/train-000000.tar", f"{d}/train-000001.tar"], f"{d}/test-000000.tar"),
        "glob": (f"{d}/train-*.tar", f"{d}/test-*.tar"),
        "braces": (f"{d}/train-{{000000..000001}}.tar", f"{d}/test-000000.tar"),
        "pipe": (f"pipe:cat {d}/train-{{000000..000001}}.tar", f"pipe:cat {d}/test-000000.tar"),
        "fsspec": (f"file://{d}/train-{{000000..000001}}.tar", f"file://{d}/test-000000.tar"),
    }


def beside(shard_dir: Path, folder: Path, index: str) -> Path:
    """A copy of the shards with ``index`` beside them: the manifest ``kdcache shards`` wrote,
    a WebDataset ``shardindex.json`` (as ``widsindex create`` writes it), or nothing."""
    folder.mkdir()
    for tar in shard_dir.glob("*.tar"):
        shutil.copy(tar, folder / tar.name)
    if index == "manifest":
        for manifest in shard_dir.glob("*-manifest.json"):
            shutil.copy(manifest, folder / manifest.name)
    if index == "wids":
        entries = [
            {"url": name, "nsamples": 8, "filesize": (folder / name).stat().st_size}
            for name in ("train-000000.tar", "train-000001.tar", "test-000000.tar")
        ]
        (folder / "shardindex.json").write_text(
            json.dumps({"wids_version": 1, "shardlist": entries})
        )
    return folder


@pytest.fixture(scope="module")
def reference(shard_dir, tmp_path_factory) -> dict:
    """The cache of the shards named by their paths: what every other form must equal."""
    root = tmp_path_factory.mktemp("reference")
    shards, _ = url_forms(shard_dir)["paths"]
    kdcache("precompute", precompute_config(root / "p.yaml", shards, root / "cache"))
    return cache_arrays(root / "cache")


FORMS = [
    (form, index)
    for index in ("manifest", "none")
    for form in ("paths", "glob", "braces", "pipe", "fsspec")
] + [("braces", "wids"), ("pipe", "wids")]
IDS = [f"{form}-{index}" for form, index in FORMS]
SLOW = pytest.mark.slow  # a precompute through Ray takes ~30 s on 2 shared cores
PRECOMPUTE_FORMS = [
    pytest.param(*case, id=name, marks=() if name == "pipe-manifest" else SLOW)
    for case, name in zip(FORMS, IDS, strict=True)
]


@pytest.mark.parametrize(("form", "index"), FORMS, ids=IDS)
def test_every_shard_url_form_trains(shard_dir, tmp_path, form, index):
    """``kdcache train`` without a cache (plain CE) reads each form of ``data.shards`` and
    ``data.val_shards``. Fixed here: a ``pipe:`` command over files with kdcache's manifest
    beside them was refused, ``shard 'pipe:cat …/test-000000.tar' does not exist``."""
    folder = beside(shard_dir, tmp_path / "shards", index)
    shards, val = url_forms(folder)[form]
    config = train_config(
        tmp_path / "t.yaml",
        shards,
        val,
        None,
        data={"num_classes": 4},
        teacher={"mode": "none"},
        views={"recipe": RECIPE},
        stages=[{"epochs": 1, "loss": {"name": "ce"}}],
    )
    summary = trained(config)
    assert summary.images == 16 and summary.teacher_forwards == 0


@pytest.mark.parametrize(("form", "index"), PRECOMPUTE_FORMS)
def test_every_shard_url_form_precomputes(shard_dir, reference, tmp_path, form, index):
    """Each form of ``data.shards`` makes the reference cache, and trains from it. Fixed here:
    ``pipe:`` commands over files with kdcache's manifest beside them were refused at planning,
    ``shard 'pipe:cat …/train-000000.tar' does not exist``."""
    folder = beside(shard_dir, tmp_path / "shards", index)
    shards, val = url_forms(folder)[form]
    cache = tmp_path / "cache"
    kdcache("precompute", precompute_config(tmp_path / "p.yaml", shards, cache))
    assert_same_arrays(cache_arrays(cache), reference)
    summary = trained(train_config(tmp_path / "t.yaml", shards, val, cache))
    assert summary.images == 16


# ---- one cache with every teacher kind, a strong recipe and per-teacher renderings --------------


@pytest.fixture(scope="module")
def features(shard_dir, tmp_path_factory) -> dict:
    """``kdcache precompute`` of a strong recipe (RandAugment, erasing, Mixup/CutMix), A=2, with
    a teacher rendering at 16 px bicubic, another at the recipe's 12 px, a sampled teacher and
    a stored ensemble of both models."""
    root = tmp_path_factory.mktemp("features")
    shards = f"{shard_dir.absolute()}/train-{{000000..000001}}.tar"
    config = precompute_config(
        root / "p.yaml",
        shards,
        root / "cache",
        cache={"num_views": 2, "recipe": {**RECIPE, **STRONG}},
        teachers=TEACHERS,
    )
    kdcache("precompute", config)
    val = f"{shard_dir.absolute()}/test-000000.tar"
    return {"root": root, "config": config, "shards": shards, "val": val, "cache": root / "cache"}


def verified(cache: Path, out: Path, *teachers: str) -> VerifyResult:
    """``kdcache verify CACHE --json``: every teacher (or the named ones) recomputed and ok."""
    chosen = [arg for name in teachers for arg in ("--teacher", name)]
    kdcache("verify", cache, "--num", 16, "--json", out, *chosen)
    result = VerifyResult.read(str(out))
    assert result.teachers and result.ok, result
    return result


def test_stored_ensemble_is_precomputed_and_verified_from_the_cli(features, tmp_path):
    """Fixed here: every ``kdcache precompute`` of a ``teachers[].ensemble`` failed with
    ``AttributeError: 'NoneType' object has no attribute 'name'``, leaving an empty cache."""
    result = verified(features["cache"], tmp_path / "v.json", "ens")
    assert [t.teacher for t in result.teachers] == ["ens"]
    record = json.loads(next((features["cache"] / "runs").glob("*.json")).read_text())
    models = {t["name"]: t["model"] for t in record["teachers"]}
    assert models["ens"] == "ensemble(kd_cnn_tiny, kd_mlp)"


def test_strong_recipe_renderings_and_sampled_teacher_validate_verify_inspect(features, tmp_path):
    kdcache("validate", features["cache"], "--json", tmp_path / "val.json")
    valid = ValidateResult.read(str(tmp_path / "val.json"))
    assert valid.ok and sorted(valid.teachers) == ["ens", "other", "plain", "samp"]
    result = verified(features["cache"], tmp_path / "v.json")
    assert {t.teacher for t in result.teachers} == {"ens", "other", "plain", "samp"}
    draws = {t.teacher: t.draws_agreement for t in result.teachers}
    assert draws["samp"] == 1.0
    kdcache(
        "inspect", features["cache"], "--json", tmp_path / "i.json", "--ensemble", "plain:1,other:1"
    )
    inspected = InspectResult.read(str(tmp_path / "i.json"))
    assert sorted(inspected.teachers) == ["ens", "other", "plain", "samp"]
    assert inspected.ensembles and "samp" in inspected.sampled


STAGES = {
    "on_the_fly_ensemble": {"teachers": ["plain", "other"], "combine": "probs"},
    "stored_ensemble": {"teacher": "ens"},
    "sampled": {"teacher": "samp", "loss": {"name": "kd", "temperature": 1.0, "tail": "sample"}},
    "rendered_teacher": {"teacher": "plain"},
}


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_train_from_each_teacher_kind(features, tmp_path, kind):
    stage = {"epochs": 1, "loss": {"name": "kd", "temperature": 2.0}, **STAGES[kind]}
    config = train_config(
        tmp_path / "t.yaml",
        features["shards"],
        features["val"],
        features["cache"],
        student={**MLP, "kwargs": {"img_size": 10, "hidden": 16}, "render": {"size": 10}},
        teacher={"name": "plain"},
        stages=[stage],
    )
    assert trained(config).images == 16


@pytest.mark.slow
def test_growth_from_the_cli_verifies_and_trains(features, tmp_path):
    """``kdcache precompute CONFIG cache.num_views=3 --grow`` on a copy of the feature cache: every
    teacher kind (stored ensemble and sampled included) fills the new view; verify and train."""
    cache = tmp_path / "cache"
    shutil.copytree(features["cache"], cache)
    kdcache("precompute", features["config"], f"cache.path={cache}", "cache.num_views=3", "--grow")
    verified(cache, tmp_path / "v.json")
    config = train_config(
        tmp_path / "t.yaml",
        features["shards"],
        features["val"],
        cache,
        teacher={"name": "ens"},
    )
    assert trained(config).images == 16
