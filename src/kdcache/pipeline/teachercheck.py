"""The teacher check: every precompute measures each teacher's top-1 on the views it computes
(the labels are in the shards) and fails the run when a teacher clearly looks broken.

A teacher fails when its top-1 is near chance, below ``CHANCE_FACTOR / num_classes`` (1.5/C:
15 % for 10 classes; a random or mis-loaded network scores about 1/C, any trained one far
more), or, with ``teachers[].expect_top1``, when its top-1 on unmixed views is below
``EXPECT_FRACTION`` of it (augmented views cost a trained teacher a few points, not a quarter;
a wrong rendering or checkpoint costs far more). "Below" must be clear, not luck of a small
sample: the upper end of the 99 % Wilson interval of the measured top-1 must be below the bar
(about 200 views for a random teacher of 10 classes, 22000 for 1000 classes); with fewer views
the teacher is reported, not judged. The same rule is applied after every shard, so a broken
teacher stops a long run early, and once more at the end.

``teachers[].accept_low_accuracy: true`` keeps the run going (the check says ``accepted``); a
teacher the config gives no weights (no checkpoint, ``pretrained`` or ``local-dir:``: a seeded
random init, for trying the pipeline) is measured but not judged.
"""

from __future__ import annotations

import math

from kdcache.core.errors import KdcacheError
from kdcache.core.results import TeacherRun
from kdcache.models.spec import LOCAL_DIR, ModelSpec
from kdcache.pipeline.config import TeacherSection
from kdcache.pipeline.plan import ResolvedTeacher

CHANCE_FACTOR = 1.5
"""A teacher whose top-1 is below this many times chance (1/C) fails."""
EXPECT_FRACTION = 0.75
"""A teacher whose unmixed top-1 is below this fraction of its ``expect_top1`` fails."""
Z_99 = 2.326
"""One-sided 99 % normal quantile: the Wilson bound's width."""


class TeacherCheckError(KdcacheError, RuntimeError):
    """A teacher failed the teacher check (one line naming it and its rendering)."""


def has_weights(spec: ModelSpec) -> bool:
    """Whether the config gives the model trained weights (else: seeded random init)."""
    return bool(
        spec.checkpoint
        or spec.pretrained
        or spec.source == "torchscript"
        or spec.name.startswith(LOCAL_DIR)
    )


def upper_bound(correct: int, n: int, z: float = Z_99) -> float:
    """Upper end of the Wilson score interval of a proportion ``correct / n``."""
    p = correct / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre + spread) / (1 + z * z / n)


def problem(run: TeacherRun, num_classes: int, expect: float | None) -> str:
    """Why the teacher clearly fails the check ("" when it passes or the sample is too small)."""
    chance = CHANCE_FACTOR / num_classes
    if run.views_checked and upper_bound(run.views_correct, run.views_checked) < chance:
        return (
            f"top-1 {run.top1:.1%} on {run.views_checked} views is near chance "
            f"(below {CHANCE_FACTOR:g}/C = {chance:.1%} for C={num_classes})"
        )
    bar = None if expect is None else EXPECT_FRACTION * expect
    n = run.unmixed_checked
    if bar is not None and n and upper_bound(run.unmixed_correct, n) < bar:
        return (
            f"top-1 {run.top1_unmixed:.1%} on {n} unmixed views is far below its "
            f"expect_top1 {expect:.1%} (under {EXPECT_FRACTION:g} of it)"
        )
    return ""


def judge(
    runs: list[TeacherRun],
    resolved: dict[str, ResolvedTeacher],
    sections: list[TeacherSection],
    num_classes: int,
    final: bool,
) -> None:
    """Raise :class:`TeacherCheckError` for the first teacher that clearly fails unaccepted;
    at the end (``final``) set each run's ``check`` too (``sections``: the config's
    ``teachers``)."""
    index_of = {section.name: i for i, section in enumerate(sections)}
    for run in runs:
        index = index_of[run.name]
        section = sections[index]
        teacher = resolved[run.name]
        judged = any(has_weights(m.spec) for m in teacher.models())
        why = problem(run, num_classes, section.expect_top1) if judged else ""
        if why and not section.accept_low_accuracy:
            run.check = f"failed: {why}"
            raise TeacherCheckError(
                f"teacher check: teacher {run.name!r} (teachers.{index}): {why}; it renders "
                f"views at {teacher.rendering_from}; check its checkpoint and rendering "
                f"(teachers.{index}.render), or set teachers.{index}.accept_low_accuracy: true"
            )
        if final:
            run.check = verdict(run, judged, why)


def verdict(run: TeacherRun, judged: bool, why: str) -> str:
    """The recorded outcome of a teacher that did not stop the run."""
    if not judged:
        return "not judged: no weights in the config (seeded random init)"
    if why:
        return f"accepted: {why}"
    if run.top1 is None:
        return "not judged: no labelled view"
    return "passed"
