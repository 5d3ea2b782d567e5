"""Cache encodings: fp16 and the compact q8 decode to the same form, within q8's stated bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_tools.encoding import Q8_STEP, decode, encode
from cache_tools.reader import read_block
from cache_tools.store import Fingerprint, STATUS_VALID
from cache_tools.targets import from_logits
from cache_tools.views import ViewRecipe
from cache_tools.writer import add_teacher, create_store, write_teacher, write_views


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
    arrays = encode(encoding, t.idx.numpy().astype(np.uint16), t.logit.numpy(), t.lse.numpy(), t.label_logit.numpy())
    return t, decode(encoding, arrays)


def test_q8_keeps_indices_and_log_probabilities_within_its_bound():
    logits = teacher_like_logits(2000, 1000)
    t, (idx, logit, lse, label_logit) = encoded_round_trip("q8", logits, k=10)
    # the same top-k sets come back sorted by logit (ties within one step may swap places)
    assert (np.diff(logit, axis=1) <= 0).all()
    swapped = idx != t.idx.numpy()
    assert (np.abs(logit - t.logit.numpy() + (t.logit[:, :1].numpy() - logit[:, :1]))[swapped] <= Q8_STEP).all()
    assert all(set(a) == set(b) for a, b in zip(idx, t.idx.numpy()))
    exact_logp = (t.logit - t.lse[:, None]).numpy()
    got_logp = np.take_along_axis(logit - lse[:, None], np.argsort(idx, axis=1), 1)
    want_logp = np.take_along_axis(exact_logp, np.argsort(t.idx.numpy(), axis=1), 1)
    bound = Q8_STEP / 2 + 2.0 ** -11 * np.log(1000) + 1e-5
    clipped = want_logp < (t.logit[:, :1] - t.lse[:, None]).numpy() - 255 * Q8_STEP
    assert np.abs(got_logp - want_logp)[~clipped].max() <= bound


def test_q8_mean_kl_against_fp32_topk_is_below_1e_3():
    logits = teacher_like_logits(2000, 1000, seed=1)
    t, (idx, logit, lse, _) = encoded_round_trip("q8", logits, k=10)
    p = torch.softmax(t.logit, -1).numpy()
    order = np.argsort(idx, axis=1)
    q_sorted = torch.softmax(torch.from_numpy(np.take_along_axis(logit, order, 1)), -1).numpy()
    p_sorted = np.take_along_axis(p, np.argsort(t.idx.numpy(), axis=1), 1)
    kl = (p_sorted * (np.log(p_sorted) - np.log(q_sorted))).sum(1)
    assert kl.mean() <= 1e-3


@pytest.mark.parametrize("encoding", ["fp16", "q8"])
def test_store_round_trip_per_encoding(tmp_path, encoding):
    keys = [[f"s0_{i}" for i in range(5)]]
    store = create_store(
        str(tmp_path / "c.zarr"), fingerprint=Fingerprint(shards=["a.tar"], counts=[5], key_digest="x"), keys=keys,
        recipe=ViewRecipe(size=8), num_views=2, num_classes=50, class_names=[], seed=0, config={},
    )
    add_teacher(store, "t", model={}, weights_digest="w", k=4, encoding=encoding)
    write_views(store, 0, labels=np.arange(5), status=np.full(5, STATUS_VALID), errors=[""] * 5, params=np.zeros((5, 2, 7)))
    logits = teacher_like_logits(10, 50)
    t = from_logits(logits, torch.arange(10) // 2, 4)
    write_teacher(store, 0, "t", topk_idx=t.idx.numpy().reshape(5, 2, 4), topk_logit=t.logit.numpy().reshape(5, 2, 4),
                  lse=t.lse.numpy().reshape(5, 2), label_logit=t.label_logit.numpy().reshape(5, 2))
    tb = read_block(store, 0, ["t"]).teachers["t"]
    np.testing.assert_array_equal(tb.topk_idx.reshape(10, 4), t.idx.numpy())
    tol = Q8_STEP / 2 + 0.02 if encoding == "q8" else 0.02
    np.testing.assert_allclose(tb.topk_logit.reshape(10, 4) - tb.lse.reshape(10, 1), (t.logit - t.lse[:, None]).numpy(), atol=tol)
    label_logp = (t.label_logit - t.lse).numpy()
    close = label_logp > -255 * Q8_STEP + 1
    np.testing.assert_allclose((tb.label_logit - tb.lse).reshape(10)[close], label_logp[close], atol=tol)
