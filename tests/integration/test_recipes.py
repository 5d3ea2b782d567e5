"""Strong recipes end to end: RandAugment, jitter, erasing and Mixup/CutMix views made by
precompute (in-process and through Ray), read by the trainer, checked by validate and verify,
with a teacher that renders its views at another size and interpolation than the student."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.cache.store import open_store
from kdcache.cache_tools.verify import verify_cache
from kdcache.cli import main
from kdcache.core.config import load_config
from kdcache.models.build import build_model
from kdcache.models.runner import ModelRunner
from kdcache.pipeline.config import PrecomputeConfig
from kdcache.targets.sparse import MixedLabels, from_logits
from kdcache.train.config import KDLossConfig, TrainConfig, load_train_config
from kdcache.train.data import build_train_data
from kdcache.train.losses import Criterion
from kdcache.train.schedule import lr_at, optimizer_segments
from kdcache.train.target_source import online_teacher_spec
from kdcache.train.trainer import train
from kdcache.views.recipe import ViewRecipe
from tests.support.cachebuild import (
    build_cache,
    cache_arrays,
    precompute_config,
    run_precompute,
    tiny_teacher,
    write_shards,
)
from tests.support.precomputerun import make_config, precompute, shards_url

STRONG = {
    "policy": "rand-m9-mstd0.5-inc1",
    "color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4},
    "erasing": {"prob": 0.25, "mode": "pixel"},
    "mix": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "group_size": 6},
}
GREY = {"channels": 1, "mean": [0.5], "std": [0.25]}
TEACHER_RENDER = {"size": 20, "interpolation": "bicubic"}


@pytest.fixture(scope="module")
def strong(tmp_path_factory):
    """A B3-like cache over 4 grey shards (k = C = 4), its teacher rendering 20 px bicubic while
    the recipe's (and the student's) is 12 px bilinear."""
    root = tmp_path_factory.mktemp("strong")
    urls = write_shards(root / "shards")
    val = write_shards(root / "shards", prefix="val", num_shards=1, per_shard=8)
    recipe = ViewRecipe(size=12, scale=(0.5, 1.0), **GREY, **STRONG)
    path = root / "cache.zarr"
    build_cache(path, urls, teachers={"big": 4}, recipe=recipe, render=TEACHER_RENDER)
    return {"root": root, "urls": urls, "val": val, "path": path}


def config(strong, run_dir, **sections) -> TrainConfig:
    data = {
        "run": {"dir": str(run_dir), "progress": False, "log_every": 2},
        "data": {
            "shards": strong["urls"],
            "val_shards": strong["val"],
            "batch_size": 8,
            "num_workers": 0,
            "shuffle_buffer": 10,
        },
        "cache": {"path": str(strong["path"])},
        "student": {"name": "kd_mlp", "kwargs": {"img_size": 12, "hidden": 16}},
        "teacher": {"mode": "cache", "name": "big"},
        "stages": [{"epochs": 1, "loss": {"name": "kd", "alpha": 0.5, "temperature": 2.0}}],
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainConfig.model_validate(data)


def test_the_strong_cache_validates_and_verifies_mixed_views_included(strong, capsys):
    store = open_store(str(strong["path"]))
    meta = store.teacher_meta("big")
    assert (meta.rendering.size, meta.rendering.interpolation) == (20, "bicubic")
    partners = store.view_group["mix_partner"][:]
    assert (partners != 0).mean() > 0.9  # mix prob 1: every view with a valid group mate
    assert main(["validate", str(strong["path"])]) == 0
    [result] = verify_cache(store, num=40, seed=1).teachers
    assert result.ok and result.views == 40 and result.top1_agreement == 1.0


def test_cached_kd_equals_online_kd_on_the_same_mixed_views(strong, tmp_path):
    """The trainer rebuilds each mixed view in the student's rendering (12 px) and, online, in the
    teacher's (20 px bicubic): the teacher's logits on those equal the cached ones (k = C), and
    so do the KD losses."""
    cfg = config(strong, tmp_path, teacher={"mode": "online", "name": "big"})
    data = build_train_data(cfg, 0, 1, ["big"], pin_memory=False)
    assert data.teacher_renderings["big"].size == 20 and data.rendering.size == 12
    runner = ModelRunner(
        build_model(online_teacher_spec(cfg.teacher, "big", data.store), 4, 1),
        data.teacher_renderings["big"],
        device="cpu",
    )
    criterion = Criterion(KDLossConfig(alpha=0.5, temperature=2.0), 4)
    student = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    mixed = 0
    for batch in data.epoch(0, ["big"]):
        assert batch.images.shape[-1] == 12 and batch.teacher_images["big"].shape[-1] == 20
        labels = batch.hard_labels()
        assert isinstance(labels, MixedLabels)
        mixed += int(labels.mixed.sum())
        online = from_logits(runner(batch.teacher_images["big"]).clone(), labels, 4)
        cached = batch.targets["big"]
        assert torch.equal(cached.idx, online.idx)
        assert torch.equal(cached.logit, online.logit.half())
        np.testing.assert_allclose(cached.label_logit, online.label_logit, rtol=1e-5, atol=1e-5)
        logits = student[: len(batch)]
        a = criterion(logits, labels, cached, 0).total.item()
        b = criterion(logits, labels, online, 0).total.item()
        assert a == pytest.approx(b, rel=1e-3)
    assert mixed > 30


@pytest.mark.parametrize("mode", ["cache", "online", "none"])
def test_students_train_on_strong_views_in_every_mode(strong, tmp_path, mode):
    sections = {"teacher": {"mode": mode, "name": "big" if mode != "none" else None}}
    if mode == "none":
        sections["stages"] = [{"epochs": 1, "loss": {"name": "ce"}}]
    summary = train(config(strong, tmp_path / mode, **sections))
    assert summary.completed and summary.images == 48 and summary.top1 is not None
    assert summary.teacher_forwards == (48 if mode == "online" else 0)


def test_fresh_strong_views_without_a_cache_mix_within_the_shards(strong, tmp_path):
    """No cache: views and their mixing are drawn on the fly from views.seed, as a cache would."""
    recipe = {"size": 12, "scale": [0.5, 1.0], **GREY, **STRONG}
    cfg = config(
        strong,
        tmp_path,
        cache={"path": None},
        teacher={"mode": "none", "name": None},
        views={"recipe": recipe, "num_views": 3},
        data={"num_classes": 4},
        stages=[{"epochs": 2, "loss": {"name": "ce"}}],
    )
    data = build_train_data(cfg, 0, 1, [], pin_memory=False)
    batches = list(data.epoch(0, []))
    assert sum(len(b) for b in batches) == 48
    assert all(b.lam is not None and (b.lam < 1).any() for b in batches)
    assert train(cfg).completed


def test_one_actor_gives_the_same_strong_cache_as_two(ray_session, data_dir, tmp_path):
    """RGB shards through Ray: the views, mixing partners and targets do not depend on the
    actors, nor on the data worker processes of an actor (the one actor makes its views on 2,
    the two actors each in a thread), and verify recomputes the mixed views from the shards."""
    recipe = {"size": 16, "scale": [0.3, 1.0], **STRONG}
    teachers = [{"name": "t1", "model": {"name": "kd_cnn_tiny"}, "k": 5, "render": TEACHER_RENDER}]
    caches = {}
    for actors in (1, 2):
        cache = tmp_path / f"cache{actors}"
        workers = 2 if actors == 1 else 0
        overrides = [f"ray.num_actors={actors}", "cache.num_views=2"]
        overrides.append(f"runtime.data_workers={workers}")
        cfg = make_config(shards_url(data_dir), cache, *overrides, teachers=teachers)
        cfg = cfg.model_copy(
            update={"cache": cfg.cache.model_copy(update={"recipe": ViewRecipe(**recipe)})}
        )
        assert precompute(cfg).failed == 0
        caches[actors] = cache_arrays(cache)
    for name, array in caches[1].items():
        np.testing.assert_array_equal(array, caches[2][name], err_msg=name)
    [result] = verify_cache(open_store(str(tmp_path / "cache2")), num=30).teachers
    assert result.ok


def test_student_only_augmentation_is_explicit_logged_and_fresh_each_epoch(
    strong, tmp_path, caplog
):
    plain = build_train_data(config(strong, tmp_path), 0, 1, ["big"], pin_memory=False)
    unseen = {"erasing": {"prob": 1.0, "mode": "const"}, "color_jitter": {"brightness": 0.4}}
    cfg = config(strong, tmp_path, student={"unseen_augment": unseen})
    with caplog.at_level("WARNING", logger="kdcache.train.data"):
        data = build_train_data(cfg, 0, 1, ["big"], pin_memory=False)
    assert "applied to the student's views only; the teacher did not see it" in caplog.text
    first = next(iter(plain.epoch(0, ["big"])))
    augmented = next(iter(data.epoch(0, ["big"])))
    again = next(iter(data.epoch(0, ["big"])))
    assert first.keys == augmented.keys and torch.equal(augmented.images, again.images)
    assert not torch.equal(first.images, augmented.images)
    assert torch.equal(first.targets["big"].idx, augmented.targets["big"].idx)  # targets unchanged


def test_inspect_shows_confidence_by_augmentation_strength(strong, tmp_path, capsys):
    out = tmp_path / "inspect.json"
    assert main(["inspect", str(strong["path"]), "--json", str(out), "--plots", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "teacher big: confidence by augmentation strength" in printed and "cutmix" in printed
    teacher = json.loads(out.read_text())["teachers"]["big"]
    strength = teacher["augmentation"]
    views = teacher["labelled_views"]
    assert sum(g["views"] for g in strength["policy"]["by_ops"]) == views
    mix = strength["mix"]
    assert mix["unmixed"]["views"] + mix["mixup"]["views"] + mix["cutmix"]["views"] == views
    assert sum(g["views"] for g in mix["by_lam"]) == mix["mixup"]["views"] + mix["cutmix"]["views"]
    assert all(0 <= g["max_prob"] <= 1 for g in mix["by_lam"] if g["views"])
    assert (tmp_path / "augmentation_big.png").stat().st_size > 0


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["precompute_b2_imagenet", "precompute_b3_imagenet"])
def test_dist_recipe_configs_are_valid_and_say_what_dist_runs(name):
    cfg = load_config(PrecomputeConfig, CONFIGS / "dist" / f"{name}.yaml")
    recipe = cfg.cache.recipe
    assert recipe.policy.magnitude == 9 and recipe.policy.magnitude_std == 0.5
    assert recipe.erasing.mode == "pixel" and cfg.teachers[0].model.pretrained
    if name.endswith("b3_imagenet"):
        assert recipe.color_jitter.brightness == 0.4 and recipe.mix.mixup_alpha == 0.8
        assert recipe.mix.cutmix_alpha == 1.0 and recipe.erasing.prob == 0.25
    else:
        assert recipe.color_jitter is None and recipe.mix is None and recipe.erasing.prob == 0.2


def test_dist_training_configs_follow_dists_code():
    b2 = load_train_config(CONFIGS / "dist" / "resnet50_resnet18_b2_imagenet.yaml")
    [segment] = optimizer_segments(b2)
    assert (segment.optimizer.name, segment.optimizer.lr, b2.total_epochs) == (
        "rmsprop",
        0.048,
        450,
    )
    assert lr_at(segment, 4.8) == pytest.approx(0.048 * 0.97**2) and b2.ema.decay == 0.9999
    assert b2.stages[0].loss.kd_weight == 2.0 and b2.stages[0].loss.ce_weight == 1.0
    b3 = load_train_config(CONFIGS / "dist" / "swinl_swint_b3_imagenet.yaml")
    [segment] = optimizer_segments(b3)
    assert (segment.optimizer.name, segment.optimizer.grad_clip, b3.total_epochs) == (
        "adamw",
        5.0,
        300,
    )


def test_a_stored_ensemble_and_a_sampled_teacher_on_strong_views(tmp_path):
    """Beyond one top-k teacher under a strong recipe: an ensemble whose members render the mixed
    views at different sizes, and sampled targets keyed by each view's sample key; validate
    passes and verify recomputes both from the shards."""
    urls = write_shards(tmp_path / "shards", num_shards=2, per_shard=8)
    a, _ = tiny_teacher(4, seed=0, save_to=tmp_path / "a.pt")
    b, _ = tiny_teacher(4, seed=1, save_to=tmp_path / "b.pt")
    members = [
        {"model": a.model_dump(), "weight": 1.0},
        {"model": b.model_dump(), "weight": 1.0, "render": TEACHER_RENDER},
    ]
    teachers = [
        {"name": "ens", "ensemble": {"members": members}, "k": 2},
        {"name": "drawn", "model": a.model_dump(), "k": 1, "encoding": "sampled", "samples": 3},
    ]
    recipe = ViewRecipe(size=12, scale=(0.5, 1.0), **GREY, **STRONG)
    cfg = precompute_config(tmp_path / "cache.zarr", urls, teachers, recipe=recipe, num_views=2)
    store = run_precompute(cfg)
    assert (store.view_group["mix_partner"][:] != 0).any()
    assert main(["validate", str(tmp_path / "cache.zarr")]) == 0
    results = verify_cache(store, num=12, seed=0).teachers
    assert sorted(r.teacher for r in results) == ["drawn", "ens"]
    assert all(r.ok and r.views == 12 for r in results)
