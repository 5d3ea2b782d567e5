"""``kdcache shards SOURCE --out DIR ...``: write WebDataset shards and a manifest per split."""

from __future__ import annotations

import argparse
from pathlib import Path

from kdcache.core.errors import ConfigError
from kdcache.shards.manifest import Manifest, manifest_path


def _ms():
    """:mod:`kdcache.shards.writing`, imported when a shards command is parsed or run (it
    imports torch and webdataset, which ``kdcache --help`` should not wait for)."""
    from kdcache.shards import writing as make_shards

    return make_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ms = _ms()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="output directory (created)"
    )
    common.add_argument(
        "--shard-size", type=_positive, default=1000, help="samples per shard (default 1000)"
    )
    common.add_argument(
        "--format",
        dest="image_format",
        choices=ms.IMAGE_FORMATS,
        default="png",
        help="encoding of array images; target of mixed png/jpg folders (default png)",
    )
    common.add_argument(
        "--quality", type=_quality, default=95, help="JPEG quality for --format jpg (default 95)"
    )
    common.add_argument(
        "--prefix",
        help="shard name prefix (default: the split name; with several splits "
        "'<prefix>-<split>', or use '{split}' in it)",
    )
    common.add_argument(
        "--limit", type=_positive, help="write only the first N samples of each split"
    )
    common.add_argument(
        "--overwrite", action="store_true", help="replace existing shards of the same prefix"
    )
    sources = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)

    synthetic = sources.add_parser(
        "synthetic", parents=[common], help="seeded, learnable synthetic classes"
    )
    synthetic.add_argument("--num", type=_positive, required=True, help="train samples")
    synthetic.add_argument(
        "--test-num", type=_non_negative, default=0, help="test samples (default 0: none)"
    )
    synthetic.add_argument(
        "--classes", type=_positive, default=10, help="number of classes (default 10)"
    )
    synthetic.add_argument(
        "--size", type=_size, default=(28, 28), help="HxW or one int (default 28x28)"
    )
    synthetic.add_argument(
        "--channels", type=int, choices=(1, 3), default=1, help="1 grey or 3 RGB (default 1)"
    )
    synthetic.add_argument("--seed", type=int, default=0, help="data seed (default 0)")

    idx = sources.add_parser("idx", parents=[common], help="MNIST-style IDX files (gzip or not)")
    idx.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="IDX_DIR_OR_FILES",
        help="directory holding, or the files (train|t10k)-(images|labels)-idx?-ubyte[.gz]",
    )
    idx.add_argument(
        "--class-names", type=_names, help="comma-separated class names, in label order"
    )

    fashion = sources.add_parser(
        "fashion-mnist", parents=[common], help="Fashion-MNIST from its IDX files"
    )
    fashion.add_argument(
        "--dir",
        type=Path,
        default=Path(ms.FASHION_MNIST_DIR),
        help=f"directory of the IDX files (default {ms.FASHION_MNIST_DIR})",
    )

    folder = sources.add_parser(
        "folder", parents=[common], help="ImageFolder: ROOT/[split/]<class>/*.png|jpg"
    )
    folder.add_argument("root", type=Path, metavar="ROOT", help="root of the image folder tree")
    folder.add_argument(
        "--seed", type=int, default=0, help="seed of the order samples are written in (default 0)"
    )
    folder.add_argument(
        "--sorted",
        action="store_true",
        help="write in sorted file order (shards then hold "
        "few classes each; shuffle buffers mix poorly)",
    )

    listed = sources.add_parser(
        "list",
        parents=[common],
        help="a file list with labels: CSV/TSV or 'path label' lines (e.g. a flat val folder)",
    )
    listed.add_argument("list_file", type=Path, metavar="LIST", help="the file list")
    listed.add_argument(
        "--root", type=Path, help="folder the listed paths are relative to (default: LIST's)"
    )
    listed.add_argument(
        "--class-names",
        help="class names in index order: comma-separated, or a manifest whose names to use "
        "(e.g. the train split's, so val labels get the same indices)",
    )
    listed.add_argument("--split", default="train", help="split name (default train)")
    listed.add_argument(
        "--seed", type=int, default=0, help="seed of the order samples are written in (default 0)"
    )

    parquet = sources.add_parser(
        "parquet", parents=[common], help="Parquet files (a Hugging Face dataset's data/*.parquet)"
    )
    parquet.add_argument("files", nargs="+", type=Path, metavar="FILE", help="Parquet files")
    parquet.add_argument("--split", default="train", help="split name (default train)")
    parquet.add_argument(
        "--image-column", default="image", help="encoded images or {bytes, path} (default image)"
    )
    parquet.add_argument("--label-column", default="label", help="class indices (default label)")
    parquet.add_argument(
        "--classes", type=_positive, help="number of classes (default: from the metadata)"
    )


def run(args: argparse.Namespace) -> int:
    from kdcache.core.outputs import check_output_dir

    check_output_dir(args.out, "--out")
    ms = _ms()
    options = ms.ShardOptions(
        shard_size=args.shard_size,
        image_format=args.image_format,
        quality=args.quality,
        prefix=args.prefix,
        limit=args.limit,
        overwrite=args.overwrite,
    )
    manifests = _make(args, options)
    print(summary(args.out, manifests))
    return 0


def _make(args: argparse.Namespace, options) -> dict[str, Manifest]:
    ms = _ms()
    if args.source == "synthetic":
        return ms.make_synthetic_shards(
            args.out,
            args.num,
            args.test_num,
            args.classes,
            args.size,
            args.channels,
            args.seed,
            options.shard_size,
            options.image_format,
            quality=options.quality,
            prefix=options.prefix,
            overwrite=options.overwrite,
            limit=options.limit,
        )
    if args.source == "idx":
        return ms.make_idx_shards(args.out, args.inputs, options, class_names=args.class_names)
    if args.source == "fashion-mnist":
        return ms.make_fashion_mnist_shards(args.out, args.dir, options)
    if args.source == "folder":
        return ms.make_folder_shards(
            args.out, args.root, options, seed=None if args.sorted else args.seed
        )
    from kdcache.shards import sources

    if args.source == "list":
        names = _class_names(args.class_names)
        return sources.make_list_shards(
            args.out,
            args.list_file,
            options,
            root=args.root,
            class_names=names,
            split=args.split,
            seed=args.seed,
        )
    return sources.make_parquet_shards(
        args.out,
        args.files,
        options,
        split=args.split,
        image_column=args.image_column,
        label_column=args.label_column,
        num_classes=args.classes,
    )


def _class_names(text: str | None) -> list[str] | None:
    """Comma-separated names, or the class names of a manifest file."""
    if text is None:
        return None
    if text.endswith(".json"):
        from kdcache.shards.manifest import load_manifest

        return load_manifest(text).class_names
    return [name.strip() for name in text.split(",") if name.strip()]


def summary(out_dir: Path, manifests: dict[str, Manifest]) -> str:
    """One paragraph: what was written where, and the URL to give precompute and train."""
    ms = _ms()
    first = next(iter(manifests.values()))
    size = "x".join(map(str, first.image_size)) if first.image_size else "mixed-size"
    channels = {1: "grey", 3: "RGB"}.get(first.channels or 0, "mixed-channel")
    parts = [
        f"{m.split} {m.num_samples} samples in {len(m.shards)} shard(s) {ms.shard_url(out_dir, m)}"
        for m in manifests.values()
    ]
    prefixes = [m.shards[0].rsplit("-", 1)[0] for m in manifests.values()]
    manifest_files = ", ".join(manifest_path(out_dir, p).name for p in prefixes)
    return (
        f"kdcache shards: wrote {'; '.join(parts)}. {first.num_classes} classes, {size} {channels} "
        f"{first.image_format} images, source {first.source.get('kind')}. "
        f"Manifests ({manifest_files}) in {out_dir}. "
        "Use the shard URLs above as the data of `kdcache precompute` and `kdcache train`."
    )


def _int_at_least(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            wanted = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)
_quality = _int_at_least(1, 100)


def _size(text: str) -> tuple[int, int]:
    try:
        return _ms().parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("size: ")) from None


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-empty names, got {text!r}")
    return names
