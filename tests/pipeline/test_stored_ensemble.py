"""Precompute: an ensemble of models stored as one teacher, and sampled teachers, by the real
planner and worker; ``kdcache verify`` recomputes both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.cache.reader import read_block
from kdcache.cache_tools.verify import verify_cache
from kdcache.core.errors import ConfigError
from kdcache.models.build import build_teacher
from kdcache.models.runner import ModelRunner
from kdcache.pipeline.config import PrecomputeConfig
from kdcache.pipeline.plan import plan_precompute
from kdcache.pipeline.record import new_result
from kdcache.shards.reading import decode_image, iter_shard
from kdcache.targets.sampling import sampled_from_logits, uniforms
from kdcache.targets.sparse import dense_probs, sampled_at, targets_from_arrays
from tests.support.cachebuild import (
    precompute_config,
    row_views,
    run_precompute,
    tiny_teacher,
    write_shards,
)

CLASSES = 6
VIEWS = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two random teachers, stored alone, as a probability ensemble (1:3), as an ensemble of the
    first twice, as a logit ensemble, and each again with encoding ``sampled`` (the second with
    more draws than classes outside its top-k, and no stored temperature); the first once more
    with its draws from the tail at τ = 4 (``a_tau``)."""
    root = tmp_path_factory.mktemp("ensemble")
    urls = write_shards(root / "shards", num_shards=2, per_shard=8, classes=CLASSES)
    a, _ = tiny_teacher(CLASSES, seed=0, save_to=root / "a.pt")
    b, _ = tiny_teacher(CLASSES, seed=1, save_to=root / "b.pt")
    members = [{"model": a.model_dump(), "weight": 1.0}, {"model": b.model_dump(), "weight": 3.0}]
    twice = [{"model": a.model_dump(), "weight": 0.4}, {"model": a.model_dump(), "weight": 0.6}]
    teachers = [
        {"name": "a", "model": a.model_dump(), "k": 3},
        {"name": "b", "model": b.model_dump(), "k": 3},
        {"name": "ens", "ensemble": {"members": members}, "k": 3},
        {"name": "twice", "ensemble": {"members": twice}, "k": 3},
        {"name": "mean", "ensemble": {"members": members, "combine": "logits"}, "k": 3},
        {
            "name": "a_sampled",
            "model": a.model_dump(),
            "k": 1,
            "encoding": "sampled",
            "samples": 4,
            "sample_temperatures": [4.0],
        },
        {"name": "b_sampled", "model": b.model_dump(), "k": 2, "encoding": "sampled", "samples": 9},
        {
            "name": "a_tau",
            "model": a.model_dump(),
            "k": 1,
            "encoding": "sampled",
            "samples": 4,
            "draw_temperature": 4.0,
        },
    ]
    config = precompute_config(
        root / "cache.zarr", urls, teachers, num_views=VIEWS, classes=CLASSES
    )
    store = run_precompute(config)
    specs = {"a": a, "b": b}
    return {"root": root, "urls": urls, "store": store, "specs": specs, "config": config}


def fresh_logits(world, name: str, shard: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """The model ``name`` rerun on every stored view of a shard (rows in order), and the rows."""
    store = world["store"]
    block = read_block(store, shard, [])
    samples = list(iter_shard(world["urls"][shard]))
    views = torch.cat(
        [row_views(store, block, block.row(s.key), decode_image(s.image, 1)) for s in samples]
    )
    model = build_teacher(world["specs"][name], CLASSES, 1)
    runner = ModelRunner(model, store.meta.recipe.rendering(), device="cpu")
    return runner(views).float(), np.array([block.row(s.key) for s in samples])


def stored(world, teacher: str, shard: int = 0):
    block = read_block(world["store"], shard, [teacher]).teachers[teacher]
    n = block.lse.size
    return targets_from_arrays([x.reshape(n, *x.shape[2:]) for x in block.fields()])


def test_the_stored_top_k_is_the_top_k_of_the_members_mean(world):
    za, rows = fresh_logits(world, "a")
    zb, _ = fresh_logits(world, "b")
    mean = 0.25 * torch.softmax(za, -1) + 0.75 * torch.softmax(zb, -1)
    probs, idx = mean.topk(3, dim=-1)
    ens = stored(world, "ens")
    np.testing.assert_array_equal(ens.idx.numpy(), idx.numpy())
    got = torch.exp(ens.logit.float() - ens.lse.float().unsqueeze(-1))
    torch.testing.assert_close(got, probs, rtol=2e-3, atol=2e-3)  # fp16 logits
    torch.testing.assert_close(
        torch.exp(ens.tail_lse - ens.lse), 1 - probs.sum(-1), rtol=2e-3, atol=2e-3
    )
    assert rows.tolist() == list(range(len(rows)))


def test_a_logit_ensemble_stores_the_mean_logits(world):
    za, _ = fresh_logits(world, "a")
    zb, _ = fresh_logits(world, "b")
    probs = torch.softmax(0.25 * za + 0.75 * zb, -1).topk(3, dim=-1).values
    mean = stored(world, "mean")
    got = torch.exp(mean.logit.float() - mean.lse.float().unsqueeze(-1))
    torch.testing.assert_close(got, probs, rtol=2e-3, atol=2e-3)


def test_an_ensemble_of_one_model_twice_is_that_model(world):
    a = stored(world, "a")
    twice = stored(world, "twice")
    assert torch.equal(a.idx, twice.idx)
    for t in (1.0, 4.0):
        torch.testing.assert_close(
            dense_probs(twice, CLASSES, t, "spread"),
            dense_probs(a, CLASSES, t, "spread"),
            rtol=2e-3,
            atol=2e-3,
        )


def test_the_ensemble_records_its_models(world):
    meta = world["store"].teacher_meta("ens")
    single = world["store"].teacher_meta("a")
    assert meta.model == {"source": "ensemble"} and meta.ensemble.combine == "probs"
    assert [m.weight for m in meta.ensemble.members] == [1.0, 3.0]
    assert meta.ensemble.members[0].weights_digest == single.weights_digest
    assert meta.ensemble.members[0].model == single.model
    assert meta.weights_digest not in (single.weights_digest, "")
    other = world["store"].teacher_meta("twice").weights_digest
    assert other != meta.weights_digest


def test_a_run_record_names_a_stored_ensemble_by_its_models(world):
    """The run record's ``model`` of a stored ensemble (which has no spec of its own) lists its
    models; a single model's is its name."""
    record = new_result(world["config"], plan_precompute(world["config"]))
    models = {run.name: run.model for run in record.teachers}
    name = world["specs"]["a"].name
    assert models["a"] == name
    assert models["ens"] == f"ensemble({name}, {world['specs']['b'].name})"


def drawn_again(world, teacher: str, temperatures: list[float], tau: float = 1.0):
    """(the sampled targets that ``teacher`` (member "a", 4 draws, top-1) should have stored for
    shard 0, drawn again from fresh logits; those logits)."""
    store = world["store"]
    za, rows = fresh_logits(world, "a")
    block = read_block(store, 0, [teacher])
    keys = [str(block.keys[r]) for r in rows for _ in range(VIEWS)]
    views = [v for _ in rows for v in range(VIEWS)]
    u = uniforms(store.meta.seed, keys, views, teacher, 4)
    labels = torch.from_numpy(block.labels[rows].astype(np.int64)).repeat_interleave(VIEWS)
    return sampled_from_logits(za, labels, 1, u, temperatures, tau), za


def test_sampled_teacher_stores_its_draws_reproducibly(world):
    expected, _ = drawn_again(world, "a_sampled", [4.0])
    got = stored(world, "a_sampled")
    assert torch.equal(got.sample_idx, expected.sample_idx)
    assert torch.equal(got.sample_count.float(), expected.sample_count)
    for t in (1.0, 4.0):  # the estimate from the rounded arrays: q8's bound, ~1/32 nat
        torch.testing.assert_close(
            dense_probs(sampled_at(got, t), CLASSES, t, "sample"),
            dense_probs(sampled_at(expected, t), CLASSES, t, "sample"),
            rtol=0.06,
            atol=0.01,
        )


def test_verify_recomputes_ensembles_and_draws(world):
    results = verify_cache(world["store"], num=12, seed=0).teachers
    assert {r.teacher: r.ok for r in results} == {
        "a": True,
        "b": True,
        "ens": True,
        "twice": True,
        "mean": True,
        "a_sampled": True,
        "b_sampled": True,
        "a_tau": True,
    }
    for name in ("a_sampled", "b_sampled", "a_tau"):
        assert next(r for r in results if r.teacher == name).draws_agreement == 1.0


def _config(teacher: dict) -> dict:
    return {
        "data": {"shards": "x-{000000..000001}.tar", "num_classes": CLASSES},
        "cache": {"path": "c"},
        "teachers": [{"name": "t", **teacher}],
    }


@pytest.mark.parametrize(
    ("teacher", "match"),
    [
        ({"k": 2}, r"teachers.0.model: give exactly one of teachers.0.model and"),
        (
            {"model": {"name": "m"}, "ensemble": {"members": [{"model": {"name": "m"}}]}},
            r"teachers.0.model: give exactly one of",
        ),
        (
            {"ensemble": {"members": [{"model": {"name": "m"}}]}, "render": {"size": 8}},
            r"teachers.0.render: an ensemble renders per model",
        ),
        ({"ensemble": {"members": []}}, r"teachers.0.ensemble.members: List should have at least"),
        (
            {"ensemble": {"members": [{"model": {"name": "m"}, "weight": 0}]}},
            r"teachers.0.ensemble.members.0.weight: Input should be greater than 0",
        ),
        (
            {"ensemble": {"members": [{"model": {"name": "m"}}], "combine": "max"}},
            r"teachers.0.ensemble.combine: Input should be 'probs' or 'logits'",
        ),
        (
            {"model": {"name": "m"}, "encoding": "sampled"},
            r"teachers.0.samples: encoding 'sampled' needs the number of classes to draw",
        ),
        (
            {"model": {"name": "m"}, "samples": 4},
            r"teachers.0.samples: only for encoding 'sampled' \(found 'fp16'\)",
        ),
        (
            {"model": {"name": "m"}, "sample_temperatures": [4.0]},
            r"teachers.0.sample_temperatures: only for encoding 'sampled'",
        ),
        (
            {
                "model": {"name": "m"},
                "encoding": "sampled",
                "samples": 4,
                "sample_temperatures": [1.0],
            },
            r"teachers.0.sample_temperatures: each temperature once, none of them 1",
        ),
        (
            {"model": {"name": "m"}, "encoding": "sampled", "samples": 0},
            r"teachers.0.samples: Input should be greater than or equal to 1",
        ),
        (
            {"model": {"name": "m"}, "encoding": "sampled", "samples": 4, "draw_temperature": 0},
            r"teachers.0.draw_temperature: Input should be greater than 0",
        ),
        (
            {"model": {"name": "m"}, "encoding": "sampled", "samples": 4, "draw_temperature": -4},
            r"teachers.0.draw_temperature: Input should be greater than 0",
        ),
        (
            {
                "model": {"name": "m"},
                "encoding": "sampled",
                "samples": 4,
                "draw_temperature": float("inf"),
            },
            r"teachers.0.draw_temperature: Input should be a finite number",
        ),
        (
            {
                "model": {"name": "m"},
                "encoding": "sampled",
                "samples": 4,
                "draw_temperature": float("nan"),
            },
            r"teachers.0.draw_temperature: Input should be a finite number",
        ),
        (
            {"model": {"name": "m"}, "encoding": "sampled", "samples": 4, "draw_temperature": "x"},
            r"teachers.0.draw_temperature: Input should be a valid number",
        ),
        (
            {"model": {"name": "m"}, "encoding": "q8", "draw_temperature": 4},
            r"teachers.0.draw_temperature: only for encoding 'sampled' \(found 'q8'\)",
        ),
        (
            {
                "model": {"name": "m"},
                "encoding": "sampled",
                "samples": 4,
                "draw_temperature": 4,
                "sample_temperatures": [2.0, 4.0],
            },
            r"teachers.0.sample_temperatures: 4 is the draw_temperature, whose normaliser is "
            r"stored with the draws",
        ),
        (
            {"model": {"name": "m"}, "encoding": "sampled", "samples": 4, "k": CLASSES},
            r"teachers.0.k: encoding 'sampled' draws from the classes outside the top-k",
        ),
    ],
)
def test_ensemble_and_sampling_settings_are_checked(teacher, match):
    from kdcache.core.config import validate

    with pytest.raises(ConfigError, match=match):
        validate(PrecomputeConfig, _config(teacher))


def test_validate_checks_the_draws(world, tmp_path):
    import shutil

    from kdcache.cache.store import open_store
    from kdcache.cache_tools.validate import validate_cache

    assert validate_cache(world["store"]).ok
    copy = tmp_path / "cache.zarr"
    shutil.copytree(world["store"].path, copy)
    store = open_store(str(copy), "r+")
    group = store.teacher_group("a_sampled")
    idx = group["sample_idx"][:]
    count = group["sample_count"][:]
    idx[0, 0, 1] = idx[0, 0, 0]  # the first view's second slot repeats its first
    count[0, 0, 1] = max(int(count[0, 0, 1]), 1)
    count[0, 0, 0] = 4 - count[0, 0, 1]
    group["sample_idx"][:] = idx
    group["sample_count"][:] = count
    problems = validate_cache(open_store(str(copy))).problems
    assert any("a drawn class repeats within a view's draws" in p for p in problems), problems


def test_inspect_shows_ensembles_against_their_members_and_the_draws_coverage(
    world, tmp_path, capsys
):
    import json

    from kdcache.cli import main as kdcache

    out = tmp_path / "report.json"
    path = world["store"].path
    assert kdcache(["inspect", path, "--json", str(out), "--ensemble", "a:1,b:3"]) == 0
    report = json.loads(out.read_text())
    by_label = {e["label"]: e for e in report["ensembles"]}
    # the named ensemble, and the stored ones whose models are cached (by digest and rendering)
    assert set(by_label) == {"ensemble(a:0.25,b:0.75)", "ens", "twice", "mean"}
    twice = by_label["twice"]
    assert [m["name"] for m in twice["members"]] == ["a"] and twice["stored"] == "twice"
    assert twice["agreement"]["a"] == 1.0 and twice["js"]["a"]["max"] < 1e-4
    assert twice["top1"]["ensemble"] == twice["top1"]["a"]
    ens = by_label["ens"]
    assert [(m["name"], m["weight"]) for m in ens["members"]] == [("a", 0.25), ("b", 0.75)]
    assert ens["views"] == 2 * 8 * VIEWS and ens["labelled_views"] == ens["views"]
    for figure in (ens["agreement"]["a"], ens["agreement"]["b"], ens["top1"]["ensemble"]):
        assert 0.0 <= figure <= 1.0
    assert ens["js"]["b"]["mean"] <= ens["js"]["a"]["mean"]  # the heavier member is closer
    coverage = report["sampled"]["a_sampled"]
    assert coverage["views"] == 2 * 8 * VIEWS and (coverage["k"], coverage["samples"]) == (1, 4)
    assert sum(coverage["distinct"]["counts"]) == coverage["views"]
    assert 1.0 <= coverage["distinct"]["mean"] <= 4.0
    assert 0.0 < coverage["tail_share"]["mean"] <= 1.0
    assert coverage["draw_temperature"] == 1.0
    assert report["sampled"]["a_tau"]["draw_temperature"] == 4.0
    printed = capsys.readouterr().out
    assert "== ensemble stored teacher 'ens' (probs) against its members" in printed
    assert "== sampled teachers: coverage per view" in printed


def test_inspect_refuses_an_ensemble_of_unknown_teachers(world):
    from kdcache.cache_tools.ensemble_stats import inspect_extras, parse_ensemble

    with pytest.raises(ConfigError, match=r"--ensemble .*\['zz'\] not in cache"):
        inspect_extras(world["store"], [], [parse_ensemble("a,zz")])
    with pytest.raises(ConfigError, match=r"--ensemble: expected NAME\[:WEIGHT\]"):
        parse_ensemble("a:0,b")


def test_online_training_refuses_a_stored_ensemble_by_name(world):
    from kdcache.train.config import TrainConfig
    from kdcache.train.target_source import online_teacher_spec

    config = TrainConfig.model_validate(
        {
            "data": {"shards": world["urls"]},
            "cache": {"path": world["store"].path},
            "student": {"name": "kd_mlp"},
            "teacher": {"mode": "online", "name": "ens"},
            "stages": [{"epochs": 1, "loss": {"name": "kd"}}],
        }
    )
    with pytest.raises(ConfigError, match=r"teacher.models.ens: teacher 'ens' is stored as an"):
        online_teacher_spec(config.teacher, "ens", world["store"])


def test_a_sampled_teacher_without_stored_temperatures_is_self_normalised(world):
    """9 draws, 4 classes outside the top-2: 4 slots; no temperature stored: T=4 self-normalised."""
    t = stored(world, "b_sampled")
    assert t.sample_idx.shape[-1] == CLASSES - 2 and t.lse_t.shape[-1] == 0
    assert torch.equal(t.sample_count.sum(-1).float(), torch.full((len(t.lse),), 9.0))
    at4 = sampled_at(t, 4.0)
    torch.testing.assert_close(at4.probs.sum(-1), torch.ones(len(t.lse)))


# ---- draws at a chosen temperature ---------------------------------------------------------------


def test_a_teacher_drawn_at_tau_stores_its_draws_and_the_tails_normaliser(world):
    """``a_tau``: the draws precompute stored are those from the fresh logits' tail at τ = 4
    (same generator, same keys), with the tail's ``logsumexp(l / 4)`` (array ``draw_tail``) in
    place of any ``lse_t``; at T=4 a drawn class's probability is its share of the draws times
    the exact tail mass at 4. The T=1 teachers store no ``draw_tail``."""
    store = world["store"]
    meta = store.teacher_meta("a_tau")
    assert meta.draw_temperature == 4.0 and store.teacher_meta("a_sampled").draw_temperature == 1.0
    assert "draw_tail" in meta.arrays(CLASSES) and "lse_t" not in meta.arrays(CLASSES)
    assert "draw_tail" not in store.teacher_meta("a_sampled").arrays(CLASSES)
    assert sorted(store.teacher_group("a_sampled").array_keys()) == sorted(
        [*store.teacher_meta("a_sampled").arrays(CLASSES), "done"]
    )
    expected, za = drawn_again(world, "a_tau", [], 4.0)
    got = stored(world, "a_tau")
    assert torch.equal(got.sample_idx, expected.sample_idx)
    assert torch.equal(got.sample_count.float(), expected.sample_count)
    torch.testing.assert_close(got.draw_tail_lse, expected.draw_tail_lse, rtol=2e-3, atol=2e-3)
    assert torch.all(got.draw_temperature == 4.0)
    at4 = sampled_at(got, 4.0)
    exact = torch.softmax(za / 4.0, -1)
    tail_mass = 1.0 - exact.gather(1, got.idx).sum(-1)
    torch.testing.assert_close(
        at4.probs[:, 1:], got.sample_count.float() / 4 * tail_mass[:, None], rtol=0.01, atol=2e-3
    )
    torch.testing.assert_close(at4.probs.sum(-1), torch.ones(len(tail_mass)))


def _copy(world, tmp_path):
    import shutil

    from kdcache.cache.store import open_store

    copy = tmp_path / "cache.zarr"
    shutil.copytree(world["store"].path, copy)
    return open_store(str(copy), "r+")


def test_a_cache_without_the_draw_temperature_reads_as_drawn_at_1(world, tmp_path):
    """Caches made before the draw temperature existed have no such attribute: they read as
    drawn at T=1, and their targets and estimates are what they were."""
    from kdcache.cache.store import open_store

    store = _copy(world, tmp_path)
    attrs = dict(store.teacher_group("a_sampled").attrs)
    assert attrs.pop("draw_temperature") == 1.0
    store.teacher_group("a_sampled").attrs.clear()
    store.teacher_group("a_sampled").attrs.update(attrs)
    old = open_store(store.path)
    assert old.teacher_meta("a_sampled").draw_temperature == 1.0
    block = read_block(old, 0, ["a_sampled"]).teachers["a_sampled"]
    n = block.lse.size
    before = stored(world, "a_sampled")
    after = targets_from_arrays([x.reshape(n, *x.shape[2:]) for x in block.fields()])
    for a, b in zip(before.tensors(), after.tensors(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(after.draw_tail_lse, after.tail_lse)
    for t in (1.0, 4.0, 2.0):
        assert torch.equal(sampled_at(after, t).probs, sampled_at(before, t).probs)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (0.0, "draw_temperature: Input should be greater than 0"),
        (-4.0, "draw_temperature: Input should be greater than 0"),
        (float("inf"), "draw_temperature: Input should be a finite number"),
        ("hot", "draw_temperature: Input should be a valid number"),
    ],
)
def test_a_stored_draw_temperature_is_checked_on_load(world, tmp_path, value, match):
    from kdcache.cache.store import open_store
    from kdcache.core.errors import CacheError

    store = _copy(world, tmp_path)
    store.teacher_group("a_tau").attrs.update({"draw_temperature": value})
    with pytest.raises(CacheError, match=rf"teacher 'a_tau' has unreadable attributes .*{match}"):
        open_store(store.path).teacher_meta("a_tau")


def test_a_rerun_with_another_draw_temperature_is_refused(world, tmp_path):
    from kdcache.cache.store import TeacherSpec
    from kdcache.cache.writer import add_teacher
    from kdcache.core.errors import CacheMismatchError

    store = _copy(world, tmp_path)
    meta = store.teacher_meta("a_tau")
    settings = meta.model_dump(include={"model", "weights_digest", "k", "encoding", "samples"})
    add_teacher(
        store, TeacherSpec(name="a_tau", rendering=meta.rendering, draw_temperature=4.0, **settings)
    )
    with pytest.raises(CacheMismatchError, match=r"draw_temperature: cache 4.0 vs run 2.0"):
        add_teacher(
            store,
            TeacherSpec(name="a_tau", rendering=meta.rendering, draw_temperature=2.0, **settings),
        )


def test_verify_and_validate_check_the_draws_normaliser(world, tmp_path):
    """A stored tail normaliser at τ off by 0.5 fails verify; a NaN one fails validate."""
    from kdcache.cache.store import open_store
    from kdcache.cache_tools.validate import validate_cache

    store = _copy(world, tmp_path)
    group = store.teacher_group("a_tau")
    tail = group["draw_tail"][:]
    group["draw_tail"][:] = tail + np.float16(0.5)
    [result] = verify_cache(open_store(store.path), teachers=["a_tau"], num=16, seed=0).teachers
    assert result.failures == result.views and result.draws_agreement == 1.0
    tail[0, 0] = np.nan
    group["draw_tail"][:] = tail
    problems = validate_cache(open_store(store.path)).problems
    assert any("NaN/inf value(s) in the draws' tail logsumexp" in p for p in problems), problems
