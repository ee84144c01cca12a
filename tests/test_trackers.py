"""Trackers: the --tracker flag and its refusals, the epoch filter, an MLflow run continued by a new driver,
and (slow) a sweep whose TensorBoard files, MLflow store and W&B offline runs are read back with each
tool's own reader and compared with the Parquet rows."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _wandb_files import read_run

from model.config import get_preset
from sweep import grid, trackers
from sweep.trackers import epoch_readings, is_epoch_result, parse_tracker, wandb_run_id
from sweep.trainable import trial_spec

ROOT = Path(__file__).resolve().parents[1]


def need(module: str, extra: str) -> None:
    """Skip, naming the extra, when an optional tracker package is missing (CI's .[dev] has them all)."""
    pytest.importorskip(module, reason=f"needs {module}: pip install -e '.[{extra}]' (or '.[dev]')")


def test_parse_tracker() -> None:
    assert parse_tracker("mlflow") == trackers.Tracker("mlflow", None)
    assert parse_tracker("mlflow=http://h:5000") == trackers.Tracker("mlflow", "http://h:5000")
    assert parse_tracker("wandb=my-proj") == trackers.Tracker("wandb", "my-proj")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tracker", "comet"], "'comet': use mlflow[=TRACKING_URI] or wandb[=PROJECT]"),
        (["--tracker", "wandb="], "give a value after '='"),
        (["--tracker", "mlflow", "--storage", "s3://bucket/runs"], "pass --tracker mlflow=TRACKING_URI"),
        (["--tracker", "wandb", "--tracker", "wandb=x"], "--tracker wandb is given 2 times"),
        (["--progress-every-s", "-2"], "--progress-every-s -2 must be >= 0"),
    ],
)
def test_bad_watch_flags_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        grid.main(["--dry-run", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_missing_extra_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "wandb" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(SystemExit) as exit_info:
        grid.main(["--dry-run", "--tracker", "wandb"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--tracker wandb needs the wandb extra, which is not installed: " in err
    assert "pip install 'thermosweep[wandb]'" in err


def test_wandb_run_ids_are_stable_and_safe() -> None:
    assert wandb_run_id("digits-1", "thermo-r0") == "digits-1-thermo-r0"
    odd = wandb_run_id("run", "thermo-p0.3-r0")  # '.' is replaced, so a hash keeps ids apart
    assert odd == wandb_run_id("run", "thermo-p0.3-r0") != wandb_run_id("run", "thermo-p0_3-r0")
    assert odd.startswith("run-thermo-p0_3-r0-") and len(wandb_run_id("r" * 300, "t")) == 64


def test_only_epoch_results_are_tracked() -> None:
    readings = {"epoch": 2, "train_loss": 1.5, "kid_rbf_inf": float("nan"), "ti_temps": [0.0, 1.0]}
    result = {"epoch": 2, "train_loss": 1.5, "readings_json": json.dumps(readings), "devices": 1}
    assert is_epoch_result(result)
    assert epoch_readings(result) == {"epoch": 2.0, "train_loss": 1.5}  # no NaN, no lists, no bookkeeping
    assert not is_epoch_result({"epoch": 1, "error": "DivergenceError: ...", "fatal": True})


class FakeTrial:
    """What the callbacks read of a Tune trial: its id, config and local directory (hashable by identity,
    like Tune's Trial)."""

    def __init__(self, trial_id: str, config: dict, local_path: str) -> None:
        self.trial_id, self.config, self.local_path = trial_id, config, local_path


def _epoch_result(epoch: int, loss: float) -> dict:
    readings = {"epoch": epoch, "train_loss": loss, "grad_var": 0.5 * epoch}
    return {**readings, "readings_json": json.dumps(readings), "training_iteration": epoch}


def test_mlflow_run_is_continued_by_a_new_driver(tmp_path: Path) -> None:
    need("mlflow", "mlflow")
    from mlflow import MlflowClient

    from sweep.tracker_callbacks import TrialMLflowCallback

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = get_preset("digits", seed=3)
    spec = {"trial": trial_spec(config, trial_id="cell-r1", cell="cell", repetition=1, grid="g")}

    first = TrialMLflowCallback(uri, run="r")
    first.setup()
    trial = FakeTrial("ray0001", spec, str(tmp_path))
    first.log_trial_start(trial)
    first.log_trial_result(1, trial, _epoch_result(1, 10.0))
    first.log_trial_result(2, trial, {"epoch": 1, "error": "not an epoch"})  # ignored
    # the driver dies here, after the trial trained epoch 2 but before it heard of it; a new driver (a
    # resumed run) restores the trial as a new object, whose first result carries epochs 1-2
    second = TrialMLflowCallback(uri, run="r")
    second.setup()
    again = FakeTrial("ray0001", spec, str(tmp_path))
    second.log_trial_start(again)
    restored = [json.loads(_epoch_result(e, loss)["readings_json"]) for e, loss in ((1, 10.0), (2, 8.0))]
    third = {**_epoch_result(3, 7.0), "restored_history_json": json.dumps(restored)}
    second.log_trial_result(3, again, third)
    second.log_trial_end(again)

    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "r"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "cell-r1" and run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["trial_id"], tags["cell"], tags["repetition"], tags["seed"], tags["run"]) == (
        "cell-r1",
        "cell",
        "1",
        "3",
        "r",
    )
    assert run.data.params["seed"] == "3" and run.data.params["batch_size"] == str(config.batch_size)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 10.0), (2, 8.0), (3, 7.0)]  # none twice


# ------------------------------------------------------------------------------------- end to end (Ray)

TINY_BASE = {
    "epochs": 2,
    "z_dim": 4,
    "ebm_width": 8,
    "gen_width": 1,
    "prior_steps": 2,
    "posterior_steps": 2,
    "num_train": 64,
    "num_val": 48,
    "batch_size": 16,
    "num_temps": 3,
    "eval_every": 2,
    "eval_num_min": 16,
    "eval_num_max": 48,
    "eval_num_points": 3,
    "sample_every": 0,
    "val_ll_examples": 4,
    "val_ll_temps": 5,
    "val_ll_chains": 2,
    "val_ll_prior_chains": 8,
    "grad_noise_draws": 2,
}
CELLS = [
    {"name": "vanilla", "objective": "vanilla"},
    {"name": "thermo", "objective": "thermo", "temp_power": 1},
]


def _numeric(row: pd.Series) -> dict[str, float]:
    """The finite numbers of an epochs.parquet row that came from the trial's readings."""
    skip = {"repetition", "seed", "run", "trial_id", "cell"}
    return {
        k: float(v)
        for k, v in row.items()
        if k not in skip
        and isinstance(v, int | float | np.number)
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_trackers_hold_the_parquet_readings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for module, extra in (("mlflow", "mlflow"), ("wandb", "wandb"), ("tensorboard", "dev")):
        need(module, extra)
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    grid_file = tmp_path / "tiny.json"
    grid_file.write_text(
        json.dumps({"preset": "digits", "base": TINY_BASE, "repetitions": 1, "cells": CELLS})
    )
    storage = tmp_path / "runs"
    argv = ["--grid", str(grid_file), "--storage", str(storage), "--name", "tracked"]
    argv += ["--tracker", "mlflow", "--tracker", "wandb=tiny", "--progress-every-s", "0.01"]
    assert grid.main(argv) == 0
    out = capsys.readouterr().out
    run_dir = storage / "tracked"
    epochs = pd.read_parquet(run_dir / "results" / "epochs.parquet")
    assert len(epochs) == 4
    last = epochs[epochs["epoch"] == 2].set_index("trial_id")
    assert np.isfinite(last["kid_rbf_inf"]).all() and np.isfinite(last["val_ll"]).all()
    assert np.isfinite(last.loc["thermo-r0", "grad_var_ebm"])

    # under Tune's table, the driver's progress block (its subclass of CLIReporter ran in a real Tune run)
    assert "grid: 0/2 trials ended," in out
    # the closing summary: each cell's mean seconds per epoch
    assert "s/epoch" in out
    for cell in ("vanilla", "thermo"):
        mean = epochs[epochs["cell"] == cell]["epoch_time_s"].mean()
        row = [line for line in out.splitlines() if line.startswith(cell + " ")][-1]
        assert row.split()[-1] == f"{mean:.3g}"

    # progress: each trial's side file holds its last report of its last epoch
    for trial_id in ("vanilla-r0", "thermo-r0"):
        report = json.loads((run_dir / "progress" / f"{trial_id}.json").read_text())
        assert (report["trial_id"], report["epochs"], report["steps"]) == (trial_id, 2, 4)

    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "tracked"]
    runs = {r.data.tags["trial_id"]: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["thermo-r0", "vanilla-r0"]

    wandb_runs = [read_run(p) for p in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))]
    assert len(wandb_runs) == 2
    by_name = {r["name"]: r for r in wandb_runs}
    assert sorted(by_name) == ["thermo-r0", "vanilla-r0"]

    for trial_id, rows in epochs.groupby("trial_id"):
        events = EventAccumulator(str(run_dir / trial_id), size_guidance={"scalars": 0})
        events.Reload()
        run = runs[trial_id]
        assert run.info.status == "FINISHED" and run.data.tags["cell"] == rows["cell"].iloc[0]
        w = by_name[trial_id]
        assert w["group"] == "tracked" and "cell=" + rows["cell"].iloc[0] in w["tags"]
        assert sorted(w["history"]) == [1, 2]  # step = epoch, one row per epoch
        for _, row in rows.iterrows():
            epoch = int(row["epoch"])
            readings = _numeric(row)
            assert {"train_loss", "grad_var", "grad_var_ebm", "grad_var_gen"} <= set(readings)
            if epoch == 2:
                assert {"kid_rbf_inf", "fid_inf", "val_ll"} <= set(readings)
            for name, value in readings.items():
                tb = [e for e in events.Scalars(f"ray/tune/{name}") if e.step == epoch]
                assert len(tb) == 1 and tb[0].value == pytest.approx(value, rel=1e-6), (trial_id, name)
                ml = [m.value for m in client.get_metric_history(run.info.run_id, name) if m.step == epoch]
                assert ml == [value], (trial_id, name, epoch)
                assert w["history"][epoch][name] == value, (trial_id, name, epoch)
                if epoch == 2:
                    assert w["summary"][name] == value, (trial_id, name)


def _wandb_run_started(run_dir: Path) -> bool:
    """Whether a W&B run has begun: wandb.init makes its directory at once (the run file is buffered)."""
    return any((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_resumed_trial_continues_its_tracker_runs(tmp_path: Path) -> None:
    """SIGKILL the driver after a trial's first checkpoint, resume, and find one MLflow run per trial
    holding every epoch, and W&B runs of both drivers under one run id."""
    need("mlflow", "mlflow")
    need("wandb", "wandb")
    from _procs import descendants, kill_all
    from mlflow import MlflowClient
    from test_sweep import _checkpoint_in_experiment_state

    # long enough (30 epochs of 64 steps) for the first driver's W&B run to begin before the kill
    epochs = 30
    base = {**TINY_BASE, "epochs": epochs, "eval_every": 0, "num_train": 1024, "posterior_steps": 10}
    grid_file = tmp_path / "resume.json"
    cells = [{"name": "vanilla", "objective": "vanilla"}]
    grid_file.write_text(json.dumps({"preset": "digits", "base": base, "repetitions": 1, "cells": cells}))
    storage = tmp_path / "runs"
    args = [sys.executable, "-m", "sweep.grid", "--grid", str(grid_file), "--storage", str(storage)]
    args += ["--name", "resumed", "--tracker", "mlflow", "--tracker", "wandb=tiny"]
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "TUNE_GLOBAL_CHECKPOINT_S": "0",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    run_dir = storage / "resumed"
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    started: list = []
    try:
        deadline = time.time() + 300
        # kill once a checkpoint can be resumed and the first driver's W&B run has begun
        while not (_checkpoint_in_experiment_state(run_dir) and _wandb_run_started(run_dir)):
            assert driver.poll() is None, "the driver ended before the first checkpoint"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        started = descendants(driver.pid)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
        kill_all(started + descendants(driver.pid))
    resume = [*args, "--resume"]
    done = subprocess.run(resume, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, (tmp_path / "driver.log").read_text()[-3000:]

    table = pd.read_parquet(run_dir / "results" / "epochs.parquet").set_index("epoch")
    assert sorted(table.index) == list(range(1, epochs + 1))
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "resumed"]
    (run,) = client.search_runs([experiment.experiment_id])  # one run, continued
    assert run.info.status == "FINISHED"
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert logged == table["train_loss"].to_dict()
    # one W&B run, begun by each driver: `offline-run-<time>-<run id>`, the same id twice
    run_id = wandb_run_id("resumed", "vanilla-r0")
    sessions = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(d.name.endswith(f"-{run_id}") for d in sessions)
    # the killed driver's file may be cut short (W&B buffers it); what it holds and the resumed one's
    runs = [read_run(p) for p in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))]
    assert {r["id"] for r in runs if "id" in r} == {run_id}
    steps = {s for r in runs for s in r["history"]}
    assert steps == set(range(1, epochs + 1))
    assert runs[-1]["summary"]["train_loss"] == table.loc[epochs, "train_loss"]
