"""Similarity information (paper 003) in ``kdcache inspect``: the figures against a hand
computation, per view, per class and per teacher, and the typed report through JSON.

The hand computation builds each view's dense distribution from the cache's raw arrays (the label's
probability from its stored logit, the top-k, the rest of the tail spread evenly or dropped) and
takes KL and L1 to label smoothing of the same confidence from their definitions, not from the
closed form the code uses.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdcache.cache.reader import read_block
from kdcache.cache.store import STATUS_VALID, open_store
from kdcache.cache_tools.plots import write_plots
from kdcache.cache_tools.similarity import view_similarity
from kdcache.cache_tools.stats import inspect_cache
from kdcache.core.results import InspectResult
from tests.support.cachebuild import build_cache, write_shards

C = 6


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("similarity")
    urls = write_shards(root / "shards", num_shards=2, per_shard=9, classes=C)
    build_cache(root / "cache.zarr", urls, teachers={"top2": 2, "full": C}, classes=C)
    return str(root / "cache.zarr")


def _hand(cache: str, teacher: str, tail: str) -> dict[str, np.ndarray]:
    """Per labelled view: label and each figure, from dense distributions built by hand."""
    store = open_store(cache)
    rows = {k: [] for k in ("label", "m", "h", "eff", "top1", "kl", "l1")}
    for shard in range(store.num_shards):
        block = read_block(store, shard, [teacher])
        tb = block.teachers[teacher]
        for r in np.flatnonzero(block.status == STATUS_VALID):
            y = int(block.labels[r])
            for v in range(tb.lse.shape[1]):
                lse = float(tb.lse[r, v])
                idx = tb.topk_idx[r, v].astype(int)
                p = np.full(C, np.nan)
                p[idx] = np.exp(tb.topk_logit[r, v].astype(np.float64) - lse)
                p_y = math.exp(float(tb.label_logit[r, v]) - lse)
                tail_mass = math.exp(float(tb.tail_lse[r, v]) - lse)
                outside = [j for j in range(C) if j not in idx and j != y]
                rest = max(tail_mass - (p_y if y not in idx else 0.0), 0.0)
                p[outside] = rest / len(outside) if outside and tail == "spread" else 0.0
                others = np.array([p[j] for j in range(C) if j != y])
                share = others / others.sum()
                m = 1 - p_y
                ls = np.full(C - 1, m / (C - 1))
                q = m * share
                pos = q > 0
                rows["label"].append(y)
                rows["m"].append(m)
                rows["h"].append(-(share[pos] * np.log(share[pos])).sum())
                rows["eff"].append(math.exp(rows["h"][-1]))
                rows["top1"].append(share.max())
                rows["kl"].append((q[pos] * np.log(q[pos] / ls[pos])).sum())
                rows["l1"].append(np.abs(q - ls).sum())
    return {k: np.array(v) for k, v in rows.items()}


FIGURES = {
    "nonlabel_mass": "m",
    "nonlabel_entropy": "h",
    "nonlabel_effective": "eff",
    "nonlabel_top1_share": "top1",
    "ls_kl": "kl",
    "ls_l1": "l1",
}


@pytest.mark.parametrize("tail", ["spread", "renorm"])
@pytest.mark.parametrize("teacher", ["top2", "full"])
def test_similarity_figures_match_a_hand_computation(cache, teacher, tail) -> None:
    report = inspect_cache(open_store(cache), temperatures=(1.0, 3.0), tail=tail)
    hand = _hand(cache, teacher, tail)
    sim = report.teachers[teacher].similarity
    for field, key in FIGURES.items():
        dist = getattr(sim, field)
        assert dist.n == len(hand[key])
        assert dist.mean == pytest.approx(hand[key].mean(), rel=1e-4, abs=1e-6), field
    ideal = (hand["m"] * math.log(C - 1)).sum()
    assert sim.structure == pytest.approx(hand["kl"].sum() / ideal, rel=1e-4)
    for row in report.teachers[teacher].per_class:
        mine = hand["label"] == row.class_
        assert row.views == mine.sum()
        assert row.ls_kl_mean == pytest.approx(hand["kl"][mine].mean(), rel=1e-4, abs=1e-7)
        assert row.nonlabel_entropy_mean == pytest.approx(hand["h"][mine].mean(), rel=1e-4)
        assert list(row.entropy_mean) == ["T=1.0", "T=3.0"]


def test_label_smoothing_and_one_class_responses() -> None:
    """Two views by hand, C=4, label 0: LS-like (0.7, 0.1, 0.1, 0.1) and all of its non-label
    mass on class 1 (0.7, 0.3, 0, 0)."""
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.7, 0.3, 0.0, 0.0]])
    idx = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    label = np.array([0, 0])
    v = view_similarity(label, idx, probs, probs[:, 0], np.zeros(2), 4, "spread")
    f = v.figures
    np.testing.assert_allclose(f["nonlabel_mass"], [0.3, 0.3])
    np.testing.assert_allclose(f["nonlabel_entropy"], [math.log(3), 0.0], atol=1e-12)
    np.testing.assert_allclose(f["nonlabel_effective"], [3.0, 1.0])
    np.testing.assert_allclose(f["nonlabel_top1_share"], [1 / 3, 1.0])
    np.testing.assert_allclose(f["ls_kl"], [0.0, 0.3 * math.log(3)], atol=1e-12)
    np.testing.assert_allclose(f["ls_l1"], [0.0, 0.4], atol=1e-12)


def test_most_similar_classes_follow_the_mean_shares(cache) -> None:
    report = inspect_cache(open_store(cache))
    hand_share = np.zeros((C, C))
    store = open_store(cache)
    for shard in range(store.num_shards):
        tb = read_block(store, shard, ["full"]).teachers["full"]  # k == C: no tail to spread
        block = read_block(store, shard, ["full"])
        for r in np.flatnonzero(block.status == STATUS_VALID):
            y = int(block.labels[r])
            for v in range(tb.lse.shape[1]):
                p = np.zeros(C)
                p[tb.topk_idx[r, v].astype(int)] = np.exp(
                    tb.topk_logit[r, v].astype(np.float64) - float(tb.lse[r, v])
                )
                p[y] = 0.0
                hand_share[y] += p / p.sum()
    for row in report.teachers["full"].per_class:
        mean = hand_share[row.class_] / row.views
        best = np.argsort(-mean, kind="stable")[:3]
        assert [s.class_ for s in row.most_similar] == best.tolist()
        assert [s.share for s in row.most_similar] == pytest.approx(mean[best].tolist(), rel=1e-4)


def test_typed_report_round_trips_json(cache, tmp_path) -> None:
    report = inspect_cache(open_store(cache))
    path = report.write(tmp_path / "inspect.json")
    text = (tmp_path / "inspect.json").read_text()
    assert '"class": 0' in text and "class_" not in text  # the JSON keys users read
    back = InspectResult.read(path)
    assert back == report
    assert (
        back.teachers["top2"].similarity.ls_kl.mean
        == report.teachers["top2"]["similarity"]["ls_kl"]["mean"]
    )
    broken = text.replace('"ls_kl": {', '"ls_kl": {"n": "many", "x": {', 1)
    (tmp_path / "broken.json").write_text(broken)
    with pytest.raises(Exception, match="is not a InspectResult"):
        InspectResult.read(tmp_path / "broken.json")
    names = {p.name for p in write_plots(report, tmp_path / "plots")}
    assert "similarity.png" in names
