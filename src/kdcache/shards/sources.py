"""Sources beyond image folders: a file list with labels (CSV, TSV or ``path label`` lines, e.g. a
flat ILSVRC-style val folder with its labels file) and Parquet files (Hugging Face ``datasets``'
on-disk form: an image column of encoded bytes, a label column).

Each turns its rows into :class:`~kdcache.shards.writing.SourceSample` s keyed like image folders
(the file's path, readable; :func:`~kdcache.shards.writing.path_keys`) and writes them with
:func:`~kdcache.shards.writing.write_splits`, so a split's shards, manifest, key -> file map and
``_info.json`` look the same whatever the source.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.core.errors import ConfigError, DataError
from kdcache.shards.manifest import Manifest
from kdcache.shards.writing import (
    FOLDER_EXTENSIONS,
    ShardOptions,
    SourceSample,
    path_keys,
    sniff_format,
    write_splits,
)


@dataclass(frozen=True)
class ListedFile:
    """One row of a file list: the image file and its label (an index or a class name)."""

    path: str
    label: str
    line: int


# ---- file lists ----------------------------------------------------------------------------------


def read_file_list(list_file: str | Path) -> list[ListedFile]:
    """Rows ``path, label`` of a CSV (``,``), TSV (tab) or whitespace-separated list; a first row
    whose label is not a number and whose path has no image extension is a header."""
    list_file = Path(list_file)
    try:
        text = list_file.read_text()
    except OSError as exc:
        raise DataError(f"{list_file}: cannot read the file list: {exc}") from exc
    rows = [(n, cells) for n, cells in enumerate(_cells(text), start=1) if cells]
    if rows and _is_header(rows[0][1]):
        rows = rows[1:]
    out = []
    for line, cells in rows:
        if len(cells) < 2:
            raise DataError(f"{list_file}:{line}: expected 'path<sep>label', found {cells!r}")
        out.append(ListedFile(cells[0].strip(), cells[1].strip(), line))
    if not out:
        raise DataError(f"{list_file}: no rows (expected 'path,label' per line)")
    return out


def _cells(text: str) -> list[list[str]]:
    first = next((line for line in text.splitlines() if line.strip()), "")
    if "\t" in first or "," in first:
        return list(csv.reader(io.StringIO(text), delimiter="\t" if "\t" in first else ","))
    return [line.split() for line in text.splitlines()]


def _is_header(cells: list[str]) -> bool:
    path = cells[0].strip().lower()
    return len(cells) > 1 and not path.endswith(tuple(FOLDER_EXTENSIONS)) and not _is_int(cells[1])


def _is_int(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()


def label_indices(
    rows: Sequence[ListedFile], class_names: Sequence[str] | None, where: str
) -> tuple[list[int], list[str]]:
    """Each row's class index and the class names: integer labels as they are, names by
    ``class_names`` (e.g. the train split's manifest, so val indices match) or by sorted order."""
    if all(_is_int(r.label) for r in rows):
        return [int(r.label) for r in rows], list(class_names or [])
    names = list(class_names) if class_names else sorted({r.label for r in rows})
    index = {name: i for i, name in enumerate(names)}
    unknown = [r for r in rows if r.label not in index]
    if unknown:
        first = unknown[0]
        raise DataError(
            f"{where}:{first.line}: label {first.label!r} is not a class name "
            f"({len(names)} known, e.g. {names[:3]})"
        )
    return [index[r.label] for r in rows], names


def make_list_shards(
    out_dir: str | Path,
    list_file: str | Path,
    options: ShardOptions | None = None,
    *,
    root: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    split: str = "train",
    seed: int | None = 0,
) -> dict[str, Manifest]:
    """Shards of the images a file list names (relative paths resolved against ``root``, by
    default the list's folder); keys from the paths as listed."""
    list_file = Path(list_file)
    base = Path(root) if root is not None else list_file.parent
    rows = read_file_list(list_file)
    labels, names = label_indices(rows, class_names, str(list_file))
    num_classes = len(names) if names else max(labels) + 1
    keys = path_keys([r.path for r in rows])
    order = _order(len(rows), seed)
    samples = (_listed_sample(base, rows[i], keys[i], labels[i]) for i in order)
    source = {
        "kind": "list",
        "list": str(list_file.resolve()),
        "root": str(base.resolve()),
        "seed": seed,
    }
    options = options or ShardOptions()
    formats = {FOLDER_EXTENSIONS.get(Path(r.path).suffix.lower()) for r in rows}
    single = formats.pop() if len(formats) == 1 else None
    if single is not None:  # stored as they are; a mixed list is re-encoded to one format
        options = replace(options, image_format=single)
    return write_splits(
        {split: (samples, len(rows))},
        out_dir,
        options,
        num_classes=num_classes,
        class_names=names,
        source=source,
    )


def _order(count: int, seed: int | None) -> Sequence[int]:
    if seed is None:
        return range(count)
    return np.random.default_rng(seed).permutation(count).tolist()


def _listed_sample(base: Path, row: ListedFile, key: str, label: int) -> SourceSample:
    path = base / row.path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path} (list line {row.line}): cannot read: {exc}") from exc
    ext = sniff_format(data)
    if ext is None:
        raise DataError(f"{path}: not a PNG or JPEG file (magic bytes {data[:4].hex()})")
    return SourceSample(key, label, data=data, ext=ext, origin=row.path)


# ---- Parquet (Hugging Face datasets) ------------------------------------------------------------


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ConfigError(
            "Parquet sources need pyarrow: pip install 'kdcache[parquet]' (or pyarrow)"
        ) from exc
    return pq


def parquet_class_names(files: Sequence[str | Path], label_column: str) -> list[str]:
    """Class names from the ``huggingface`` schema metadata ``datasets`` writes (a ClassLabel
    feature's ``names``); empty when there are none."""
    schema = _pyarrow().read_schema(str(files[0]))
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return []
    features = json.loads(raw).get("info", {}).get("features", {})
    return list(features.get(label_column, {}).get("names", []))


def parquet_samples(
    files: Sequence[str | Path], split: str, image_column: str, label_column: str
) -> Iterator[SourceSample]:
    """One sample per row, in file and row order. The image column holds encoded bytes, or a
    ``{bytes, path}`` struct (``datasets``' Image feature): the key comes from ``path`` when
    every row has one, else ``<split>_NNNNNNNN`` by position."""
    pq = _pyarrow()
    position = 0
    for file in files:
        table = pq.read_table(str(file), columns=[image_column, label_column])
        images = table.column(image_column).to_pylist()
        labels = table.column(label_column).to_pylist()
        paths = [_image_path(cell) for cell in images]
        if all(paths):
            keys = path_keys([str(p) for p in paths])
        else:
            keys = [f"{split}_{position + i:08d}" for i in range(len(images))]
        for row, (cell, label) in enumerate(zip(images, labels, strict=True)):
            where = f"{file} row {row}"
            yield _parquet_sample(cell, label, keys[row], paths[row] or where, where)
        position += len(images)


def _image_path(cell: Any) -> str | None:
    return cell.get("path") if isinstance(cell, dict) else None


def _parquet_sample(cell: Any, label: Any, key: str, origin: str, where: str) -> SourceSample:
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not isinstance(data, bytes | bytearray):
        raise DataError(f"{where}: the image column holds no encoded image bytes ({type(data)})")
    ext = sniff_format(bytes(data))
    if ext is None:
        raise DataError(f"{where}: not a PNG or JPEG image (magic bytes {bytes(data[:4]).hex()})")
    if not isinstance(label, int) or isinstance(label, bool):
        raise DataError(f"{where}: label {label!r} is not a class index")
    return SourceSample(key, label, data=bytes(data), ext=ext, origin=origin)


def make_parquet_shards(
    out_dir: str | Path,
    files: Sequence[str | Path],
    options: ShardOptions | None = None,
    *,
    split: str = "train",
    image_column: str = "image",
    label_column: str = "label",
    num_classes: int | None = None,
) -> dict[str, Manifest]:
    """Shards of Parquet files (e.g. a Hugging Face dataset's ``data/train-*.parquet``)."""
    if not files:
        raise ConfigError("no Parquet files given")
    pq = _pyarrow()
    names = parquet_class_names(files, label_column)
    rows = sum(pq.ParquetFile(str(f)).metadata.num_rows for f in files)
    classes = num_classes or len(names) or _max_label(files, label_column) + 1
    samples = parquet_samples(files, split, image_column, label_column)
    source = {"kind": "parquet", "parquet": [str(Path(f).resolve()) for f in files]}
    first = next(samples, None)
    if first is None:
        raise DataError(f"{files[0]}: no rows")
    options = replace(options or ShardOptions(), image_format=first.ext or "png")
    return write_splits(
        {split: (itertools.chain([first], samples), rows)},
        out_dir,
        options,
        num_classes=classes,
        class_names=names,
        source=source,
    )


def _max_label(files: Sequence[str | Path], label_column: str) -> int:
    pq = _pyarrow()
    columns = (pq.read_table(str(f), columns=[label_column]).column(0) for f in files)
    return max(max(column.to_pylist()) for column in columns)
