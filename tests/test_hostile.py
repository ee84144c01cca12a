"""Hostile inputs and broken storage: damaged checkpoints, errors that a retry cannot cure, values that
must be refused with one line."""

from __future__ import annotations

import math
import shutil
import sys
from dataclasses import fields
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ExperimentConfig, apply_overrides, get_preset
from model.loop import DivergenceError, init_state

SMALL = dict(z_dim=4, ebm_width=8, gen_width=2)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def trial_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trial directory as Ray leaves it: checkpoint_000000..2 holding epochs 1..3 (distinct params)."""
    from sweep.checkpoint import TrialCheckpointer

    root = tmp_path_factory.mktemp("trial") / "cell-r0"
    state = init_state(get_preset("digits", **SMALL))
    with TrialCheckpointer() as ckpt:
        for index in range(3):
            epoch = index + 1
            directory = root / f"checkpoint_{index:06d}"
            directory.mkdir(parents=True)
            moved = state.replace(
                epoch=jnp.asarray(epoch, jnp.int32),
                ebm_params=jax.tree.map(lambda a, e=epoch: a + e, state.ebm_params),
            )
            ckpt.save(
                directory,
                moved,
                [{"epoch": e} for e in range(1, epoch + 1)],
                {"trial_id": "cell-r0", "epoch": epoch},
            )
    return root


def _restore(directory: Path, logs: list[str]):
    from ray import tune

    from sweep.checkpoint import TrialCheckpointer, restore_newest_readable

    template = init_state(get_preset("digits", **SMALL))
    with TrialCheckpointer() as ckpt:
        return restore_newest_readable(
            ckpt, tune.Checkpoint.from_directory(str(directory)), template, log=logs.append
        )


def _first_leaf(state) -> float:
    return float(np.asarray(jax.tree.leaves(state.ebm_params)[0]).reshape(-1)[0])


@pytest.mark.parametrize("damaged", ["state/manifest.ocdbt", "state/_METADATA", "history.json"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(
    trial_dir: Path, tmp_path: Path, damaged: str
) -> None:
    trial = tmp_path / "cell-r0"
    shutil.copytree(trial_dir, trial)
    intact: list[str] = []
    state, _, _ = _restore(trial / "checkpoint_000002", intact)
    assert int(state.epoch) == 3 and intact == []

    _truncate(trial / "checkpoint_000002" / damaged)
    logs: list[str] = []
    state, history, meta = _restore(trial / "checkpoint_000002", logs)
    assert int(state.epoch) == 2 and meta["epoch"] == 2 and len(history) == 2
    assert _first_leaf(state) == pytest.approx(_first_leaf(_restore(trial_dir / "checkpoint_000001", [])[0]))
    assert len(logs) == 1
    assert "checkpoint_000002 cannot be read" in logs[0]
    assert "fell back to checkpoint_000001 (epoch 2)" in logs[0]
    assert "1 epoch(s) (3..3) will be trained again" in logs[0]


def test_no_readable_checkpoint_names_them_and_the_fix(
    trial_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sweep.checkpoint import CheckpointError, mark_unreadable

    trial = tmp_path / "cell-r0"
    shutil.copytree(trial_dir, trial)
    for index in range(3):
        _truncate(trial / f"checkpoint_{index:06d}" / "state" / "manifest.ocdbt")
    unraisable: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(u.exc_value))
    with pytest.raises(CheckpointError) as info:
        _restore(trial / "checkpoint_000002", [])
    message = str(info.value)
    assert unraisable == [], "the aborted reads' callbacks print a traceback per array"
    assert "\n" not in message and len(message) < 800
    for index in range(3):
        assert f"checkpoint_{index:06d} (ValueError: " in message
    assert f"in {trial}: " in message
    assert "delete checkpoint_000002 checkpoint_000001 checkpoint_000000 there" in message
    assert "--retry-errored" in message

    # The trial records that in a checkpoint of its own, which Ray restores on a retry: it tries the old
    # ones again, and once they are deleted (the fix) it starts from epoch 0.
    (trial / "checkpoint_000003").mkdir()
    mark_unreadable(trial / "checkpoint_000003", message, {"epoch": 0})
    with pytest.raises(CheckpointError, match="checkpoint_000002"):
        _restore(trial / "checkpoint_000003", [])
    for index in range(3):
        shutil.rmtree(trial / f"checkpoint_{index:06d}")
    assert _restore(trial / "checkpoint_000003", []) is None


def test_only_older_checkpoints_are_candidates(trial_dir: Path) -> None:
    """Ray's snapshot may name an older checkpoint than the newest on disk: fall back from that one only
    (Ray numbers the checkpoints it writes next from its own index)."""
    from ray import tune

    from sweep.checkpoint import trial_checkpoints

    names = [
        c.path.rsplit("/", 1)[1]
        for c in trial_checkpoints(tune.Checkpoint.from_directory(str(trial_dir / "checkpoint_000001")))
    ]
    assert names == ["checkpoint_000001", "checkpoint_000000"]


def test_a_recorded_divergence_is_raised_not_skipped(trial_dir: Path, tmp_path: Path) -> None:
    from sweep.checkpoint import mark_diverged

    trial = tmp_path / "cell-r0"
    shutil.copytree(trial_dir, trial)
    (trial / "checkpoint_000003").mkdir()
    mark_diverged(trial / "checkpoint_000003", "DivergenceError: loss is nan", {"epoch": 3}, [])
    with pytest.raises(DivergenceError, match="loss is nan"):
        _restore(trial / "checkpoint_000003", [])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_errors_that_cannot_go_away_are_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """An invalid config inside a trial ends it at once with one line; a lost worker is still retried."""
    import os

    import ray
    from ray import tune

    from sweep.failures import TrialFailures
    from sweep.trainable import make_trainable

    def flaky_trial(config: dict) -> None:
        """Dies like a lost worker (the process exits) on its first attempt, then finishes."""
        attempts = Path(config["dir"]) / "attempts"
        with attempts.open("a") as out:
            out.write("x\n")
        if len(attempts.read_text().splitlines()) == 1:
            os._exit(1)
        tune.report({"done_ok": 1})

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_worker_niceness", "0")
    monkeypatch.setenv("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    bad = {
        "trial_id": "bad-r0",
        "cell": "bad",
        "repetition": 0,
        "grid": "g",
        "columns": {},
        "experiment": {**get_preset("digits").to_dict(), "temp_power": -1.0},
    }

    def run(trainable, param_space: dict, name: str):
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(tmp_path),
                callbacks=[TrialFailures(2)],
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=2),
            ),
        )
        return tuner.fit()

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=True)
    try:
        fatal = run(make_trainable(samples_uri=None), {"trial": bad}, "fatal")
        flaky = run(flaky_trial, {"dir": str(tmp_path)}, "flaky")
    finally:
        ray.shutdown()
    err = capfd.readouterr().err
    [result] = list(fatal)
    assert result.error is not None
    [error_txt] = (tmp_path / "fatal").glob("*/error.txt")
    assert error_txt.read_text().count("Failure #") == 1, "the config error was retried"
    assert (
        "ended in ERROR: ValueError: temp_power=-1.0 must be a finite number > 0 (t_i = (i/(N_t-1))^p); "
        "not retried"
    ) in err
    assert "Traceback" not in err

    [result] = list(flaky)
    assert result.error is None and result.metrics["done_ok"] == 1
    assert len((tmp_path / "attempts").read_text().splitlines()) == 2, "a lost worker is retried"
    assert "retrying from its last checkpoint (retry 1 of 2)" in err


FLOAT_FIELDS = [f.name for f in fields(ExperimentConfig) if isinstance(f.default, float)]
INT_FIELDS = [
    f.name for f in fields(ExperimentConfig) if isinstance(f.default, int) and not isinstance(f.default, bool)
]


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_no_number_field_takes_nan_or_inf(name: str, bad: float) -> None:
    """NaN fails every comparison, so `x < 0` checks let it through (kl_ridge=nan did, and diverged)."""
    with pytest.raises(ValueError, match=f"^{name}=(nan|inf|-inf) must be a finite number"):
        ExperimentConfig(**{name: bad})
    with pytest.raises(ValueError, match=f"^{name}="):
        apply_overrides(ExperimentConfig(), {name: str(bad)})


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("bad", [math.nan, 2.5, True])
def test_integer_fields_take_integers_only(name: str, bad: float) -> None:
    with pytest.raises(ValueError, match=f"^{name}=.* must be an integer"):
        ExperimentConfig(**{name: bad})


def test_kl_ridge_zero_is_refused_where_the_batch_covariance_is_singular() -> None:
    thermo = dict(objective="thermo", z_dim=16, kl_ridge=0.0)
    with pytest.raises(
        ValueError,
        match=r"kl_ridge=0.0 with batch_size \* chains_per_example = 16 <= "
        r"z_dim=16 makes the kl_batch",
    ):
        ExperimentConfig(**thermo, batch_size=16)
    with pytest.raises(ValueError, match=r"= 16 <= z_dim=16"):  # every chain of the batch is a row of the fit
        ExperimentConfig(**thermo, batch_size=8, chains_per_example=2)
    ExperimentConfig(**thermo, batch_size=9, chains_per_example=2)
    ExperimentConfig(**thermo, batch_size=17)
    ExperimentConfig(**{**thermo, "ti_rule": "trapezoid"}, batch_size=16)  # no covariance is fitted
    ExperimentConfig(**{**thermo, "objective": "vanilla"}, batch_size=16)  # no covariance is fitted
    ExperimentConfig(**{**thermo, "kl_ridge": 1e-6}, batch_size=4)


@pytest.mark.parametrize("batch", [8, 9])
def test_the_refused_case_is_the_singular_one(batch: int) -> None:
    """Why the rule is batch_size <= z_dim: n samples give a covariance of rank n - 1, so the KL of Eq. 20
    between the fitted Gaussians is NaN without a ridge for n <= d and finite for n > d."""
    from model.objectives import fitted_gaussians
    from model.thermo import adjacent_gaussian_kls

    z = jax.random.normal(jax.random.key(0), (3, batch, 8))
    kls = adjacent_gaussian_kls(*fitted_gaussians(z, jnp.float32(0.0)))
    finite = bool(jnp.all(jnp.isfinite(jnp.stack(kls))))
    assert finite == (batch > 8)


def test_nothing_the_project_writes_is_read_back_with_pickle() -> None:
    """The storage may be written by others (docs/security.md): the project reads JSON, Parquet, Orbax
    and npz without pickles; the one unpickler (PyTorch weights, tensors only) is torch_pickle's, which
    other modules may only subclass."""
    import re

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(
        r"\bpickle\.loads?\(|\bpickle\.Unpickler\b|cloudpickle|\bdill\b|\bjoblib\b|"
        r"\bshelve\b|marshal\.loads?\(|torch\.load\(|allow_pickle\s*=\s*True|read_pickle"
    )
    offenders = {}
    for path in sorted(root.glob("*/**/*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(("tests/", ".")) or relative == "model/metrics/reference/torch_pickle.py":
            continue
        found = pattern.findall(path.read_text())
        if found:
            offenders[relative] = found
    assert offenders == {}
    assert "allow_pickle=False" in (root / "model" / "metrics" / "inception.py").read_text()


DIVERGENCE_FIELDS = (
    "ebm_lr",
    "gen_lr",
    "prior_step_size",
    "posterior_step_size",
    "prior_steps",
    "posterior_steps",
    "lkhood_sigma",
    "prior_sigma",
)


@pytest.mark.parametrize("objective", ["vanilla", "thermo"])
def test_the_divergence_message_names_every_field_that_can_cause_it(objective: str) -> None:
    """kl_ridge=0 (thermo) diverged with advice about learning rates only; the message now names every
    field that can make a step non-finite, with its value."""
    from model.loop import _check_finite

    config = get_preset("digits", objective=objective, z_dim=4, kl_ridge=0.0, batch_size=50)
    stats = {"loss": np.array([math.nan]), "grad_var": np.array([1.0]), "grad_mean": np.array([0.0])}
    with pytest.raises(DivergenceError) as info:
        _check_finite(stats, 1, 3, config)
    message = str(info.value)
    assert message.startswith("loss is nan at epoch 1, step 3: training diverged; ") and "\n" not in message
    for name in DIVERGENCE_FIELDS:
        assert f"{name}={getattr(config, name):g}" in message
    assert ("kl_ridge=0, kl_weight=1" in message) == (objective == "thermo")


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal must come before Ray starts (and before any training): make either fail loudly."""
    import model.train
    from sweep import launch

    def started(*args, **kwargs):
        raise AssertionError("started although the input should have been refused")

    monkeypatch.setattr(launch, "init_ray", started)
    monkeypatch.setattr(model.train, "fit", started)


def _refused(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The error line of a CLI that refused `argv` with exit code 2 and no traceback."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()  # argparse's usage block, then the one error line
    assert lines[0].startswith("usage:") and all(line.startswith(" ") for line in lines[1:-1]), err
    assert ": error: " in lines[-1]
    return lines[-1]


BAD_NAMES = ["../escape", "..", ".", "-x", "a/b", "a b", "runs/../../x", "caf\u00e9"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_run_name_cannot_leave_the_storage(
    name: str, tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from sweep import grid, search

    storage = tmp_path / "runs"
    line = _refused(grid.main, ["--storage", str(storage), f"--name={name}", "--epochs", "1"], capsys)
    assert f"--name {name!r}: a name may hold only letters, digits and . _ = + -" in line
    line = _refused(search.main, ["--storage", str(storage), f"--name={name}", "--trials", "1"], capsys)
    assert f"--name {name!r}" in line
    line = _refused(search.main, ["--storage", str(storage), f"--study={name}", "--trials", "1"], capsys)
    assert f"--study {name!r}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["runs"])
    assert not (tmp_path / "escape").exists()


def test_a_run_name_through_a_link_out_of_the_storage_is_refused(
    tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from sweep import grid, launch

    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "link").symlink_to(tmp_path / "elsewhere")
    line = _refused(grid.main, ["--storage", str(tmp_path / "runs"), "--name", "link"], capsys)
    assert "outside --storage" in line
    for good in ("digits-20261125-120000", "p=1.5+eta_2", "a.b"):
        assert launch.check_name(good, "--name") == good


def test_storage_that_is_a_file_is_one_line(
    tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from sweep import grid, search

    (tmp_path / "afile").write_text("x")
    for storage in (tmp_path / "afile", tmp_path / "afile" / "below"):
        line = _refused(grid.main, ["--storage", str(storage), "--name", "r", "--epochs", "1"], capsys)
        assert f"--storage {storage}: {tmp_path / 'afile'} is a file, not a directory" in line
        line = _refused(search.main, ["--storage", str(storage), "--trials", "1"], capsys)
        assert "is a file, not a directory" in line


def test_a_grid_file_that_is_not_utf8_is_one_line(
    tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from sweep import grid

    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"preset": "digits", "cells": [{"name": "caf\xe9"}]}')
    line = _refused(grid.main, ["--grid", str(path), "--dry-run"], capsys)
    assert f"--grid {path}: not UTF-8 text (invalid continuation byte at byte" in line


def test_retry_errored_needs_resume(no_ray: None, capsys: pytest.CaptureFixture[str]) -> None:
    from sweep import grid

    assert "--retry-errored goes with --resume" in _refused(grid.main, ["--retry-errored"], capsys)


def test_model_train_refuses_a_batch_that_does_not_divide_over_the_devices(
    tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from model import train

    assert len(jax.local_devices()) == 2  # tests/conftest.py
    line = _refused(train.main, ["--set", "batch_size=51", "--epochs", "1"], capsys)
    assert line.endswith(
        "error: batch_size 51 is not divisible by 2 devices; use a multiple of 2 "
        "(e.g. 50 or 52) or run on fewer devices"
    )
    (tmp_path / "afile").write_text("x")
    line = _refused(train.main, ["--out", str(tmp_path / "afile"), "--epochs", "1"], capsys)
    assert "--out" in line and "is a file" in line


@pytest.mark.slow
def test_a_refused_name_is_one_line_and_exit_code_2_from_the_shell(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "sweep.grid", "--storage", str(tmp_path / "runs"), "--name", "../escape"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("python -m sweep.grid: error: --name '../escape'")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "runs").exists()


ABSURD = dict(objective="thermo", num_temps=100_000_000)


def test_an_absurd_step_is_refused_before_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """num_temps=1e8 compiled for a minute and died asking XLA for 1.5e15 bytes; the shape estimate
    refuses it at once, naming the fields to lower. A step of the usual size passes."""
    from model import loop
    from model.plan.device_memory import DeviceMemoryError, check_step_fits

    def compiled(*args, **kwargs):
        raise AssertionError("compiled although the step cannot fit")

    monkeypatch.setattr(loop, "train_epoch", compiled)
    config = get_preset("digits", **ABSURD)
    with pytest.raises(DeviceMemoryError) as info:
        loop.run_epoch(config, None, None, devices=jax.local_devices())
    message = str(info.value)
    assert message.startswith("the train step needs about ")
    assert " per device (estimated from the shapes) but a cpu device here has " in message
    assert "batch_size=50, num_temps=100000000, image_size=16, gen_width=2" in message and "\n" not in message
    check_step_fits(get_preset("digits", objective="thermo"), jax.local_devices())
    check_step_fits(get_preset("celeba", objective="thermo"), jax.local_devices())


def test_model_train_refuses_an_absurd_step_in_one_line(
    no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from model import train

    line = _refused(train.main, ["--set", "objective=thermo", "--set", "num_temps=100000000"], capsys)
    assert "error: the train step needs about " in line and "num_temps=100000000" in line


def test_xla_out_of_memory_becomes_the_same_one_line_advice() -> None:
    from model.plan.device_memory import DeviceMemoryError, out_of_memory_as_advice
    from sweep.failures import is_fatal

    config = get_preset("digits", objective="thermo", num_temps=4000)
    oom = jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
        "1500000000000000 bytes.\nBufferAssignment OOM Debugging ..."
    )
    with pytest.raises(DeviceMemoryError) as info, out_of_memory_as_advice(config):
        raise oom
    message = str(info.value)
    assert message.startswith("XLA ran out of device memory (RESOURCE_EXHAUSTED: Out of memory while trying")
    assert "num_temps=4000" in message and "\n" not in message
    assert is_fatal(info.value), "a step that does not fit the device will not fit on a retry either"
    other = jax.errors.JaxRuntimeError("INTERNAL: something else")
    with pytest.raises(jax.errors.JaxRuntimeError), out_of_memory_as_advice(config):
        raise other


def test_unreachable_storage_is_one_line(
    monkeypatch: pytest.MonkeyPatch, no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """An s3:// storage that cannot be reached (no network, no credentials) raised pyarrow's OSError."""
    from sweep import grid, launch

    def unreachable(uri: str):
        raise OSError("When resolving region for bucket 'bucket': AWS Error NETWORK_CONNECTION")

    monkeypatch.setattr(launch, "read_json_uri", unreachable)
    line = _refused(grid.main, ["--storage", "s3://bucket/runs", "--name", "r", "--epochs", "1"], capsys)
    assert line.endswith(
        "error: --storage s3://bucket/runs: cannot read it (When resolving region for "
        "bucket 'bucket': AWS Error NETWORK_CONNECTION); check the path, the network "
        "and the credentials"
    )


def test_analysis_report_refuses_an_out_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from analysis import report

    (tmp_path / "afile").write_text("x")
    line = _refused(report.main, [str(tmp_path), "--out", str(tmp_path / "afile")], capsys)
    assert line.endswith(
        f"error: --out {tmp_path / 'afile'} is a file; pass a directory (created if missing)"
    )
