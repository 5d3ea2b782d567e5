"""Test fixtures: tiny WebDataset shards and a cache built in-process, without Ray.

:func:`build_cache` follows precompute's path exactly (decode -> stored view params -> replay ->
``ModelRunner`` -> ``from_logits`` -> ``write_views``/``write_teacher``), so a test can compare
cached targets with the same teacher run online on the same views.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from kdcache.models import ModelSpec, build_model, weights_digest
from kdcache.shards import decode_image, iter_shard, key_digest, scan_shards
from kdcache.store import STATUS_INVALID, STATUS_VALID, CacheStore, Fingerprint
from kdcache.targets import from_logits
from kdcache.teacher import ModelRunner
from kdcache.views import ViewRecipe, replay_views, view_params
from kdcache.writer import add_teacher, create_store, write_targets, write_views

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
) -> list[str]:
    """``out_dir/<prefix>-NNNNNN.tar`` with grey PNGs (class-dependent brightness bands) and labels;
    keys ``<key_prefix>_NNNNNN`` (default the prefix), numbered across shards."""
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
                tar.write(
                    {
                        "__key__": f"{key_prefix or prefix}_{index:06d}",
                        "png": png(_image(rng, label, classes, size)),
                        "cls": str(label).encode(),
                    }
                )
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


def create_cache(
    path: str | Path,
    urls: list[str],
    *,
    recipe: ViewRecipe,
    num_views: int = 3,
    classes: int = 4,
    seed: int = 0,
    invalid_keys: tuple[str, ...] = (),
) -> CacheStore:
    """An empty cache over ``urls`` with every shard's views written (``invalid_keys`` marked
    invalid)."""
    indexes = scan_shards(urls)
    fingerprint = Fingerprint(
        shards=[i.name for i in indexes],
        counts=[len(i) for i in indexes],
        key_digest=key_digest(indexes),
    )
    store = create_store(
        str(path),
        fingerprint=fingerprint,
        keys=[i.keys for i in indexes],
        recipe=recipe,
        num_views=num_views,
        num_classes=classes,
        class_names=[str(c) for c in range(classes)],
        seed=seed,
        config={"data": {"shards": urls}},
    )
    for shard, url in enumerate(urls):
        labels = []
        status = []
        params = []
        for sample in iter_shard(url):
            image = decode_image(sample.image, recipe.channels)
            labels.append(sample.label)
            status.append(STATUS_INVALID if sample.key in invalid_keys else STATUS_VALID)
            params.append(
                view_params(
                    recipe, seed, sample.key, num_views, (int(image.shape[1]), int(image.shape[2]))
                )
            )
        write_views(
            store,
            shard,
            labels=np.array(labels),
            status=np.array(status),
            errors=["bad" if s == STATUS_INVALID else "" for s in status],
            params=np.stack(params),
        )
    return store


def add_teacher_run(
    store: CacheStore,
    urls: list[str],
    name: str,
    spec: ModelSpec,
    model: torch.nn.Module,
    k: int,
    shards: list[int] | None = None,
    encoding: str = "fp16",
) -> None:
    """Run ``model`` over every stored view of the given shards (default all) and write its
    targets."""
    add_teacher(
        store,
        name,
        model=spec.model_dump(mode="json"),
        weights_digest=weights_digest(model),
        k=k,
        encoding=encoding,
    )
    runner = ModelRunner(model, store.meta.recipe, device="cpu", name=name)
    recipe = store.meta.recipe
    num_views = store.meta.num_views
    for shard, url in enumerate(urls):
        if shards is not None and shard not in shards:
            continue
        params = store.group["view_params"][store.rows(shard)]
        views = []
        labels = []
        for row, sample in enumerate(iter_shard(url)):
            views.append(
                replay_views(decode_image(sample.image, recipe.channels), params[row], recipe)
            )
            labels += [sample.label] * num_views
        targets = from_logits(runner(torch.cat(views)), torch.tensor(labels), k)
        write_targets(store, shard, name, targets)


def build_cache(
    path: str | Path,
    urls: list[str],
    *,
    teachers: dict[str, int] | None = None,
    recipe: ViewRecipe | None = None,
    num_views: int = 3,
    classes: int = 4,
    seed: int = 0,
    invalid_keys: tuple[str, ...] = (),
    encoding: str = "fp16",
) -> CacheStore:
    """A complete cache: views plus one random-init ``kd_cnn_tiny`` teacher per ``{name: k}``
    (seeded by order; weights saved beside the cache as ``<cache>.<name>.pt`` and named in the
    stored spec)."""
    store = create_cache(
        path,
        urls,
        recipe=recipe or tiny_recipe(),
        num_views=num_views,
        classes=classes,
        seed=seed,
        invalid_keys=invalid_keys,
    )
    for i, (name, k) in enumerate((teachers or {"tiny": classes}).items()):
        spec, model = tiny_teacher(classes, seed=i, save_to=f"{path}.{name}.pt")
        add_teacher_run(store, urls, name, spec, model, k, encoding=encoding)
    return store
