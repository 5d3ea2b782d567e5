"""The trainer's features that were tested only in-process, through the real ``kdcache train``.

``data.select``, ``data.exclude_classes``, ``sftn:``, ``run.accumulate``, ``run.compile``,
``run.csv``, ``run.wandb`` (offline) and ``run.mlflow`` (a local file store), each switched on
by ``dotted.key=value`` overrides on the command line (of one base config; SFTN has its own),
as a user would, through ``kdcache.cli.main`` in this process (as
tests/integration/test_cli_features.py does). The shards and the cache are made by ``kdcache
shards`` and ``kdcache precompute`` (a small job: in process, no Ray) with a plain recipe:
``data.select`` and ``data.exclude_classes`` refuse a recipe that mixes images. Results are
read from what the commands leave: ``summary.json``, ``metrics.jsonl``, the CSV files, the W&B
and MLflow folders, the exit status and stderr.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml

from kdcache.cli import main as cli_main
from kdcache.core.results import TrainResult, VerifyResult
from kdcache.train.student import compile_unsupported
from tests.support.trainrun import read_metrics

CLASSES = 4
RECIPE = {"size": 12, "scale": [0.5, 1.0], "channels": 1, "mean": [0.5], "std": [0.25]}
MIX = {"mix": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "group_size": 4}}
MLP = {"name": "kd_mlp", "kwargs": {"img_size": 12, "hidden": 16}}
TINY = {"name": "kd_cnn_tiny"}
TRAIN_SAMPLES = 32  # 2 shards of 16, 8 per class
BATCHES = TRAIN_SAMPLES // 4  # batches of 4 in one epoch


def kdcache(*argv: object) -> int:
    """Run one ``kdcache`` command as a user would; its exit status."""
    return cli_main([str(a) for a in argv])


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(autouse=True)
def torch_threads():
    """The runs take ``run.threads=1`` (one intra-op thread is many times faster than two on 2
    shared cores) and the trainer sets it for the process: give the next module its own."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """``kdcache shards synthetic``: 2 train shards of 16 grey 16 px images, 1 test shard of 16."""
    out = tmp_path_factory.mktemp("shards")
    code = kdcache(
        "shards", "synthetic", "--out", out, "--num", TRAIN_SAMPLES, "--test-num", 16,
        "--classes", CLASSES, "--size", 16, "--channels", 1, "--shard-size", 16, "--seed", 0,
    )  # fmt: skip
    assert code == 0
    return out


def urls(shard_dir: Path) -> tuple[str, str]:
    """``data.shards`` and ``data.val_shards``."""
    d = shard_dir.absolute()
    return f"{d}/train-{{000000..000001}}.tar", f"{d}/test-000000.tar"


def precomputed(shard_dir: Path, root: Path, recipe: dict, model: dict = TINY, k: int = 2) -> Path:
    """``kdcache precompute`` of one view per sample through teacher ``t1`` (default a
    random-init ``kd_cnn_tiny``, k=2); the cache."""
    config = {
        "data": {"shards": urls(shard_dir)[0], "num_classes": CLASSES},
        "cache": {"path": str(root / "cache"), "num_views": 1, "recipe": recipe},
        "teachers": [{"name": "t1", "model": model, "k": k}],
        "runtime": {"batch_size": 16},
    }
    assert kdcache("precompute", write_yaml(root / "p.yaml", config)) == 0
    return root / "cache"


def train_yaml(path: Path, shard_dir: Path, data: dict | None = None, **sections) -> Path:
    """A train config over the module's shards, evaluated on the test shard: KD from ``t1`` for
    one epoch, batches of 4, no DataLoader workers, one thread; ``data`` updates the data
    section, each of ``sections`` replaces its section."""
    shards, val = urls(shard_dir)
    config = {
        "run": {"dir": str(path.parent / "unused"), "progress": False, "threads": 1},
        "data": {
            "shards": shards,
            "val_shards": val,
            "batch_size": 4,
            "num_workers": 0,
            "shuffle_buffer": 0,
            **(data or {}),
        },
        "student": MLP,
        "teacher": {"name": "t1"},
        "stages": [{"epochs": 1, "loss": {"name": "kd", "temperature": 2.0}}],
        **sections,
    }
    return write_yaml(path, config)


@pytest.fixture(scope="module")
def base(shard_dir, tmp_path_factory) -> Path:
    """The base train config over the plain cache."""
    root = tmp_path_factory.mktemp("plain")
    cache = precomputed(shard_dir, root, RECIPE)
    return train_yaml(root / "train.yaml", shard_dir, cache={"path": str(cache)})


def trained(config: Path, run_dir: Path, *overrides: str) -> TrainResult:
    """``kdcache train CONFIG run.dir=RUN_DIR OVERRIDES...``: exit 0 and a completed, evaluated
    run's ``summary.json``."""
    assert kdcache("train", config, f"run.dir={run_dir}", *overrides) == 0
    summary = TrainResult.read(str(run_dir / "summary.json"))
    assert summary.completed and summary.top1 is not None
    return summary


def lines(run_dir: Path, kind: str) -> list[dict]:
    return [line for line in read_metrics(run_dir) if line["kind"] == kind]


# ---- data.select and data.exclude_classes -------------------------------------------------------


def selected(base: Path, run_dir: Path, by: str, *overrides: str) -> TrainResult:
    return trained(base, run_dir, "data.select.per_class=2", f"data.select.by={by}", *overrides)


def test_select_by_entropy_and_at_random(base, tmp_path):
    """Each pick keeps 2 samples per class and trains on those only; the highest and the lowest
    entropy are different samples; the random pick moves with ``run.seed``."""
    high = selected(base, tmp_path / "high", "entropy_high", "data.select.temperature=4")
    low = selected(base, tmp_path / "low", "entropy_low", "data.select.temperature=4")
    for summary, by in ((high, "entropy_high"), (low, "entropy_low")):
        record = summary.selection
        assert (record.by, record.teacher, record.temperature) == (by, "t1", 4.0)
        assert record.samples == 8 and record.counts == {str(c): 2 for c in range(CLASSES)}
        assert len(set(record.keys)) == 8
        assert summary.images == 8 and summary.steps == 2  # one epoch of the 8 kept
    assert set(high.selection.keys).isdisjoint(low.selection.keys)
    randoms = [
        selected(base, tmp_path / f"random{seed}", "random", f"run.seed={seed}").selection
        for seed in (0, 1)
    ]
    assert all(r.by == "random" and r.teacher is None and r.samples == 8 for r in randoms)
    assert randoms[0].keys != randoms[1].keys


def test_held_out_class_is_never_trained_on_and_reported_per_class(base, tmp_path, capsys):
    run = tmp_path / "run"
    summary = trained(base, run, "data.exclude_classes=[1]")
    assert summary.selection.excluded_classes == [1] and summary.selection.keys is None
    assert summary.selection.samples == TRAIN_SAMPLES - 8
    assert summary.images == TRAIN_SAMPLES - 8  # class 1's 8 samples never reach a batch
    per_class = summary.per_class_top1
    assert len(per_class) == CLASSES and all(top1 is not None for top1 in per_class)
    last = lines(run, "eval")[-1]
    assert [last[f"top1_class_{c}"] for c in range(CLASSES)] == per_class
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["per_class_top1"] == per_class  # the summary the command prints, too


@pytest.fixture(scope="module")
def mixing(shard_dir, tmp_path_factory) -> Path:
    """The train config over a cache whose recipe mixes images (Mixup/CutMix)."""
    root = tmp_path_factory.mktemp("mixing")
    cache = precomputed(shard_dir, root, {**RECIPE, **MIX})
    return train_yaml(root / "train.yaml", shard_dir, cache={"path": str(cache)})


REFUSED = {  # refused as the run starts: one line
    "select_mixing": (
        "mixing",
        ["data.select.per_class=2"],
        r"data\.select: the cache's recipe mixes images \(Mixup/CutMix\)",
    ),
    "exclude_mixing": (
        "mixing",
        ["data.exclude_classes=[0]"],
        r"data\.exclude_classes: the cache's recipe mixes images",
    ),
    "select_unknown_teacher": (
        "base",
        ["data.select.per_class=2", "data.select.teacher=nope"],
        r"data\.select\.teacher: 'nope' is not a teacher of cache .*; valid: t1$",
    ),
    "exclude_unknown_class": (
        "base",
        ["data.exclude_classes=[4]"],
        r"data\.exclude_classes: \[4\] not among the 4 classes",
    ),
}
INVALID = {  # refused as the config loads: a line naming the file, then one per problem
    "select_no_cache": (
        ["data.select.per_class=2", "cache.path=null", "teacher.mode=none", "data.num_classes=4"],
        r"data\.select: needs cache\.path",
    ),
    "sftn_with_a_cached_teacher": (
        ["sftn.student.name=test_resnet"],
        r"sftn: trains a teacher from labels; teacher\.mode must be 'none' \(found 'cache'\)",
    ),
}


def refused(capsys, config: Path, run: Path, overrides: list[str]) -> list[str]:
    """``kdcache train``: exit status 2, no traceback, no run written; stderr's lines."""
    capsys.readouterr()
    assert kdcache("train", config, f"run.dir={run}", *overrides) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.startswith("kdcache train: error: "), err
    assert not (run / "summary.json").exists()
    return err.splitlines()


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_bad_combination_is_one_line_naming_the_key(request, tmp_path, capsys, case):
    config, overrides, message = REFUSED[case]
    err = refused(capsys, request.getfixturevalue(config), tmp_path / "run", overrides)
    assert len(err) == 1 and re.search(message, err[0]), err


@pytest.mark.parametrize("case", sorted(INVALID))
def test_an_invalid_combination_names_the_file_and_the_key(base, tmp_path, capsys, case):
    overrides, message = INVALID[case]
    err = refused(capsys, base, tmp_path / "run", [*overrides, "stages.0.loss={name: ce}"])
    assert len(err) == 2, err
    assert err[0].endswith(f"config {str(base)!r} is invalid:"), err
    assert re.search(message, err[1]), err


# ---- SFTN: a teacher trained with student branches ----------------------------------------------


def test_sftn_teacher_run_from_the_cli(shard_dir, tmp_path, capsys):
    """``sftn:`` trains ``test_resnet`` with 3 ``test_resnet`` branches, from labels (no cache):
    the branches' file, their top-1 printed and in the summary, and the plain teacher's
    checkpoint, which ``kdcache precompute`` and ``verify`` take as a cache's teacher."""
    run = tmp_path / "sftn"
    recipe = {**RECIPE, "size": 16}
    path = train_yaml(
        tmp_path / "sftn.yaml",
        shard_dir,
        data={"num_classes": CLASSES, "batch_size": 8},
        views={"recipe": recipe},
        student={"name": "test_resnet"},
        teacher={"mode": "none"},
        stages=[{"epochs": 1, "loss": {"name": "ce"}}],
    )
    capsys.readouterr()
    summary = trained(path, run, "sftn.student.name=test_resnet", "sftn.preset=imagenet")
    assert summary.mode == "none" and len(summary.sftn_branch_top1) == 3
    out = capsys.readouterr().out
    assert "SFTN student branches, top-1 from the first stage on: " in out
    assert (run / "checkpoints" / "model_final.pt").is_file()
    assert (run / "sftn_branches.pt").is_file()
    last = lines(run, "eval")[-1]
    assert [last[f"branch{i}_top1"] for i in (1, 2, 3)] == summary.sftn_branch_top1
    assert all({"ce", "kd", "branch_ce"} <= set(line) for line in lines(run, "train"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["sftn"]["preset"] == "imagenet" and saved["sftn"]["lambda_kl"] == 1.0
    checkpoint = str(run / "checkpoints" / "model_final.pt")
    teacher = {"name": "test_resnet", "checkpoint": checkpoint}
    cache = precomputed(shard_dir, tmp_path, recipe, teacher, CLASSES)
    assert kdcache("verify", cache, "--num", 8, "--json", tmp_path / "v.json") == 0
    assert VerifyResult.read(str(tmp_path / "v.json")).ok  # recomputed from the checkpoint


# ---- run.accumulate and run.compile -------------------------------------------------------------


def test_accumulate_steps_once_per_group_of_batches(base, tmp_path):
    run = tmp_path / "run"
    summary = trained(base, run, "run.accumulate=2", "run.log_every=1")
    assert summary.images == TRAIN_SAMPLES
    assert summary.steps == BATCHES // 2  # 8 batches, an optimizer step every 2
    assert [line["step"] for line in lines(run, "train")] == [1, 2, 3, 4]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["run"]["accumulate"] == 2


def test_compile_where_torch_cannot_trains_uncompiled_with_a_warning(
    base, tmp_path, monkeypatch, caplog
):
    """No C++ compiler on PATH (inductor's CPU kernels need one): the run says why and trains."""
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no c++, g++ or clang++
    monkeypatch.delenv("CXX", raising=False)
    summary = trained(base, tmp_path / "run", "run.compile=true")
    assert summary.images == TRAIN_SAMPLES
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        m.startswith("run.compile: inductor needs a C++ compiler") and "uncompiled" in m
        for m in warned
    ), warned


@pytest.mark.slow  # torch.compile of the student: about a minute on 2 busy cores
@pytest.mark.skipif(
    compile_unsupported(torch.device("cpu")) is not None,
    reason=f"torch.compile unsupported here: {compile_unsupported(torch.device('cpu'))}",
)
def test_compiled_student_trains_from_the_cli(base, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kdcache.train.student")
    run = tmp_path / "run"
    summary = trained(base, run, "run.compile=true")
    assert summary.images == TRAIN_SAMPLES
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("run.compile: compiling the student") for m in messages), messages
    weights = torch.load(run / "checkpoints" / "model_final.pt", weights_only=True)
    assert weights and not any(k.startswith("_orig_mod.") for k in weights)


# ---- run.csv, run.wandb (offline) and run.mlflow (a local file store) ---------------------------


def csv_rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def logged(base, tmp_path_factory) -> dict:
    """One run with the three loggers on: the run folder and the MLflow store."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("logged")
    store = root / "mlruns"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        summary = trained(
            base, root / "run", "run.log_every=1", "run.csv=true",
            "run.wandb.project=kdcache-cli", f"run.mlflow.tracking_uri=file:{store}",
            "run.mlflow.experiment=cli",
        )  # fmt: skip
    return {"run": root / "run", "store": store, "summary": summary}


def test_csv_files_hold_every_metrics_line(logged):
    run = logged["run"]
    for kind, columns in (
        ("train", {"epoch", "step", "loss", "kd", "ce", "lr", "images"}),
        ("eval", {"epoch", "step", "top1", "top5", "loss", "top1_class_0"}),
    ):
        header, rows = csv_rows(run / f"{kind}.csv")
        assert columns <= set(header), header
        own = lines(run, kind)
        assert len(rows) == len(own) > 0
        assert [int(r["step"]) for r in rows] == [line["step"] for line in own]
        assert [float(r["loss"]) for r in rows] == [line["loss"] for line in own]
    _, evals = csv_rows(run / "eval.csv")
    assert float(evals[-1]["top1"]) == logged["summary"].top1


def test_wandb_offline_run_folder(logged):
    run = logged["run"]
    wandb_id = (run / "wandb_id").read_text().strip()
    folders = sorted((run / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(folders) == 1, sorted((run / "wandb").iterdir())
    assert (folders[0] / f"run-{wandb_id}.wandb").stat().st_size > 0


def test_mlflow_file_store_has_the_runs_metrics(logged, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind it
    store = logged["store"]
    client = MlflowClient(tracking_uri=f"file:{store}")
    run_id = (logged["run"] / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "cli"
    assert (store / run.info.experiment_id / run_id / "metrics").is_dir()
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == [line["step"] for line in lines(logged["run"], "train")]
    top1 = client.get_metric_history(run_id, "eval/top1")
    assert [m.value for m in top1][-1] == logged["summary"].top1
