"""The cache store: layout round trip, completion marks, refusals that say what differs,
validate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from pydantic import ValidationError

from kdcache.cache.reader import read_block
from kdcache.cache.store import STATUS_INVALID, STATUS_VALID, Fingerprint, TeacherSpec, open_store
from kdcache.cache.writer import add_teacher, create_store, write_targets, write_views
from kdcache.cache_tools.validate import validate_cache
from kdcache.core.errors import (
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
    CacheNotFoundError,
)
from kdcache.targets.sparse import from_logits
from kdcache.views.recipe import ViewParams, ViewRecipe, draw_view

A = 2
C = 6
K = 3
KEYS = [["s0_a", "s0_b", "s0_c"], ["s1_a", "s1_b"]]
RECIPE = ViewRecipe(size=8, channels=1, mean=(0.5,), std=(0.5,))


def fingerprint(keys=KEYS) -> Fingerprint:
    return Fingerprint(
        shards=[f"d-{i:06d}.tar" for i in range(len(keys))],
        counts=[len(k) for k in keys],
        key_digest="digest",
    )


def new_store(path, **overrides):
    kwargs = dict(
        fingerprint=fingerprint(),
        keys=KEYS,
        recipe=RECIPE,
        num_views=A,
        num_classes=C,
        class_names=[],
        seed=0,
        config={"note": "test"},
    )
    kwargs.update(overrides)
    return create_store(str(path), **kwargs)


def fill_shard(store, shard, teacher="t", logits=None, invalid_row=None):
    keys = KEYS[shard]
    n = len(keys)
    labels = np.arange(n) % C
    status = np.full(n, STATUS_VALID)
    errors = [""] * n
    if invalid_row is not None:
        status[invalid_row] = STATUS_INVALID
        errors[invalid_row] = "corrupt image"
    params = ViewParams.empty(RECIPE, n, A)
    for row, key in enumerate(keys):
        for a in range(A):
            params.put(row, a, draw_view(RECIPE, 0, key, a, (10, 10)))
    write_views(store, shard, labels=labels, status=status, errors=errors, params=params)
    logits = torch.randn(n * A, C) if logits is None else logits
    t = from_logits(logits, torch.as_tensor(labels).repeat_interleave(A), K)
    write_targets(store, shard, teacher, t)
    return logits


@pytest.fixture
def store(tmp_path):
    store = new_store(tmp_path / "c.zarr")
    add_teacher(
        store,
        TeacherSpec(name="t", model={"source": "timm", "name": "kd_mlp"}, weights_digest="w1", k=K),
    )
    return store


def test_round_trip_one_chunk_per_shard(store):
    torch.manual_seed(0)
    logits = fill_shard(store, 1)
    reopened = open_store(store.path)
    assert reopened.group["labels"].chunks == (3,) and reopened.cap == 3
    block = read_block(reopened, "d-000001.tar", ["t"])
    assert list(block.keys) == KEYS[1] and block.row("s1_b") == 1
    tb = block.teachers["t"]
    np.testing.assert_allclose(tb.lse.reshape(-1), torch.logsumexp(logits, -1).numpy(), rtol=1e-6)
    assert tb.topk_idx.dtype == np.uint16 and tb.topk_logit.dtype == np.float16
    assert reopened.meta.config == {"note": "test"} and reopened.teacher_meta("t").k == K


def test_incomplete_shards_are_reported_and_refused(store):
    fill_shard(store, 1)
    assert store.incomplete_shards() == {"views": ["d-000000.tar"], "t": ["d-000000.tar"]}
    with pytest.raises(CacheIncompleteError, match="shard 'd-000000.tar' has no views yet"):
        read_block(store, 0, ["t"])


def test_unknown_key_is_an_error_not_a_misalignment(store):
    fill_shard(store, 1)
    with pytest.raises(
        CacheMismatchError, match="key 's0_a' is not in the cache's block for shard 'd-000001.tar'"
    ):
        read_block(store, 1, ["t"]).row("s0_a")


def test_mismatches_say_what_differs(store):
    other = fingerprint([["s0_a", "s0_b"], ["s1_a", "s1_b"]])
    with pytest.raises(
        CacheMismatchError,
        match="shard 'd-000000.tar' has 3 samples in the cache but 2 in the data",
    ):
        store.check_compatible(fingerprint=other)
    with pytest.raises(
        CacheMismatchError, match=r"view recipe differs \(size: cache 8 vs run 16\)"
    ):
        store.check_compatible(recipe=RECIPE.model_copy(update={"size": 16}))
    with pytest.raises(
        CacheMismatchError, match="num_classes: the cache has 6, the run asks for 10"
    ):
        store.check_compatible(num_classes=10)
    renamed = Fingerprint(shards=["x.tar", "d-000001.tar"], counts=[3, 2], key_digest="digest")
    with pytest.raises(
        CacheMismatchError,
        match=r"shards differ: 1 in the cache but not given \(e.g. \['d-000000.tar'\]\)",
    ):
        store.check_compatible(fingerprint=renamed)
    with pytest.raises(CacheMismatchError, match="teacher 'u' is not in cache .* it has \\['t'\\]"):
        store.teacher_group("u")


def test_teacher_with_other_weights_is_refused(store):
    add_teacher(
        store,
        TeacherSpec(name="t", model={"source": "timm", "name": "kd_mlp"}, weights_digest="w1", k=K),
    )  # same: fine
    with pytest.raises(
        CacheMismatchError,
        match="teacher 't' already exists .*weights_digest: cache 'w1' vs run 'w2'",
    ):
        add_teacher(
            store,
            TeacherSpec(
                name="t", model={"source": "timm", "name": "kd_mlp"}, weights_digest="w2", k=K
            ),
        )
    with pytest.raises(CacheError, match="k=7 must be between 1 and num_classes=6"):
        add_teacher(store, TeacherSpec(name="u", model={}, weights_digest="w", k=7))


def test_creating_over_an_existing_cache_needs_overwrite(store, tmp_path):
    with pytest.raises(CacheError, match="already holds data; pass --overwrite"):
        new_store(tmp_path / "c.zarr")
    assert new_store(tmp_path / "c.zarr", overwrite=True).teachers == []


def test_open_refuses_what_is_not_a_cache(tmp_path):
    with pytest.raises(CacheNotFoundError, match="no cache at"):
        open_store(str(tmp_path / "missing.zarr"))
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(CacheError, match="not a kdcache cache"):
        open_store(str(tmp_path / "plain.zarr"))


def test_validate_passes_a_sound_cache_and_lists_every_problem(store):
    fill_shard(store, 0, invalid_row=1)
    fill_shard(store, 1)
    report = validate_cache(store)
    assert report.problems == [
        "stored keys do not match the fingerprint's key digest"
    ]  # test digest is fake
    tg = store.teacher_group("t")
    logit = tg["topk_logit"][0:3]
    logit[0, 0, 0] = np.nan
    tg["topk_logit"][0:3] = logit
    idx = tg["topk_idx"][3:6]
    idx[0, 0, 0] = C + 1
    tg["topk_idx"][3:6] = idx
    problems = "\n".join(validate_cache(store).problems)
    assert "shard 'd-000000.tar', teacher 't': 1 NaN/inf value(s) in top-k logits" in problems
    assert "shard 'd-000001.tar', teacher 't': class indices outside [0, 6)" in problems


def test_add_teacher_stores_the_spec_and_its_own_fields(store):
    """The spec's fields are stored as given; the index dtype, the default rendering and the
    creation stamp are the writer's."""
    spec = TeacherSpec(name="q", model={"name": "m"}, weights_digest="wq", k=2, encoding="q8")
    meta = add_teacher(store, spec)
    stored = open_store(store.path).teacher_meta("q")
    assert stored == meta
    assert (stored.k, stored.encoding, stored.weights_digest) == (2, "q8", "wq")
    assert (stored.index_dtype, stored.rendering) == ("uint16", RECIPE.rendering())
    assert stored.created["id"] and stored.created["id"] != store.teacher_meta("t").created["id"]
    with pytest.raises(ValidationError, match="created"):  # the writer's field, not the caller's
        TeacherSpec.model_validate(
            {"name": "q", "model": {}, "weights_digest": "w", "k": 2, "created": {}}
        )


def test_a_half_created_teacher_is_ignored_then_created_again(store):
    """A precompute killed while creating a teacher leaves a subgroup without attributes (they come
    last)."""
    half = store.group.require_group("teachers/half")
    half.create_array("topk_idx", shape=(6, A, K), dtype="uint16")
    reopened = open_store(store.path, "r+")
    assert reopened.teachers == ["t"] and reopened.unfinished_teachers == ["half"]
    fill_shard(reopened, 0)
    fill_shard(reopened, 1)
    assert reopened.incomplete_shards() == {}  # the half teacher is not waited for
    add_teacher(
        reopened,
        TeacherSpec(
            name="half", model={"source": "timm", "name": "kd_mlp"}, weights_digest="w2", k=2
        ),
    )
    assert reopened.teachers == ["half", "t"] and reopened.unfinished_teachers == []
    assert open_store(store.path).teacher_meta("half").k == 2


def test_unreadable_teacher_attributes_are_an_error_naming_the_teacher(store):
    store.group["teachers/t"].attrs.update({"k": "many"})
    with pytest.raises(
        CacheError,
        match=r"teacher 't' has unreadable attributes "
        r"\(1 problem\(s\), e.g. k: Input should be a valid integer",
    ):
        open_store(store.path).teacher_meta("t")


def test_an_identity_saved_before_a_field_existed_matches_when_the_cache_lacks_it_too():
    """A run saved by an earlier kdcache (no teachers' ``created``) resumes on the same cache;
    a field that differs is still named."""
    from kdcache.cache.store import identity_differences

    rendering = {"size": 28, "interpolation": "bilinear", "mean": [0.3], "std": [0.3]}
    teacher = {"weights_digest": "w", "k": 10, "rendering": rendering}
    saved = {"path": "a", "creation_id": None, "teachers": {"big": teacher}}
    current = {"path": "b", "teachers": {"big": {**teacher, "created": None}}}
    assert identity_differences(saved, current) == []
    rebuilt = {"path": "b", "teachers": {"big": {**teacher, "created": "id2"}}}
    assert identity_differences(saved, rebuilt) == [
        f"teachers: {{'big': {teacher!r}}} vs {{'big': {rebuilt['teachers']['big']!r}}}"
    ]
