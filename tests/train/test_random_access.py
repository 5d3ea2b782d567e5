"""For a loop of one's own (issue 23, item 4): random access by (key, view) returns what the
trainer's stream gives, a map-style dataset over any indexable source, the dense mixed one-hot."""

from __future__ import annotations

import pytest
import torch

import kdcache
from kdcache.core.errors import CacheMismatchError, DataError
from kdcache.shards.reading import iter_shard
from kdcache.targets.sparse import MixedLabels
from tests.support.cachebuild import build_cache, tiny_recipe, write_shards

MIX = {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "prob": 1.0, "group_size": 4}


@pytest.fixture(scope="module")
def mixed_world(tmp_path_factory):
    """Shards and a cache whose views are all mixed (Mixup or CutMix within groups of 4)."""
    root = tmp_path_factory.mktemp("mixed")
    urls = write_shards(root / "shards", num_shards=2)
    store = build_cache(
        root / "cache.zarr", urls, teachers={"tiny": 4}, recipe=tiny_recipe(mix=MIX)
    )
    return urls, store


def source_of(urls: list[str]) -> list[tuple[bytes, int, str]]:
    """The shards' samples as a plain list of (encoded image, label, key)."""
    return [
        (s.image, s.label, s.key) for url in urls for s in iter_shard(url) if s.label is not None
    ]


def stream_samples(urls, cache, epoch: int) -> list:
    dataset = kdcache.CacheDataset(urls, cache, teachers=["tiny"], epoch=epoch, batch_size=8)
    return list(dataset)


def assert_same_targets(a, b) -> None:
    for name in a.__dataclass_fields__:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("mixed", [False, True], ids=["crops", "mixup_cutmix"])
def test_reader_and_map_dataset_return_what_the_stream_gives(world, mixed_world, mixed):
    urls, cache = (mixed_world[0], mixed_world[1].path) if mixed else (world["urls"], None)
    cache = cache or str(world["root"] / "cache.zarr")
    reader = kdcache.CacheReader(cache, teachers=["tiny"])
    source = source_of(urls)
    images = {key: image for image, _, key in source}
    dataset = kdcache.ViewDataset(source, reader, epoch=1)
    by_key = {dataset.key(i): i for i in range(len(dataset))}
    streamed = stream_samples(urls, cache, epoch=1)
    assert len(streamed) == len(dataset) and streamed
    assert any(s.lam is not None and s.lam < 1 for s in streamed) == mixed
    for sample in streamed:
        key = sample.key
        partner = reader.partner(key, sample.view)
        other = None if partner is None else images[partner[0]]
        pixels = reader.render(key, sample.view, images[key], other)
        assert torch.equal(pixels, sample.image)
        assert_same_targets(
            reader.targets(key, sample.view).map(lambda x: x[0]), sample.targets["tiny"]
        )
        item = dataset[by_key[key]]  # the map-style dataset: same view, pixels, labels, targets
        assert item.view == sample.view and torch.equal(item.image, sample.image)
        assert int(item.label) == int(sample.label)
        assert_same_targets(item.targets["tiny"], sample.targets["tiny"])
        if mixed:
            assert int(item.partner_label) == int(sample.partner_label)
            assert float(item.lam) == float(sample.lam)
    batch = kdcache.collate([dataset[i] for i in range(4)])
    assert batch.images.shape[0] == 4 and batch.targets["tiny"].k == 4


def test_reader_errors_name_the_key_and_view(world, mixed_world):
    reader = kdcache.CacheReader(str(world["root"] / "cache.zarr"))
    with pytest.raises(CacheMismatchError, match="key 'nope' is not in cache"):
        reader.targets("nope", 0)
    key = source_of(world["urls"])[0][2]
    with pytest.raises(ValueError, match=f"view 9 of key '{key}': the cache holds views 0..2"):
        reader.view(key, 9)
    mixed = kdcache.CacheReader(mixed_world[1])
    image, _, key = source_of(mixed_world[0])[0]
    with pytest.raises(DataError, match=f"key '{key}', view 0: mixed with '.*'; pass its image"):
        mixed.render(key, 0, image)
    with pytest.raises(DataError, match="has no key: pass keys="):
        kdcache.ViewDataset([(image, 0)], mixed)[0]


def test_one_hot_gives_the_mixed_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    labels = MixedLabels(
        torch.tensor([0, 1, 2, 3, 4, 0]),
        torch.tensor([1, 1, 4, 0, 2, 3]),
        torch.tensor([1.0, 0.3, 0.5, 0.9, 0.0, 0.75]),
    )
    for smoothing in (0.0, 0.1):
        dense = labels.one_hot(5, smoothing=smoothing)
        assert torch.allclose(dense.sum(1), torch.ones(6))
        soft_ce = -(dense * logits.log_softmax(-1)).sum(-1).mean()
        expected = kdcache.ce(logits, labels, label_smoothing=smoothing)
        torch.testing.assert_close(soft_ce, expected)
    from timm.loss import SoftTargetCrossEntropy

    timm_ce = SoftTargetCrossEntropy()(logits, labels.one_hot(5, smoothing=0.1))
    torch.testing.assert_close(timm_ce, kdcache.ce(logits, labels, label_smoothing=0.1))
    unmixed = MixedLabels.unmixed(torch.tensor([2, 0])).one_hot(3)
    assert torch.equal(unmixed, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))


def test_the_own_loop_api_is_public():
    for name in ("build_model", "lr_at", "optimizer_segments", "CacheReader", "ViewDataset"):
        assert name in kdcache.__all__ and getattr(kdcache, name) is not None
