"""User errors end in one line and exit status 2, never a traceback (issue 17, item 3).

Each case runs the real command through ``kdcache.cli.main`` in this process (an exception that is
not a kdcache error would escape it and fail the test) and checks that stderr is one line
``kdcache CMD: error: ...`` naming the file, shard, key or config key. Outputs that cannot be
written are checked before any work, on a real read-only filesystem (a tmpfs mounted read-only:
root ignores permission bits but not a read-only mount; skipped where mounting is not allowed) and
on paths whose parent is a regular file (always run). Real tars, real Zarr caches, real torch
checkpoints, real DataLoader worker processes.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from kdcache.cli import main as cli_main
from kdcache.core.config import validate
from kdcache.core.errors import DataError, user_message
from kdcache.models.build import ModelSpec, build_model
from kdcache.pipeline.config import PrecomputeConfig
from tests.support.cachebuild import cache_arrays, write_shards
from tests.support.precomputerun import run_in_process

GREY_RECIPE = {"size": 12, "scale": [0.5, 1.0], "channels": 1, "mean": [0.5], "std": [0.25]}


def fails_with(capsys, argv: list[str], message: str) -> str:
    """Run the command; it must exit 2 with one error line matching ``message`` (a regex)."""
    capsys.readouterr()
    assert cli_main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err, err
    assert err.startswith(f"kdcache {argv[0]}: error: "), err
    assert re.search(message, err), err
    return err


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("shards"), num_shards=2, per_shard=6)


def precompute_yaml(path: Path, shards: list[str], cache: Path, **teacher) -> Path:
    model = {"name": "kd_cnn_tiny", **teacher}
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"shards": shards, "num_classes": 4},
                "cache": {"path": str(cache), "num_views": 2, "recipe": GREY_RECIPE},
                "teachers": [{"name": "t1", "model": model, "k": 3}],
                "ray": {"num_actors": 1},
                "runtime": {"batch_size": 16},
            }
        )
    )
    return path


def train_yaml(path: Path, shards: list[str], cache: Path, workers: int = 0, **student) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "run": {"dir": str(path.parent / "run"), "progress": False},
                "data": {
                    "shards": shards,
                    "batch_size": 4,
                    "num_workers": workers,
                    "shuffle_buffer": 0,
                },
                "cache": {"path": str(cache)},
                "student": {"name": "kd_mlp", "kwargs": {"img_size": 12}, **student},
                "teacher": {"name": "tiny"},
                "stages": [{"epochs": 1, "loss": {"name": "kd"}}],
            }
        )
    )
    return path


# ---- weights files ------------------------------------------------------------------------------


@pytest.fixture
def checkpoints(tmp_path) -> dict[str, Path]:
    net = build_model(ModelSpec(name="kd_cnn_tiny"), 4, 1)
    torch.save(net.state_dict(), tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    torch.save(net, tmp_path / "whole.pth")
    student = build_model(ModelSpec(name="kd_mlp", kwargs={"img_size": 12}), 4, 1)
    torch.save(student.state_dict(), tmp_path / "student.pth")
    (tmp_path / "student_cut.pth").write_bytes((tmp_path / "student.pth").read_bytes()[:900])
    return {p.stem: p for p in tmp_path.glob("*.pth")}


@pytest.mark.parametrize(
    ("file", "message"),
    [
        ("cut", r"checkpoint '.*cut.pth' cannot be read as PyTorch or safetensors weights: it is "),
        ("whole", r"checkpoint '.*whole.pth' is a pickled Python object .*Save model.state_dict"),
    ],
)
def test_unusable_teacher_checkpoint(capsys, tmp_path, shards, checkpoints, file, message):
    config = precompute_yaml(
        tmp_path / "p.yaml", shards, tmp_path / "cache", checkpoint=str(checkpoints[file])
    )
    err = fails_with(
        capsys, ["precompute", config], rf"teachers.0.model \(teacher 't1'\): {message}"
    )
    assert "kdcache loads a state dict" in err  # the accepted forms
    assert not (tmp_path / "cache").exists()


def test_unusable_student_checkpoint(capsys, tmp_path, world, checkpoints):
    config = train_yaml(
        tmp_path / "t.yaml",
        world["urls"],
        world["root"] / "cache.zarr",
        checkpoint=str(checkpoints["student_cut"]),
    )
    fails_with(capsys, ["train", config], r"checkpoint '.*student_cut.pth' cannot be read as ")


# ---- manifests ----------------------------------------------------------------------------------


def test_malformed_manifest_beside_the_shards(capsys, tmp_path, shards, world):
    folder = tmp_path / "shards"
    folder.mkdir()
    copies = [shutil.copy(url, folder) for url in shards]
    (folder / "train-manifest.json").write_text('{"split": "train", "shards": [')
    config = precompute_yaml(tmp_path / "p.yaml", copies, tmp_path / "cache")
    fails_with(
        capsys,
        ["precompute", config],
        r"manifest '.*train-manifest.json' beside the shards is not a valid kdcache manifest: "
        r"JSON: Invalid JSON: .*Fix or remove it",
    )
    (folder / "train-manifest.json").write_text('{"split": "train", "shards": 3}')
    config = train_yaml(tmp_path / "t.yaml", world["urls"], world["root"] / "cache.zarr")
    with_val = yaml.safe_load(config.read_text())
    with_val["data"]["val_shards"] = copies[0]  # its counts come from the manifest beside it
    config.write_text(yaml.safe_dump(with_val))
    fails_with(
        capsys,
        ["train", tmp_path / "t.yaml"],
        r"manifest '.*train-manifest.json' .*: shards: Input should be a valid array; "
        r"counts: Field required",
    )


# ---- outputs: read-only filesystems and paths through a file ------------------------------------


@pytest.fixture
def read_only(tmp_path) -> Path:
    """A real read-only filesystem: a tmpfs mounted ``ro`` (needs the right to mount)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs: {done.stderr.strip() or done.returncode}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def output_cases(base: Path, world) -> list[tuple[list, str]]:
    cache = world["root"] / "cache.zarr"
    return [
        (["inspect", cache, "--json", base / "stats.json"], r"--json: "),
        (["inspect", cache, "--plots", base / "plots"], r"--plots: "),
        (
            ["shards", "synthetic", "--out", base / "shards", "--num", 8, "--classes", 2],
            r"--out: ",
        ),
    ]


def test_outputs_on_a_read_only_filesystem_are_refused_before_any_work(
    capsys, tmp_path, read_only, shards, world
):
    for argv, key in output_cases(read_only, world):
        fails_with(capsys, argv, rf"{key}cannot write '.*' \(in '.*ro'\): it is on a read-only ")
    config = precompute_yaml(tmp_path / "p.yaml", shards, read_only / "cache")
    fails_with(
        capsys,
        ["precompute", config],
        r"cache.path: cannot write '.*ro/cache' \(in '.*ro'\): it is on a read-only filesystem",
    )


def test_outputs_through_a_file_or_of_the_wrong_type_are_refused(capsys, tmp_path, shards, world):
    (tmp_path / "file").write_text("x")
    for argv, key in output_cases(tmp_path / "file", world):
        fails_with(capsys, argv, rf"{key}'.*file/.*' cannot be created: '.*file' is a file")
    fails_with(
        capsys, ["inspect", world["root"] / "cache.zarr", "--json", tmp_path], r"is a directory"
    )
    fails_with(
        capsys, ["shards", "synthetic", "--out", tmp_path / "file", "--num", 4], r"is a file, not a"
    )
    for cache, message in [
        (tmp_path / "file" / "cache", r"cache.path: '.*file/cache' cannot be created: "),
        (tmp_path / "file", r"cache.path: '.*file' is a file, not a directory"),
    ]:
        config = precompute_yaml(tmp_path / "p.yaml", shards, cache)
        fails_with(capsys, ["precompute", config], message)


def test_overwrite_through_a_symbolic_link_is_refused(capsys, tmp_path, shards):
    run_in_process(validate(PrecomputeConfig, _config(shards, tmp_path / "real")))
    before = cache_arrays(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    config = precompute_yaml(tmp_path / "p.yaml", shards, tmp_path / "link")
    fails_with(
        capsys,
        ["precompute", config, "--overwrite"],
        r"cache.path: '.*link' is a symbolic link to '.*real'; --overwrite does not delete "
        r"through a link: give the target itself \(cache.path=.*real\) or remove the link",
    )
    after = cache_arrays(tmp_path / "real")
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


def _config(shards: list[str], cache: Path) -> dict:
    return yaml.safe_load(precompute_yaml(cache.parent / "c.yaml", shards, cache).read_text())


# ---- a teacher group whose zarr.json was deleted ----------------------------------------------


def test_rerun_after_a_teacher_groups_metadata_was_deleted(capsys, tmp_path, shards):
    cfg = validate(PrecomputeConfig, _config(shards, tmp_path / "cache"))
    run_in_process(cfg)
    clean = cache_arrays(tmp_path / "cache")
    (tmp_path / "cache" / "teachers" / "t1" / "zarr.json").unlink()
    config = precompute_yaml(tmp_path / "p.yaml", shards, tmp_path / "cache")
    message = (
        r"cache '.*cache': 'teachers/t1' holds arrays but no zarr.json \(its group metadata was "
        r"deleted\).* Delete 'teachers/t1' from the cache to compute it again"
    )
    fails_with(capsys, ["precompute", config], message)
    fails_with(capsys, ["validate", tmp_path / "cache"], message)  # readers say the same
    assert not (tmp_path / "cache" / "teachers" / "t1" / "zarr.json").exists()  # left as found
    shutil.rmtree(tmp_path / "cache" / "teachers" / "t1")  # what the message says to do
    run_in_process(cfg)
    redone = cache_arrays(tmp_path / "cache")
    for name in clean:
        np.testing.assert_array_equal(clean[name], redone[name], err_msg=name)


# ---- errors raised in DataLoader workers --------------------------------------------------------


def relabel(src: str, dst: Path, key: str, label: bytes) -> str:
    with tarfile.open(src) as tar, tarfile.open(dst, "w") as out:
        for member in tar.getmembers():
            data = tar.extractfile(member).read()
            if member.name == f"{key}.cls":
                data = label
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    return str(dst)


def test_an_error_in_a_dataloader_worker_is_the_workers_own_line(capsys, tmp_path, world):
    urls = [shutil.copy(u, tmp_path) for u in world["urls"]]
    relabel(world["urls"][2], Path(urls[2]), "train_000030", b"cat")
    config = train_yaml(tmp_path / "t.yaml", urls, world["root"] / "cache.zarr", workers=2)
    fails_with(
        capsys,
        ["train", config],
        r"^kdcache train: error: shard 'train-000002.tar', key 'train_000030': label b'cat' is "
        r"not an integer$",
    )


def test_user_message_unwraps_torchs_worker_wrapper():
    try:
        raise DataError("shard 's.tar', key 'k': label 9 in the data\nbut 0 in the cache")
    except DataError as exc:
        import traceback

        original = "".join(traceback.format_exception(exc))
    wrapped = DataError(f"Caught DataError in DataLoader worker process 1.\nOriginal {original}")
    assert (
        user_message(wrapped) == "shard 's.tar', key 'k': label 9 in the data\nbut 0 in the cache"
    )
    assert user_message(DataError("plain")) == "plain"


# ---- damaged values: named, no numpy warnings -------------------------------------------------


def test_validate_and_inspect_on_non_finite_targets_print_no_numpy_warnings(
    capsys, tmp_path, world
):
    cache = tmp_path / "cache.zarr"
    shutil.copytree(world["root"] / "cache.zarr", cache)
    group = zarr.open_group(str(cache), mode="r+")
    logits = group["teachers/tiny/topk_logit"]
    block = logits[0:12]
    block[0, 0, :] = [np.inf, np.inf, -np.inf, np.nan]
    block[2, 1, :2] = [60000, -60000]
    logits[0:12] = block
    capsys.readouterr()
    assert cli_main(["validate", str(cache)]) == 1  # pytest turns any warning into an error
    out = capsys.readouterr()
    assert "NaN/inf value(s) in top-k logits" in out.out and "Warning" not in out.out + out.err
    fails_with(
        capsys,
        ["inspect", cache],
        r"shard 'train-000000.tar', teacher 'tiny': \d+ NaN or inf value\(s\) in the stored "
        r"targets; the cache is damaged",
    )


def test_overrides_after_options_are_taken_and_other_strays_refused(capsys):
    """``kdcache precompute cfg.yaml --overwrite key=value`` as people type it: the late override
    joins the others; a stray option, or an override where the command takes none, is refused."""
    from kdcache.cli import build_parser, parse

    parser = build_parser(["precompute"])
    args = parse(parser, ["precompute", "c.yaml", "a.b=1", "--overwrite", "cache.seed=2"])
    assert args.overwrite and args.overrides == ["a.b=1", "cache.seed=2"]
    for argv in (["precompute", "c.yaml", "--overwrite", "--bogus"], ["validate", "c", "x=1"]):
        with pytest.raises(SystemExit) as exit_:
            parse(build_parser([argv[0]]), argv)
        assert exit_.value.code == 2
        assert "unrecognized arguments: " + argv[-1] in capsys.readouterr().err


# ---- messages that say what the file is and what to do (issue 25, item 7) -----------------------


def plain_train_yaml(path: Path, shards: list[str], workers: int = 0, epochs: int = 1) -> Path:
    """A CE run without a cache (no precompute needed) in ``path.parent / 'run'``."""
    path.write_text(
        yaml.safe_dump(
            {
                "run": {"dir": str(path.parent / "run"), "progress": False},
                "data": {
                    "shards": shards,
                    "num_classes": 4,
                    "batch_size": 2,
                    "num_workers": workers,
                    "shuffle_buffer": 0,
                },
                "views": {"recipe": GREY_RECIPE},
                "teacher": {"mode": "none"},
                "student": {"name": "kd_mlp", "kwargs": {"img_size": 12, "hidden": 8}},
                "stages": [{"epochs": epochs, "loss": {"name": "ce"}}],
            }
        )
    )
    return path


def test_overwrite_flag_to_train_hints_run_overwrite(capsys, tmp_path, shards):
    """Was: the flag went on as an override, refused as one with no hint of the key."""
    config = plain_train_yaml(tmp_path / "t.yaml", shards)
    fails_with(
        capsys,
        ["train", config, "--overwrite"],
        r"--overwrite: kdcache train has no such flag \(only --resume\); to start over in "
        r"run.dir, give run.overwrite=true$",
    )


def test_base_naming_a_directory_says_so(capsys, tmp_path, shards):
    """Was: ``base 'configs' does not exist`` for a directory that plainly does."""
    config = plain_train_yaml(tmp_path / "t.yaml", shards)
    (tmp_path / "configs").mkdir()
    config.write_text("base: configs\n" + config.read_text())
    fails_with(
        capsys,
        ["train", config],
        r"config '.*t.yaml': base 'configs' is a directory \('.*configs'\), not a config file",
    )


def random_bytes(path: Path, size: int = 4096) -> Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def test_random_bytes_as_a_checkpoint_are_not_called_a_pickled_object(capsys, tmp_path, shards):
    """Was: ``is a pickled Python object, e.g. a whole model``, for bytes that are no pickle."""
    noise = random_bytes(tmp_path / "noise.pth")
    config = precompute_yaml(tmp_path / "p.yaml", shards, tmp_path / "cache", checkpoint=str(noise))
    err = fails_with(
        capsys,
        ["precompute", config],
        r"checkpoint '.*noise.pth' cannot be read as PyTorch or safetensors weights: it is "
        r"truncated, damaged or of another format \(UnpicklingError: ",
    )
    assert "pickled Python object" not in err and "weights_only" not in err


@pytest.mark.parametrize("damage", ["random-bytes", "truncated"])
def test_unreadable_last_pt_on_resume_is_one_plain_line(capsys, tmp_path, shards, damage):
    """Was: torch's text cut mid-sentence, with ANSI escapes and a hint toward
    ``weights_only=False`` (which would unpickle whatever the file holds)."""
    config = plain_train_yaml(tmp_path / "t.yaml", shards)
    assert cli_main(["train", str(config)]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    else:
        random_bytes(last)
    err = fails_with(
        capsys,
        ["train", config, "--resume"],
        r"'?.*/run/checkpoints/last.pt'? \(the run's resume checkpoint\) cannot be read: it is "
        r"truncated, damaged or not a checkpoint \(\w+: [^)]*\); to start over, rerun without "
        r"--resume and with run.overwrite=true, or put back a good copy of it$",
    )
    assert "\x1b" not in err and "weights_only" not in err


def worker_pids(pid: int) -> list[int]:
    """The children of process ``pid`` (a trainer's DataLoader workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in children.read_text().split()]
    except OSError:
        return []


def test_a_killed_dataloader_worker_is_one_line_naming_the_resume(tmp_path, shards):
    """``kill -9`` of a DataLoader worker of a real ``kdcache train`` process. Was: torch's
    36-line traceback ending in ``DataLoader worker (pid(s) N) exited unexpectedly``."""
    config = plain_train_yaml(tmp_path / "t.yaml", shards, workers=2, epochs=500)
    command = [sys.executable, "-m", "kdcache", "train", str(config)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    killed = 0
    # every worker seen is killed until the run stops: a worker killed while its epoch's
    # iterator shuts down goes unnoticed by torch, the next one is not
    while proc.poll() is None and time.monotonic() < deadline:
        for pid in worker_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.1)
    proc.kill()  # only if it outlived the deadline
    _, err = proc.communicate(timeout=60)
    assert killed, "no DataLoader worker started"
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    assert re.fullmatch(
        r"kdcache train: error: a DataLoader worker process \(pid [\d, ]+\) (killed by signal "
        r"\w+|exited unexpectedly[\w -]*) while the run streamed its data .*rerun with --resume to "
        r"continue '.*/run' from its last checkpoint, and if it recurs lower data.num_workers, "
        r"data.shuffle_buffer or data.batch_size",
        last,
    ), last
