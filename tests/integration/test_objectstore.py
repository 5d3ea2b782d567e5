"""Shards and cache on an S3-compatible object store (a local moto server), through fsspec / s3fs.

The server listens on 127.0.0.1 at a free port; nothing leaves the machine. Credentials are dummy
values; the endpoint reaches the cache through ``cache.storage_options`` and the shards through
the standard AWS environment (``AWS_ENDPOINT_URL``), which Ray actors and DataLoader workers
inherit, or, with that environment removed, through ``data.storage_options`` alone. The default
run covers precompute in-process, the writer lock and a training epoch; the slow test runs
``kdcache precompute`` through Ray actors (compared with a local run), ``kdcache validate``, and
``kdcache train`` with DataLoader workers, all against the server.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kdcache.cache.lock import WriterLock, read_holder
from kdcache.cache.reader import read_block
from kdcache.cache.store import open_store
from kdcache.cache_tools.validate import validate_cache
from kdcache.cli import main as cli_main
from kdcache.core.config import validate
from kdcache.core.errors import CacheLockedError, CacheMismatchError, CacheReadError, WeightsError
from kdcache.core.results import read_run_records
from kdcache.models.build import ModelSpec, build_model, build_teacher, weights_digest
from kdcache.pipeline.config import PrecomputeConfig
from kdcache.pipeline.plan import plan_precompute, seal_fingerprint
from kdcache.pipeline.runner import precompute, store_size, worker_settings
from kdcache.pipeline.worker import ShardWorker
from kdcache.shards.manifest import Manifest
from kdcache.shards.reading import expand_shards, iter_shard, scan_shards
from kdcache.train.config import TrainConfig
from kdcache.train.data import build_train_data
from kdcache.train.trainer import train
from tests.support.cachebuild import write_shards
from tests.support.precomputerun import run_in_process

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "kdcache"
SHARDS = f"s3://{BUCKET}/shards/train-{{000000..000003}}.tar"
GREY = {"channels": 1, "mean": [0.5], "std": [0.25]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback with a bucket holding 4 tiny shards (+1 validation shard)."""
    patch = pytest.MonkeyPatch()
    for name in (
        "AWS_PROFILE",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_SESSION_TOKEN",
    ):
        patch.delenv(name, raising=False)
    server = moto_server.ThreadedMotoServer(
        ip_address="127.0.0.1", port=_free_port(), verbose=False
    )
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    patch.setenv("AWS_ACCESS_KEY_ID", "testing")
    patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    patch.setenv("AWS_ENDPOINT_URL", endpoint)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir(BUCKET)
    local = tmp_path_factory.mktemp("s3shards")
    for url in write_shards(local) + write_shards(local, prefix="val", num_shards=1, per_shard=10):
        fs.put(url, f"{BUCKET}/shards/{Path(url).name}")
    yield {
        "endpoint": endpoint,
        "fs": fs,
        "options": {"client_kwargs": {"endpoint_url": endpoint}},
        "local": local,
    }
    server.stop()
    patch.undo()
    s3fs.S3FileSystem.clear_instance_cache()


def precompute_config(s3, cache: str, *, local: bool = False) -> PrecomputeConfig:
    shards = str(s3["local"] / "train-{000000..000003}.tar") if local else SHARDS
    return validate(
        PrecomputeConfig,
        {
            "data": {"shards": shards, "num_classes": 4},
            "cache": {
                "path": cache,
                "storage_options": {} if local else s3["options"],
                "num_views": 2,
                "recipe": {"size": 12, "scale": [0.5, 1.0], **GREY},
            },
            "teachers": [{"name": "tiny", "model": {"name": "kd_cnn_tiny"}, "k": 3}],
            "ray": {"num_actors": 2},
            "runtime": {"batch_size": 16},
        },
    )


def train_config(s3, cache: str, run_dir: Path, workers: int = 0) -> dict:
    return {
        "run": {"dir": str(run_dir), "log_every": 2, "progress": False},
        "data": {
            "shards": f"s3://{BUCKET}/shards/train-*.tar",
            "val_shards": f"s3://{BUCKET}/shards/val-000000.tar",
            "batch_size": 8,
            "num_workers": workers,
            "shuffle_buffer": 10,
        },
        "cache": {"path": cache, "storage_options": s3["options"]},
        "student": {"name": "kd_mlp", "kwargs": {"img_size": 12, "hidden": 16}},
        "teacher": {"mode": "cache", "name": "tiny"},
        "stages": [{"epochs": 1, "loss": {"name": "kd", "alpha": 0.5, "temperature": 2.0}}],
    }


def arrays(path: str, options: dict | None = None) -> dict[str, np.ndarray]:
    store = open_store(path, "r", options)
    out = {
        name: np.asarray(store.group[name][:])
        for name in ("keys", "labels", "status", "views/crop", "views/flip", "views/image_hw")
    }
    group = store.teacher_group("tiny")
    out.update(
        {
            f"tiny/{name}": np.asarray(group[name][:])
            for name in ("topk_idx", "topk_logit", "lse", "label_logit")
        }
    )
    out["marks"] = np.concatenate([store.views_done(), store.teacher_done("tiny")])
    return out


@pytest.fixture(scope="module")
def local_cache(s3, tmp_path_factory) -> str:
    """The same precompute on local copies of the shards (in-process), to compare with."""
    path = str(tmp_path_factory.mktemp("localcache") / "cache.zarr")
    run_in_process(precompute_config(s3, path, local=True))
    return path


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_precompute_and_train_on_s3_in_process(s3, tmp_path):
    cache = f"s3://{BUCKET}/inproc/cache.zarr"
    run_in_process(precompute_config(s3, cache))
    assert open_store(cache, "r", s3["options"]).incomplete_shards() == {}
    assert store_size(cache, s3["options"]) > 1000
    config = TrainConfig.model_validate(train_config(s3, cache, tmp_path))
    data = build_train_data(config, 0, 1, ["tiny"], pin_memory=False)
    keys = [key for batch in data.epoch(0, ["tiny"]) for key in batch.keys]
    assert sorted(keys) == [f"train_{i:06d}" for i in range(48)]


def test_teacher_checkpoint_on_s3_is_fetched_once_per_node_and_its_digest_checked(
    s3, tmp_path, monkeypatch
):
    """A timm-style DDP checkpoint on the server: the precompute driver fetches it into the node's
    checkpoint cache, the shard worker (an actor, here in-process) reuses that copy and checks the
    digest; a changed object is fetched again and refused by the existing cache."""
    monkeypatch.setenv("KDCACHE_CHECKPOINT_CACHE", str(tmp_path / "ckpts"))
    torch.manual_seed(5)
    net = build_model(ModelSpec(name="kd_cnn_tiny"), 4, 1)
    torch.save({"state_dict": torch.nn.DataParallel(net).state_dict()}, tmp_path / "t.pth")
    s3["fs"].put(str(tmp_path / "t.pth"), f"{BUCKET}/ckpt/teacher.pth")
    url = f"s3://{BUCKET}/ckpt/teacher.pth"
    data = precompute_config(s3, str(tmp_path / "cache.zarr"), local=True).model_dump()
    data["teachers"][0]["model"]["checkpoint"] = url
    cfg = validate(PrecomputeConfig, data)
    run_in_process(cfg)
    assert open_store(str(tmp_path / "cache.zarr")).teacher_meta("tiny").weights_digest == (
        weights_digest(net)
    )
    (copy,) = (tmp_path / "ckpts").glob("*-teacher.pth")
    fetched = copy.stat().st_mtime_ns
    spec = ModelSpec(name="kd_cnn_tiny", checkpoint=url)
    assert weights_digest(build_teacher(spec, 4, 1)) == weights_digest(net)
    assert copy.stat().st_mtime_ns == fetched  # not fetched again

    torch.manual_seed(6)
    torch.save(build_model(ModelSpec(name="kd_cnn_tiny"), 4, 1).state_dict(), tmp_path / "t.pth")
    s3["fs"].put(str(tmp_path / "t.pth"), f"{BUCKET}/ckpt/teacher.pth")
    with pytest.raises(CacheMismatchError, match=r"teacher 'tiny' already exists .*weights_digest"):
        run_in_process(cfg)
    assert len(list((tmp_path / "ckpts").glob("*-teacher.pth"))) == 2
    with pytest.raises(WeightsError, match=rf"checkpoint '{url}x' does not exist"):
        build_teacher(spec.model_copy(update={"checkpoint": url + "x"}), 4, 1)


def test_damaged_cache_on_s3_is_refused_and_repaired(s3, local_cache, caplog):
    """Damage at rest on an object store: a lost chunk object is found by listing (the rerun's
    cheap check) and by the reader's exists, a flipped byte by its checksum (--check); the rerun
    redoes those shards and the arrays equal a local run's."""
    cache = f"s3://{BUCKET}/damaged/cache.zarr"
    config = precompute_config(s3, cache)
    run_in_process(config)
    fs = s3["fs"]
    fs.rm(f"{BUCKET}/damaged/cache.zarr/status/c/1")
    chunk = f"{BUCKET}/damaged/cache.zarr/teachers/tiny/topk_logit/c/2/0/0"
    data = bytearray(fs.cat(chunk))
    data[len(data) // 2] ^= 0x5A
    fs.pipe(chunk, bytes(data))
    store = open_store(cache, "r", s3["options"])
    with pytest.raises(CacheReadError, match=r"cannot read 'status' of shard 'train-000001.tar'"):
        read_block(store, 1, ["tiny"])
    with pytest.raises(CacheReadError, match=r"'teachers/tiny/topk_logit' of shard 'train-000002"):
        read_block(store, 2, ["tiny"])
    config.cache.check = True
    with caplog.at_level(logging.WARNING, logger="kdcache.pipeline.repair"):
        assert [task.index for task in plan_precompute(config).tasks] == [1, 2]
    assert "shard 'train-000001.tar': 'status' has no chunk file" in caplog.text
    run_in_process(config)
    assert_same(arrays(cache, s3["options"]), arrays(local_cache))


def test_writer_lock_on_s3_is_exclusive(s3):
    cache = f"s3://{BUCKET}/locked/cache.zarr"
    with WriterLock(cache, s3["options"]):
        assert s3["fs"].exists(f"{BUCKET}/locked/cache.zarr.lock")
        with pytest.raises(
            CacheLockedError,
            match=rf"cache '{cache}' is being written by another precompute: pid {os.getpid()}",
        ):
            WriterLock(cache, s3["options"]).acquire()
        with pytest.raises(
            CacheLockedError, match=r"holds its lock 's3://kdcache/locked/cache.zarr.lock'"
        ):
            precompute(precompute_config(s3, cache))  # before any Ray work
    assert read_holder(cache, s3["options"]) is None


def test_shards_read_with_explicit_storage_options(s3, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # not from the environment this time
    urls = expand_shards(f"s3://{BUCKET}/shards/train-*.tar", storage_options=s3["options"])
    assert [u.rsplit("/", 1)[1] for u in urls] == [f"train-{i:06d}.tar" for i in range(4)]
    assert [len(i) for i in scan_shards(urls, storage_options=s3["options"])] == [12] * 4
    assert [s.key for s in iter_shard(urls[1], s3["options"])][:2] == [
        "train_000012",
        "train_000013",
    ]


def test_precompute_and_train_with_shards_through_data_storage_options(
    s3, tmp_path, monkeypatch, caplog, capsys
):
    """No AWS endpoint or credentials in the environment: the shards and their manifest are reached
    through ``data.storage_options`` only (the cache is local); the options are never saved or
    logged."""
    for name in (
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    caplog.set_level(logging.DEBUG)
    key = "kd-opt-key-7f3a"
    secret = "kd-opt-secret-91c4"
    options = {
        "endpoint_url": s3["endpoint"],
        "key": key,
        "secret": secret,
        "client_kwargs": {"region_name": "us-east-1"},
    }
    names = ["zero", "one", "two", "three"]
    prefix = f"{BUCKET}/optshards"
    for shard in sorted(s3["local"].glob("*.tar")):
        s3["fs"].put(str(shard), f"{prefix}/{shard.name}")
    manifest = Manifest(
        split="train",
        shards=[f"train-{i:06d}.tar" for i in range(4)],
        counts=[12] * 4,
        num_samples=48,
        num_classes=4,
        class_names=names,
        image_format="png",
    )
    s3["fs"].pipe(f"{prefix}/train-manifest.json", manifest.model_dump_json().encode())

    cache = str(tmp_path / "cache.zarr")
    cfg = validate(
        PrecomputeConfig,
        {  # no data.num_classes: from the manifest on the server
            "data": {
                "shards": f"s3://{prefix}/train-{{000000..000003}}.tar",
                "storage_options": options,
            },
            "cache": {
                "path": cache,
                "num_views": 2,
                "recipe": {"size": 12, "scale": [0.5, 1.0], **GREY},
            },
            "teachers": [{"name": "tiny", "model": {"name": "kd_cnn_tiny"}, "k": 3}],
            "runtime": {"batch_size": 16},
        },
    )
    plan = plan_precompute(cfg)
    assert plan.num_classes == 4 and plan.class_names == names
    worker = ShardWorker(
        pickle.loads(pickle.dumps(worker_settings(cfg, plan)))
    )  # as sent to a Ray actor
    for task in plan.tasks:
        worker(task)
    seal_fingerprint(plan.store)
    store = open_store(cache)
    assert store.incomplete_shards() == {} and store.meta.class_names == names
    assert store.meta.config["data"]["storage_options"] == {
        "endpoint_url": "<redacted>",
        "key": "<redacted>",
        "secret": "<redacted>",
        "client_kwargs": "<redacted>",
    }
    flags = [
        f"--storage-option={k}={v}"
        for k, v in [
            ("endpoint_url", s3["endpoint"]),
            ("key", key),
            ("secret", secret),
            ("client_kwargs.region_name", "us-east-1"),
        ]
    ]
    assert (
        cli_main(["verify", cache, "--num", "6", "--shards", f"s3://{prefix}/train-*.tar", *flags])
        == 0
    )

    run_dir = tmp_path / "run"
    config = TrainConfig.model_validate(
        {
            "run": {"dir": str(run_dir), "log_every": 2, "progress": False},
            "data": {
                "shards": f"s3://{prefix}/train-*.tar",
                "val_shards": f"s3://{prefix}/val-000000.tar",
                "storage_options": options,
                "verify_keys": True,
                "batch_size": 8,
                "num_workers": 2,
                "shuffle_buffer": 10,
            },
            "cache": {"path": cache},
            "student": {"name": "kd_mlp", "kwargs": {"img_size": 12, "hidden": 16}},
            "teacher": {"mode": "cache", "name": "tiny"},
            "stages": [{"epochs": 1, "loss": {"name": "kd", "alpha": 0.5, "temperature": 2.0}}],
        }
    )
    summary = train(config)
    assert summary.completed and summary.steps == 6
    evals = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"eval"' in line
    ]
    assert (
        evals and evals[-1]["n"] == 10
    )  # the validation shard, streamed by the DataLoader workers
    saved = (run_dir / "config.yaml").read_text()
    assert "storage_options" in saved and key not in saved and secret not in saved
    ours = [r.getMessage() for r in caplog.records if r.name.split(".")[0] == "kdcache"]
    printed = "\n".join(ours) + "".join(capsys.readouterr())
    assert (
        ours and secret not in printed and key not in printed
    )  # (botocore's own debug lines show the key id)


@pytest.mark.slow
def test_precompute_with_ray_and_train_with_workers_on_s3(
    s3, ray_session, local_cache, tmp_path, capsys
):
    cache = f"s3://{BUCKET}/ray/cache.zarr"
    _, summary = precompute(precompute_config(s3, cache), progress=False)
    assert summary.status == "complete" and summary.failed == 0 and summary.views == 48 * 2
    assert summary.store_bytes > 1000 and summary.incomplete == {}
    [record] = read_run_records(cache, s3["options"])  # the driver's run record, on S3 too
    assert record == summary and record.record_path().startswith(
        f"s3://{BUCKET}/ray/cache.zarr/runs/"
    )
    assert record.config["cache"]["storage_options"] == {"client_kwargs": "<redacted>"}
    assert not s3["fs"].exists(f"{BUCKET}/ray/cache.zarr.lock")
    assert_same(arrays(cache, s3["options"]), arrays(local_cache))
    assert validate_cache(open_store(cache, "r", s3["options"])).ok
    assert (
        cli_main(["validate", cache]) == 0
        and "valid: every shard complete" in capsys.readouterr().out
    )
    assert precompute(precompute_config(s3, cache))[1].status == "nothing_to_do"  # rerun
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(train_config(s3, cache, tmp_path / "run", workers=2)))
    assert cli_main(["train", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "kdcache train (cache): 1 epochs, 6 steps" in out and "0 teacher forwards" in out
    assert (tmp_path / "run" / "summary.json").exists()
