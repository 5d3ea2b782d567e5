"""Tests of ``kdcache shards``: synthetic, IDX and folder sources, the shard writer and the CLI."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from kdcache.cli import main
from kdcache.core.errors import ConfigError, DataError, DuplicateKeyError
from kdcache.shards.manifest import load_manifest
from kdcache.shards.writing import (
    FASHION_MNIST_DIR,
    ShardOptions,
    ShardsExistError,
    SourceSample,
    folder_splits,
    idx_splits,
    make_folder_shards,
    make_idx_shards,
    make_synthetic_shards,
    parse_size,
    read_file_map,
    read_idx,
    shard_url,
    synthetic_samples,
    write_split,
)

# --------------------------------------------------------------------------------------------
# helpers


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def read_back(out_dir: Path, split: str) -> list[dict]:
    """Samples of a split through WebDataset, images opened with PIL in their stored mode
    (webdataset's ``decode("pil")`` would convert grey images to RGB)."""
    manifest = load_manifest(out_dir / f"{split}-manifest.json")
    urls = [str(out_dir / name) for name in manifest.shards]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(_decode))


def _decode(sample: dict) -> dict:
    decoded = {"__key__": sample["__key__"], "cls": int(sample["cls"].decode("ascii"))}
    for ext in ("png", "jpg"):
        if ext in sample:
            decoded[ext] = Image.open(io.BytesIO(sample[ext]))
    return decoded


def write_idx(path: Path, array: np.ndarray) -> Path:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def make_idx_dir(root: Path, train: int = 30, test: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (train, 7, 5), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 4, train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, 7, 5), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 4, test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(root / name, array)
    return arrays


def save_image(path: Path, seed: int, mode: str = "RGB", size: tuple[int, int] = (9, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(array).save(
        path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    )


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic_shards(
        out, 250, 60, classes=5, size=(12, 16), channels=1, seed=3, shard_size=100
    )
    return out


# --------------------------------------------------------------------------------------------
# synthetic + writer


def test_synthetic_round_trip(synthetic: Path) -> None:
    train = load_manifest(synthetic / "train-manifest.json")
    assert train.counts == [100, 100, 50] and train.num_samples == 250
    assert train.shards == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert (train.num_classes, train.image_size, train.channels, train.image_format) == (
        5,
        [12, 16],
        1,
        "png",
    )
    assert train.source["kind"] == "synthetic" and train.source["seed"] == 3
    assert load_manifest(synthetic / "test-manifest.json").counts == [60]
    samples = read_back(synthetic, "train") + read_back(synthetic, "test")
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)) == 310
    assert all("." not in k and "/" not in k for k in keys)
    assert {s["cls"] for s in samples} == set(range(5))
    assert all(s["png"].size == (16, 12) and s["png"].mode == "L" for s in samples)


def test_shard_entries_are_png_and_ascii_cls(synthetic: Path) -> None:
    members = tar_members(synthetic / "train-000002.tar")
    assert len(members) == 100
    keys = {name.split(".", 1)[0] for name in members}
    assert {name.split(".", 1)[1] for name in members} == {"png", "cls"}
    for key in keys:
        assert members[f"{key}.png"].startswith(b"\x89PNG")
        assert 0 <= int(members[f"{key}.cls"].decode("ascii")) < 5


def test_synthetic_is_deterministic(tmp_path: Path, synthetic: Path) -> None:
    make_synthetic_shards(
        tmp_path / "a", 250, 60, classes=5, size=(12, 16), channels=1, seed=3, shard_size=100
    )
    make_synthetic_shards(
        tmp_path / "b", 250, 0, classes=5, size=(12, 16), channels=1, seed=4, shard_size=100
    )
    for name in ("train-000000.tar", "train-000002.tar", "test-000000.tar", "train-manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (synthetic / name).read_bytes()
    assert (tmp_path / "b" / "train-000000.tar").read_bytes() != (
        synthetic / "train-000000.tar"
    ).read_bytes()


def test_synthetic_is_learnable_but_not_trivial() -> None:
    kw = {"classes": 4, "size": (16, 16), "channels": 1, "seed": 0}
    train = list(synthetic_samples("train", 800, **kw))
    test = list(synthetic_samples("test", 400, **kw))
    x = np.stack([s.image.ravel() for s in train]).astype(np.float32)
    y = np.array([s.label for s in train])
    centroids = np.stack([x[y == c].mean(0) for c in range(4)])
    xt = np.stack([s.image.ravel() for s in test]).astype(np.float32)
    predicted = ((xt[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    accuracy = (predicted == np.array([s.label for s in test])).mean()
    assert 0.5 < accuracy < 0.99  # chance is 0.25


def test_synthetic_rgb_jpeg(tmp_path: Path) -> None:
    manifests = make_synthetic_shards(
        tmp_path, 40, 0, classes=3, size=8, channels=3, seed=0, shard_size=16, image_format="jpg"
    )
    assert list(manifests) == ["train"]
    assert (
        manifests["train"].counts,
        manifests["train"].channels,
        manifests["train"].image_format,
    ) == ([16, 16, 8], 3, "jpg")
    samples = read_back(tmp_path, "train")
    assert all(s["jpg"].mode == "RGB" and s["jpg"].size == (8, 8) for s in samples)
    assert shard_url(tmp_path, manifests["train"]) == f"{tmp_path}/train-{{000000..000002}}.tar"


def test_refuses_to_overwrite_then_overwrites_and_removes_stale_shards(tmp_path: Path) -> None:
    make_synthetic_shards(tmp_path, 30, 0, classes=2, size=8, shard_size=10)
    with pytest.raises(ShardsExistError, match=r"train-manifest\.json already exists.*--overwrite"):
        make_synthetic_shards(tmp_path, 30, 0, classes=2, size=8, shard_size=10)
    (tmp_path / "train-manifest.json").unlink()
    with pytest.raises(ShardsExistError, match=r"train-000000\.tar already exists"):
        make_synthetic_shards(tmp_path, 30, 0, classes=2, size=8, shard_size=10)
    manifests = make_synthetic_shards(
        tmp_path, 15, 0, classes=2, size=8, shard_size=10, overwrite=True
    )
    assert manifests["train"].counts == [10, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "_info.json",
        "train-000000.tar",
        "train-000001.tar",
        "train-manifest.json",
    ]


def test_prefix_and_limit(tmp_path: Path) -> None:
    manifests = make_synthetic_shards(
        tmp_path, 50, 20, classes=2, size=8, shard_size=8, prefix="toy", limit=10
    )
    assert {m.num_samples for m in manifests.values()} == {10}
    assert manifests["train"].shards == ["toy-train-000000.tar", "toy-train-000001.tar"]
    assert (tmp_path / "toy-test-manifest.json").exists()


@pytest.mark.parametrize(
    ("sample", "error", "match"),
    [
        (
            SourceSample("a.b", 0, np.zeros((4, 4), np.uint8)),
            DataError,
            r"key 'a\.b' must .* no '\.'",
        ),
        (
            SourceSample("a", 7, np.zeros((4, 4), np.uint8)),
            DataError,
            r"x-000000\.tar: key 'a': label 7 is not in 0\.\.2",
        ),
        (SourceSample("a", 0, np.zeros((4, 4), np.float32)), DataError, r"expected a uint8"),
    ],
)
def test_write_split_rejects_bad_samples(
    tmp_path: Path, sample: SourceSample, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        write_split([sample], tmp_path, "x", ShardOptions(), num_classes=3)
    assert not (tmp_path / "x-manifest.json").exists()
    assert not list(tmp_path.glob("*.tar*"))


def test_write_split_rejects_duplicate_keys_and_empty_splits(tmp_path: Path) -> None:
    image = np.zeros((4, 4), np.uint8)
    with pytest.raises(DuplicateKeyError, match="key 'k' occurs twice"):
        write_split(
            [SourceSample("k", 0, image), SourceSample("k", 1, image)],
            tmp_path,
            "dup",
            ShardOptions(),
            num_classes=2,
        )
    with pytest.raises(DataError, match="split 'empty': no samples"):
        write_split([], tmp_path, "empty", ShardOptions(), num_classes=2)


def test_write_split_takes_its_options(tmp_path: Path) -> None:
    """Shard size, format and ``limit`` come from the ShardOptions, as for write_splits."""
    images = [SourceSample(f"k{i}", i % 2, np.full((4, 4), i, np.uint8)) for i in range(7)]
    options = ShardOptions(shard_size=2, image_format="jpg", quality=90, limit=5)
    manifest = write_split(images, tmp_path, "lim", options, num_classes=2, total=7)
    assert (manifest.num_samples, manifest.counts, manifest.image_format) == (5, [2, 2, 1], "jpg")
    with pytest.raises(ShardsExistError, match=r"lim-manifest\.json already exists"):
        write_split(images, tmp_path, "lim", ShardOptions(), num_classes=2)
    again = write_split(images, tmp_path, "lim", ShardOptions(overwrite=True), num_classes=2)
    assert (again.num_samples, again.shards) == (7, ["lim-000000.tar"])
    assert not (tmp_path / "lim-000001.tar").exists()  # the stale shards of the first write


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shard_size": 0}, "shard_size: expected a positive"),
        ({"image_format": "gif"}, "image_format"),
        ({"quality": 101}, "quality"),
        ({"prefix": "a/b"}, "prefix"),
    ],
)
def test_shard_options_are_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ShardOptions(**kwargs)


@pytest.mark.parametrize(
    ("text", "expected"), [("28x28", (28, 28)), ("32", (32, 32)), ("12X16", (12, 16)), (8, (8, 8))]
)
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["ax3", "28x", "1x2x3", "2x2"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="size: expected"):
        parse_size(text)


# --------------------------------------------------------------------------------------------
# IDX


def test_idx_round_trip(tmp_path: Path) -> None:
    arrays = make_idx_dir(tmp_path / "idx")
    manifests = make_idx_shards(
        tmp_path / "out",
        [tmp_path / "idx"],
        ShardOptions(shard_size=8),
        class_names=["a", "b", "c", "d"],
    )
    assert manifests["train"].counts == [8, 8, 8, 6] and manifests["test"].counts == [8, 4]
    assert (
        manifests["test"].image_size,
        manifests["test"].channels,
        manifests["test"].class_names,
    ) == ([7, 5], 1, ["a", "b", "c", "d"])
    samples = read_back(tmp_path / "out", "train")
    assert [s["__key__"] for s in samples] == [f"train_{i:08d}" for i in range(30)]
    images = np.stack([np.asarray(s["png"]) for s in samples])
    np.testing.assert_array_equal(images, arrays["train-images-idx3-ubyte.gz"])  # PNG is lossless
    assert [s["cls"] for s in samples] == arrays["train-labels-idx1-ubyte.gz"].tolist()


def test_idx_from_files_and_prefers_uncompressed(tmp_path: Path) -> None:
    arrays = make_idx_dir(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((1, 2, 2), np.uint8))  # stale .gz
    splits = idx_splits([tmp_path])
    np.testing.assert_array_equal(splits["test"][0], arrays["t10k-images-idx3-ubyte"])
    only_train = idx_splits(
        [tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels-idx1-ubyte.gz"]
    )
    assert list(only_train) == ["train"] and only_train["train"][0].shape == (30, 7, 5)


def test_idx_malformed(tmp_path: Path) -> None:
    bad = tmp_path / "bad-images"
    bad.write_bytes(b"\x08\x03\x00\x00" + bytes(40))
    with pytest.raises(
        DataError, match=r"bad-images: not an IDX file \(bad magic number 08030000\)"
    ):
        read_idx(bad)
    short = write_idx(tmp_path / "short", np.zeros((3, 4, 4), np.uint8))
    short.write_bytes(short.read_bytes()[:-5])
    with pytest.raises(
        DataError, match=r"short: IDX shape \(3, 4, 4\) needs 48 data bytes, found 43"
    ):
        read_idx(short)
    broken_gzip = tmp_path / "broken.gz"
    broken_gzip.write_bytes(gzip.compress(bytes(100))[:20])
    with pytest.raises(DataError, match="broken.gz: cannot read IDX file"):
        read_idx(broken_gzip)


def test_idx_count_mismatch_and_missing_partner(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 4, 4), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte has 5 images but .*train-labels-idx1-ubyte has 4"
    ):
        idx_splits([tmp_path])
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: found no matching t10k-labels"):
        idx_splits([tmp_path])
    with pytest.raises(DataError, match=f"{tmp_path / 'nothing'}: no such file"):
        idx_splits([tmp_path / "nothing"])


def test_idx_labels_beyond_class_names(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "idx")
    with pytest.raises(DataError, match=r"label 3 but only 2 class names"):
        make_idx_shards(tmp_path / "out", [tmp_path / "idx"], class_names=["a", "b"])


# --------------------------------------------------------------------------------------------
# folders


def test_folder_flat_layout_keeps_bytes(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for i, name in enumerate(
        ["dog/b.jpg", "dog/a.JPEG", "cat/x.jpg", "cat/sub/y.jpg", "emu/z.jpg"]
    ):
        save_image(root / name, i)
    class_names, splits = folder_splits(root)
    assert class_names == ["cat", "dog", "emu"]
    assert [(p.relative_to(root).as_posix(), c) for p, c in splits["train"]] == [
        ("cat/sub/y.jpg", 0),
        ("cat/x.jpg", 0),
        ("dog/a.JPEG", 1),
        ("dog/b.jpg", 1),
        ("emu/z.jpg", 2),
    ]
    manifests = make_folder_shards(tmp_path / "out", root, ShardOptions(shard_size=2))
    manifest = manifests["train"]
    assert (manifest.image_format, manifest.counts) == ("jpg", [2, 2, 1])
    assert (manifest.image_size, manifest.channels) == ([6, 9], 3)
    members = {}
    for name in manifest.shards:
        members.update(tar_members(tmp_path / "out" / name))
    keys = ["cat-sub-y", "cat-x", "dog-a", "dog-b", "emu-z"]  # the paths, readable
    for key, (path, label) in zip(keys, splits["train"], strict=True):
        assert members[f"{key}.jpg"] == path.read_bytes()  # stored as is
        assert members[f"{key}.cls"] == str(label).encode()
    files = read_file_map(tmp_path / "out" / manifest.source["files"])
    assert {files[k] for k in keys} == {p.relative_to(root).as_posix() for p, _ in splits["train"]}


def test_folder_split_layout_and_mixed_formats(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    save_image(root / "train/ant/1.png", 1, mode="L")
    save_image(root / "train/bee/2.jpg", 2, mode="L")
    save_image(root / "train/bee/3.png", 3, mode="L")
    save_image(root / "val/bee/4.png", 4, mode="L")
    save_image(root / "val/cow/5.png", 5, mode="L", size=(4, 4))
    manifests = make_folder_shards(
        tmp_path / "out", root, ShardOptions(image_format="png"), seed=None
    )
    assert list(manifests) == ["train", "val"]
    assert (
        manifests["train"].class_names == ["ant", "bee", "cow"]
        and manifests["train"].num_classes == 3
    )
    assert (manifests["train"].image_format, manifests["train"].channels) == ("png", 1)
    assert manifests["val"].image_size is None  # sizes differ
    train = read_back(tmp_path / "out", "train")
    assert [(s["__key__"], s["cls"]) for s in train] == [("ant-1", 0), ("bee-2", 1), ("bee-3", 1)]
    assert all(s["png"].mode == "L" for s in train)  # the JPEG was re-encoded to PNG
    assert [s["cls"] for s in read_back(tmp_path / "out", "val")] == [1, 2]


def test_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: no class folders"):
        folder_splits(tmp_path / "empty")
    (tmp_path / "noimages" / "cat").mkdir(parents=True)
    (tmp_path / "noimages" / "cat" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=f"{tmp_path / 'noimages'}: no .png/.jpg/.jpeg files"):
        folder_splits(tmp_path / "noimages")
    save_image(tmp_path / "mixed" / "train" / "cat" / "a.png", 0)
    save_image(tmp_path / "mixed" / "dog" / "b.png", 0)
    with pytest.raises(
        DataError, match=r"mixed: mixes split folders \['train'\] with other folders \['dog'\]"
    ):
        folder_splits(tmp_path / "mixed")
    fake = tmp_path / "fake" / "cat" / "a.jpg"
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"GIF89a....")
    with pytest.raises(DataError, match=r"a\.jpg: not a PNG or JPEG file"):
        make_folder_shards(tmp_path / "out", tmp_path / "fake")


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_synthetic(tmp_path: Path, capsys) -> None:
    argv = [
        "shards",
        "synthetic",
        "--out",
        str(tmp_path),
        "--num",
        "30",
        "--test-num",
        "10",
        "--classes",
        "3",
        "--size",
        "10x12",
        "--channels",
        "3",
        "--seed",
        "5",
        "--shard-size",
        "16",
        "--format",
        "jpg",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "wrote train 30 samples in 2 shard(s)" in out and "10x12 RGB jpg" in out
    manifest = load_manifest(tmp_path / "train-manifest.json")
    assert (manifest.image_size, manifest.channels, manifest.source["seed"]) == ([10, 12], 3, 5)
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_cli_idx_and_folder(tmp_path: Path, capsys) -> None:
    make_idx_dir(tmp_path / "idx")
    assert (
        main(
            [
                "shards",
                "idx",
                "--out",
                str(tmp_path / "o1"),
                str(tmp_path / "idx"),
                "--class-names",
                "w,x,y,z",
                "--limit",
                "5",
            ]
        )
        == 0
    )
    assert load_manifest(tmp_path / "o1" / "test-manifest.json").num_samples == 5
    save_image(tmp_path / "imgs" / "a" / "1.png", 0)
    save_image(tmp_path / "imgs" / "b" / "2.png", 1)
    assert (
        main(
            [
                "shards",
                "folder",
                "--out",
                str(tmp_path / "o2"),
                str(tmp_path / "imgs"),
                "--prefix",
                "pics",
            ]
        )
        == 0
    )
    assert load_manifest(tmp_path / "o2" / "pics-manifest.json").class_names == ["a", "b"]
    assert main(["shards", "folder", "--out", str(tmp_path / "o3"), str(tmp_path / "nowhere")]) == 2
    assert "nowhere: not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--size", "big"], "argument --size: expected HxW"),
        (["--channels", "2"], "argument --channels"),
        (["--shard-size", "0"], "argument --shard-size: expected an integer >= 1"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path: Path, capsys, args: list[str], match: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["shards", "synthetic", "--out", str(tmp_path), "--num", "10", *args])
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_cli_fashion_mnist_missing(tmp_path: Path, capsys) -> None:
    assert (
        main(["shards", "fashion-mnist", "--out", str(tmp_path), "--dir", str(tmp_path / "none")])
        == 2
    )
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(),
    reason=f"{FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)",
)
def test_cli_fashion_mnist(tmp_path: Path) -> None:
    assert main(["shards", "fashion-mnist", "--out", str(tmp_path), "--limit", "500"]) == 0
    train = load_manifest(tmp_path / "train-manifest.json")
    assert (train.num_samples, train.num_classes, train.image_size, train.channels) == (
        500,
        10,
        [28, 28],
        1,
    )
    assert train.class_names[0] == "T-shirt/top"
    assert len(read_back(tmp_path, "test")) == 500
