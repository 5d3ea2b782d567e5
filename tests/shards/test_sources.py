"""Sources beyond tar shards: readable keys from file paths and the key -> file map, file lists
with labels, Parquet files (Hugging Face ``datasets``' form), and ``_info.json`` for timm."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kdcache.cli import main
from kdcache.core.errors import DataError
from kdcache.shards.reading import iter_shard
from kdcache.shards.sources import make_list_shards, make_parquet_shards, read_file_list
from kdcache.shards.writing import make_folder_shards, path_keys, read_file_map
from tests.support.cachebuild import assert_same_arrays, build_cache, cache_arrays, tiny_recipe

CLASSES = ["ant", "bee", "cow"]


def png(seed: int, size: int = 16) -> bytes:
    base = np.full((size, size), 40 + 60 * (seed % 3), np.uint8)
    noise = np.random.default_rng(seed).integers(0, 40, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(base + noise).save(buffer, format="PNG")
    return buffer.getvalue()


def image_tree(root: Path, per_class: int = 4) -> list[tuple[str, int, bytes]]:
    """``root/<class>/img.<i>.png``: (relative path, label, bytes) in sorted path order."""
    rows = []
    for label, name in enumerate(CLASSES):
        for i in range(per_class):
            relative = f"{name}/img.{i}.png"
            data = png(label * 100 + i)
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / relative).write_bytes(data)
            rows.append((relative, label, data))
    return sorted(rows)


def test_path_keys_are_readable_dot_free_and_unique() -> None:
    paths = ["cat/sub/x.1.jpg", "cat/a b.png", "cat-sub/x_1.png", "dog/y.jpg"]
    keys = path_keys(paths)
    assert keys[1] == "cat-a_b" and keys[3] == "dog-y"
    assert keys[0] != keys[2] and len(set(keys)) == 4  # both are cat-sub-x_1: disambiguated
    assert all("." not in k and "/" not in k for k in keys)


def test_a_folders_file_names_survive_into_keys_and_the_map(tmp_path) -> None:
    rows = image_tree(tmp_path / "tree")
    manifest = make_folder_shards(tmp_path / "out", tmp_path / "tree")["train"]
    files = read_file_map(tmp_path / "out" / manifest.source["files"])
    assert sorted(files.values()) == [relative for relative, _, _ in rows]
    samples = [s for shard in manifest.shards for s in iter_shard(str(tmp_path / "out" / shard))]
    by_path = {relative: data for relative, _, data in rows}
    for sample in samples:
        assert sample.image == by_path[files[sample.key]]  # the map points at the very file


def test_a_flat_val_folder_with_a_labels_file_uses_the_train_class_indices(tmp_path) -> None:
    val = tmp_path / "val"
    val.mkdir()
    lines = ["file\tclass"]
    for i, name in enumerate(["cow", "ant", "cow"]):
        (val / f"ILSVRC_val_{i}.png").write_bytes(png(i))
        lines.append(f"ILSVRC_val_{i}.png\t{name}")
    (val / "labels.tsv").write_text("\n".join(lines) + "\n")
    manifest = make_list_shards(
        tmp_path / "out", val / "labels.tsv", class_names=CLASSES, split="val", seed=None
    )["val"]
    assert (manifest.num_classes, manifest.class_names) == (3, CLASSES)
    samples = list(iter_shard(str(tmp_path / "out" / manifest.shards[0])))
    assert [(s.key, s.label) for s in samples] == [
        ("ILSVRC_val_0", 2),
        ("ILSVRC_val_1", 0),
        ("ILSVRC_val_2", 2),
    ]


def test_file_list_errors_name_the_line(tmp_path) -> None:
    (tmp_path / "a.png").write_bytes(png(0))
    (tmp_path / "list.csv").write_text("a.png,ant\nb.png,emu\n")
    with pytest.raises(DataError, match=r"list.csv:2: label 'emu' is not a class name"):
        make_list_shards(tmp_path / "out", tmp_path / "list.csv", class_names=CLASSES)
    (tmp_path / "short.txt").write_text("a.png\n")
    with pytest.raises(DataError, match=r"short.txt:1: expected 'path<sep>label'"):
        read_file_list(tmp_path / "short.txt")


def hf_parquet(path: Path, rows: list[tuple[str, int, bytes]]) -> None:
    """A Parquet file as ``datasets`` writes one: an Image struct column and a ClassLabel."""
    images = [{"bytes": data, "path": relative} for relative, _, data in rows]
    table = pa.table({"image": images, "label": [label for _, label, _ in rows]})
    features = {"image": {"_type": "Image"}, "label": {"names": CLASSES, "_type": "ClassLabel"}}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path)


def test_a_parquet_source_gives_the_same_cache_as_the_same_images_from_a_folder(tmp_path) -> None:
    rows = image_tree(tmp_path / "tree")
    hf_parquet(tmp_path / "train.parquet", rows)
    folder = make_folder_shards(tmp_path / "a", tmp_path / "tree", seed=None)["train"]
    parquet = make_parquet_shards(tmp_path / "b", [tmp_path / "train.parquet"])["train"]
    assert (parquet.class_names, parquet.counts) == (folder.class_names, folder.counts)
    assert parquet.key_digests == folder.key_digests
    recipe = tiny_recipe(size=12)
    build_cache(
        tmp_path / "a.zarr",
        [str(tmp_path / "a" / s) for s in folder.shards],
        recipe=recipe,
        classes=3,
    )
    build_cache(
        tmp_path / "b.zarr",
        [str(tmp_path / "b" / s) for s in parquet.shards],
        recipe=recipe,
        classes=3,
    )
    assert_same_arrays(cache_arrays(tmp_path / "a.zarr"), cache_arrays(tmp_path / "b.zarr"))


def test_timms_webdataset_reader_reads_kdcache_shards(tmp_path) -> None:
    from timm.data import create_dataset

    image_tree(tmp_path / "tree", per_class=3)
    manifest = make_folder_shards(tmp_path / "out", tmp_path / "tree")["train"]
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert info["splits"]["train"]["shard_lengths"] == manifest.counts
    dataset = create_dataset("wds/kd", root=str(tmp_path / "out"), split="train")
    assert len(dataset) == manifest.num_samples
    labels = sorted(int(target) for _, target in dataset)
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_the_cli_writes_list_and_parquet_sources(tmp_path, capsys) -> None:
    rows = image_tree(tmp_path / "tree", per_class=2)
    lines = [f"{relative} {CLASSES[label]}" for relative, label, _ in rows]
    (tmp_path / "tree" / "train.txt").write_text("\n".join(lines) + "\n")
    argv = ["shards", "list", str(tmp_path / "tree" / "train.txt"), "--out", str(tmp_path / "l")]
    assert main(argv) == 0
    assert "train 6 samples" in capsys.readouterr().out
    hf_parquet(tmp_path / "t.parquet", rows)
    argv = ["shards", "parquet", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "p")]
    assert main(argv) == 0
    assert "source parquet" in capsys.readouterr().out
