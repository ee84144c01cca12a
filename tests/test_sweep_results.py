"""Parquet writer (idempotent, atomic, reloadable), summary, error parsing, and the Orbax trial checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from model.schema import EPOCH_COLUMNS, TRIAL_COLUMNS
from sweep.results import (
    ResultsTables,
    config_columns,
    error_message,
    format_summary,
    summarize,
)


def _reading(epoch: int, loss: float) -> dict:
    return {
        "epoch": epoch,
        "train_loss": loss,
        "val_loss": loss,
        "grad_mean": 0.0,
        "grad_var": loss / 10,
        "grad_var_ebm": 0.1,
        "grad_var_gen": 0.2,
        "kid_rbf_inf": math.nan,
        "kid_poly_inf": math.nan,
        "fid_inf": math.nan,
        "epoch_time_s": 1.0,
        "ebm_lr": 1e-4,
        "gen_lr": 1e-3,
        "kid_rbf_slope": 0.5,
    }


def test_tables_are_idempotent_atomic_and_reloadable(tmp_path) -> None:
    from model.config import get_preset

    tables = ResultsTables(str(tmp_path / "results"))
    cfg = get_preset("digits", objective="vanilla")
    tables.upsert_trial(
        "a-r0",
        run="r",
        cell="a",
        repetition=0,
        **config_columns(cfg),
        status="RUNNING",
        search="p-eta",
        optuna_trial=3,
    )
    tables.upsert_epochs("a-r0", [_reading(1, 10.0), _reading(2, 9.0)], run="r", cell="a", repetition=0)
    tables.upsert_epochs("a-r0", [_reading(2, 9.0)], run="r", cell="a", repetition=0)  # a re-run epoch
    tables.flush()
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["epochs.parquet", "trials.parquet"]

    trials = pd.read_parquet(tmp_path / "results" / "trials.parquet")
    epochs = pd.read_parquet(tmp_path / "results" / "epochs.parquet")
    assert list(trials.columns[: len(TRIAL_COLUMNS)]) == list(TRIAL_COLUMNS)
    assert {"search", "optuna_trial"} <= set(trials.columns) and trials["optuna_trial"].iloc[0] == 3
    assert trials["temp_power"].isna().all() and trials["epochs_completed"].tolist() == [2]
    assert list(epochs.columns[: len(EPOCH_COLUMNS)]) == list(EPOCH_COLUMNS)
    assert "kid_rbf_slope" in epochs.columns and len(epochs) == 2

    again = ResultsTables(str(tmp_path / "results"))  # a resumed driver starts from what is on disk
    again.upsert_epochs("a-r0", [_reading(3, 8.0)], run="r", cell="a", repetition=0)
    again.upsert_trial("a-r0", status="TERMINATED")
    again.flush()
    epochs = pd.read_parquet(tmp_path / "results" / "epochs.parquet")
    assert epochs["epoch"].tolist() == [1, 2, 3]
    trials = pd.read_parquet(tmp_path / "results" / "trials.parquet")
    assert trials["status"].tolist() == ["TERMINATED"] and trials["search"].tolist() == ["p-eta"]


def test_summary_mean_and_std_over_repetitions() -> None:
    trials = pd.DataFrame(
        {
            "cell": ["a", "a", "b", "b"],
            "status": ["TERMINATED", "TERMINATED", "TERMINATED", "ERROR"],
            "final_grad_var": [1.0, 3.0, 5.0, None],
            "final_kid_rbf_inf": [None, None, 0.2, None],
            "final_train_loss": [10.0, 20.0, 30.0, None],
        }
    )
    summary = summarize(trials, pd.DataFrame())
    a = summary.set_index("cell").loc["a"]
    assert a["grad_var_mean"] == 2.0 and a["grad_var_std"] == pytest.approx(math.sqrt(2))
    b = summary.set_index("cell").loc["b"]
    assert b["finished"] == 1 and b["errors"] == 1 and math.isnan(b["grad_var_std"])
    text = format_summary(summary)
    assert "2.000e+00 +- 1.414e+00" in text and "0.2000" in text


def test_error_message_picks_the_divergence() -> None:
    trace = (
        "Traceback (most recent call last):\n  File x\nray.exceptions.RayTaskError(DivergenceError): "
        "ray::f() (pid=1)\nmodel.loop.DivergenceError: "
        "loss is nan at epoch 2, step 3: lower the rates\n"
    )
    assert error_message(trace) == "DivergenceError: loss is nan at epoch 2, step 3: lower the rates"
    assert error_message("boom\nValueError: bad") == "ValueError: bad"
    assert error_message(None) is None


def test_orbax_checkpoint_round_trip_is_exact(tmp_path) -> None:
    import jax

    from model.config import get_preset
    from model.loop import DivergenceError, init_state
    from sweep.checkpoint import TrialCheckpointer, mark_diverged

    cfg = get_preset("digits", z_dim=4, ebm_width=8, gen_width=2, seed=3)
    state = init_state(cfg).replace(epoch=jax.numpy.asarray(5, jax.numpy.int32))
    history = [_reading(1, 2.5)]
    with TrialCheckpointer() as ckpt:
        ckpt.save(tmp_path / "c", state, history, {"trial_id": "x-r0", "epoch": 5})
        template = init_state(get_preset("digits", z_dim=4, ebm_width=8, gen_width=2))
        restored, hist, meta = ckpt.restore(tmp_path / "c", template)
    assert meta["trial_id"] == "x-r0" and hist[0]["train_loss"] == 2.5 and math.isnan(hist[0]["fid_inf"])
    assert int(restored.epoch) == 5
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    (tmp_path / "d").mkdir()
    mark_diverged(tmp_path / "d", "DivergenceError: loss is nan", {"trial_id": "x-r0"}, history)
    with TrialCheckpointer() as ckpt, pytest.raises(DivergenceError, match="loss is nan"):
        ckpt.restore(tmp_path / "d", state)
