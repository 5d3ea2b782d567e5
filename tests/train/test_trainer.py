"""The trainer end to end on real tars and a real Zarr cache: modes, parity, resumption, DDP,
configs."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from kdcache.cli import main as kdcache
from kdcache.core.config import validate
from kdcache.core.errors import CacheMismatchError, ConfigError
from kdcache.models.build import ModelSpec, build_model
from kdcache.models.runner import ModelRunner
from kdcache.targets.sparse import from_logits
from kdcache.train.checkpoint import CheckpointError
from kdcache.train.config import (
    CacheConfig,
    DataConfig,
    KDLossConfig,
    RunConfig,
    StageConfig,
    TrainConfig,
    load_train_config,
)
from kdcache.train.data import build_train_data
from kdcache.train.hooks import StepHook
from kdcache.train.losses import Criterion
from kdcache.train.schedule import place_stages
from kdcache.train.target_source import online_teacher_spec
from kdcache.train.trainer import train
from tests.support.cachebuild import build_cache, write_shards
from tests.support.trainrun import read_metrics as metrics
from tests.support.trainrun import world_train_config as make
from tests.support.trainrun import world_train_dict as raw

ROOT = Path(__file__).resolve().parents[2]


# ---- modes ---------------------------------------------------------------------------------------


def test_cache_mode_run_writes_its_outputs_and_runs_no_teacher(world, tmp_path):
    summary = train(make(world, tmp_path))
    assert summary.completed and summary.teacher_forwards == 0 and summary.images == 47
    assert summary.invalid_rows_skipped_per_epoch == 1 and summary.top1 is not None
    lines = metrics(tmp_path)
    assert [line["kind"] for line in lines] == ["train"] * 3 + ["eval"]
    assert all(line["teacher_forwards"] == 0 for line in lines if line["kind"] == "train")
    assert {"loss", "ce", "kd", "lr"} <= lines[0].keys()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["teacher"]["name"] == "tiny"
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 6
    model = build_model(
        ModelSpec(
            name="kd_mlp",
            kwargs={"img_size": 12, "hidden": 16},
            checkpoint=str(tmp_path / "checkpoints" / "model_final.pt"),
        ),
        4,
        1,
    )
    assert model(torch.zeros(1, 1, 12, 12)).shape == (1, 4)


def test_online_mode_runs_the_teacher_on_every_view(world, tmp_path):
    cached = train(make(world, tmp_path / "cache"))
    online = train(make(world, tmp_path / "online", teacher={"mode": "online"}))
    assert online.teacher_forwards == 47
    a = metrics(tmp_path / "cache")
    b = metrics(tmp_path / "online")
    assert [x["step"] for x in a] == [x["step"] for x in b]
    for x, y in zip(a, b, strict=True):  # same views, same targets up to the cache's fp16 rounding
        assert x.get("loss", x.get("top1")) == pytest.approx(
            y.get("loss", y.get("top1")), rel=2e-3, abs=1e-3
        )
    assert cached.teacher_forwards == 0


def test_cached_kd_equals_online_kd_when_k_is_the_class_count(world):
    config = make(world, "unused")
    data = build_train_data(config, 0, 1, ["tiny"], pin_memory=False)
    spec = online_teacher_spec(config.teacher, "tiny", data.store)
    runner = ModelRunner(build_model(spec, 4, 1), data.recipe, device="cpu")
    criterion = Criterion(KDLossConfig(alpha=0.5, temperature=2.0), 4)
    student = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    for batch in data.epoch(0, ["tiny"]):
        cached = batch.targets["tiny"]
        online = from_logits(runner(batch.images).clone(), batch.labels, 4)
        # the cache holds exactly the online teacher's logits of the same views, rounded to fp16
        assert torch.equal(cached.idx, online.idx) and torch.equal(
            cached.logit, online.logit.half()
        )
        logits = student[: len(batch)]
        a = criterion(logits, batch.labels, cached, 0)
        b = criterion(logits, batch.labels, online, 0)
        assert a.total.item() == pytest.approx(b.total.item(), rel=1e-3)


def test_teacher_training_saves_early_checkpoints(world, tmp_path):
    config = make(
        world,
        tmp_path,
        teacher={"mode": "none", "name": None},
        cache={"path": None},
        data={"shards": world["clean"], "num_classes": 4},
        views={
            "recipe": {"size": 12, "scale": [0.5, 1.0], "channels": 1, "mean": [0.5], "std": [0.25]}
        },
        student={"name": "kd_cnn_tiny", "kwargs": {}},
        run={"save_model_epochs": [1]},
        stages=[{"epochs": 2, "loss": {"name": "ce", "label_smoothing": 0.1}}],
    )
    summary = train(config)
    assert summary.completed and summary.images == 2 * 48 and summary.teacher_forwards == 0
    for name in ("model_e1.pt", "model_final.pt"):
        build_model(
            ModelSpec(name="kd_cnn_tiny", checkpoint=str(tmp_path / "checkpoints" / name)), 4, 1
        )
    early = torch.load(tmp_path / "checkpoints" / "model_e1.pt")
    final = torch.load(tmp_path / "checkpoints" / "model_final.pt")
    assert not torch.equal(early["head.weight"], final["head.weight"])


# ---- resumption ----------------------------------------------------------------------------------


def two_stage(world, run_dir, **run):
    return make(
        world,
        run_dir,
        run={"ckpt_every_steps": 4, **run},
        ema={"enabled": True, "decay": 0.9},
        data={"num_workers": 2},
        stages=[
            {"epochs": 1, "loss": {"name": "kd"}},
            {
                "epochs": 1,
                "teacher": "top2",
                "loss": {"name": "effdstl"},
                "optimizer": {"lr": 0.05, "weight_decay": 0.0},
            },
        ],
    )


def test_resumed_run_reproduces_the_uninterrupted_run_bit_for_bit(world, tmp_path):
    full = train(two_stage(world, tmp_path / "full"))
    stopped = train(two_stage(world, tmp_path / "cut", max_steps=3))
    assert not stopped.completed and stopped.steps == 3
    with open(
        tmp_path / "cut" / "metrics.jsonl", "a"
    ) as handle:  # a line a killed run wrote after its checkpoint
        handle.write(json.dumps({"kind": "train", "step": 4, "loss": 0.0}) + "\n")
    resumed = train(two_stage(world, tmp_path / "cut", resume="must"))
    assert resumed.completed and resumed.steps == full.steps == 12
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt")
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_resume_is_bit_exact_with_a_dropout_student(world, tmp_path):
    """Dropout draws from the global RNG that a checkpoint restores; the loader must not draw from
    it."""
    student = {"kwargs": {"img_size": 12, "hidden": 16, "drop_rate": 0.5}}
    stages = [{"epochs": 2, "loss": {"name": "kd", "alpha": 0.5, "temperature": 2.0}}]
    data = {"num_workers": 2}
    train(make(world, tmp_path / "full", student=student, stages=stages, data=data))
    train(
        make(
            world, tmp_path / "cut", student=student, stages=stages, data=data, run={"max_steps": 3}
        )
    )
    train(
        make(
            world,
            tmp_path / "cut",
            student=student,
            stages=stages,
            data=data,
            run={"resume": "must"},
        )
    )
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_tensorboard_scalars_mirror_the_metrics_and_survive_a_resume(world, tmp_path):
    tb = {"tensorboard": True, "ckpt_every_steps": 2}
    stages = [{"epochs": 2, "loss": {"name": "kd", "alpha": 0.5, "temperature": 2.0}}]
    train(make(world, tmp_path / "full", run=tb, stages=stages))
    full = tensorboard_scalars(tmp_path / "full")
    lines = metrics(tmp_path / "full")
    train_lines = [line for line in lines if line["kind"] == "train"]
    assert full["train/loss"] == [
        (line["step"], pytest.approx(line["loss"], rel=1e-6)) for line in train_lines
    ]
    assert [step for step, _ in full["eval/top1"]] == [
        line["step"] for line in lines if line["kind"] == "eval"
    ]
    assert "train/epoch" not in full and "train/time" in full

    train(make(world, tmp_path / "cut", run={**tb, "max_steps": 5}, stages=stages))
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(
        str(tmp_path / "cut" / "tensorboard")
    ) as killed:  # logged after the checkpoint, then killed
        killed.add_scalar("train/loss", 123.0, 6)
    train(
        make(world, tmp_path / "cut", run={**tb, "max_steps": 7, "resume": "must"}, stages=stages)
    )
    train(make(world, tmp_path / "cut", run={**tb, "resume": "must"}, stages=stages))
    resumed = tensorboard_scalars(tmp_path / "cut")
    untimed = [tag for tag in full if tag not in ("train/time", "train/images_per_s")]
    assert sorted(resumed) == sorted(full)
    assert {tag: resumed[tag] for tag in untimed} == {tag: full[tag] for tag in untimed}


def test_resume_refuses_another_config_naming_the_keys(world, tmp_path):
    train(make(world, tmp_path, run={"max_steps": 2}))
    changed = make(
        world, tmp_path, run={"resume": "must"}, optimizer={"lr": 0.2}, data={"batch_size": 4}
    )
    expected = (
        r"another config; differing keys:\n"
        r"  data.batch_size: checkpoint 8 vs now 4\n"
        r"  optimizer.lr: checkpoint 0.1 vs now 0.2"
    )
    with pytest.raises(CheckpointError, match=expected):
        train(changed)
    assert train(
        make(world, tmp_path, run={"resume": "auto", "log_every": 3})
    ).completed  # mutable keys may change


def test_a_run_saved_before_a_key_existed_resumes_at_its_default(world, tmp_path):
    """A checkpoint whose config lacks keys added since (here sftn, data.select, run.compile)
    resumes when they are at their defaults; one set otherwise is still a difference."""
    train(make(world, tmp_path, run={"max_steps": 2}))
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    for section, key in (("sftn", None), ("data", "select"), ("run", "compile")):
        ckpt["config"].pop(section) if key is None else ckpt["config"][section].pop(key)
    torch.save(ckpt, path)
    assert train(make(world, tmp_path, run={"resume": "must"})).completed
    train(make(world, tmp_path / "b", run={"max_steps": 2}))
    path = tmp_path / "b" / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["run"].pop("accumulate")
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"run.accumulate: checkpoint 1 vs now 2"):
        train(make(world, tmp_path / "b", run={"resume": "must", "accumulate": 2}))


def test_existing_run_dir_is_not_overwritten_silently(world, tmp_path):
    train(make(world, tmp_path, run={"max_steps": 1}))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(make(world, tmp_path))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        train(make(world, tmp_path / "other", run={"resume": "must"}))
    assert train(make(world, tmp_path, run={"overwrite": True})).completed


class Recorder(StepHook):
    """What a hook sees: each call with the global step, and last.pt's step at each step's end."""

    def __init__(self, run_dir: Path):
        self.last = run_dir / "checkpoints" / "last.pt"
        self.calls: list[tuple[str, int]] = []
        self.saved: list[int | None] = []

    def step_start(self, trainer, batch) -> None:
        self.calls.append(("start", trainer.state.global_step))

    def step_end(self, trainer, batch, parts) -> None:
        self.calls.append(("end", trainer.state.global_step))
        saved = torch.load(self.last, weights_only=True) if self.last.is_file() else None
        self.saved.append(None if saved is None else saved["state"]["global_step"])


def test_step_hooks_run_around_every_step_after_its_checkpoint(world, tmp_path):
    hook = Recorder(tmp_path)
    summary = train(make(world, tmp_path, run={"ckpt_every_steps": 2}), hooks=[hook])
    assert summary.steps == 6
    # step_start sees the steps done before it, step_end the step just done
    assert hook.calls == [call for s in range(6) for call in (("start", s), ("end", s + 1))]
    # step_end comes after the step's checkpoint (every 2 steps; the epoch's end writes the last)
    assert hook.saved == [None, 2, 2, 4, 4, 4]


def test_run_dir_that_is_a_file_is_refused_before_any_work(world, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw(world, taken)))
    # the shards do not exist either: run.dir is checked first, before any data is read
    assert kdcache(["train", str(path), f"run.dir={taken}", "data.shards=/nowhere/x.tar"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"kdcache train: error: run.dir: {str(taken)!r} is a file, not a directory"
    ]
    with pytest.raises(ConfigError, match=r"cannot be created: '.*taken' is a file"):
        train(make(world, taken / "run"))


def test_run_dir_that_cannot_be_written_is_refused(world, tmp_path, capsys):
    """A real read-only place: a read-only filesystem needs a mount (root), so when this runs as
    root (which ignores permission bits) a path below a regular file stands in: it cannot be
    created either, and os.access - the check that also sees a read-only mount - is exercised
    by the 0o555 directory when not root."""
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw(world, tmp_path / "run")))
    if os.geteuid() == 0:
        blocker = tmp_path / "blocker"
        blocker.write_text("")
        run_dir = blocker / "sub" / "run"
        expected = f"run.dir: {str(run_dir)!r} cannot be created: {str(blocker)!r} is a file"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        run_dir = locked / "run"
        expected = (
            f"run.dir: {str(run_dir)!r} cannot be created: {str(locked)!r} is not writable by "
            "this user"
        )
    assert kdcache(["train", str(path), f"run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"kdcache train: error: {expected}"]
    assert "Traceback" not in err and not run_dir.exists()


# ---- DDP -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, config_data: dict, out_dir: str, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import kdcache.train.data as data_module

    seen: list[tuple[int, str]] = []
    original = data_module.RunData.epoch

    def recording(self, epoch, teachers, skip_batches=0):
        for batch in original(self, epoch, teachers, skip_batches):
            seen.extend((epoch, key) for key in batch.keys)
            yield batch

    data_module.RunData.epoch = recording
    torch.set_num_threads(1)
    torch.multiprocessing.set_start_method(
        "fork", force=True
    )  # spawn's children would spawn their loader workers too
    summary = train(TrainConfig.model_validate(config_data))
    Path(out_dir, f"rank{rank}.json").write_text(
        json.dumps({"seen": seen, "summary": summary.model_dump()})
    )


def test_two_process_ddp_sees_every_sample_once_per_epoch(world, tmp_path):
    """3 shards on 2 ranks: one rank's shards hold twice the other's samples, yet nothing is
    dropped."""
    uneven = {
        "urls": write_shards(tmp_path / "shards", num_shards=3),
        "val": world["val"],
        "root": tmp_path,
    }
    build_cache(tmp_path / "cache.zarr", uneven["urls"], teachers={"tiny": 4})
    config = raw(
        uneven,
        tmp_path / "run",
        data={"num_workers": 1},
        stages=[{"epochs": 2, "loss": {"name": "dist"}}],
    )
    torch.multiprocessing.spawn(
        _ddp_worker, args=(config, str(tmp_path), _free_port()), nprocs=2, join=True
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    keys = sorted(f"train_{i:06d}" for i in range(36))
    for epoch in (0, 1):
        per_rank = [[k for e, k in r["seen"] if e == epoch] for r in ranks]
        assert sorted(per_rank[0] + per_rank[1]) == keys
    assert ranks[0]["summary"]["world_size"] == 2 and ranks[0]["summary"]["images"] == 2 * 36
    assert ranks[0]["summary"]["steps"] == ranks[1]["summary"]["steps"] == 6


# ---- configs and the command line ----------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages.0.loss.alpha=2", r"stages.0.loss.alpha: Input should be less than or equal to 1"),
        ("data.batch_size=0", r"data.batch_size: Input should be greater than or equal to 1"),
        ("teacher.mode=offline", r"teacher.mode: Input should be 'cache', 'online' or 'none'"),
        ("run.bogus=1", r"run.bogus: unknown key; valid keys here: accumulate, amp, channels_last"),
        (
            "stages.0.loss.name=fancy",
            r"stages.0.loss.name: Value error, unknown loss 'fancy'; registered: ce, kd, dist",
        ),
        (
            "teacher.mode=none",
            r"stages.0.loss.name: 'kd' needs a teacher but teacher.mode is 'none'",
        ),
        ("cache.path=null", r"cache.path: teacher.mode 'cache' needs the cache's path"),
        (
            "stages.0.scheduler.name=step",
            r"scheduler.milestones: a 'step' schedule needs milestones",
        ),
        (
            "run.save_model_epochs=[0,3]",
            r"run.save_model_epochs: \[0, 3\] are not epoch counts of this run \(1..1\)",
        ),
        (
            "stages.0.loss.stop_epoch=1",
            r"stages.0.loss.stop_epoch: 1 is not before the stage's end \(epoch 1\)",
        ),
        (
            "stages.0.loss.stop_epoch=0",
            r"stages.0.loss.stop_epoch: 0 is not after the stage's first epoch",
        ),
        ("scheduler.min_lr=0.5", r"scheduler.min_lr: 0.5 is above optimizer.lr 0.1"),
        (
            "scheduler.warmup_epochs=2",
            r"scheduler.warmup_epochs: 2 is longer than the 1 epoch\(s\) of its optimizer",
        ),
    ],
)
def test_config_rejections_name_the_dotted_key(world, tmp_path, override, message):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw(world, tmp_path / "run")))
    with pytest.raises(ConfigError, match=message):
        load_train_config(path, [override])


def test_a_schedule_without_its_optimizer_is_refused(world):
    data = raw(world, "x", stages=[{"epochs": 1}, {"epochs": 1, "scheduler": {"name": "constant"}}])
    with pytest.raises(
        ValidationError,
        match=r"stages.1.scheduler: a schedule belongs to a new optimizer; "
        r"set stages.1.optimizer too",
    ):
        TrainConfig.model_validate(data)


def test_stage_rules_name_their_keys(world):
    ce_with_teacher = raw(
        world, "x", stages=[{"epochs": 1, "loss": {"name": "ce"}, "teacher": "tiny"}]
    )
    with pytest.raises(
        ConfigError, match=r"stages.0.teacher: a 'ce' stage uses no teacher \(found 'tiny'\)"
    ):
        validate(TrainConfig, ce_with_teacher)
    late = raw(
        world,
        "x",
        stages=[
            {"epochs": 2, "loss": {"name": "kd"}},
            {
                "epochs": 2,
                "optimizer": {"lr": 0.01},
                "scheduler": {"name": "step", "milestones": [1, 2]},
            },
        ],
    )
    with pytest.raises(
        ConfigError,
        match=r"stages.1.scheduler.milestones: \[2\] are not before the end of its 2 epoch",
    ):
        validate(TrainConfig, late)


def test_a_train_config_built_in_code_enforces_the_rules_between_keys(world, tmp_path):
    """Not only load_train_config: the model itself refuses, however it is constructed."""
    kd_without_teacher = raw(world, tmp_path, teacher={"mode": "none"})
    with pytest.raises(
        ValidationError,
        match=r"stages.0.loss.name: 'kd' needs a teacher but teacher.mode is 'none'",
    ):
        TrainConfig.model_validate(kd_without_teacher)
    with pytest.raises(ValidationError, match=r"cache.path: teacher.mode 'cache' needs"):
        TrainConfig(**{**raw(world, tmp_path), "cache": {"path": None}})
    with pytest.raises(ConfigError, match=r"^config is invalid:\n  stages.0.loss.name: 'kd' needs"):
        validate(TrainConfig, kd_without_teacher)


def test_cli_prints_one_line_per_broken_rule_and_exits_2(world, tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw(world, tmp_path / "run")))
    broken = ["teacher.mode=none", "run.save_model_epochs=[5]"]
    assert kdcache(["train", str(path), *broken]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"kdcache train: error: config {str(path)!r} is invalid:",
        "  stages.0.loss.name: 'kd' needs a teacher but teacher.mode is 'none' (use 'ce')",
        "  run.save_model_epochs: [5] are not epoch counts of this run (1..1); no checkpoint "
        "would be written for them",
    ]


def test_views_beside_a_cache_must_match_it(world, tmp_path):
    recipe = world["store"].meta.recipe.model_dump(mode="json")
    same = make(world, tmp_path, views={"recipe": recipe, "num_views": 3})
    assert (
        build_train_data(same, 0, 1, ["tiny"], pin_memory=False).recipe
        == world["store"].meta.recipe
    )
    with pytest.raises(
        CacheMismatchError,
        match=r"views.recipe: .*'size': 10.* differs from the cache's .*'size': 12",
    ):
        build_train_data(
            make(world, tmp_path, views={"recipe": {**recipe, "size": 10}}),
            0,
            1,
            ["tiny"],
            pin_memory=False,
        )
    with pytest.raises(CacheMismatchError, match=r"views.num_views: 2 differs from the cache's 3"):
        build_train_data(
            make(world, tmp_path, views={"num_views": 2}), 0, 1, ["tiny"], pin_memory=False
        )


def test_online_teacher_without_a_spec_is_refused(world):
    with pytest.raises(
        ConfigError, match=r"teacher.models.big: no model spec for online teacher 'big'"
    ):
        online_teacher_spec(make(world, "x").teacher, "big", None)


def test_config_schema_is_pinned():
    """A change to the config surface must be deliberate: update this list with it."""
    sections = {
        name: sorted(model.model_fields)
        for name, model in (
            ("run", RunConfig),
            ("data", DataConfig),
            ("cache", CacheConfig),
            ("stage", StageConfig),
        )
    }
    assert sorted(TrainConfig.model_fields) == [
        "cache",
        "data",
        "ema",
        "imports",
        "optimizer",
        "run",
        "scheduler",
        "sftn",
        "stages",
        "student",
        "teacher",
        "version",
        "views",
    ]
    assert sections == {
        "run": [
            "accumulate",
            "amp",
            "channels_last",
            "ckpt_every_steps",
            "compile",
            "csv",
            "device",
            "dir",
            "eval_every",
            "force_unlock",
            "log_every",
            "max_steps",
            "mlflow",
            "on_nonfinite",
            "overwrite",
            "progress",
            "resume",
            "save_model_epochs",
            "seed",
            "tensorboard",
            "threads",
            "wandb",
        ],
        "data": [
            "batch_size",
            "eval_batch_size",
            "exclude_classes",
            "label_key",
            "max_pixels",
            "num_classes",
            "num_workers",
            "persistent_workers",
            "pin_memory",
            "prefetch_factor",
            "select",
            "shard_shuffle",
            "shards",
            "shuffle_buffer",
            "storage_options",
            "val_shards",
            "verify_keys",
        ],
        "cache": ["path", "shard_subset", "storage_options"],
        "stage": [
            "combine",
            "epochs",
            "loss",
            "name",
            "optimizer",
            "scheduler",
            "teacher",
            "teachers",
        ],
    }


@pytest.mark.parametrize(
    "path",
    sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "configs").rglob("*.yaml")
        if p.parent.name in ("fmnist", "effdstl", "sftn")
        or p.name == "train.yaml"
        or (p.parent.name == "similarity" and p.name != "precompute.yaml")
    ),
)
def test_shipped_configs_load(path):
    config = load_train_config(ROOT / path)
    stages, segments = place_stages(
        config.stages,
        teacher=config.teacher,
        optimizer=config.optimizer,
        scheduler=config.scheduler,
    )
    if "effdstl/" in path:
        assert [s.end for s in stages] == [240, 300] and [s.config.loss.name for s in stages] == [
            "wsl",
            "effdstl",
        ]
        schedules = [
            (g.optimizer.lr, g.optimizer.weight_decay, g.scheduler.min_lr) for g in segments
        ]
        assert schedules == [(0.5, 4e-5, 1e-5), (0.05, 0.0, 5e-4)]
        wsl = stages[0].config.loss
        mining = stages[1].config.loss
        # the official code: WSL at T=2 with weights at T=2 and weight 0.5; no CE in stage 2
        assert (wsl.temperature, wsl.weight_temperature, wsl.kd_weight) == (2.0, 2.0, 0.5)
        assert (mining.teacher_temperature, mining.ce_weight) == (0.7, 0.0)
    if "similarity/student_select" in path:
        assert config.data.select.per_class == 20 and config.data.select.teacher == "e3"
    if "similarity/student_heldout" in path:
        assert config.data.exclude_classes == [6]


def test_cli_trains_and_prints_the_summary(world, tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw(world, tmp_path / "run")))
    assert kdcache(["train", str(path), "stages.0.epochs=1", "run.max_steps=2"]) == 0
    assert "kdcache train (cache): 0 epochs, 2 steps" in capsys.readouterr().out
    assert kdcache(["train", str(path), "--resume", "run.max_steps=null"]) == 0
    out = capsys.readouterr().out
    assert "1 epochs, 6 steps" in out and "0 teacher forwards" in out
    assert kdcache(["train", str(path), "optimizer.lr=-1"]) == 2
    assert "optimizer.lr: Input should be greater than 0" in capsys.readouterr().err
