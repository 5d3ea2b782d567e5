"""Training against ensembles of cached teachers and against sampled targets, end to end on real
tars and a real cache (made by precompute's planner and worker); online runs the same ensemble."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kdcache.core.config import validate
from kdcache.core.errors import ConfigError
from kdcache.train.config import TrainConfig
from kdcache.train.reporting import TIMING_KEYS
from kdcache.train.trainer import train
from tests.support.cachebuild import precompute_config, run_precompute, tiny_teacher, write_shards

CLASSES = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """2 shards x 12 grey samples; a cache with teachers ``a`` and ``b`` at k = C, ``s`` (the
    first model again, encoding ``sampled``: top-1 and 3 draws, normaliser stored at T=2),
    ``s_tau`` (the same drawn from the tail at T=4) and ``top1`` (the first model at k = 1,
    fp16)."""
    root = tmp_path_factory.mktemp("ens_train")
    urls = write_shards(root / "shards", num_shards=2, per_shard=12, classes=CLASSES)
    a, _ = tiny_teacher(CLASSES, seed=0, save_to=root / "a.pt")
    b, _ = tiny_teacher(CLASSES, seed=1, save_to=root / "b.pt")
    sampled = {"encoding": "sampled", "samples": 3, "sample_temperatures": [2.0]}
    teachers = [
        {"name": "a", "model": a.model_dump(), "k": CLASSES},
        {"name": "b", "model": b.model_dump(), "k": CLASSES},
        {"name": "s", "model": a.model_dump(), "k": 1, **sampled},
        {
            "name": "s_tau",
            "model": a.model_dump(),
            "k": 1,
            "encoding": "sampled",
            "samples": 3,
            "draw_temperature": 4.0,
        },
        {"name": "top1", "model": a.model_dump(), "k": 1},
    ]
    config = precompute_config(root / "cache.zarr", urls, teachers, num_views=2, classes=CLASSES)
    run_precompute(config)
    return {"root": root, "urls": urls}


def raw(world, run_dir, stage: dict, **sections) -> dict:
    data = {
        "run": {"dir": str(run_dir), "log_every": 1, "progress": False},
        "data": {"shards": world["urls"], "batch_size": 8, "num_workers": 0, "shuffle_buffer": 0},
        "cache": {"path": str(world["root"] / "cache.zarr")},
        "student": {"name": "kd_mlp", "kwargs": {"img_size": 12, "hidden": 16}},
        "teacher": {"mode": "cache"},
        "optimizer": {"lr": 0.1},
        "stages": [{"epochs": 1, "loss": {"name": "kd", "temperature": 2.0}, **stage}],
    }
    data.update(sections)
    return data


def make(world, run_dir, stage: dict, **sections) -> TrainConfig:
    return validate(TrainConfig, raw(world, run_dir, stage, **sections))


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x and not set(x) <= set(TIMING_KEYS)]


def test_a_list_of_teachers_is_an_ensemble_of_equal_weights(world):
    config = make(world, "x", {"teachers": ["a", "b"]})
    assert config.stages[0].teachers == {"a": 1.0, "b": 1.0}
    assert config.stages[0].combine is None


@pytest.mark.parametrize(
    ("stage", "match"),
    [
        ({"teacher": "a", "teachers": ["a", "b"]}, r"stages.0.teachers: set stages.0.teacher or"),
        ({"teachers": []}, r"stages.0.teachers: name at least one teacher"),
        ({"teachers": ["a", "a"]}, r"stages.0.teachers: .*listed more than once: \['a'\]"),
        ({"teachers": {"a": 1.0, "b": 0.0}}, r"stages.0.teachers.b: Input should be greater"),
        ({"combine": "probs"}, r"stages.0.combine: only for an ensemble \(stages.0.teachers\)"),
        (
            {"teachers": ["a", "b"], "combine": "max"},
            r"stages.0.combine: Input should be 'probs' or 'logits'",
        ),
        (
            {"teachers": ["a", "b"], "combine": "logits", "loss": {"name": "kd", "tail": "renorm"}},
            r"stages.0.combine: 'logits' averages every teacher's logits, which needs "
            r"stages.0.loss.tail 'spread' \(found 'renorm'",
        ),
        (
            {"teachers": ["a", "b"], "loss": {"name": "ce"}},
            r"stages.0.teachers: a 'ce' stage uses no teacher",
        ),
    ],
)
def test_ensemble_settings_are_checked_naming_the_key(world, stage, match):
    with pytest.raises(ConfigError, match=match):
        make(world, "x", stage)


def test_a_stage_trains_against_an_ensemble_of_cached_teachers(world, tmp_path):
    summary = train(make(world, tmp_path, {"teachers": {"a": 1.0, "b": 3.0}}))
    assert summary.completed and summary.teacher_forwards == 0
    assert summary.images == 24


def test_online_mode_runs_the_same_ensemble(world, tmp_path):
    """The same ensemble, cached (k = C, fp16) and run live on the same views: the same losses
    up to the cache's rounding."""
    stage = {"teachers": {"a": 1.0, "b": 3.0}}
    train(make(world, tmp_path / "cache", stage))
    online = train(make(world, tmp_path / "online", stage, teacher={"mode": "online"}))
    assert online.teacher_forwards == 2 * 24  # both members on every view
    a = losses(tmp_path / "cache")
    b = losses(tmp_path / "online")
    assert len(a) == len(b) > 0
    assert a == pytest.approx(b, rel=2e-3, abs=1e-3)


def test_an_ensemble_of_one_teacher_trains_as_that_teacher(world, tmp_path):
    train(make(world, tmp_path / "one", {"teacher": "a"}))
    train(make(world, tmp_path / "ens", {"teachers": ["a"]}))
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "ens"), rel=1e-5)


def test_sampled_targets_train_with_the_sample_tail(world, tmp_path):
    stage = {"teacher": "s", "loss": {"name": "kd", "temperature": 2.0, "tail": "sample"}}
    summary = train(make(world, tmp_path, stage))
    assert summary.completed and all(x == x for x in losses(tmp_path))


def test_an_ensemble_with_a_sampled_member_trains(world, tmp_path):
    stage = {"teachers": ["s", "b"], "loss": {"name": "wsl", "temperature": 2.0, "tail": "sample"}}
    assert train(make(world, tmp_path, stage)).completed


def test_the_sample_tail_needs_sampled_teachers(world, tmp_path):
    """A top-k teacher with a tail is refused before any work; one at k = C has no tail to
    sample (exact), and ``topk`` does not go with the draws."""
    stage = {"teachers": ["a", "top1"], "loss": {"name": "kd", "tail": "sample"}}
    with pytest.raises(
        ConfigError,
        match=r"stages.0.loss.tail: 'sample' needs teachers stored with encoding 'sampled' .*"
        r"teacher 'top1' is 'fp16' with k=1",
    ):
        train(make(world, tmp_path / "top1", stage))
    stage = {"teacher": "s", "loss": {"name": "kd", "tail": "sample", "topk": 1}}
    with pytest.raises(ConfigError, match=r"stages.0.loss.topk: not with tail 'sample'"):
        train(make(world, tmp_path / "topk", stage))
    exact = {"teacher": "a", "loss": {"name": "kd", "tail": "sample"}}
    assert train(make(world, tmp_path / "exact", exact)).completed


def test_a_temperature_without_its_normaliser_is_a_logged_estimate(world, tmp_path, caplog):
    stage = {"teacher": "s", "loss": {"name": "kd", "temperature": 4.0, "tail": "sample"}}
    with caplog.at_level(logging.WARNING):
        train(make(world, tmp_path, stage))
    assert "not at the loss's T=4: its sampled targets are a self-normalised estimate" in (
        caplog.text
    )


def test_a_teacher_drawn_at_the_loss_temperature_trains_unbiased(world, tmp_path, caplog):
    """Draws at τ = 4 make T=4 (and T=1) unbiased: no self-normalisation warning, at either."""
    for t in (4.0, 1.0):
        stage = {"teacher": "s_tau", "loss": {"name": "kd", "temperature": t, "tail": "sample"}}
        with caplog.at_level(logging.WARNING):
            assert train(make(world, tmp_path / f"t{t:g}", stage)).completed
    assert "self-normalised" not in caplog.text
    stage = {"teacher": "s_tau", "loss": {"name": "kd", "temperature": 2.0, "tail": "sample"}}
    with caplog.at_level(logging.WARNING):
        train(make(world, tmp_path / "t2", stage))
    assert "stores the normaliser at T=[1.0, 4.0], not at the loss's T=2" in caplog.text
