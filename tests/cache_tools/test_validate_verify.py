"""`kdcache validate` and `kdcache verify` on real caches built from real shards."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.cache.reader import read_block
from kdcache.cache.store import open_store
from kdcache.cache_tools.verify import verify_cache
from kdcache.cli import main
from kdcache.core.errors import CacheMismatchError, CacheReadError, ResultError
from kdcache.core.results import ValidateResult, VerifyResult
from tests.support.cachebuild import build_cache, tiny_teacher, write_shards


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("vv")
    urls = write_shards(root / "shards", num_shards=3, per_shard=[10, 7, 9])
    path = root / "cache"
    build_cache(path, urls, teachers={"weak": 3, "strong": 4})
    return root, urls, str(path)


def copy_cache(built, tmp_path) -> str:
    _, _, path = built
    target = tmp_path / "cache"
    shutil.copytree(path, target)
    for name in ("weak", "strong"):
        shutil.copy(f"{path}.{name}.pt", f"{target}.{name}.pt")
    return str(target)


def test_validate_and_verify_pass_on_a_sound_cache(built, capsys):
    _, _, path = built
    assert main(["validate", path]) == 0
    assert "valid: every shard complete" in capsys.readouterr().out
    assert main(["verify", path, "--num", "20"]) == 0
    out = capsys.readouterr().out
    assert "weak" in out and "strong" in out and "FAIL" not in out


def test_validate_and_verify_write_their_results_as_json(built, tmp_path, capsys):
    _, _, path = built
    assert main(["validate", path, "--json", str(tmp_path / "out" / "validate.json")]) == 0
    assert f"wrote {tmp_path / 'out' / 'validate.json'}" in capsys.readouterr().out
    validated = ValidateResult.read(tmp_path / "out" / "validate.json")
    assert validated.ok and validated.problems == [] and validated.cache == path
    assert (validated.shards, validated.views, validated.teachers) == (
        3,
        26 * 3,
        ["strong", "weak"],
    )
    argv = ["verify", path, "--num", "12", "--seed", "4", "--json", str(tmp_path / "verify.json")]
    assert main(argv) == 0
    verified = VerifyResult.read(tmp_path / "verify.json")
    assert verified.ok and (verified.num, verified.seed, verified.cache) == (12, 4, path)
    assert [(t.teacher, t.views, t.ok) for t in verified.teachers] == [
        ("strong", 12, True),
        ("weak", 12, True),
    ]
    with pytest.raises(ResultError, match="is not a VerifyResult: .*teachers"):
        VerifyResult.read(tmp_path / "out" / "validate.json")  # a validate result is not one


def test_json_outputs_are_checked_before_any_work(built, tmp_path, capsys):
    _, _, path = built
    (tmp_path / "taken").mkdir()
    for command in ("validate", "verify"):
        assert main([command, path, "--json", str(tmp_path / "taken")]) == 2
        assert "--json: " in capsys.readouterr().err


def test_verify_recomputes_within_fp16_rounding(built):
    _, _, path = built
    for result in verify_cache(open_store(path), num=40, seed=3).teachers:
        assert result.views == 26 and result.ok  # 26 valid samples in all, fewer than --num
        assert result.topk_agreement == 1.0 and result.max_lse_delta < 1e-4


def test_verify_fails_on_tampered_targets(built, tmp_path, capsys):
    path = copy_cache(built, tmp_path)
    group = open_store(path, "r+").teacher_group("weak")
    logits = group["topk_logit"][:]
    group["topk_logit"][:] = logits + np.float16(0.5)
    assert main(["verify", path, "--num", "20"]) == 1
    assert "FAIL (20 views beyond tolerance)" in capsys.readouterr().out
    assert main(["verify", path, "--num", "20", "--json", str(tmp_path / "verify.json")]) == 1
    result = VerifyResult.read(tmp_path / "verify.json")
    assert not result.ok
    assert [(t.teacher, t.ok, t.failures) for t in result.teachers] == [
        ("strong", True, 0),
        ("weak", False, 20),
    ]


def test_verify_refuses_other_teacher_weights(built, tmp_path):
    path = copy_cache(built, tmp_path)
    _, other = tiny_teacher(4, seed=9)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(
        CacheMismatchError, match="teacher 'weak': the weights built from .*other.pt' have digest"
    ):
        verify_cache(
            open_store(path), teachers=["weak"], num=4, checkpoint=str(tmp_path / "other.pt")
        )


def test_verify_finds_moved_shards_with_a_pattern(built, tmp_path):
    root, urls, path = built
    moved = tmp_path / "moved"
    shutil.copytree(root / "shards", moved)
    assert verify_cache(open_store(path), num=5, shards=str(moved / "train-*.tar")).ok
    with pytest.raises(
        CacheMismatchError,
        match="shard 'train-000000.tar' of the cache is not among the given shards",
    ):
        verify_cache(open_store(path), num=26, shards=str(moved / "train-00000[12].tar"))


def test_validate_lists_incomplete_shards_and_bad_values(tmp_path, capsys):
    urls = write_shards(tmp_path / "shards", num_shards=2, per_shard=6)
    build_cache(tmp_path / "cache", urls, teachers={"t": 3}, shards=[0])
    store = open_store(str(tmp_path / "cache"), "r+")
    lse = store.teacher_group("t")["lse"][0:6]
    lse[2, 1] = -100.0
    store.teacher_group("t")["lse"][0:6] = lse
    assert main(["validate", str(tmp_path / "cache")]) == 1
    out = capsys.readouterr().out
    assert "t: 1 shard(s) without a completion mark: ['train-000001.tar']" in out
    assert (
        "shard 'train-000000.tar', teacher 't': 1 view(s) with logsumexp below the top logit" in out
    )


def test_validate_finds_a_tail_that_does_not_add_up(built, tmp_path, capsys):
    """The stored tail must make up, with the top-k, the whole logsumexp; a corrupted one is
    listed."""
    path = copy_cache(built, tmp_path)
    group = open_store(path, "r+").teacher_group("weak")
    log_tail = group["log_tail"][:]
    log_tail[0, 0] = np.float16(-1.0) if log_tail[0, 0] < -2 else np.float16(-8.0)
    log_tail[1, 2] = np.float16(np.nan)
    group["log_tail"][:] = log_tail
    assert main(["validate", path]) == 1
    out = capsys.readouterr().out
    assert "teacher 'weak': 1 NaN/inf value(s) in the tail logsumexp" in out
    group["log_tail"][1, 2] = log_tail[0, 1]  # a real value, but not this view's
    assert main(["validate", path]) == 1
    assert "whose top-k and tail do not add up to the logsumexp" in capsys.readouterr().out


def test_q8_cache_validates_and_verifies_within_its_own_bound(tmp_path, capsys):
    """q8 rounds logit differences to 1/16 nat: verify must judge it by q8's bound, not fp16's."""
    urls = write_shards(tmp_path / "shards", num_shards=2, per_shard=8)
    path = str(tmp_path / "cache")
    build_cache(path, urls, teachers={"q": 3}, classes=10, encoding="q8")
    assert main(["validate", path]) == 0
    [result] = verify_cache(open_store(path), num=40, atol=0.0).teachers
    assert result.ok and result.max_abs_delta > 1e-3  # q8's rounding shows, and is within its bound
    assert result.max_tail_delta <= 0.012


def test_verify_fails_on_a_tampered_tail(built, tmp_path):
    path = copy_cache(built, tmp_path)
    group = open_store(path, "r+").teacher_group("weak")
    group["log_tail"][:] = (group["log_tail"][:].astype(np.float32) - 1.0).astype(
        np.float16
    )  # every tail / e
    [result] = verify_cache(open_store(path), teachers=["weak"], num=30).teachers
    assert not result.ok and result.failures == result.views > 0 and result.max_abs_delta < 1e-2


def test_validate_names_a_damaged_chunk_and_lost_ones(built, tmp_path, capsys):
    path = copy_cache(built, tmp_path)
    teachers = Path(path) / "teachers"
    damaged = teachers / "weak" / "topk_logit" / "c" / "1" / "0" / "0"
    damaged.write_bytes(damaged.read_bytes()[:10])
    (teachers / "strong" / "lse" / "c" / "2" / "0").unlink()
    (teachers / "strong" / "label_logit" / "c" / "0" / "0").unlink()  # would read as zeros
    assert main(["validate", path]) == 1
    out = capsys.readouterr().out
    assert "cannot read 'teachers/weak/topk_logit' of shard 'train-000001.tar' (" in out
    lost = "has no chunk file for the shard, which is marked complete"
    assert f"shard 'train-000002.tar': 'teachers/strong/lse' {lost}" in out
    assert f"shard 'train-000000.tar': 'teachers/strong/label_logit' {lost}" in out
    assert "INVALID: 3 problem(s)" in out
    with pytest.raises(
        CacheReadError, match=r"'teachers/weak/topk_logit' of shard 'train-000001.tar'.*damaged"
    ):
        read_block(open_store(path), 1, ["weak"])


@pytest.mark.parametrize(
    ("array", "value"),
    [("teachers/weak/topk_idx", 9), ("labels", 7)],  # the cache has 4 classes
)
def test_values_out_of_range_are_refused_by_every_reader_naming_the_array(
    built, tmp_path, capsys, array, value
):
    path = copy_cache(built, tmp_path)
    store = open_store(path, "r+")
    rows = store.rows(1)
    stored = store.group[array][rows.start : rows.stop]
    stored[0] = value  # a valid row (every row of these shards is labelled): checksums stay valid
    store.group[array][rows.start : rows.stop] = stored
    shard = "'train-000001.tar'"
    named = rf"'{array}' of shard {shard} holds {value}, outside the 4 classes \[-?[01], 4\)"
    with pytest.raises(CacheReadError, match=named):  # the trainer's read
        read_block(open_store(path), 1, ["weak", "strong"])
    capsys.readouterr()
    for command in (["inspect", path], ["verify", path, "--num", "40"]):
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"'{array}' of shard 'train-000001.tar'" in err
        assert "kdcache validate" in err
    assert main(["validate", path]) == 1  # validate lists it among the problems
