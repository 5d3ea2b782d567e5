"""Cache encodings: fp16 and the compact q8 decode to the same form, within q8's stated bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.cache.reader import read_block
from kdcache.cache.store import STATUS_VALID, Fingerprint, TeacherSpec
from kdcache.cache.writer import add_teacher, create_store, write_targets, write_views
from kdcache.targets.encoding import Q8_STEP, Q8_TAIL_MAX, decode, encode
from kdcache.targets.sparse import SparseTargets, dense_probs, from_logits, tail_mass_t1
from kdcache.views.recipe import ViewParams, ViewRecipe


def teacher_like_logits(n: int, classes: int, seed: int = 0) -> torch.Tensor:
    """Peaked logits with a long tail, like a trained classifier's."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 2.0
    labels = torch.randint(classes, (n,), generator=g)
    logits[torch.arange(n), labels] += torch.rand(n, generator=g) * 12
    return logits


def encoded_round_trip(encoding: str, logits: torch.Tensor, k: int):
    labels = torch.arange(len(logits)) % logits.shape[1]
    t = from_logits(logits, labels, k)
    arrays = encode(
        encoding,
        t.idx.numpy().astype(np.uint16),
        t.logit.numpy(),
        t.lse.numpy(),
        t.label_logit.numpy(),
        t.tail_lse.numpy(),
    )
    return t, decode(encoding, arrays)


def as_targets(decoded) -> SparseTargets:
    return SparseTargets(
        *(
            torch.from_numpy(np.asarray(x).astype(np.int64 if i == 0 else np.float32))
            for i, x in enumerate(decoded)
        )
    )


def test_q8_keeps_indices_and_log_probabilities_within_its_bound():
    logits = teacher_like_logits(2000, 1000)
    t, (idx, logit, lse, label_logit, _) = encoded_round_trip("q8", logits, k=10)
    # the same top-k sets come back sorted by logit (ties within one step may swap places)
    assert (np.diff(logit, axis=1) <= 0).all()
    swapped = idx != t.idx.numpy()
    assert (
        np.abs(logit - t.logit.numpy() + (t.logit[:, :1].numpy() - logit[:, :1]))[swapped]
        <= Q8_STEP
    ).all()
    assert all(set(a) == set(b) for a, b in zip(idx, t.idx.numpy(), strict=True))
    exact_logp = (t.logit - t.lse[:, None]).numpy()
    got_logp = np.take_along_axis(logit - lse[:, None], np.argsort(idx, axis=1), 1)
    want_logp = np.take_along_axis(exact_logp, np.argsort(t.idx.numpy(), axis=1), 1)
    bound = Q8_STEP / 2 + 2.0**-11 * np.log(1000) + 1e-5
    clipped = want_logp < (t.logit[:, :1] - t.lse[:, None]).numpy() - 255 * Q8_STEP
    assert np.abs(got_logp - want_logp)[~clipped].max() <= bound


def test_q8_mean_kl_against_fp32_topk_is_below_1e_3():
    logits = teacher_like_logits(2000, 1000, seed=1)
    t, (idx, logit, lse, _, _) = encoded_round_trip("q8", logits, k=10)
    p = torch.softmax(t.logit, -1).numpy()
    order = np.argsort(idx, axis=1)
    q_sorted = torch.softmax(torch.from_numpy(np.take_along_axis(logit, order, 1)), -1).numpy()
    p_sorted = np.take_along_axis(p, np.argsort(t.idx.numpy(), axis=1), 1)
    kl = (p_sorted * (np.log(p_sorted) - np.log(q_sorted))).sum(1)
    assert kl.mean() <= 1e-3


def confident_logits(n: int, classes: int, seed: int = 0) -> torch.Tensor:
    """Like :func:`teacher_like_logits` with top-1 margins of 8 to 24 nats: tails from ~0.5 down to
    1e-8."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 2.0
    logits[torch.arange(n), torch.randint(classes, (n,), generator=g)] += (
        8 + torch.rand(n, generator=g) * 16
    )
    return logits


@pytest.mark.parametrize("encoding", ["fp16", "q8"])
def test_the_stored_tail_is_within_its_bound(encoding):
    """The log tail mass comes back within the encoding's stated bound, small tails included, where
    1 - sum(top-k) (format 1) loses small tails to the rounding of the top logits."""
    t, decoded = encoded_round_trip(encoding, confident_logits(4000, 1000, seed=2), k=10)
    got = decoded[4] - decoded[2]
    want = (t.tail_lse - t.lse).numpy()
    x = -want
    if encoding == "fp16":
        bound = 2.0**-11 * x + 1e-6
    else:
        bound = (
            np.sqrt(Q8_TAIL_MAX * x) / 254
            + Q8_TAIL_MAX / (4 * 254**2)
            + 2.0**-11 * np.log(1000)
            + 1e-5
        )
    assert (np.abs(got - want) <= bound).all()
    assert np.abs(np.exp(got) - np.exp(want)).max() <= (1e-3 if encoding == "fp16" else 0.011)
    small = np.exp(want) < 1e-3
    assert small.sum() > 100
    derived = 1 - np.exp(decoded[1].astype(np.float32) - decoded[2][:, None]).sum(1)
    derived_rel = np.abs(derived - np.exp(want))[small] / np.exp(want)[small]
    stored_rel = np.abs(np.exp(got) - np.exp(want))[small] / np.exp(want)[small]
    assert stored_rel.max() < 0.15 and derived_rel.max() > 1.0


@pytest.mark.parametrize("encoding", ["fp16", "q8"])
def test_no_tail_reads_as_none(encoding):
    t, decoded = encoded_round_trip(encoding, teacher_like_logits(50, 8), k=8)
    assert np.isneginf(decoded[4]).all() and (tail_mass_t1(as_targets(decoded)) == 0).all()


@pytest.mark.parametrize("encoding", ["fp16", "q8"])
def test_spread_targets_at_t4_match_the_fp32_top_k(encoding):
    """With the tail stored, `tail: spread` at a KD temperature is as close to the fp32 top-k as
    `renorm` is (format 1: mean KL 1.4 nats for fp16 at C=1000, T=4)."""
    t, decoded = encoded_round_trip(encoding, teacher_like_logits(2000, 1000, seed=3), k=10)
    p = dense_probs(t, 1000, 4.0, "spread").double()
    q = dense_probs(as_targets(decoded), 1000, 4.0, "spread").double()
    assert float((torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1).mean()) <= 1e-3


@pytest.mark.parametrize("encoding", ["fp16", "q8"])
def test_store_round_trip_per_encoding(tmp_path, encoding):
    keys = [[f"s0_{i}" for i in range(5)]]
    store = create_store(
        str(tmp_path / "c.zarr"),
        fingerprint=Fingerprint(shards=["a.tar"], counts=[5], key_digest="x"),
        keys=keys,
        recipe=ViewRecipe(size=8),
        num_views=2,
        num_classes=50,
        class_names=[],
        seed=0,
        config={},
    )
    add_teacher(store, TeacherSpec(name="t", model={}, weights_digest="w", k=4, encoding=encoding))
    write_views(
        store,
        0,
        labels=np.arange(5),
        status=np.full(5, STATUS_VALID),
        errors=[""] * 5,
        params=ViewParams.empty(ViewRecipe(size=8), 5, 2),
    )
    logits = teacher_like_logits(10, 50)
    t = from_logits(logits, torch.arange(10) // 2, 4)
    write_targets(store, 0, "t", t)
    tb = read_block(store, 0, ["t"]).teachers["t"]
    np.testing.assert_array_equal(tb.topk_idx.reshape(10, 4), t.idx.numpy())
    tol = Q8_STEP / 2 + 0.02 if encoding == "q8" else 0.02
    np.testing.assert_allclose(
        tb.topk_logit.reshape(10, 4) - tb.lse.reshape(10, 1),
        (t.logit - t.lse[:, None]).numpy(),
        atol=tol,
    )
    label_logp = (t.label_logit - t.lse).numpy()
    close = label_logp > -255 * Q8_STEP + 1
    np.testing.assert_allclose(
        (tb.label_logit - tb.lse).reshape(10)[close], label_logp[close], atol=tol
    )
    want_tail = (t.tail_lse - t.lse).numpy()
    np.testing.assert_allclose(
        (tb.tail_lse - tb.lse).reshape(10), want_tail, atol=0.15 if encoding == "q8" else 0.01
    )
