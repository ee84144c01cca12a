"""End-to-end sweeps on local Ray with a tiny model: results tables, kill-and-resume equality, two CPU
devices per trial, and a two-node Ray cluster on one machine. Every test stops the Ray it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _procs import descendants, kill_all

from model.schema import EPOCH_COLUMNS, TRIAL_COLUMNS
from sweep.grid import main

ROOT = Path(__file__).resolve().parents[1]
TINY_BASE = {
    "epochs": 2,
    "z_dim": 4,
    "ebm_width": 8,
    "gen_width": 2,
    "prior_steps": 2,
    "posterior_steps": 2,
    "num_train": 64,
    "num_val": 32,
    "batch_size": 16,
    "eval_every": 0,
    "sample_every": 2,
    "num_temps": 3,
}
TIMING_COLUMNS = {"epoch_time_s", "eval_time_s", "val_ll_time_s", "grad_noise_time_s"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def write_grid(path: Path, cells: list[dict], repetitions: int = 2, **base) -> str:
    path.write_text(
        json.dumps(
            {"preset": "digits", "base": {**TINY_BASE, **base}, "repetitions": repetitions, "cells": cells}
        )
    )
    return str(path)


TINY_CELLS = [
    {"name": "vanilla", "objective": "vanilla"},
    {"name": "thermo", "objective": "thermo", "temp_power": 0.5},
]


@pytest.fixture(scope="module")
def sweep_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for drivers: local Ray without auth, and one compilation cache shared by the tests."""
    cache = tmp_path_factory.mktemp("jax-cache")
    return {"RAY_AUTH_MODE": "disabled", "cache": str(cache)}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, sweep_env: dict[str, str]) -> Path:
    """The tiny grid (2 cells x 2 repetitions x 2 epochs) run once, uninterrupted, in this process."""
    root = tmp_path_factory.mktemp("ref")
    grid = write_grid(root / "tiny.json", TINY_CELLS)
    code = main(
        [
            "--grid",
            grid,
            "--storage",
            str(root / "runs"),
            "--name",
            "ref",
            "--compile-cache",
            sweep_env["cache"],
        ]
    )
    assert code == 0
    return root / "runs" / "ref"


def read(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (
        pd.read_parquet(run_dir / "results" / "trials.parquet"),
        pd.read_parquet(run_dir / "results" / "epochs.parquet"),
    )


def test_tiny_grid_end_to_end(reference_run: Path) -> None:
    trials, epochs = read(reference_run)
    assert list(trials.columns[: len(TRIAL_COLUMNS)]) == list(TRIAL_COLUMNS)
    assert list(epochs.columns[: len(EPOCH_COLUMNS)]) == list(EPOCH_COLUMNS)
    assert len(trials) == 4 and len(epochs) == 8
    assert set(trials["trial_id"]) == {"vanilla-r0", "vanilla-r1", "thermo-r0", "thermo-r1"}
    assert (trials["status"] == "TERMINATED").all() and trials["error"].isna().all()
    assert (trials["epochs_completed"] == 2).all() and (trials["devices"] == 1).all()
    assert trials.set_index("trial_id").loc["thermo-r1", "seed"] == 1
    vanilla = trials[trials["objective"] == "vanilla"]
    assert vanilla["temp_power"].isna().all() and vanilla["num_temps"].isna().all()
    assert (trials[trials["objective"] == "thermo"]["temp_power"] == 0.5).all()
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert np.isfinite(epochs["grad_var"]).all() and (epochs["grad_var"] > 0).all()
    assert epochs["kid_rbf_inf"].isna().all()  # eval_every=0: not evaluated
    thermo = trials[trials["objective"] == "thermo"]
    assert (thermo["ebm_gradient"] == "chains").all() and vanilla["ebm_gradient"].isna().all()
    # the TI curve of every thermo epoch, through Ray's reporting into Parquet list columns
    by_trial = epochs.set_index("trial_id")
    curves = by_trial.loc[list(thermo["trial_id"]), "ti_expected_loglik"]
    assert all(len(c) == 3 for c in curves)
    assert by_trial.loc[list(vanilla["trial_id"]), "ti_temps"].isna().all()
    assert np.isfinite(by_trial.loc[list(thermo["trial_id"]), "kl_identity_error"]).all()
    assert json.loads(trials["config_json"].iloc[0])["z_dim"] == 4
    for trial_id in trials["trial_id"]:
        assert (reference_run / "samples" / trial_id / "epoch_0002.png").is_file()
        assert sorted(p.name for p in (reference_run / trial_id).glob("checkpoint_*")) == [
            "checkpoint_000000",
            "checkpoint_000001",
        ]


def _checkpoint_in_experiment_state(run_dir: Path) -> bool:
    """True once Tune's experiment snapshot has a checkpoint in a trial's checkpoint manager (a resume can
    then continue that trial). The checkpoint's name in the trial's last result is not enough: a snapshot
    can hold the result before the checkpoint is registered, and a resume from it starts over."""
    for path in run_dir.glob("experiment_state-*.json"):
        try:
            trials = json.loads(path.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):
            continue  # not yet written, or being rewritten
        for _, runtime in trials:
            manager = json.loads(runtime).get("checkpoint_manager", {})
            # Tune stores the manager as hex of its pickle; the bytes are searched, never unpickled.
            if b"checkpoint_000000" in bytes.fromhex(manager.get("value", "")):
                return True
    return False


def test_kill_and_resume_matches_uninterrupted(tmp_path: Path, sweep_env: dict[str, str]) -> None:
    """SIGKILL the driver mid-sweep, resume, and get exactly the epochs table of an uninterrupted run."""
    grid = write_grid(
        tmp_path / "kill.json",
        TINY_CELLS,
        repetitions=1,
        epochs=6,
        num_train=512,
        prior_steps=10,
        posterior_steps=10,
        sample_every=0,
    )
    storage = tmp_path / "runs"
    common = ["--grid", grid, "--storage", str(storage), "--compile-cache", sweep_env["cache"]]
    assert main([*common, "--name", "whole"]) == 0

    args = [sys.executable, "-m", "sweep.grid", *common, "--name", "killed"]
    # Tune snapshots its experiment state on every step, so the kill can land while a trial is mid-way.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    log_path = tmp_path / "driver.log"
    log = log_path.open("w")
    driver = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    run_dir = storage / "killed"
    started: list = []
    try:
        deadline = time.time() + 300
        while not _checkpoint_in_experiment_state(run_dir):
            assert driver.poll() is None, "the driver ended before the first checkpoint"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        started = descendants(driver.pid)
        driver.send_signal(signal.SIGKILL)  # the driver dies at once, mid-sweep
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
        kill_all(started + descendants(driver.pid))  # Ray's processes outlive a SIGKILLed driver
    trials, _ = read(run_dir)
    assert not (trials["status"] == "TERMINATED").all(), "the sweep was meant to be interrupted"
    killed_at = log_path.stat().st_size

    code = subprocess.run(
        [*args, "--resume"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=400
    ).returncode
    resumed_log = log_path.read_text()[killed_at:]
    assert code == 0, resumed_log[-3000:]
    assert "resumed after epoch" in resumed_log, "a trial should continue from its checkpoint"

    _, ref_epochs = read(storage / "whole")
    trials, epochs = read(run_dir)
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert len(trials) == 2 and (trials["status"] == "TERMINATED").all()
    key = ["trial_id", "epoch"]
    ours = epochs.sort_values(key).reset_index(drop=True)
    theirs = ref_epochs.sort_values(key).reset_index(drop=True)
    columns = [c for c in theirs.columns if c not in TIMING_COLUMNS | {"run"}]
    assert len(ours) == len(theirs) == 12
    pd.testing.assert_frame_equal(ours[columns], theirs[columns], check_exact=True)


def test_trial_with_two_cpu_devices(tmp_path: Path, reference_run: Path, sweep_env: dict[str, str]) -> None:
    grid = write_grid(tmp_path / "one.json", TINY_CELLS[:1], repetitions=1)
    code = main(
        [
            "--grid",
            grid,
            "--storage",
            str(tmp_path),
            "--name",
            "two",
            "--cpus-per-trial",
            "2",
            "--compile-cache",
            sweep_env["cache"],
        ]
    )
    assert code == 0
    trials, epochs = read(tmp_path / "two")
    assert trials["devices"].tolist() == [2] and trials["status"].tolist() == ["TERMINATED"]
    _, ref = read(reference_run)
    ref = ref[ref["trial_id"] == "vanilla-r0"].sort_values("epoch")
    for column in ("train_loss", "val_loss", "grad_var"):
        np.testing.assert_allclose(epochs.sort_values("epoch")[column], ref[column], rtol=2e-4)


def test_two_node_cluster_and_a_diverging_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sweep_env: dict[str, str]
) -> None:
    """Two single-CPU nodes run the two trials at once, one each; one trial diverges (a huge prior step
    size): it ends in ERROR with the reason in the `error` column, and the other still finishes."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_worker_niceness", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        cells = [
            {"name": "ok", "objective": "vanilla"},
            {"name": "boom", "objective": "vanilla", "prior_step_size": 1e20},
        ]
        grid = write_grid(tmp_path / "two.json", cells, repetitions=1, epochs=1)
        code = main(
            [
                "--grid",
                grid,
                "--storage",
                str(tmp_path),
                "--name",
                "nodes",
                "--address",
                cluster.address,
                "--max-failures",
                "1",
                "--compile-cache",
                sweep_env["cache"],
            ]
        )
        assert code == 0
    finally:
        cluster.shutdown()
    trials, epochs = read(tmp_path / "nodes")
    trials = trials.set_index("trial_id")
    assert trials.loc["ok-r0", "status"] == "TERMINATED" and trials.loc["boom-r0", "status"] == "ERROR"
    assert trials.loc["boom-r0", "error"].startswith("DivergenceError: ")
    assert "nan" in trials.loc["boom-r0", "error"] and pd.isna(trials.loc["ok-r0", "error"])
    assert epochs["trial_id"].tolist() == ["ok-r0"]
    assert trials["node_id"].nunique() == 2, "each node ran one trial"
