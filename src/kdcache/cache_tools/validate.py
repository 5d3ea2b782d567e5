"""``kdcache validate``: integrity checks of a cache, every problem listed.

Checks: every shard has its views mark and every teacher's mark; every shard marked complete has
every chunk its marks vouch for (:func:`kdcache.cache.integrity.find_damage`: a lost chunk file
would read as fill values); every chunk decodes (crc32c); stored keys are unique and match
the fingerprint's digest; valid rows have labels in range and sane view boxes; teacher indices are
in range and sorted by logit; logsumexp >= top logit; the top-k and the stored tail add up to the
logsumexp (within the encoding's rounding); the label's logit is at most the logsumexp and equals
its top-k logit where the label is in the top-k; no NaN or inf in valid rows (a tail of -inf: none).
"""

from __future__ import annotations

import numpy as np

from kdcache.cache.integrity import VIEWS, find_damage, part_marks
from kdcache.cache.reader import ShardBlock, TeacherBlock, read_block
from kdcache.cache.store import STATUS_EMPTY, STATUS_VALID, CacheStore
from kdcache.core.errors import CacheReadError
from kdcache.core.results import ValidateResult
from kdcache.shards.reading import ShardIndex, key_digest
from kdcache.targets.encoding import FP16_REL, consistency_tolerance, logit_tolerance
from kdcache.views.recipe import ViewRecipe, param_problems


def validate_cache(
    store: CacheStore, teachers: list[str] | None = None, max_problems: int = 200
) -> ValidateResult:
    """Every check of the module docstring, for the views and ``teachers`` (default: all of the
    cache's); the problems are listed, up to ``max_problems``."""
    teachers = store.teachers if teachers is None else teachers
    report = ValidateResult(cache=store.path, teachers=list(teachers), shards=store.num_shards)
    marks = {part: part_marks(store, part)[0] for part in [VIEWS, *teachers]}
    for part, done in marks.items():
        names = [store.meta.fingerprint.shards[i] for i in np.flatnonzero(~done)]
        if names:
            report.problems.append(
                f"{part}: {len(names)} shard(s) without a completion mark: "
                f"{names[:5]}{' ...' if len(names) > 5 else ''}"
            )
    damage = find_damage(store, teachers)
    report.problems += [str(d) for d in damage]
    damaged = {d.shard for d in damage}
    all_keys: list[ShardIndex] = []
    for shard in range(store.num_shards):
        if shard in damaged:
            continue  # listed above: reading it would only repeat that
        try:
            with np.errstate(all="ignore"):  # damaged values are reported as problems, not warned
                _validate_shard(store, shard, teachers, marks, all_keys, report)
        except CacheReadError as exc:
            report.problems.append(str(exc))
        if len(report.problems) > max_problems:
            report.problems.append("... (stopped listing)")
            return report
    if len(all_keys) == store.num_shards and marks[VIEWS].all():
        report.problems += check_keys(store, all_keys)
    return report


def _validate_shard(
    store: CacheStore,
    shard: int,
    teachers: list[str],
    marks: dict[str, np.ndarray],
    all_keys: list[ShardIndex],
    report: ValidateResult,
) -> None:
    block = read_block(store, shard, [], require_complete=False, check_values=False)
    all_keys.append(ShardIndex(url=block.shard, keys=[str(k) for k in block.keys]))
    if not marks[VIEWS][shard]:
        return
    done = [t for t in teachers if marks[t][shard]]
    block = read_block(store, shard, done, require_complete=False, check_values=False)
    report.views += int((block.status == STATUS_VALID).sum()) * store.meta.num_views
    report.invalid_rows += int((block.status != STATUS_VALID).sum())
    encodings = {name: store.teacher_meta(name).encoding for name in done}
    report.problems += check_block(block, store.meta.num_classes, encodings, store.meta.recipe)


def check_keys(store: CacheStore, indexes: list[ShardIndex]) -> list[str]:
    keys = [k for index in indexes for k in index.keys]
    problems = []
    if len(set(keys)) != len(keys):
        problems.append(f"stored keys are not unique ({len(keys) - len(set(keys))} repeats)")
    if not store.meta.fingerprint.key_digest:
        problems.append(
            "the fingerprint's key digest is not set (a precompute stopped before its end): "
            "rerun precompute to check the keys across shards and set it"
        )
    elif key_digest(indexes) != store.meta.fingerprint.key_digest:
        problems.append("stored keys do not match the fingerprint's key digest")
    return problems


def check_block(
    block: ShardBlock, num_classes: int, encodings: dict[str, str], recipe: ViewRecipe
) -> list[str]:
    where = f"shard {block.shard!r}"
    valid = block.status == STATUS_VALID
    problems = []
    if (block.status == STATUS_EMPTY).any():
        problems.append(
            f"{where}: {int((block.status == STATUS_EMPTY).sum())} row(s) never written "
            "despite the views mark"
        )
    labels = block.labels[valid]
    if ((labels < 0) | (labels >= num_classes)).any():
        problems.append(f"{where}: labels outside [0, {num_classes}) in valid rows")
    problems += [f"{where}: {p}" for p in param_problems(block.view_params, valid, recipe)]
    for name, tb in block.teachers.items():
        unmixed = (
            block.view_params.mixing(*_all_views(block))[1].reshape(len(block), -1)[valid] == 1
        )
        found = check_teacher(tb, valid, num_classes, encodings[name])
        found += _check_label_logit(tb, valid, labels, encodings[name], unmixed)
        problems += [f"{where}, teacher {name!r}: {p}" for p in found]
    return problems


def _all_views(block: ShardBlock) -> tuple[np.ndarray, np.ndarray]:
    """(rows, views) of every view of a block, in row-major order."""
    a = block.view_params.num_views
    return np.repeat(np.arange(len(block)), a), np.tile(np.arange(a), len(block))


def _check_label_logit(
    tb: TeacherBlock, valid: np.ndarray, labels: np.ndarray, encoding: str, unmixed: np.ndarray
) -> list[str]:
    """The label's logit is at most the logsumexp, and equals its top-k logit where the label is in
    the top-k (views that mix two images store the lam-weighted logit of both labels: only the
    first check applies)."""
    has = labels >= 0
    idx = tb.topk_idx[valid][has].astype(np.int64)
    logit = tb.topk_logit[valid][has].astype(np.float32)
    label_logit = tb.label_logit[valid][has]
    lse = tb.lse[valid][has]
    if not len(idx) or not (np.isfinite(label_logit).all() and np.isfinite(logit).all()):
        return []  # nothing labelled, or NaN/inf reported above
    problems = []
    slack = FP16_REL * np.maximum(np.abs(lse), 1.0) + 1e-4
    if (label_logit > lse + slack).any():
        problems.append(
            f"{int((label_logit > lse + slack).sum())} view(s) whose label logit exceeds "
            "the logsumexp"
        )
    hit = (idx == labels[has][:, None, None]) & unmixed[has][..., None]
    tol = (
        logit_tolerance(encoding, logit)
        + FP16_REL * np.maximum(np.abs(label_logit[..., None]), 1.0)
        + 1e-4
    )
    off = hit & (np.abs(logit - label_logit[..., None]) > tol)
    if off.any():
        problems.append(
            f"{int(off.any(-1).sum())} view(s) whose label logit differs from the label's "
            "top-k logit"
        )
    return problems


def check_teacher(
    tb: TeacherBlock, valid: np.ndarray, num_classes: int, encoding: str
) -> list[str]:
    idx = tb.topk_idx[valid].astype(np.int64)
    logit = tb.topk_logit[valid].astype(np.float32)
    lse = tb.lse[valid]
    label_logit = tb.label_logit[valid]
    problems = []
    for name, arr in (("top-k logits", logit), ("logsumexp", lse), ("label logit", label_logit)):
        if not np.isfinite(arr).all():
            problems.append(f"{int((~np.isfinite(arr)).sum())} NaN/inf value(s) in {name}")
    if ((idx < 0) | (idx >= num_classes)).any():
        problems.append(f"class indices outside [0, {num_classes})")
    if idx.shape[-1] > 1 and (np.diff(logit, axis=-1) > 0).any():
        problems.append("top-k logits not sorted in descending order")
    sorted_idx = np.sort(idx, axis=-1)
    if idx.shape[-1] > 1 and (np.diff(sorted_idx, axis=-1) == 0).any():
        problems.append("a class index repeats within a view's top-k")
    if len(logit):
        slack = FP16_REL * np.maximum(np.abs(logit[..., 0]), 1.0)
        if (lse < logit[..., 0] - slack).any():
            problems.append(
                f"{int((lse < logit[..., 0] - slack).sum())} view(s) with logsumexp below "
                "the top logit"
            )
    if tb.sampled:
        problems += _check_draws(tb, valid, num_classes)
    return problems + _check_tail(logit, lse, tb.tail_lse[valid], encoding)


def _check_draws(tb: TeacherBlock, valid: np.ndarray, num_classes: int) -> list[str]:
    """A sampled teacher's draws: classes in range, distinct, outside the top-k; every view with
    a tail drew the same number of times; the tail's logsumexp at the draw temperature is a
    number or ``-inf``."""
    if tb.sample_idx is None or tb.sample_count is None or tb.draw_tail_lse is None:
        return ["the teacher is not stored with its draws (encoding 'sampled')"]
    idx = tb.sample_idx[valid].astype(np.int64)
    count = tb.sample_count[valid].astype(np.int64)
    used = count > 0
    problems = []
    if ((idx < 0) | (idx >= num_classes))[used].any():
        problems.append(f"drawn classes outside [0, {num_classes})")
    head = tb.topk_idx[valid].astype(np.int64)
    if (used[..., :, None] & (idx[..., :, None] == head[..., None, :])).any():
        problems.append("a drawn class is one of the view's stored top-k")
    same = used[..., :, None] & used[..., None, :] & (idx[..., :, None] == idx[..., None, :])
    if (same.sum(-1) > 1).any():
        problems.append("a drawn class repeats within a view's draws")
    totals = count.sum(-1)[np.isfinite(tb.tail_lse[valid])]
    if totals.size and (totals != totals.max()).any():
        problems.append("views with a tail drew different numbers of classes")
    draw_tail = tb.draw_tail_lse[valid]
    bad = np.isnan(draw_tail) | (draw_tail == np.inf)
    if bad.any():
        problems.append(f"{int(bad.sum())} NaN/inf value(s) in the draws' tail logsumexp")
    return problems


def _check_tail(
    logit: np.ndarray, lse: np.ndarray, tail_lse: np.ndarray, encoding: str
) -> list[str]:
    """The stored tail: no NaN or +inf, and top-k + tail = everything (the logsumexp) within
    rounding."""
    bad = np.isnan(tail_lse) | (tail_lse == np.inf)
    if bad.any():
        return [f"{int(bad.sum())} NaN/inf value(s) in the tail logsumexp"]
    if not len(logit) or not np.isfinite(lse).all() or not np.isfinite(logit).all():
        return []  # reported above
    top = logit[..., :1]
    with np.errstate(divide="ignore"):
        total = np.logaddexp(top[..., 0] + np.log(np.exp(logit - top).sum(-1)), tail_lse)
    off = np.abs(total - lse) > consistency_tolerance(encoding, logit, lse)
    if off.any():
        worst = float(np.abs(total - lse).max())
        return [
            f"{int(off.sum())} view(s) whose top-k and tail do not add up to the logsumexp "
            f"(worst by {worst:.3g} nats)"
        ]
    return []
