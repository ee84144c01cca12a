"""The cluster path run for real, on a tiny model: storage on a local S3 server (moto's, reached only
through the standard AWS environment), drivers SIGKILLed in the middle of an epoch and resumed from
another working directory, mid-epoch checkpoints (`--checkpoint-every-s`), and a search whose Optuna
database lives beside the driver. Every run must end with exactly the rows and parameters of an
uninterrupted run. Each test stops only the processes it started."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest
from _procs import descendants, kill_all

from sweep.grid import main

ROOT = Path(__file__).resolve().parents[1]
# One trial of 3 epochs of 768 steps each (batch 2): an epoch lasts seconds (6 s on an idle 2-core
# machine), so a kill lands inside one.
LONG = {
    "epochs": 3,
    "z_dim": 4,
    "ebm_width": 8,
    "gen_width": 2,
    "prior_steps": 30,
    "posterior_steps": 30,
    "num_train": 4608,  # epochs of ~7 s on a quiet 2-core machine: time to kill one mid-epoch
    "num_val": 32,
    "batch_size": 2,
    "eval_every": 0,
    "sample_every": 0,
}
TRIAL = "v-r0"
TIMING_COLUMNS = {"epoch_time_s", "eval_time_s", "val_ll_time_s", "grad_noise_time_s", "run"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def write_grid(path: Path) -> str:
    cells = [{"name": "v", "objective": "vanilla"}]
    path.write_text(json.dumps({"preset": "digits", "base": LONG, "repetitions": 1, "cells": cells}))
    return str(path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("jax-cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cache: str) -> Path:
    """The grid run once, uninterrupted, on local storage, without mid-epoch checkpoints."""
    root = tmp_path_factory.mktemp("ref")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    grid = write_grid(root / "long.json")
    assert main(["--grid", grid, "--storage", str(root), "--name", "ref", "--compile-cache", cache]) == 0
    return root / "ref"


def driver_env() -> dict[str, str]:
    """The environment of a driver started from anywhere: this checkout importable, local Ray without
    auth, Tune's experiment snapshot written on every step (so a kill finds the newest checkpoint)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "RAY_AUTH_MODE": "disabled",
        "TUNE_GLOBAL_CHECKPOINT_S": "0",
    }


def s3_json(s3, key: str):
    try:
        return json.loads(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    except Exception:  # noqa: BLE001 - not there yet, or being replaced
        return None


def newest_known_checkpoint(s3, run: str) -> int | None:
    """The highest checkpoint index in Tune's experiment snapshot on S3 (None before the first)."""
    best = None
    for key in s3.keys(f"runs/{run}/experiment_state-"):
        state = s3_json(s3, key)
        if not state:
            continue
        for _, runtime in state["trial_data"]:
            manager = json.loads(runtime).get("checkpoint_manager", {})
            # Tune stores the manager as hex of its pickle; the bytes are searched, never unpickled.
            found = [
                int(i) for i in re.findall(rb"checkpoint_(\d{6})", bytes.fromhex(manager.get("value", "")))
            ]
            if found:
                best = max(found + ([best] if best is not None else []))
    return best


def partial_meta(s3, run: str, index: int) -> dict | None:
    """trial.json of checkpoint `index` if it is a mid-epoch checkpoint, else None."""
    meta = s3_json(s3, f"runs/{run}/{TRIAL}/checkpoint_{index:06d}/trial.json")
    return meta if meta and "partial_step" in meta else None


def partial_metas(s3, run: str) -> list[dict]:
    """trial.json of every mid-epoch checkpoint of the trial now on S3."""
    keys = s3.keys(f"runs/{run}/{TRIAL}/checkpoint_")
    partial = [k.rsplit("/", 2)[1] for k in keys if k.endswith("/partial.npz")]
    metas = [s3_json(s3, f"runs/{run}/{TRIAL}/{name}/trial.json") for name in partial]
    return [m for m in metas if m and "partial_step" in m]


def read_s3(s3, run: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run's two tables, each one version of its file though the driver may be rewriting it
    (`analysis.remote.read_parquet`; pandas' own reader can tear a read across two versions)."""
    from analysis.remote import RemotePath, read_parquet

    return (
        read_parquet(RemotePath(s3.uri("runs", run, "results", "trials.parquet"))),
        read_parquet(RemotePath(s3.uri("runs", run, "results", "epochs.parquet"))),
    )


def assert_rows_equal(epochs: pd.DataFrame, reference: Path) -> None:
    ref = pd.read_parquet(reference / "results" / "epochs.parquet")
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    key = ["trial_id", "epoch"]
    ours = epochs.sort_values(key).reset_index(drop=True)
    theirs = ref.sort_values(key).reset_index(drop=True)
    columns = [c for c in theirs.columns if c not in TIMING_COLUMNS]
    assert len(ours) == len(theirs) == LONG["epochs"]
    pd.testing.assert_frame_equal(ours[columns], theirs[columns], check_exact=True)


def final_state(trials: pd.DataFrame, where: Path, scheme: str = ""):
    """The train state in the final checkpoint of the one trial of `trials` (its `checkpoint` column: a
    local path, or a bucket path with `scheme` s3://), restored with Orbax."""
    import pyarrow.fs as pafs

    from model.config import ExperimentConfig
    from model.loop import init_state
    from sweep.checkpoint import TrialCheckpointer
    from sweep.storage import filesystem_for

    (row,) = trials.to_dict("records")
    fs, path = filesystem_for(scheme + row["checkpoint"])
    pafs.copy_files(path, str(where), source_filesystem=fs)
    config = ExperimentConfig(**json.loads(row["config_json"]))
    with TrialCheckpointer() as ckpt:
        state, _, _ = ckpt.restore(where, init_state(config))
    return state


def assert_same_parameters(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_s3_grid_killed_mid_epoch_resumes_bit_exactly(
    s3_server, reference: Path, cache: str, tmp_path: Path
) -> None:
    """Storage on S3, mid-epoch checkpoints every 0.5 s: the driver is SIGKILLed while Tune's newest
    checkpoint is a mid-epoch one; `--resume` from another working directory continues that epoch at its
    next step and ends with the rows and final parameters of the uninterrupted local run, bit for bit."""
    storage = s3_server.uri("runs")
    grid = write_grid(tmp_path / "long.json")
    common = [
        "--storage",
        storage,
        "--name",
        "killed",
        "--compile-cache",
        cache,
        "--checkpoint-every-s",
        "0.5",
    ]
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    log_path = tmp_path / "driver.log"
    log = log_path.open("w")
    cmd = [sys.executable, "-m", "sweep.grid"]
    driver = subprocess.Popen(
        [*cmd, "--grid", grid, *common], cwd=first, env=driver_env(), stdout=log, stderr=subprocess.STDOUT
    )
    started: list = []
    try:
        deadline = time.time() + 400
        while True:
            newest = newest_known_checkpoint(s3_server, "killed")
            if newest is not None and partial_meta(s3_server, "killed", newest):
                break
            assert driver.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "no mid-epoch checkpoint in Tune's snapshot within 400 s"
            time.sleep(0.1)
        started = descendants(driver.pid)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
        kill_all(started + descendants(driver.pid))
    killed_at = log_path.stat().st_size

    code = subprocess.run(
        [*cmd, *common, "--resume"],
        cwd=second,
        env=driver_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        timeout=600,
    ).returncode
    resumed = log_path.read_text()[killed_at:]
    assert code == 0, resumed[-3000:]
    assert re.search(rf"\[{TRIAL}\] resumed in epoch \d after step \d+", resumed), resumed[-3000:]

    trials, epochs = read_s3(s3_server, "killed")
    assert trials["status"].tolist() == ["TERMINATED"]
    assert_rows_equal(epochs, reference)
    ref_trials = pd.read_parquet(reference / "results" / "trials.parquet")
    ours = final_state(trials, tmp_path / "ours", scheme="s3://")
    theirs = final_state(ref_trials, tmp_path / "theirs")
    assert_same_parameters(ours, theirs)
    assert not list(first.iterdir()) and not list(second.iterdir()), "nothing written beside the driver"


def test_s3_search_killed_reaches_its_trials(s3_server, cache: str, tmp_path: Path) -> None:
    """A search on S3 storage with its Optuna database beside the driver (local SQLite): SIGKILLed once a
    trial is COMPLETE and another RUNNING, `--resume` reaches --trials COMPLETE trials, and the study and
    the Parquet rows on S3 agree (same p, eta, final KID; one row per trial and epoch)."""
    import optuna
    from test_search import TINY_SET, _states

    from sweep.search import main as search

    db = tmp_path / "optuna.db"
    args = [
        "--trials",
        "4",
        "--epochs",
        "1",
        "--max-concurrent",
        "2",
        "--storage",
        s3_server.uri("runs"),
        "--optuna-storage",
        f"sqlite:///{db}",
        "--name",
        "search",
        "--compile-cache",
        cache,
        *TINY_SET,
    ]
    log = (tmp_path / "driver.log").open("w")
    cmd = [sys.executable, "-m", "sweep.search", *args]
    driver = subprocess.Popen(cmd, cwd=tmp_path, env=driver_env(), stdout=log, stderr=subprocess.STDOUT)
    started: list = []
    try:
        deadline = time.time() + 400
        while not {"COMPLETE", "RUNNING"} <= set(_states(db)):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.time() < deadline, "no COMPLETE and RUNNING trial within 400 s"
            time.sleep(0.1)
        started = descendants(driver.pid)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
        kill_all(started + descendants(driver.pid))

    assert search([*args, "--resume"]) == 0
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{db}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4
    trials, epochs = read_s3(s3_server, "search")
    assert not trials.duplicated("trial_id").any() and not epochs.duplicated(["trial_id", "epoch"]).any()
    rows = trials.set_index("optuna_trial")
    for t in done:
        row = rows.loc[t.number]
        assert row["status"] == "TERMINATED" and row["optuna_state"] == "COMPLETE"
        assert row["temp_power"] == t.params["p"] and row["kl_weight"] == t.params["eta"]
        last = epochs[(epochs["trial_id"] == row["trial_id"]) & (epochs["epoch"] == 1)]
        assert len(last) == 1 and last["kid_rbf_inf"].iloc[0] == t.value == row["search_value"]
    interrupted = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert interrupted, "the kill was meant to interrupt a running trial"
    for t in interrupted:  # ERROR in Parquet if the driver had written its row
        if t.number in rows.index:
            assert rows.loc[t.number, "status"] == "ERROR"


class RayNodes:
    """A Ray head and worker nodes as separate `ray start --block` processes on 127.0.0.1, each with its
    own CPUs, temp dir (short: Unix socket paths are limited) and free ports. `stop()` ends every process
    of these nodes, found by their pids and by their temp dirs in command lines, and nothing else."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.address = ""

    def start(self, name: str, cpus: int) -> None:
        from _s3 import _free_port

        temp = self.root / name
        temp.mkdir()
        ports = [
            "--node-manager-port",
            "--object-manager-port",
            "--runtime-env-agent-port",
            "--dashboard-agent-grpc-port",
            "--dashboard-agent-listen-port",
            "--metrics-export-port",
        ]
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--disable-usage-stats"]
        cmd += ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus), "--temp-dir", str(temp)]
        cmd += ["--object-store-memory", str(100 * 2**20), "--min-worker-port", "0", "--max-worker-port", "0"]
        for flag in ports:
            cmd += [flag, str(_free_port())]
        if not self.procs:
            port = _free_port()
            cmd += ["--head", "--port", str(port), "--include-dashboard", "false"]
            cmd += ["--ray-client-server-port", str(_free_port())]
            self.address = f"127.0.0.1:{port}"
        else:
            cmd += ["--address", self.address]
        log = (self.root / f"{name}.log").open("w")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def mine(self) -> list:
        """Every live process of these nodes."""
        import psutil

        found = {p.pid: p for proc in self.procs.values() for p in descendants(proc.pid)}
        for p in psutil.process_iter(["cmdline"]):
            if str(self.root) in " ".join(p.info["cmdline"] or []):
                found.setdefault(p.pid, p)
        for proc in self.procs.values():
            if proc.poll() is None:
                found.setdefault(proc.pid, psutil.Process(proc.pid))
        return list(found.values())

    def running_trial(self) -> str | None:
        """The worker node whose processes include a trial (Ray names it ray::ImplicitFunc)."""
        for name, proc in self.procs.items():
            if any("ImplicitFunc" in " ".join(p.cmdline()) for p in _alive(descendants(proc.pid))):
                return name
        return None

    def raylet(self, name: str):
        (raylet,) = [p for p in _alive(descendants(self.procs[name].pid)) if p.name() == "raylet"]
        return raylet

    def trial_output(self) -> str:
        """What the trial processes of every node printed, from the nodes' own worker logs (the driver
        shows a copy that Ray's log monitors forward, which can miss lines around a node's loss)."""
        return "".join(
            p.read_text(encoding="utf-8", errors="replace")
            for p in sorted(self.root.glob("*/session_*/logs/worker-*.out"))
        )

    def stop(self) -> None:
        import shutil

        kill_all(self.mine())
        for proc in self.procs.values():
            proc.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(procs: list) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            p.cmdline()
            out.append(p)
        except psutil.Error:
            pass
    return out


def test_a_lost_node_resumes_on_another_from_its_s3_checkpoint(
    s3_server, reference: Path, cache: str, tmp_path: Path
) -> None:
    """A head (no CPUs) and two one-CPU worker nodes, separate `ray start` processes sharing nothing but
    the S3 storage; the grid's trial runs on one worker; its raylet is SIGKILLed mid-epoch. The driver
    says the trial lost its node, and with --max-failures 0 (a lost node does not count) the trial
    resumes on the other worker from its mid-epoch checkpoint in S3: rows complete, unique, equal to an
    uninterrupted run, and the same final parameters."""
    import tempfile

    env = {
        **driver_env(),
        "RAY_worker_niceness": "0",
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }
    nodes = RayNodes(Path(tempfile.mkdtemp(prefix="ts-", dir="/tmp")), env)
    log_path = tmp_path / "driver.log"
    driver = None
    try:
        nodes.start("head", cpus=0)
        time.sleep(3)  # the head's GCS listens before the workers join
        nodes.start("w1", cpus=1)
        nodes.start("w2", cpus=1)
        grid = write_grid(tmp_path / "long.json")
        cmd = [sys.executable, "-m", "sweep.grid", "--grid", grid, "--storage", s3_server.uri("runs")]
        cmd += ["--name", "nodes", "--address", nodes.address, "--max-failures", "0"]
        cmd += ["--checkpoint-every-s", "1", "--compile-cache", cache]
        log = log_path.open("w")
        driver = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 400

        def wait(what: str) -> None:
            assert driver.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, f"{what} within 400 s"
            time.sleep(0.1)

        def first_node() -> str | None:
            """The node named by the trial's row once its first epoch is in both tables, else None
            (epochs.parquet is put before trials.parquet, so one can exist without the other)."""
            if not (
                s3_server.keys("runs/nodes/results/epochs.parquet")
                and s3_server.keys("runs/nodes/results/trials.parquet")
            ):
                return None
            trials, epochs = read_s3(s3_server, "nodes")
            if epochs.empty or trials.empty or trials["node_id"].isna().any():
                return None
            (node,) = trials["node_id"].tolist()
            return node

        while (before := first_node()) is None:
            wait("no epoch row")  # the first epoch is done: its row names the trial's node
        lost = nodes.running_trial()
        assert lost in ("w1", "w2"), "the trial runs on a worker node"
        steps = LONG["num_train"] // LONG["batch_size"]
        while not any(
            m["epoch"] >= 1 and m["partial_step"] < steps // 2 for m in partial_metas(s3_server, "nodes")
        ):
            wait("no mid-epoch checkpoint early in epoch 2 or 3")
        nodes.raylet(lost).kill()  # SIGKILL: the node is gone mid-epoch
        assert driver.wait(timeout=600) == 0, log_path.read_text()[-3000:]
        trial_output = nodes.trial_output()
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        nodes.stop()
    text = log_path.read_text()
    assert re.search(rf"trial {TRIAL} lost its node .*does not count against --max-failures", text), text[
        -3000:
    ]
    resumed = re.findall(rf"\[{TRIAL}\] resumed [^\n]*", trial_output)
    assert resumed and re.fullmatch(rf"\[{TRIAL}\] resumed in epoch \d after step \d+", resumed[0]), resumed
    trials, epochs = read_s3(s3_server, "nodes")
    assert trials["status"].tolist() == ["TERMINATED"]
    assert trials["node_id"].iloc[0] != before, "the trial finished on the other worker"
    assert_rows_equal(epochs, reference)
    ref_trials = pd.read_parquet(reference / "results" / "trials.parquet")
    assert_same_parameters(
        final_state(trials, tmp_path / "ours", scheme="s3://"), final_state(ref_trials, tmp_path / "ref")
    )
