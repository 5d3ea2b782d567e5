"""Training on part of the cache: ``data.select`` (examples per class ranked by a teacher's
entropy) and ``data.exclude_classes`` (a class the student never sees), paper 003's experiments.

The expected selection is computed here from the cache's raw arrays with dense numpy (the
teacher's spread distribution at T, its entropy per view, the mean over a sample's views), not
with the code under test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from kdcache.cache.reader import read_block
from kdcache.cache.store import STATUS_VALID
from kdcache.core.errors import ConfigError
from kdcache.core.results import TrainResult
from kdcache.shards.reading import shard_name
from kdcache.train.data import build_train_data
from kdcache.train.trainer import train
from tests.support.trainrun import world_train_config as make

C = 4


def _expected_entropy(world, teacher: str, temperature: float) -> dict[str, tuple[int, float]]:
    """key -> (label, mean entropy over its views) for every valid row, by hand."""
    out = {}
    for url in world["urls"]:
        block = read_block(world["store"], shard_name(url), [teacher])
        tb = block.teachers[teacher]
        for row in np.flatnonzero(block.status == STATUS_VALID):
            idx = tb.topk_idx[row].astype(np.int64)
            logit = tb.topk_logit[row].astype(np.float64)
            tail = tb.tail_lse[row].astype(np.float64)
            k = idx.shape[-1]
            # dense logits: the top-k as stored, each other class the tail spread evenly
            spread = tail - np.log(C - k) if k < C else np.full_like(tail, -np.inf)
            dense = np.repeat(spread[:, None], C, axis=1)
            np.put_along_axis(dense, idx, logit, axis=1)
            p = np.exp(dense / temperature)
            p /= p.sum(1, keepdims=True)
            h = -(p * np.log(p)).sum(1)
            out[str(block.keys[row])] = (int(block.labels[row]), float(h.mean()))
    return out


def _streamed(config) -> list[tuple[str, int]]:
    data = build_train_data(config, 0, 1, ["tiny"], pin_memory=False)
    pairs = []
    for batch in data.epoch(0, ["tiny"]):
        pairs += list(zip(batch.keys, batch.labels.tolist(), strict=True))
    return pairs


@pytest.mark.parametrize("by", ["entropy_high", "entropy_low"])
def test_selection_by_entropy_picks_the_extremes_per_class(world, tmp_path, by) -> None:
    select = {"per_class": 3, "by": by, "teacher": "top2", "temperature": 4.0}
    config = make(world, tmp_path, data={"select": select})
    data = build_train_data(config, 0, 1, ["tiny"], pin_memory=False)
    expected = _expected_entropy(world, "top2", 4.0)  # k=2 of C=4: the tail spread
    want = set()
    for c in range(C):
        ranked = sorted(
            (h, key) for key, (label, h) in expected.items() if label == c
        )  # low to high
        chosen = ranked[-3:] if by == "entropy_high" else ranked[:3]
        want |= {key for _, key in chosen}
    record = data.selection
    assert set(record.keys) == want and len(record.keys) == 3 * C
    assert record.counts == {str(c): 3 for c in range(C)} and record.samples == 12
    assert (record.by, record.teacher, record.temperature) == (by, "top2", 4.0)
    streamed = _streamed(config)
    assert sorted(k for k, _ in streamed) == sorted(want)  # exactly those, each once


def test_selection_is_deterministic_from_the_seed(world, tmp_path) -> None:
    def keys(seed: int, by: str) -> list[str]:
        select = {"per_class": 2, "by": by, "teacher": "tiny"}
        config = make(world, tmp_path, data={"select": select}, run={"seed": seed})
        return build_train_data(config, 0, 1, ["tiny"], pin_memory=False).selection.keys

    assert keys(0, "random") == keys(0, "random")
    assert keys(0, "entropy_high") == keys(0, "entropy_high") == keys(5, "entropy_high")
    randoms = {tuple(keys(s, "random")) for s in range(6)}
    assert len(randoms) > 1  # the random pick moves with the seed
    expected = _expected_entropy(world, "tiny", 1.0)
    for pick in randoms:
        labels = [expected[k][0] for k in pick]
        assert sorted(labels) == sorted(list(range(C)) * 2)  # 2 per class, valid rows only


def test_a_held_out_class_never_reaches_the_batches(world, tmp_path) -> None:
    config = make(world, tmp_path, data={"exclude_classes": [2], "shuffle_buffer": 0})
    streamed = _streamed(config)
    expected = _expected_entropy(world, "tiny", 1.0)
    assert {label for _, label in streamed} == {0, 1, 3}
    assert sorted(k for k, _ in streamed) == sorted(k for k, (c, _) in expected.items() if c != 2)


def test_held_out_run_reports_accuracy_per_class(world, tmp_path) -> None:
    config = make(world, tmp_path, data={"exclude_classes": [1]})
    summary = train(config)
    assert len(summary.per_class_top1) == C and all(x is not None for x in summary.per_class_top1)
    assert summary.selection.excluded_classes == [1] and summary.selection.keys is None
    assert summary.selection.samples == 47 - 11  # 12 per class, one invalid row of class 1 aside
    written = TrainResult.read(tmp_path / "summary.json")
    assert written.per_class_top1 == summary.per_class_top1
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [e for e in evals if e.get("kind") == "eval"][-1]
    assert [last[f"top1_class_{c}"] for c in range(C)] == summary.per_class_top1


def test_selection_refuses_what_it_cannot_do(world, tmp_path) -> None:
    with pytest.raises(ValidationError, match="data.select: needs cache.path"):
        make(world, tmp_path, cache={"path": None}, teacher={"mode": "none", "name": None},
             data={"select": {"per_class": 2}, "num_classes": C},
             stages=[{"epochs": 1}])  # fmt: skip
    config = make(world, tmp_path, data={"select": {"per_class": 2, "teacher": "nope"}})
    with pytest.raises(ConfigError, match="data.select.teacher: 'nope' is not a teacher"):
        build_train_data(config, 0, 1, ["tiny"], pin_memory=False)
    config = make(world, tmp_path, data={"exclude_classes": [C]})
    with pytest.raises(ConfigError, match=r"data.exclude_classes: \[4\] not among the 4 classes"):
        build_train_data(config, 0, 1, ["tiny"], pin_memory=False)
