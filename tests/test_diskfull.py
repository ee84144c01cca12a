"""A full disk loses nothing: a grid whose storage (a small tmpfs the test mounts; drivers and trials share
it) fills up mid-run stops in one line (exit 1) with every file it wrote whole; once the volume is grown,
`--resume` finishes with the rows of an uninterrupted run. Needs root to mount: skipped elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest

from sweep.grid import main

ROOT = Path(__file__).resolve().parents[1]
TIMING_COLUMNS = {"epoch_time_s", "eval_time_s", "val_ll_time_s", "grad_noise_time_s", "run"}
TINY = {
    "epochs": 3,
    "z_dim": 4,
    "ebm_width": 8,
    "gen_width": 2,
    "prior_steps": 2,
    "posterior_steps": 2,
    "num_train": 64,
    "num_val": 32,
    "batch_size": 16,
    "eval_every": 0,
    "sample_every": 1,
    "num_temps": 3,
}
CELLS = [{"name": "vanilla", "objective": "vanilla"}, {"name": "thermo", "objective": "thermo"}]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 KiB tmpfs (root only; skipped elsewhere), unmounted at the end."""
    mnt = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    _mount(mnt, "64k")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_is_storage_full_reads_errors_chains_and_traces():
    from sweep.diskfull import is_storage_full

    assert is_storage_full(OSError(28, "No space left on device"))
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as inner:
            raise RuntimeError("could not persist the checkpoint") from inner
    except RuntimeError as outer:
        assert is_storage_full(outer)
    assert is_storage_full("OSError: [Errno 28] Error writing bytes to file.")
    assert is_storage_full("sqlite3.OperationalError: database or disk is full")
    assert not is_storage_full(OSError(5, "Input/output error"))
    assert not is_storage_full("DivergenceError: loss is nan")


def test_writes_on_a_full_disk_leave_the_old_file_whole(small_disk: Path):
    from sweep.checkpoint import write_json
    from sweep.results import ResultsTables
    from sweep.storage import write_bytes_uri, write_json_uri

    write_json_uri(str(small_disk / "sweep.json"), {"run": "r"})
    tables = ResultsTables(str(small_disk / "results"))
    tables.upsert_trial("t", run="r", status="RUNNING")
    tables.flush()
    before = {p: p.read_bytes() for p in small_disk.rglob("*") if p.is_file()}
    big = os.urandom(200_000)
    with pytest.raises(OSError):
        write_bytes_uri(str(small_disk / "sweep.json"), big)
    with pytest.raises(OSError):
        write_json(small_disk / "sweep.json", {"x": big.hex()})
    tables.upsert_trial("t", error=big.hex())
    with pytest.raises(OSError):
        tables.flush()
    after = {p: p.read_bytes() for p in small_disk.rglob("*") if p.is_file()}
    assert after == before, "a failed write must leave the old files whole and no temporary behind"


pytestmark = [pytest.mark.timeout(900)]


def _mount(directory: Path, size: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()[:200]}")


def _files_whole(run_dir: Path) -> None:
    """Every file thermosweep writes into the storage itself reads back (none cut off), no temporary is
    left. (Checkpoint directories are copied in by Ray, file by file: one may be cut off, and a resume
    then restores the newest complete one.)"""
    json.loads((run_dir / "sweep.json").read_text())
    for path in (run_dir / "results").glob("*.parquet"):
        pd.read_parquet(path)
    assert not list(run_dir.rglob("*.tmp-*")), list(run_dir.rglob("*.tmp-*"))
    for png in (run_dir / "samples").rglob("*.png"):
        assert png.stat().st_size > 0, png


@pytest.mark.slow
def test_full_disk_stops_in_one_line_and_resume_completes(tmp_path: Path) -> None:
    grid = tmp_path / "tiny.json"
    grid.write_text(json.dumps({"preset": "digits", "base": TINY, "repetitions": 1, "cells": CELLS}))
    cache = str(tmp_path / "cache")
    common = ["--grid", str(grid), "--compile-cache", cache, "--max-failures", "2"]
    assert main([*common, "--storage", str(tmp_path / "ref"), "--name", "ref"]) == 0

    mnt = tmp_path / f"full-{uuid.uuid4().hex[:6]}"
    _mount(mnt, "700k")
    try:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        args = [sys.executable, "-m", "sweep.grid", *common, "--storage", str(mnt), "--name", "run"]
        full = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-4000:]
        last = [line for line in full.stderr.splitlines() if line.strip()][-1]
        assert last.startswith(f"storage {mnt} is full"), full.stderr[-4000:]
        assert "--resume" in last and "Kept:" in last
        assert "Traceback" not in full.stderr, full.stderr[-4000:]
        assert "retrying" not in full.stderr, "a full storage must not use up a trial's retries"
        _files_whole(mnt / "run")

        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        resumed = subprocess.run(
            [*args, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        _files_whole(mnt / "run")
        key = ["trial_id", "epoch"]
        ours = pd.read_parquet(mnt / "run" / "results" / "epochs.parquet").sort_values(key)
        ref = pd.read_parquet(tmp_path / "ref" / "ref" / "results" / "epochs.parquet").sort_values(key)
        trials = pd.read_parquet(mnt / "run" / "results" / "trials.parquet")
        assert (trials["status"] == "TERMINATED").all() and len(trials) == 2
        assert not ours.duplicated(key).any() and len(ours) == len(ref) == 6
        columns = [c for c in ref.columns if c not in TIMING_COLUMNS]
        pd.testing.assert_frame_equal(
            ours[columns].reset_index(drop=True), ref[columns].reset_index(drop=True), check_exact=True
        )
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
