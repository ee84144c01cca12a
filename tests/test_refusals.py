"""Refusals come in seconds whatever the value, before anything is written or scheduled: a suggested fix
found by bisection, names past the filesystem's and S3's limits, a data set that is not there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import get_preset
from model.plan import cost
from sweep.grid import main as grid_main
from sweep.search import main as search_main

ROOT = Path(__file__).resolve().parents[1]


def test_suggest_fix_bisects_instead_of_walking(monkeypatch):
    """num_temps=10^8 used to validate a config for every smaller N_t (hours); the bisection probes ~27."""
    config = get_preset("celeba", objective="thermo", num_temps=100_000_000)
    probes = []
    fits = cost._fits

    def counted(*args):
        probes.append(1)
        if len(probes) > 1000:
            raise AssertionError("suggest_fix walks the values instead of bisecting")
        return fits(*args)

    monkeypatch.setattr(cost, "_fits", counted)
    fix = cost.suggest_fix(config, cost.target_from("h100"), 1, "gpu")
    assert "--set num_temps=" in fix
    assert len(probes) < 100
    nt = int(fix.split("--set num_temps=")[1].split()[0])
    target = cost.target_from("h100")
    # the largest fitting value, exactly: it fits and one more does not
    from dataclasses import replace

    assert cost._fits(replace(config, num_temps=nt), target, 1, "gpu")
    assert not cost._fits(replace(config, num_temps=nt + 1), target, 1, "gpu")
    assert not cost._fits(replace(config, batch_size=1), target, 1, "gpu")  # no batch fits: none offered


def test_largest_fitting_matches_a_walk():
    for limit in (0, 1, 2, 7, 50, 99, 100):
        walk = next((n for n in range(100, 0, -1) if n <= limit), None)
        assert cost._largest_fitting(1, 100, lambda n, limit=limit: n <= limit) == walk


def test_huge_num_temps_refused_in_seconds(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        grid_main(
            [
                "--set",
                "num_temps=100000000",
                "--target",
                "h100",
                "--storage",
                str(tmp_path / "runs"),
                "--name",
                "x",
            ]
        )
    assert exc.value.code == 2
    assert "--set num_temps=" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_dry_run_of_the_paper_grid_warns_once_at_most():
    """suggest_fix's probes (configs nobody asked for) printed 59 UserWarnings; only the paper's own
    kl_batch rank warning may remain, once."""
    out = subprocess.run(
        [sys.executable, "-m", "sweep.grid", "--grid", "paper-celeba", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    warned = [line for line in out.stderr.splitlines() if "Warning:" in line]
    assert len(warned) <= 1, warned
    assert all("kl_batch" in line for line in warned)


LONG = "a" * 300


@pytest.mark.parametrize("dry", [True, False])
@pytest.mark.parametrize("cli", ["grid", "search"])
def test_a_name_past_255_bytes_is_refused(tmp_path, capsys, cli, dry):
    storage = tmp_path / "runs"
    argv = ["--name", LONG, "--storage", str(storage)] + (["--dry-run"] if dry else [])
    with pytest.raises(SystemExit) as exc:
        (grid_main if cli == "grid" else search_main)(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "300 bytes" in err and "255" in err and "Traceback" not in err
    assert not storage.exists()


def test_a_name_255_bytes_long_is_fine(tmp_path):
    assert grid_main(["--name", "b" * 255, "--storage", str(tmp_path), "--dry-run"]) == 0


@pytest.mark.parametrize("cli", ["grid", "search"])
def test_an_s3_key_past_1024_bytes_is_refused(capsys, cli):
    """Nothing is contacted: the length alone refuses it (no server, no credentials needed)."""
    storage = "s3://bkt/" + "/".join(["p" * 200] * 4)
    with pytest.raises(SystemExit) as exc:
        (grid_main if cli == "grid" else search_main)(
            ["--storage", storage, "--name", "r" * 100, "--dry-run"]
        )
    assert exc.value.code == 2
    assert "1024 bytes" in capsys.readouterr().err


def test_a_missing_data_set_is_refused_before_ray_starts(tmp_path, capsys):
    """`--set data_dir=<empty>` on paper-cifar10 used to start every trial and retry each twice."""
    storage = tmp_path / "runs"
    with pytest.raises(SystemExit) as exc:
        grid_main(
            ["--grid", "paper-cifar10", "--set", f"data_dir={tmp_path / 'empty'}", "--storage", str(storage)]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "not prepared" in err and "python -m model.data prepare cifar10 --data-dir" in err
    assert "Traceback" not in err and not storage.exists()


def test_search_refuses_a_missing_data_set(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        search_main(
            ["--base", "cifar10", "--set", f"data_dir={tmp_path / 'empty'}", "--storage", str(tmp_path / "r")]
        )
    assert exc.value.code == 2
    assert "python -m model.data prepare cifar10" in capsys.readouterr().err


def test_model_train_refuses_a_missing_data_set_in_one_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "model.train",
            "--preset",
            "cifar10",
            "--set",
            f"data_dir={tmp_path / 'empty'}",
        ],
        cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": ""},  # one CPU device: the preset's batch of 75 fits
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith("python -m model.train: error: TFDS data set 'cifar10'")
    )


def test_a_trial_on_a_missing_data_set_is_not_retried():
    """On a cluster whose head cannot see the workers' data, the trial's own DatasetNotPreparedError ends
    it at once (incurable), instead of `--max-failures` retries."""
    from model.tfds_data import DatasetNotPreparedError
    from sweep.failures import is_fatal

    assert is_fatal(DatasetNotPreparedError("TFDS data set 'cifar10' is not prepared in /empty"))
    assert not is_fatal(OSError("connection reset"))
