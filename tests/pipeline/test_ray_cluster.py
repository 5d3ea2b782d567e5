"""Precompute like any Ray job: actors wait for their resources, and a cluster that cannot be
reached is one error before anything is written.

A real local Ray (the module's ``ray_session``: 2 CPUs). An actor asking for more CPUs than the
cluster has waits, logs what it waits for, and gives up after ``ray.wait_for_resources_s``;
one that finds the CPUs taken waits for them and then runs. The unreachable-address tests need
Ray not initialised in this process (they run first, before the module's Ray starts): a
``ray.address`` (or ``RAY_ADDRESS``, as ``ray job submit`` sets it) nobody listens on ends in one
line, exit status 2, no cache and no lock.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import ray
import yaml

from kdcache.cache.store import open_store
from kdcache.cli import main as cli_main
from kdcache.core.results import read_run_records
from kdcache.pipeline.cluster import probe_cluster
from kdcache.pipeline.config import RaySection
from kdcache.pipeline.runner import (
    RayClusterError,
    ResourcesUnavailableError,
    fits_now,
    precompute,
)
from tests.support.precomputerun import make_config
from tests.support.processes import kill_session
from tests.support.tarbuild import good, write_tar


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def shard(tmp_path) -> str:
    return write_tar(tmp_path / "good-000000.tar", good("g", 4))


def config(shard: str, cache, *overrides: str):
    return make_config(shard, cache, "data.num_classes=10", "ray.num_actors=1", *overrides)


# ---- an unreachable cluster: before anything is written (Ray not initialised here) --------------


def test_an_unreachable_ray_address_is_one_error_and_writes_nothing(shard, tmp_path, capsys):
    assert not ray.is_initialized(), "these tests need a process without Ray initialised"
    address = f"127.0.0.1:{closed_port()}"
    with pytest.raises(
        RayClusterError,
        match=rf"ray.address: cannot reach a Ray cluster at '{address}': {address} does not "
        r"accept connections .*; start one \(`ray start --head`\)",
    ):
        precompute(config(shard, tmp_path / "cache", f"ray.address={address}"))
    config_file = tmp_path / "precompute.yaml"
    config_file.write_text(
        yaml.safe_dump(config(shard, tmp_path / "cache").model_dump(mode="json"))
    )
    assert cli_main(["precompute", str(config_file), f"ray.address=ray://{address}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("kdcache precompute: error: ray.address: cannot reach a Ray cluster")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache.lock").exists()
    assert not ray.is_initialized()


@pytest.fixture
def not_ray() -> str:
    """``127.0.0.1:PORT`` where a plain TCP server accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:  # closed at the end of the test
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for conn in accepted:
        conn.close()


def test_a_ray_address_where_no_ray_answers_fails_within_the_timeout(
    shard, tmp_path, capsys, not_ray
):
    """Was: over 4 minutes of Ray's retries, a GCS connection line each time."""
    assert not ray.is_initialized(), "these tests need a process without Ray initialised"
    config_file = tmp_path / "precompute.yaml"
    config_file.write_text(
        yaml.safe_dump(config(shard, tmp_path / "cache").model_dump(mode="json"))
    )
    start = time.monotonic()
    argv = ["precompute", str(config_file), f"ray.address={not_ray}", "ray.connect_timeout_s=4"]
    assert cli_main(argv) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(
        f"kdcache precompute: error: ray.address: cannot reach a Ray cluster at '{not_ray}': "
        "no Ray cluster answered within ray.connect_timeout_s=4 s"
    ), err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache.lock").exists()
    assert not ray.is_initialized()


@pytest.mark.slow
def test_a_real_cluster_at_ray_address_is_joined_after_the_probe(shard, tmp_path, capsys):
    """The probe in a child process lets a real cluster through: ``ray start --head`` (its own
    session, killed by session at the end, never ``ray stop``, which would stop other Rays on
    the machine), then ``kdcache precompute … ray.address=127.0.0.1:PORT``."""
    assert not ray.is_initialized(), "these tests need a process without Ray initialised"
    port = closed_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
            f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
            "--node-ip-address=127.0.0.1", f"--temp-dir={tempfile.mkdtemp(prefix='kdh')}",
        ],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while probe_cluster(address, 30) is not None and time.monotonic() < deadline:
            time.sleep(1)  # the head is starting
        config_file = tmp_path / "precompute.yaml"
        config_file.write_text(
            yaml.safe_dump(config(shard, tmp_path / "cache").model_dump(mode="json"))
        )
        argv = [
            "precompute",
            str(config_file),
            f"ray.address={address}",
            "ray.connect_timeout_s=60",
        ]
        assert cli_main(argv) == 0, capsys.readouterr().err
        assert not open_store(str(tmp_path / "cache")).incomplete_shards().get("t1")
    finally:
        kill_session(head.pid)
    assert not ray.is_initialized()


def test_auto_under_ray_job_submit_joins_ray_address(shard, tmp_path, monkeypatch):
    """``ray job submit`` sets RAY_ADDRESS for its entrypoint: ``auto``, or no address, joins it."""
    address = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(RayClusterError, match=rf"at 'auto': {address} does not accept"):
        precompute(config(shard, tmp_path / "cache", "ray.address=auto"))
    with pytest.raises(
        RayClusterError, match=rf"at '{address}' \(RAY_ADDRESS; ray.address is unset\)"
    ):
        precompute(config(shard, tmp_path / "cache"))
    assert not (tmp_path / "cache").exists() and not ray.is_initialized()


# ---- actors wait for their resources (the module's local Ray, 2 CPUs) ---------------------------


def test_an_actor_larger_than_the_cluster_waits_then_fails_naming_the_key(
    ray_session, shard, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="kdcache")
    cfg = config(shard, tmp_path / "cache", "ray.cpus_per_actor=4", "ray.wait_for_resources_s=3")
    start = time.monotonic()
    with pytest.raises(
        ResourcesUnavailableError,
        match=r"no shard actor was up within ray.wait_for_resources_s=3 s .*each shard actor "
        r"needs 4 CPU and 0 GPU \(ray.cpus_per_actor, ray.gpus_per_actor\); the cluster has 2 "
        r"CPU .*no shard was processed",
    ):
        precompute(cfg, progress=False)
    assert 3 <= time.monotonic() - start < 60
    assert "but 0 fit the cluster now" in caplog.text
    assert "shard actors: 1 not up after" in caplog.text
    assert open_store(str(tmp_path / "cache")).incomplete_shards()["t1"] == ["good-000000.tar"]
    [record] = read_run_records(str(tmp_path / "cache"))  # the run says how it ended
    assert record.status == "error" and record.shards_done == [] and record.tasks == 1
    assert record.error.startswith("ResourcesUnavailableError: no shard actor was up within")


def test_the_first_not_up_line_is_early_only_when_actors_do_not_fit(ray_session):
    """Actors that fit are building their teachers: no "not up" line for the first interval."""
    assert fits_now(RaySection())
    assert not fits_now(RaySection(cpus_per_actor=4))
    assert not fits_now(RaySection(gpus_per_actor=1))


def test_an_actor_waits_for_cpus_taken_by_another_job_then_runs(
    ray_session, shard, tmp_path, caplog
):
    @ray.remote(num_cpus=2)
    class Holder:  # another job holding every CPU of the cluster
        def ping(self) -> int:
            return 1

    holder = Holder.remote()
    ray.get(holder.ping.remote())
    timer = threading.Timer(8.0, lambda: ray.kill(holder, no_restart=True))
    timer.start()
    caplog.set_level(logging.INFO, logger="kdcache")
    try:
        _, summary = precompute(
            config(shard, tmp_path / "cache", "ray.wait_for_resources_s=120"), progress=False
        )
    finally:
        timer.cancel()
        ray.kill(holder, no_restart=True)
    assert summary is not None and summary.failed == 0 and summary.views == 4 * 2
    assert "shard actors: 1 not up after" in caplog.text
    assert open_store(str(tmp_path / "cache")).incomplete_shards() == {}


def test_a_driver_joins_the_cluster_of_ray_address_as_under_ray_job_submit(
    ray_session, shard, tmp_path
):
    """A second driver process given the cluster as ``RAY_ADDRESS`` (what ``ray job submit`` sets
    for its entrypoint) and ``ray.address=auto`` runs its actors on this module's Ray."""
    config_file = tmp_path / "precompute.yaml"
    config_file.write_text(
        yaml.safe_dump(config(shard, tmp_path / "cache").model_dump(mode="json"))
    )
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run(
        [sys.executable, "-m", "kdcache", "precompute", str(config_file), "ray.address=auto"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1/1 shard task(s) done" in done.stdout
    assert open_store(str(tmp_path / "cache")).incomplete_shards() == {}
