"""On a CUDA device: the paths that only run there, against their CPU or fp32 counterparts.

- the teacher runner under bf16 autocast and channels_last against fp32 on the same views;
- training batches pinned (by the DataLoader) and copied non-blocking to the device, unchanged;
- precompute on CUDA against precompute on the CPU: the same cache, up to rounding;
- a short cached-KD run on CUDA against the same run on the CPU.

Marked ``gpu``: ``make test-gpu`` (``pytest -m gpu``) runs them, and skips them with the reason
"needs CUDA" where torch finds no CUDA device; ``make test`` leaves them out.

The teacher is a timm ResNet-18 with its classifier scaled up, so that its logits spread over a few
nats as a trained teacher's do (a random head's logits lie within 0.2 of each other: all
near-ties). Tolerances are in standard deviations of the reference logits; measured on the CPU,
bf16 moves a logit by at most 0.02 of them and 0.004 on average, while a wrong memory layout or
normalisation moves it by about 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcache.cache.reader import read_block
from kdcache.cache.store import STATUS_VALID, CacheStore
from kdcache.core.results import TrainResult
from kdcache.models.build import ModelSpec, build_teacher
from kdcache.models.runner import ModelRunner
from kdcache.train.config import TrainConfig
from kdcache.train.data import Batch, build_train_data
from kdcache.train.trainer import train
from kdcache.views.recipe import Rendering, ViewRecipe
from tests.support.cachebuild import precompute_config, run_precompute
from tests.support.trainrun import world_train_dict

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CLASSES = 10
TOLERANCE = {"bf16": 0.08, "off": 0.01}
"""Largest |logit difference| against the fp32 reference, in standard deviations of its logits:
bf16 autocast (4x what the CPU's bf16 shows), or full precision (cuDNN may use TF32)."""
RECIPE = ViewRecipe(name="rrc_flip", size=16, scale=(0.5, 1.0))
"""RGB random-resized crops of data_dir's 16x16 images."""


@pytest.fixture(scope="module")
def teacher_spec(tmp_path_factory) -> dict:
    """A random-init ResNet-18 for ``CLASSES`` classes with its classifier scaled by 100 (logits
    with a standard deviation of about 4), saved as a checkpoint."""
    path = tmp_path_factory.mktemp("teacher") / "resnet18.pt"
    model = build_teacher(ModelSpec(name="resnet18"), CLASSES, 3)
    with torch.no_grad():
        model.get_classifier().weight.mul_(100.0)
        model.get_classifier().bias.mul_(100.0)
    torch.save(model.state_dict(), path)
    return {"name": "resnet18", "checkpoint": str(path)}


def assert_close_logits(reference: np.ndarray, other: np.ndarray, tolerance: float, k: int) -> None:
    """``other`` within ``tolerance`` standard deviations of ``reference`` (``[N, C]``), 4x closer
    on average; their top-k class sets equal wherever the reference's k-th and (k+1)-th logits
    are more than twice that apart (closer, a near-tie may break either way); and enough such
    views that this says something."""
    tol = tolerance * float(reference.std())
    diff = np.abs(other - reference)
    assert diff.max() <= tol, f"max |difference| {diff.max():.4g} > {tol:.4g}"
    assert diff.mean() <= tol / 4, f"mean |difference| {diff.mean():.4g} > {tol / 4:.4g}"
    ranked = -np.sort(-reference, axis=1)
    clear = ranked[:, k - 1] - ranked[:, k] > 2 * tol
    same = np.array(
        [set(a) == set(b) for a, b in zip(top_k(reference, k), top_k(other, k), strict=True)]
    )
    assert same[clear].all(), f"{int((~same & clear).sum())} view(s) changed a clear top-{k}"
    assert clear.mean() >= 0.2, f"only {clear.mean():.0%} of the views have a clear top-{k}"


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


# ---- the teacher runner -------------------------------------------------------------------------


def smooth_views(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``uint8[n, 3, size, size]`` images of smooth random structure (upsampled noise)."""
    coarse = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(coarse, size=size, mode="bilinear") * 255).round().to(torch.uint8)


def test_bf16_channels_last_runner_matches_fp32_on_the_same_views(teacher_spec):
    spec = ModelSpec.model_validate(teacher_spec)
    rendering = Rendering(size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    views = smooth_views(256, 64)
    fast = ModelRunner(build_teacher(spec, CLASSES, 3), rendering, device="cuda", amp="bf16")
    exact = ModelRunner(
        build_teacher(spec, CLASSES, 3), rendering, device="cuda", amp="off", channels_last=False
    )
    conv = next(p for p in fast.model.parameters() if p.ndim == 4)
    assert fast.channels_last and conv.is_contiguous(memory_format=torch.channels_last)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 proper
        reference = exact(views)
    got = fast(views)
    assert got.dtype == torch.float32 and got.device.type == "cuda"
    for k in (1, 5):
        assert_close_logits(reference.cpu().numpy(), got.cpu().numpy(), TOLERANCE["bf16"], k)


# ---- pinned batches -----------------------------------------------------------------------------


def train_config(world, run_dir: Path, **run) -> TrainConfig:
    """Cached KD from the world's teacher ``tiny``: 1 epoch, batches of 8, 2 loader workers."""
    data = world_train_dict(world, run_dir, run=run, data={"num_workers": 2})
    return TrainConfig.model_validate(data)


def batch_tensors(batch: Batch) -> dict[str, torch.Tensor]:
    """Every tensor of a batch, by name."""
    named = {"images": batch.images, "labels": batch.labels}
    named |= {"views": batch.views, "partner_labels": batch.partner_labels, "lam": batch.lam}
    for teacher, targets in batch.targets.items():
        named |= {f"{teacher}.{i}": t for i, t in enumerate(targets.tensors())}
    named |= {f"teacher_images.{n}": x for n, x in batch.teacher_images.items()}
    return {name: t for name, t in named.items() if t is not None}


def test_batches_are_pinned_and_copied_to_cuda_unchanged(world, tmp_path):
    data = build_train_data(train_config(world, tmp_path), 0, 1, ["tiny"], pin_memory=True)
    batches = list(data.epoch(0, ["tiny"]))
    assert len(batches) == 6 and all(batch.targets for batch in batches)
    for batch in batches:
        tensors = batch_tensors(batch)
        assert all(t.is_pinned() for t in tensors.values()), "the loader did not pin every tensor"
        on_device = batch_tensors(batch.to("cuda"))  # non-blocking copies from pinned memory
        torch.cuda.synchronize()
        assert on_device.keys() == tensors.keys()
        for name, tensor in on_device.items():
            assert tensor.device.type == "cuda", name
            assert torch.equal(tensor.cpu(), tensors[name]), name
    plain = build_train_data(train_config(world, tmp_path), 0, 1, ["tiny"], pin_memory=False)
    batch = next(iter(plain.epoch(0, ["tiny"])))
    assert not batch.images.is_pinned()
    assert all(t.is_pinned() for t in batch_tensors(batch.pin_memory()).values())


# ---- precompute on CUDA and on the CPU ----------------------------------------------------------


def precompute_on(
    device: str, amp: str, data_dir: Path, teacher_spec: dict, path: Path
) -> CacheStore:
    """data_dir's 4 shards x 2 views with the teacher twice: all classes kept, and the top 3."""
    urls = sorted(str(p) for p in data_dir.glob("train-*.tar"))
    teachers = [
        {"name": "full", "model": teacher_spec, "k": CLASSES},
        {"name": "top3", "model": teacher_spec, "k": 3},
    ]
    cfg = precompute_config(path, urls, teachers, recipe=RECIPE, num_views=2, classes=CLASSES)
    runtime = cfg.runtime.model_copy(update={"device": device, "amp": amp})
    return run_precompute(cfg.model_copy(update={"runtime": runtime}))


@pytest.fixture(scope="module")
def cpu_cache(data_dir, teacher_spec, tmp_path_factory) -> CacheStore:
    return precompute_on("cpu", "off", data_dir, teacher_spec, tmp_path_factory.mktemp("cpu"))


def dense_logits(store: CacheStore, teacher: str) -> tuple[np.ndarray, np.ndarray]:
    """A teacher's stored top-k over every valid view: ``[N, C]`` logits (0 where not stored),
    ``[N, k]`` indices, views in row order."""
    rows = []
    for shard in range(store.num_shards):
        block = read_block(store, shard, [teacher])
        targets = block.teachers[teacher]
        valid = block.status == STATUS_VALID
        rows.append((targets.topk_idx[valid], targets.topk_logit[valid]))
    idx = np.concatenate([i.reshape(-1, i.shape[-1]) for i, _ in rows]).astype(np.int64)
    logit = np.concatenate([v.reshape(-1, v.shape[-1]) for _, v in rows]).astype(np.float32)
    dense = np.zeros((len(idx), CLASSES), np.float32)
    np.put_along_axis(dense, idx, logit, axis=1)
    return dense, idx


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_precompute_on_cuda_matches_the_cpu(cpu_cache, data_dir, teacher_spec, tmp_path, amp):
    gpu = precompute_on("cuda", amp, data_dir, teacher_spec, tmp_path / "cache")
    assert gpu.incomplete_shards() == {} and cpu_cache.incomplete_shards() == {}
    for path in ["keys", "labels", "status", *(f"views/{n}" for n in gpu.view_group.array_keys())]:
        np.testing.assert_array_equal(gpu.array(path)[:], cpu_cache.array(path)[:], err_msg=path)
    reference, _ = dense_logits(cpu_cache, "full")
    got, _ = dense_logits(gpu, "full")
    for k in (1, 3):
        assert_close_logits(reference, got, TOLERANCE[amp], k)
    # the top-3 teacher: its indices are the full teacher's top 3 where those are clear of the 4th
    tol = TOLERANCE[amp] * float(reference.std())
    _, idx = dense_logits(gpu, "top3")
    ranked = -np.sort(-reference, axis=1)
    clear = ranked[:, 2] - ranked[:, 3] > 2 * tol
    same = np.array([set(a) == set(b) for a, b in zip(top_k(reference, 3), idx, strict=True)])
    assert same[clear].all() and clear.mean() >= 0.2
    for teacher in ("full", "top3"):
        lse_cpu = cpu_cache.array(f"teachers/{teacher}/lse")[:]
        lse_gpu = gpu.array(f"teachers/{teacher}/lse")[:]
        np.testing.assert_allclose(lse_gpu, lse_cpu, rtol=0, atol=tol, err_msg=teacher)


# ---- training on CUDA ---------------------------------------------------------------------------


def train_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [line["loss"] for line in map(json.loads, lines) if line["kind"] == "train"]


@pytest.mark.parametrize(("amp", "rel"), [("off", 1e-3), ("bf16", 5e-2)])
def test_a_short_cached_kd_run_on_cuda_trains_as_on_the_cpu(world, tmp_path, amp, rel):
    cpu = train(train_config(world, tmp_path / "cpu", device="cpu", amp="off"))
    gpu = train(train_config(world, tmp_path / "cuda", device="cuda", amp=amp))
    assert gpu.completed and gpu.device.startswith("cuda") and cpu.device == "cpu"
    assert (gpu.steps, gpu.images, gpu.teacher_forwards) == (cpu.steps, cpu.images, 0) == (6, 47, 0)
    assert gpu.top1 is not None and TrainResult.read(tmp_path / "cuda" / "summary.json") == gpu
    losses = train_losses(tmp_path / "cuda")
    assert all(np.isfinite(losses)) and losses == pytest.approx(
        train_losses(tmp_path / "cpu"), rel=rel
    )
