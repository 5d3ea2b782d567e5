"""``kdcache bench``: each benchmark runs at tiny sizes and writes its JSON keys (no timing
assertions), plus the pieces the benchmarks brought: ``loss.topk`` truncation, batches pickled for
the loader queue, precompute's background view thread."""

from __future__ import annotations

import json
import pickle
import threading

import pytest
import torch

from benchmarks.__main__ import main as bench_main
from benchmarks.common import BenchResult
from kdcache.core.errors import ConfigError, DataError
from kdcache.pipeline.worker import background
from kdcache.targets.sparse import SparseTargets, from_logits, truncate
from kdcache.train.config import KDLossConfig, TrainConfig
from kdcache.train.data import Batch
from kdcache.train.hooks import StepHook
from kdcache.train.losses import Criterion
from kdcache.train.trainer import Trainer, train
from tests.support.cachebuild import build_cache, write_shards

FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def bench(name: str, tmp_path, *extra: str) -> dict:
    out = tmp_path / "result.json"
    assert (
        bench_main([name, "--quick", "--out", str(tmp_path / "work"), "--json", str(out), *extra])
        == 0
    )
    return BenchResult.read(out).results


# ---- the benchmarks ------------------------------------------------------------------------------


def test_train_bench_writes_its_keys(tmp_path, capsys):
    result = bench("train", tmp_path, "--source", "synthetic")
    assert {
        "plain_ips",
        "cached_ips",
        "online_ips",
        "cached_over_plain",
        "cached_over_online",
        "cached_over_plain_strong",
        "ideal_speedup_over_online",
        "cpu_ips",
        "step",
    } <= result.keys()
    assert all(result[k] > 0 for k in ("plain_ips", "cached_ips", "online_ips"))
    assert result["cached_over_plain_strong"] > 0
    # the baseline without kdcache: webdataset + timm's transforms (+ Mixup/CutMix), plain CE
    for key in ("cached_over_timm", "cached_over_timm_strong"):
        assert result[key] > 0 and result[f"{key}_cpu"] > 0
        assert result[f"{key}_rounds"]["n"] == 1
    assert result["timm_ips"] > 0 and result["timm_strong_ips"] > 0
    assert len(result["load_avg_rounds"]) == 1
    printed = capsys.readouterr().out
    assert "cached_over_timm_strong" in printed and "cached/online" in printed


def test_train_bench_on_224px_jpegs_times_the_modes_asked_for(tmp_path):
    result = bench("train", tmp_path, "--image-size", "224", "--modes", "cached_strong,timm_strong")
    assert result["settings"]["image_size"] == 224
    assert result["cpu_ips"].keys() == {"cached_strong", "timm_strong"}
    assert result["cached_over_timm_strong"] > 0 and result["cached_over_timm"] is None
    shards = list((tmp_path / "work").glob("shards-synthetic-200-jpg256/train-*.tar"))
    assert shards and b"JFIF" in shards[0].read_bytes()[:4096]


def test_precompute_bench_writes_its_keys(tmp_path):
    result = bench("precompute", tmp_path, "--source", "synthetic", "--actors", "")
    assert {
        "pipeline_vps",
        "forward_vps",
        "pipeline_over_forward",
        "sweep",
        "actors",
    } <= result.keys()
    assert [r["views"] for r in result["sweep"]] == [1, 2] and result["actors"] == []
    # the data path alone on ImageNet-like JPEGs, A=8 at 224 px, with 0, 1 and 2 data workers
    assert result["datapath_vps_per_core"] > 0 and result["datapath_scaling_2"] > 0
    assert [r["data_workers"] for r in result["datapath"]["workers"]] == [0, 1, 2]
    assert all(r["views"] == 4 * 8 for r in result["datapath"]["workers"])
    assert len(result["datapath_load"]["before"]) == 3
    # planning 64 shards beside their manifest on the local S3 server: no shard read
    assert result["planning"]["shards"] == 64
    assert result["plan_requests_per_shard"] <= 1 and result["plan_payload_reads"] == 0


def test_gpu_bench_is_skipped_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the bench runs instead of skipping")
    out = tmp_path / "gpu.json"
    assert bench_main(["gpu", "--out", str(tmp_path / "work"), "--json", str(out)]) == 0
    assert "gpu bench skipped: CUDA is not available" in capsys.readouterr().out
    written = BenchResult.read(out)
    assert "skipped" in written.results and written.bench == "gpu"
    assert written.argv[:1] == ["gpu"] and "kdcache" in written.versions
    assert not (tmp_path / "work").exists()  # nothing made before the check


def test_gpu_bench_runs_its_cuda_path_on_the_cpu(tmp_path):
    """``--device cpu --quick``: every step of the GPU check, tiny, so none of it is dead code."""
    result = bench("gpu", tmp_path, "--device", "cpu")
    assert result["settings"]["image_hw"] == [375, 500] and result["settings"]["amp"] == "bf16"
    assert result["forward_vps"] > 0 and result["pipeline_vps"] > 0
    assert [r["workers"] for r in result["datapath"]][0] == 1
    assert all(r["views"] == 16 * 2 for r in result["datapath"])
    assert result["pipeline"][0]["views"] == 8 * 2  # the first shard warms the worker up
    assert result["cores_per_gpu"] > 0


@pytest.mark.slow
def test_precompute_bench_with_a_ray_actor(tmp_path):
    result = bench("precompute", tmp_path, "--source", "synthetic", "--actors", "1")
    assert result["actors"][0]["actors"] == 1 and result["actors"][0]["vps_busy"] > 0


def test_cache_bench_writes_its_keys(tmp_path):
    result = bench("cache", tmp_path)
    assert {
        "bytes_per_view_k10",
        "read_vps",
        "kl_k10",
        "shared_bytes_per_view",
        "rows",
    } <= result.keys()
    assert set(result["bytes_per_view_k10"]) == {"fp16", "q8"}
    assert set(result["recipe_bytes_per_view"]) == {"crop", "b2", "b3"}
    chunks = result["recipe_chunk_bytes_per_view"]
    assert all(0 < chunks[r] < result["recipe_bytes_per_view"][r] for r in chunks)
    assert chunks["crop"] < chunks["b2"] < chunks["b3"]
    assert {(r["encoding"], r["k"]) for r in result["rows"]} == {
        (e, k) for e in ("fp16", "q8") for k in (5, 10, 20)
    }
    # top-k vs sampled targets (drawn at T=1, and at KD's T=4) at equal bytes per view (24 B by
    # default), T=1 and KD's T=4
    assert {t: set(v) for t, v in result["grad_cos"].items()} == {
        t: {"topk", "topk_renorm", "sampled", "sampled_sn", "sampled_tau"} for t in ("T=1", "T=4")
    }
    detail = result["grad_cos_detail"]
    for name in ("topk", "sampled", "sampled_tau"):
        assert detail[name]["layout_bytes"] <= 24, name
    assert (detail["topk"]["k"], detail["sampled"]["draws"]) == (6, 3)
    assert (detail["sampled_tau"]["draws"], detail["sampled_tau"]["draw_temperature"]) == (3, 4.0)
    assert set(detail["disk_bytes_per_view"]) == {"topk", "sampled", "sampled_tau"}
    for figures in result["grad_cos"].values():
        assert all(-1.0 <= x <= 1.0 for x in figures.values())


@pytest.mark.skipif(
    not __import__("os").path.exists(FMNIST), reason="needs the dataset-fashion-mnist package"
)
def test_inspect_bench_writes_its_keys_and_the_reports(tmp_path):
    result = bench("inspect", tmp_path)
    assert {
        "cache_views",
        "seconds_per_teacher",
        "views_per_s_per_teacher",
        "two_teachers_s",
        "cli",
        "peak_rss_full_over_quarter",
    } <= result.keys()
    assert result["cache_views"] == 4 * 50 * 2 and set(result["cli"]) == {"quarter", "full"}
    assert result["cli"]["full"]["shards_read"] == 4  # read from the CLI's --json result
    assert all(cli["peak_rss_mb"] > 0 for cli in result["cli"].values())
    report = json.loads((tmp_path / "work" / "full.json").read_text())
    assert sorted(report["teachers"]) == ["t0", "t1"] and report["teachers"]["t0"]["views"] == 400
    assert len(report["pairs"]) == 1 and set(report["teachers"]["t0"]["entropy"]) == {
        "T=1.0",
        "T=4.0",
    }


def test_parity_bench_writes_its_keys(tmp_path):
    result = bench("parity", tmp_path)
    assert {
        "online_acc",
        "cached_acc",
        "ce_acc",
        "per_k",
        "teacher_acc",
        "parity_ok",
    } <= result.keys()
    assert {"mean", "std"} <= result["cached_acc"].keys()
    assert {(r["k"], r["tail"]) for r in result["per_k"]} == {
        (k, t) for k in (1, 5) for t in ("spread", "renorm")
    }
    strong = result["strong"]
    assert {"online_acc", "cached_acc", "ce_acc", "parity_ok"} <= strong.keys()
    assert {"mean", "std"} <= strong["cached_acc"].keys() and strong["recipe"]["mix"]
    # top-k, sampled and full targets at equal bytes; a two-teacher ensemble vs each member
    beyond = result["beyond"]
    assert set(beyond["equal_bytes"]) == {"topk", "sampled", "sampled_sn", "sampled_tau", "full"}
    for name in ("topk", "sampled", "sampled_tau"):
        assert beyond["equal_bytes"][name]["layout_bytes"] <= beyond["budget_bytes_per_view"]
    assert beyond["equal_bytes"]["sampled_tau"]["draw_temperature"] == 4.0
    assert set(beyond["ensemble"]["students"]) == {"ensemble", "teacher", "teacher2"}
    assert {"mean", "std"} <= beyond["ensemble"]["students"]["ensemble"].keys()
    assert set(beyond["ensemble"]["on_cached_views"]["top1"]) == {"ensemble", "teacher", "teacher2"}


# ---- loss.topk: truncating cached targets at read time -------------------------------------------


def logits_and_labels(n: int = 16, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, classes, generator=g) * 3, torch.randint(classes, (n,), generator=g)


def test_truncated_targets_are_what_a_smaller_k_cache_holds():
    logits, labels = logits_and_labels()
    cut = truncate(from_logits(logits, labels, 10), 3)
    small = from_logits(logits, labels, 3)
    for a, b in zip(
        cut.tensors(), small.tensors(), strict=True
    ):  # the dropped classes join the tail exactly
        torch.testing.assert_close(a, b)
    assert truncate(small, None) is small and truncate(small, 5) is small


@pytest.mark.parametrize("tail", ["spread", "renorm"])
def test_kd_with_topk_equals_kd_on_the_smaller_cache(tail):
    logits, labels = logits_and_labels()
    student = torch.randn(16, 10)
    cut = Criterion(KDLossConfig(topk=2, tail=tail, temperature=4.0), 10)(
        student, labels, from_logits(logits, labels, 10), 0
    )
    small = Criterion(KDLossConfig(tail=tail, temperature=4.0), 10)(
        student, labels, from_logits(logits, labels, 2), 0
    )
    torch.testing.assert_close(cut.total, small.total)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_topk")
    urls = write_shards(root / "shards", num_shards=2)
    build_cache(root / "cache.zarr", urls, teachers={"top3": 3})
    return {"root": root, "urls": urls}


def config(world, run_dir, mode: str, topk: int) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "run": {"dir": str(run_dir), "progress": False},
            "data": {
                "shards": world["urls"],
                "batch_size": 8,
                "num_workers": 0,
                "shuffle_buffer": 0,
            },
            "cache": {"path": str(world["root"] / "cache.zarr")},
            "student": {"name": "kd_mlp", "kwargs": {"img_size": 12, "hidden": 8}},
            "teacher": {"mode": mode, "name": "top3"},
            "stages": [{"epochs": 1, "loss": {"name": "kd", "topk": topk}}],
        }
    )


@pytest.mark.parametrize(
    "mode, topk, match",
    [
        ("cache", 4, r"stages.0.loss.topk: 4 is more than the cache's k=3 for teacher 'top3'"),
        ("online", 5, r"stages.0.loss.topk: 5 is more than the 4 classes"),
    ],
)
def test_topk_above_what_the_targets_hold_is_refused(world, tmp_path, mode, topk, match):
    with pytest.raises(ConfigError, match=match):
        Trainer(config(world, tmp_path, mode, topk))


def test_topk_rejects_zero(world, tmp_path):
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        config(world, tmp_path, "cache", 0)


class StepLog(StepHook):
    """Each step's batch size and whether its loss had a KD term."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, bool]] = []

    def step_end(self, trainer, batch, parts) -> None:
        self.steps.append((len(batch), parts.kd is not None))


def test_trainer_steps_with_topk_from_the_cache(world, tmp_path):
    steps = StepLog()
    summary = train(config(world, tmp_path, "cache", 2), hooks=[steps])
    assert sum(n for n, _ in steps.steps) == summary.images == 24
    assert all(kd for _, kd in steps.steps)


# ---- batches through the loader queue, precompute's view thread ----------------------------------


def test_batch_pickles_its_small_tensors_by_value_and_round_trips():
    targets = SparseTargets(
        torch.arange(6).view(3, 2),
        torch.ones(3, 2, dtype=torch.float16),
        torch.zeros(3),
        torch.ones(3),
        torch.full((3,), -2.0),
    )
    batch = Batch(
        images=torch.zeros(3, 1, 4, 4, dtype=torch.uint8),
        labels=torch.tensor([0, 1, 2]),
        targets={"t": targets},
        keys=["a", "b", "c"],
        views=torch.tensor([0, 1, 0]),
    )
    back = pickle.loads(pickle.dumps(batch))
    assert (
        back.keys == batch.keys
        and torch.equal(back.images, batch.images)
        and torch.equal(back.views, batch.views)
    )
    assert torch.equal(back.labels, batch.labels)
    for a, b in zip(back.targets["t"].tensors(), targets.tensors(), strict=True):
        assert torch.equal(a, b) and a.dtype == b.dtype


def test_background_yields_in_order_and_raises_the_producers_error_in_the_consumer():
    assert list(background(iter(range(7)), 2)) == list(range(7))

    def failing():
        yield 1
        raise DataError("shard 'x.tar', key 'k': cannot decode the image")

    with pytest.raises(DataError, match="cannot decode the image"):
        list(background(failing(), 2))


def test_background_stops_its_thread_when_the_consumer_stops_early():
    before = threading.active_count()
    items = background(iter(range(1000)), 2)
    assert next(items) == 0
    items.close()
    assert threading.active_count() == before


@pytest.mark.slow  # trains 7 teachers and ~20 students, even at --quick sizes
@pytest.mark.skipif(
    not __import__("os").path.exists(FMNIST), reason="needs the dataset-fashion-mnist package"
)
def test_papers_bench_writes_a_measured_row_per_claim(tmp_path, capsys):
    result = bench("papers", tmp_path)
    claims = result["claims"]
    assert {c["paper"] for c in claims} == {"000", "001", "002", "003", "004"}
    for c in claims:
        assert set(c) >= {"paper", "claim", "a", "b", "agrees"}
        for side in (c["a"], c["b"]):
            assert set(side) >= {"name", "mean", "std"}
            assert 0 <= side["mean"] <= 100
        assert c["agrees"] == (c["a"]["mean"] > c["b"]["mean"])
    assert "agrees" in capsys.readouterr().out
