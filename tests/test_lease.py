"""One driver per run: the driver lease (`sweep.lease`) on local storage (O_EXCL), on S3 (a conditional
put, against moto's real S3 server) and in an Optuna study's database; refused at once naming the holder,
an expired lease taken over, --take-over taking a live one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _procs import descendants, kill_all

from sweep import lease as L
from sweep.grid import main as grid_main
from sweep.search import main as search_main

ROOT = Path(__file__).resolve().parents[1]


def _backends(kind: str, tmp_path: Path, request: pytest.FixtureRequest):
    if kind == "local":
        return lambda: L.LocalBackend(str(tmp_path / "run"))
    if kind == "s3":
        s3 = request.getfixturevalue("s3_server")
        return lambda: L.S3Backend(s3.uri("runs", "run"))
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    return lambda: L.StudyBackend(storage, "study", "optuna.db")


@pytest.fixture(params=["local", "s3", "study"])
def backend(request, tmp_path):
    return _backends(request.param, tmp_path, request)


def test_a_second_driver_is_refused_naming_the_first(backend):
    first = L.DriverLease(ttl=60)
    first.acquire(backend(), what="run 'r'", resume=False, take_over=False)
    try:
        second = L.DriverLease(ttl=60)
        with pytest.raises(L.LeaseHeld) as err:
            second.acquire(backend(), what="run 'r'", resume=True, take_over=False)
        message = str(err.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}, started {first.record['started']}" in message
        assert "--take-over" in message
    finally:
        first.release()
    again = L.DriverLease(ttl=60)  # released: free again
    again.acquire(backend(), what="run 'r'", resume=False, take_over=False)
    again.release()


def test_an_expired_lease_is_taken_over(backend):
    stale = L.DriverLease(ttl=60)
    stale.record = {**stale.record, "host": "gone-host", "renewed": time.time() - 3600}
    stale.acquire(backend(), what="run 'r'", resume=False, take_over=False)
    stale._stop.set()  # the holder died: it renews no more
    taker = L.DriverLease(ttl=60)
    taker.acquire(backend(), what="run 'r'", resume=True, take_over=False)
    holder, _ = backend().read()
    assert holder["token"] == taker.record["token"]
    taker.release()


def test_a_dead_process_on_this_host_holds_nothing(backend):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    record = {**L.new_record(60), "pid": int(dead.stdout), "process_start": 0.0}
    assert L.expired(record)
    assert not L.expired(L.new_record(60))  # this process, renewed now


def test_take_over_takes_a_live_lease_and_the_holder_learns_it(backend):
    lost = []
    holder = L.DriverLease(ttl=60, on_lost=lost.append)
    holder.acquire(backend(), what="run 'r'", resume=False, take_over=False)
    taker = L.DriverLease(ttl=60)
    taker.acquire(backend(), what="run 'r'", resume=False, take_over=True)
    holder.renew()  # the heartbeat finds the lease moved on
    assert len(lost) == 1 and not holder.held
    record, _ = backend().read()
    assert record["token"] == taker.record["token"]
    holder.release()  # removes nothing of the new holder's
    assert backend().read()[0]["token"] == taker.record["token"]
    taker.release()
    assert backend().read() == (None, None)


def test_the_heartbeat_renews(backend):
    lease = L.DriverLease(ttl=0.6)
    lease.acquire(backend(), what="run 'r'", resume=False, take_over=False)
    try:
        first = backend().read()[0]["renewed"]
        deadline = time.time() + 60
        while backend().read()[0]["renewed"] == first:
            assert time.time() < deadline, "no renewal within 60 s"
            time.sleep(0.1)
    finally:
        lease.release()


def test_a_cut_off_local_lease_expires_with_its_ttl(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / L.LEASE_FILE).write_bytes(b"")  # a driver died (or the disk filled) while writing it
    assert L.expired(L.LocalBackend(str(run)).read()[0]) is False
    old = time.time() - 2 * L.DEFAULT_TTL_S
    os.utime(run / L.LEASE_FILE, (old, old))
    lease = L.DriverLease()
    lease.acquire(L.LocalBackend(str(run)), what="run", resume=True, take_over=False)
    lease.release()


# ------------------------------------------------------------------------------------------ the CLIs


def test_grid_on_a_held_s3_run_is_refused_before_anything_runs(s3_server, capsys):
    held = L.hold(s3_server.uri("runs", "r"), what="run 'r'", resume=False, take_over=False)
    try:
        with pytest.raises(SystemExit) as exc:
            grid_main(["--storage", s3_server.uri("runs"), "--name", "r", "--resume"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err and "is held by host" in err and "--take-over" in err
    finally:
        held.release()
    assert s3_server.keys("runs/") == []


def test_a_search_on_a_study_another_run_drives_is_refused(tmp_path, capsys):
    """Two runs (different --name) on one study in a shared database: the second is refused."""
    import optuna

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    storage = optuna.storages.RDBStorage(url)
    held = L.DriverLease()
    held.acquire(L.StudyBackend(storage, "shared", url), what="study", resume=False, take_over=False)
    try:
        with pytest.raises(SystemExit) as exc:
            search_main(
                [
                    "--storage",
                    str(tmp_path / "runs"),
                    "--name",
                    "other",
                    "--study",
                    "shared",
                    "--optuna-storage",
                    url,
                ]
            )
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "study 'shared' is held by host" in err and f"pid {os.getpid()}" in err
    finally:
        held.release()
    assert not (tmp_path / "runs" / "other" / L.LEASE_FILE).exists(), "the run's lease is given back"


TINY = {
    "epochs": 30,
    "z_dim": 4,
    "ebm_width": 8,
    "gen_width": 2,
    "prior_steps": 2,
    "posterior_steps": 2,
    "num_train": 64,
    "num_val": 32,
    "batch_size": 16,
    "eval_every": 0,
    "sample_every": 0,
}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_grid_drivers_one_second_apart(tmp_path):
    """Both used to run and mix the run directory; now the later one to take the lease exits 2 naming
    the other, and nothing of it reaches the run."""
    grid = tmp_path / "g.json"
    grid.write_text(
        json.dumps({"preset": "digits", "base": TINY, "repetitions": 1, "cells": [{"name": "c"}]})
    )
    args = [sys.executable, "-m", "sweep.grid", "--grid", str(grid), "--storage", str(tmp_path / "runs")]
    args += ["--name", "run", "--compile-cache", "none"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    logs = [(tmp_path / f"driver{i}.log").open("w") for i in range(2)]
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=logs[0], stderr=subprocess.STDOUT)
    time.sleep(1)
    second = subprocess.Popen(args, cwd=ROOT, env=env, stdout=logs[1], stderr=subprocess.STDOUT)
    drivers = [first, second]
    started = []
    try:
        deadline = time.time() + 300
        while all(d.poll() is None for d in drivers):
            assert time.time() < deadline, "neither driver was refused within 300 s"
            time.sleep(0.2)
        refused = next(i for i, d in enumerate(drivers) if d.poll() is not None)
        other = drivers[1 - refused]
        assert drivers[refused].returncode == 2
        text = (tmp_path / f"driver{refused}.log").read_text()
        assert f"is held by host {socket.gethostname()}, pid {other.pid}, started" in text, text[-2000:]
        assert "Traceback" not in text
        holder = json.loads((tmp_path / "runs" / "run" / L.LEASE_FILE).read_text())
        assert holder["pid"] == other.pid
    finally:
        for d in drivers:
            started += descendants(d.pid)
            if d.poll() is None:
                d.send_signal(signal.SIGKILL)
                d.wait()
        kill_all(started)
