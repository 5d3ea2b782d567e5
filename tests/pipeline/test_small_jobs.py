"""Small jobs (issue 24): with ``ray.mode: auto`` and no cluster a small precompute runs in this
process, without starting Ray, to the same cache as its shard tasks give anywhere."""

from __future__ import annotations

import logging

import ray

from kdcache.cache.store import open_store
from kdcache.cache_tools.validate import validate_cache
from kdcache.core.results import read_run_records
from kdcache.pipeline.runner import precompute
from tests.support.cachebuild import assert_same_arrays, cache_arrays
from tests.support.precomputerun import make_config, run_in_process, shards_url


def test_small_local_job_runs_in_process_without_ray(data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kdcache")
    assert not ray.is_initialized()
    cfg = make_config(shards_url(data_dir), tmp_path / "cache")
    _, result = precompute(cfg, progress=False)
    assert not ray.is_initialized()  # Ray was never started
    assert "running 4 shard task(s) in this process (ray.mode: auto" in caplog.text
    assert "shard actors" not in caplog.text
    assert result.status == "complete" and result.views == 160 * 2
    assert [r.status for r in read_run_records(str(tmp_path / "cache"))] == ["complete"]
    assert validate_cache(open_store(str(tmp_path / "cache"))).ok
    # the same arrays as the shard worker gives on its own (as on a Ray actor)
    run_in_process(make_config(shards_url(data_dir), tmp_path / "reference"))
    assert_same_arrays(cache_arrays(tmp_path / "cache"), cache_arrays(tmp_path / "reference"))


def test_a_shard_that_fails_in_process_fails_alone(bad_dir):
    """As on actors: the other shards finish and the failure names the shard."""
    from kdcache.pipeline.runner import ShardsFailedError

    shards = [str(bad_dir / "good-000000.tar"), str(bad_dir / "corrupt-000000.tar")]
    cfg = make_config(shards, bad_dir / "cache", "data.num_classes=10", "ray.mode=local")
    try:
        precompute(cfg, progress=False)
    except ShardsFailedError as exc:
        assert list(exc.failures) == ["corrupt-000000.tar"]
        assert "c_bad" in str(exc)  # names the sample, as on an actor
        assert exc.result.shards_done == ["good-000000.tar"]
    else:
        raise AssertionError("the bad shard did not fail")
