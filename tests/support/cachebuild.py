"""Test fixtures: tiny WebDataset shards, and caches built by the real planner and worker.

:func:`build_cache` runs precompute's own code in-process (``plan_precompute`` and ``ShardWorker``,
without Ray), so a test compares cached targets with the same teacher run online on the same
views, and a test of the trainer reads a cache exactly as precompute writes it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from kdcache.cache.store import CacheStore, open_store
from kdcache.models.build import ModelSpec, build_model
from kdcache.pipeline.config import PrecomputeConfig
from kdcache.pipeline.plan import plan_precompute
from kdcache.pipeline.runner import worker_settings
from kdcache.pipeline.worker import ShardWorker
from kdcache.views.recipe import ViewRecipe, render_rows

GREY = dict(channels=1, mean=(0.5,), std=(0.25,))


def tiny_recipe(size: int = 12, **kw) -> ViewRecipe:
    """A grey random-resized-crop recipe for 16x16 test images."""
    return ViewRecipe(name="rrc_flip", size=size, scale=(0.5, 1.0), **{**GREY, **kw})


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(
    out_dir: str | Path,
    prefix: str = "train",
    num_shards: int = 4,
    per_shard: int | list[int] = 12,
    classes: int = 4,
    size: int = 16,
    seed: int = 0,
    key_prefix: str | None = None,
    unlabelled: tuple[str, ...] = (),
) -> list[str]:
    """``out_dir/<prefix>-NNNNNN.tar`` with grey PNGs (class-dependent brightness bands) and labels;
    keys ``<key_prefix>_NNNNNN`` (default the prefix), numbered across shards. Keys in
    ``unlabelled`` get no ``.cls`` entry (``on_error: skip`` stores them as invalid rows)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = per_shard if isinstance(per_shard, list) else [per_shard] * num_shards
    urls = []
    index = 0
    for shard, count in enumerate(counts):
        url = str(out_dir / f"{prefix}-{shard:06d}.tar")
        with wds.TarWriter(url, encoder=False) as tar:
            for _ in range(count):
                label = index % classes
                key = f"{key_prefix or prefix}_{index:06d}"
                sample = {"__key__": key, "png": png(_image(rng, label, classes, size))}
                if key not in unlabelled:
                    sample["cls"] = str(label).encode()
                tar.write(sample)
                index += 1
        urls.append(url)
    return urls


def _image(rng: np.random.Generator, label: int, classes: int, size: int) -> np.ndarray:
    base = np.zeros((size, size), np.float32)
    band = size // classes
    base[:, label * band : (label + 1) * band] = 180.0
    return np.clip(base + rng.normal(40, 25, (size, size)), 0, 255).astype(np.uint8)


def tiny_teacher(
    classes: int = 4,
    seed: int = 0,
    name: str = "kd_cnn_tiny",
    save_to: str | Path | None = None,
    in_chans: int = 1,
) -> tuple[ModelSpec, torch.nn.Module]:
    """A seeded random-init teacher; with ``save_to`` its weights are saved there and named in the
    spec."""
    torch.manual_seed(seed)
    model = build_model(ModelSpec(name=name), classes, in_chans)
    if save_to is None:
        return ModelSpec(name=name), model
    torch.save(model.state_dict(), save_to)
    return ModelSpec(name=name, checkpoint=str(save_to)), model


def precompute_config(
    path: str | Path,
    urls: list[str],
    teachers: list[dict],
    *,
    recipe: ViewRecipe | None = None,
    num_views: int = 3,
    classes: int = 4,
    seed: int = 0,
) -> PrecomputeConfig:
    """A precompute config over ``urls`` (``on_error: skip``: unlabelled samples become invalid
    rows), in-process on the CPU."""
    recipe = recipe or tiny_recipe()
    return PrecomputeConfig.model_validate(
        {
            "data": {"shards": urls, "num_classes": classes, "on_error": "skip"},
            "cache": {
                "path": str(path),
                "seed": seed,
                "num_views": num_views,
                "recipe": recipe.model_dump(),
            },
            "teachers": teachers,
            "runtime": {"batch_size": 64, "device": "cpu"},
        }
    )


def run_precompute(config: PrecomputeConfig, shards: list[int] | None = None) -> CacheStore:
    """Plan and run the shard tasks (only ``shards``, when given) with one in-process worker."""
    plan = plan_precompute(config)
    worker = ShardWorker(worker_settings(config, plan))
    for task in plan.tasks:
        if shards is None or task.index in shards:
            worker(task)
    return open_store(plan.cache_path)


def build_cache(
    path: str | Path,
    urls: list[str],
    *,
    teachers: dict[str, int] | None = None,
    recipe: ViewRecipe | None = None,
    num_views: int = 3,
    classes: int = 4,
    seed: int = 0,
    encoding: str = "fp16",
    shards: list[int] | None = None,
    render: dict | None = None,
    samples: int | None = None,
) -> CacheStore:
    """A cache made by precompute's code: views plus one random-init ``kd_cnn_tiny`` teacher per
    ``{name: k}`` (seeded by order; weights saved beside the cache as ``<cache>.<name>.pt`` and
    named in the stored spec; ``render``: every teacher's ``teachers.N.render``; ``samples``: their
    draws, with encoding ``sampled``); only ``shards`` are processed when given."""
    sections = []
    for i, (name, k) in enumerate((teachers or {"tiny": classes}).items()):
        spec, _ = tiny_teacher(
            classes, seed=i, save_to=f"{path}.{name}.pt", in_chans=_chans(recipe)
        )
        section = {"name": name, "model": spec.model_dump(), "k": k, "encoding": encoding}
        if samples is not None:  # encoding "sampled": the classes drawn per view
            section["samples"] = samples
        sections.append({**section, "render": render or {}})
    config = precompute_config(
        path, urls, sections, recipe=recipe, num_views=num_views, classes=classes, seed=seed
    )
    return run_precompute(config, shards)


def _chans(recipe: ViewRecipe | None) -> int:
    return (recipe or tiny_recipe()).channels


def row_views(store: CacheStore, block, row: int, image: torch.Tensor) -> torch.Tensor:
    """The A stored views of an unmixed row of ``block``, rendered the way the cache's recipe
    renders by default (``uint8[A, C, S, S]``)."""
    recipe = store.meta.recipe
    return render_rows({row: image}, block.view_params, [row], recipe, recipe.rendering())


def cache_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a cache; completion marks (timestamps) as booleans."""
    store = open_store(str(path))
    names = ["keys", "labels", "status", "errors"]
    names += [f"views/{name}" for name in store.view_group.array_keys()]
    out = {name: np.asarray(store.group[name][:]) for name in names}
    out["views_done"] = store.views_done()
    for teacher in store.teachers:
        group = store.teacher_group(teacher)
        for name in store.teacher_meta(teacher).arrays(store.meta.num_classes):
            out[f"{teacher}/{name}"] = np.asarray(group[name][:])
        out[f"{teacher}/done"] = store.teacher_done(teacher)
    return out


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Two :func:`cache_arrays` results hold the same arrays, equal element for element."""
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
