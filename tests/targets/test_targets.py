"""Soft targets rebuilt from sparse cached values: exact at T=1, tail treatment as specified."""

from __future__ import annotations

import pytest
import torch

from kdcache.targets.sparse import (
    dense_probs,
    from_logits,
    label_prob_t1,
    sparse_probs,
    tail_mass_t1,
    topk_probs_t1,
)

C = 12


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(16, C) * 3


def test_topk_probabilities_and_tail_mass_are_exact_at_t1(logits):
    labels = torch.arange(16) % C
    t = from_logits(logits, labels, k=4)
    exact = torch.softmax(logits, -1)
    torch.testing.assert_close(topk_probs_t1(t), exact.gather(1, t.idx))
    torch.testing.assert_close(tail_mass_t1(t), 1 - exact.gather(1, t.idx).sum(-1))
    torch.testing.assert_close(label_prob_t1(t), exact.gather(1, labels[:, None]).squeeze(1))


def test_spread_keeps_exact_topk_and_spreads_the_tail_uniformly(logits):
    t = from_logits(logits, torch.zeros(16, dtype=torch.long), k=4)
    probs = dense_probs(t, C, 1.0, "spread")
    exact = torch.softmax(logits, -1)
    torch.testing.assert_close(probs.gather(1, t.idx), exact.gather(1, t.idx))
    outside = torch.ones_like(probs, dtype=torch.bool).scatter(1, t.idx, False)
    tail = probs[outside].view(16, C - 4)
    torch.testing.assert_close(tail, tail[:, :1].expand_as(tail))  # uniform
    torch.testing.assert_close(tail.sum(-1), tail_mass_t1(t))


def test_renorm_drops_the_tail_and_sharpens_with_temperature(logits):
    t = from_logits(logits, torch.zeros(16, dtype=torch.long), k=3)
    for temperature in (0.5, 1.0, 4.0):
        probs = dense_probs(t, C, temperature, "renorm")
        expected = torch.softmax(logits.gather(1, t.idx) / temperature, -1)
        torch.testing.assert_close(probs.gather(1, t.idx), expected)
        torch.testing.assert_close(probs.sum(-1), torch.ones(16))


@pytest.mark.parametrize("tail", ["renorm", "spread"])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0, 4.0])
def test_k_equal_to_classes_is_exact_at_every_temperature(logits, tail, temperature):
    t = from_logits(logits, torch.zeros(16, dtype=torch.long), k=C)
    probs = dense_probs(t, C, temperature, tail)
    torch.testing.assert_close(probs, torch.softmax(logits / temperature, -1))


@pytest.mark.parametrize("tail", ["renorm", "spread"])
def test_sparse_form_equals_dense_form(logits, tail):
    t = from_logits(logits, torch.zeros(16, dtype=torch.long), k=5)
    top, other = sparse_probs(t, C, 2.0, tail)
    dense = dense_probs(t, C, 2.0, tail)
    torch.testing.assert_close(top, dense.gather(1, t.idx))
    outside = torch.ones_like(dense, dtype=torch.bool).scatter(1, t.idx, False)
    torch.testing.assert_close(other, dense[outside].view(16, C - 5)[:, 0])


def test_unknown_tail_mode_is_refused(logits):
    t = from_logits(logits, torch.zeros(16, dtype=torch.long), k=3)
    with pytest.raises(ValueError, match="tail must be one of"):
        dense_probs(t, C, 1.0, "drop")
