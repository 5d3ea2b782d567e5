"""Ensembles of teachers: several models' distributions combined into one target.

Two places combine teachers:

- **In training** (``stages.N.teachers``): the cached (or online) targets of several teachers of
  the same views are mixed at the loss's temperature (:class:`StageEnsemble` names them;
  :func:`kdcache.targets.sparse.ensemble_targets` mixes them).
- **In precompute** (``teachers[].ensemble``): several models run on every view and their
  combination is stored as one teacher (:func:`combine_logits`). ``probs`` stores the mixture
  at T=1, ``log sum_i w_i softmax(l_i)``: tempering it later tempers the mixture
  (``p_mix^(1/T)``), which is not the mixture of the tempered members that a training-time
  ensemble uses; ``logits`` stores ``sum_i w_i l_i``, which tempers like one teacher.

Weights are normalised to sum to 1 in both.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kdcache.cache.store import EnsembleMeta, MemberMeta, TeacherMeta
from kdcache.core.errors import CacheMismatchError
from kdcache.models.build import ModelSpec, build_teacher, weights_digest
from kdcache.targets.sparse import COMBINES
from kdcache.views.recipe import Rendering


def normalised(weights: Collection[float]) -> list[float]:
    """Weights scaled to sum to 1."""
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def combine_logits(
    logits: Sequence[torch.Tensor], weights: Sequence[float], combine: str
) -> torch.Tensor:
    """``[B, C]`` logits of an ensemble: ``probs`` the log of the weighted mean of the members'
    softmax (log-probabilities: their logsumexp is 0), ``logits`` the weighted mean of the
    logits. One member: its own logits, unchanged."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, found {combine!r}")
    if len(logits) == 1:
        return logits[0]
    w = normalised(weights)
    if combine == "logits":
        terms = (wi * z.float() for wi, z in zip(w, logits, strict=True))
        return functools.reduce(operator.add, terms)  # ``sum`` would be typed ``Tensor | int``
    stacked = torch.stack([torch.log_softmax(z.float(), dim=-1) for z in logits])
    log_w = torch.tensor(w, device=stacked.device).log().view(-1, 1, 1)
    return torch.logsumexp(stacked + log_w, dim=0)


def ensemble_digest(combine: str, members: Sequence[MemberMeta]) -> str:
    """What identifies a stored ensemble: its combination, each model's weights digest,
    normalised weight and rendering."""
    parts = [
        [m.weights_digest, round(w, 12), m.rendering.model_dump(mode="json")]
        for m, w in zip(members, normalised([m.weight for m in members]), strict=True)
    ]
    text = json.dumps([combine, parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def ensemble_meta(
    combine: str, specs: Sequence[ModelSpec], digests: Sequence[str], weights, renderings
) -> EnsembleMeta:
    """The metadata a stored ensemble teacher records."""
    members = [
        MemberMeta(model=spec.model_dump(mode="json"), weights_digest=d, weight=w, rendering=r)
        for spec, d, w, r in zip(specs, digests, weights, renderings, strict=True)
    ]
    return EnsembleMeta(combine=combine, members=members)


ENSEMBLE_MODEL = {"source": "ensemble"}
"""The ``model`` a stored ensemble teacher records (its models are in ``ensemble``)."""


def build_members(
    name: str, meta: TeacherMeta, num_classes: int, in_chans: int
) -> list[tuple[nn.Module, float, Rendering]]:
    """A stored ensemble's models rebuilt from its metadata, each checked against its weights
    digest: (model, weight, rendering)."""
    if meta.ensemble is None:
        raise ValueError(f"teacher {name!r} is not a stored ensemble")
    out = []
    for i, member in enumerate(meta.ensemble.members):
        spec = ModelSpec.model_validate(member.model)
        model = build_teacher(spec, num_classes, in_chans)
        digest = weights_digest(model)
        if digest != member.weights_digest:
            raise CacheMismatchError(
                f"teacher {name!r}, model {i} ({spec.checkpoint or spec.name!r}): its weights "
                f"have digest {digest}, the cache was made with {member.weights_digest}"
            )
        out.append((model, member.weight, member.rendering))
    return out


@dataclass(frozen=True)
class StageEnsemble:
    """A training stage's ensemble of cached (or online) teachers: names, weights (normalised)
    and how they combine."""

    members: tuple[tuple[str, float], ...]
    combine: str = "probs"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.members)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(weight for _, weight in self.members)

    @property
    def label(self) -> str:
        """How logs and the stage's teacher key name it, e.g. ``ensemble(a:0.5,b:0.5)`` (teacher
        names never hold ``(``, so it cannot clash with one)."""
        inner = ",".join(f"{name}:{weight:g}" for name, weight in self.members)
        suffix = "" if self.combine == "probs" else f";{self.combine}"
        return f"ensemble({inner}{suffix})"

    @classmethod
    def of(cls, weights: dict[str, float], combine: str = "probs") -> StageEnsemble:
        names = list(weights)
        return cls(tuple(zip(names, normalised(weights.values()), strict=True)), combine)
