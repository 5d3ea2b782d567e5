"""Ensembles of teachers as one target: weighted means of probabilities at T or of logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.targets.sampling import sampled_from_logits
from kdcache.targets.sparse import (
    EnsembleTargets,
    dense_probs,
    ensemble_targets,
    from_logits,
    loss_targets,
    sparse_probs,
)
from kdcache.train.config import KDLossConfig, WSLLossConfig
from kdcache.train.losses import Criterion

C = 12
B = 8


@pytest.fixture
def members() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    labels = torch.arange(B) % C
    return torch.randn(B, C) * 3, torch.randn(B, C) * 2, labels


@pytest.mark.parametrize(
    ("tail", "combine"), [("spread", "probs"), ("renorm", "probs"), ("spread", "logits")]
)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_ensemble_of_two_identical_teachers_is_that_teacher(members, tail, combine, temperature):
    a, _, labels = members
    t = from_logits(a, labels, 4)
    both = ensemble_targets([t, t], [0.3, 0.7], C, temperature, tail, combine)
    expected = dense_probs(t, C, temperature, tail)
    torch.testing.assert_close(dense_probs(both, C, temperature, tail), expected)
    torch.testing.assert_close(both.lse - both.label_logit, t.lse - t.label_logit)
    assert torch.equal(both.idx[:, 0], t.idx[:, 0])


@pytest.mark.parametrize("tail", ["spread", "renorm"])
def test_probability_ensemble_is_the_weighted_mean_at_t(members, tail):
    a, b, labels = members
    ta = from_logits(a, labels, 3)
    tb = from_logits(b, labels, 5)
    mixed = ensemble_targets([ta, tb], [1.0, 3.0], C, 2.0, tail)
    expected = 0.25 * dense_probs(ta, C, 2.0, tail) + 0.75 * dense_probs(tb, C, 2.0, tail)
    torch.testing.assert_close(dense_probs(mixed, C, 2.0, tail), expected)
    top, other = sparse_probs(mixed, C, 2.0, tail)
    torch.testing.assert_close(top, expected.gather(1, mixed.idx))
    assert torch.all(other == 0)
    # the label's T=1 probability is the mixture's, exact
    p_label = 0.25 * torch.softmax(a, -1) + 0.75 * torch.softmax(b, -1)
    p_label = p_label.gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(torch.exp(mixed.label_logit - mixed.lse), p_label)


def test_logit_ensemble_at_full_k_is_the_softmax_of_the_mean_logits(members):
    a, b, labels = members
    mixed = ensemble_targets(
        [from_logits(a, labels, C), from_logits(b, labels, C)],
        [0.5, 0.5],
        C,
        3.0,
        "spread",
        "logits",
    )
    expected = torch.softmax((a + b) / 2 / 3.0, -1)
    torch.testing.assert_close(dense_probs(mixed, C, 3.0, "spread"), expected)


def test_ensemble_targets_are_made_for_one_temperature(members):
    a, _, labels = members
    t = from_logits(a, labels, 4)
    made = ensemble_targets([t], [1.0], C, 4.0, "spread")
    with pytest.raises(ValueError, match="made for T=4, the loss asks for T=2"):
        dense_probs(made, C, 2.0, "spread")


def test_logit_ensemble_with_a_renormalised_tail_is_refused(members):
    a, b, labels = members
    t = [from_logits(a, labels, 4), from_logits(b, labels, 4)]
    with pytest.raises(ValueError, match="combine 'logits' needs every member's logits"):
        ensemble_targets(t, [1.0, 1.0], C, 1.0, "renorm", "logits")


def test_weights_must_match_members(members):
    a, _, labels = members
    t = from_logits(a, labels, 4)
    with pytest.raises(ValueError, match="one positive weight per member"):
        ensemble_targets([t, t], [1.0], C, 1.0, "spread")
    with pytest.raises(ValueError, match="one positive weight per member"):
        ensemble_targets([t, t], [1.0, 0.0], C, 1.0, "spread")


def test_loss_targets_truncate_each_member_before_mixing(members):
    a, b, labels = members
    full = EnsembleTargets((from_logits(a, labels, 6), from_logits(b, labels, 6)), (1.0, 1.0))
    got = loss_targets(full, KDLossConfig(temperature=2.0, topk=2), C)
    small = [from_logits(a, labels, 2), from_logits(b, labels, 2)]
    expected = ensemble_targets(small, [1.0, 1.0], C, 2.0, "spread")
    torch.testing.assert_close(
        dense_probs(got, C, 2.0, "spread"), dense_probs(expected, C, 2.0, "spread")
    )


def test_an_ensemble_of_sampled_and_top_k_teachers_trains_every_loss(members):
    a, b, labels = members
    u = np.random.default_rng(0).random((B, 5))
    sampled = sampled_from_logits(a, labels, 2, u, [2.0])
    ensemble = EnsembleTargets((sampled, from_logits(b, labels, C)), (0.5, 0.5))
    for cfg in (KDLossConfig(tail="sample"), WSLLossConfig(tail="sample")):
        z = torch.randn(B, C, requires_grad=True)
        parts = Criterion(cfg, C)(z, labels, ensemble, epoch=0)
        parts.total.backward()
        assert torch.isfinite(z.grad).all()
