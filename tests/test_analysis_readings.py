"""The report's comparable readings (analysis/readings.py): paired differences between cells, the val_ll
and gradient-noise figures, and vanilla and thermo train_loss never on one axis."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import figures as F
from analysis.readings import fig_grad_noise_vs_grad_var, fig_val_ll, paired_differences


def _final(reps: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 5.0, reps)  # shared by every cell of a repetition
    rows = []
    for cell, objective, p, shift in (
        ("vanilla", "vanilla", np.nan, 0.0),
        ("thermo-p1", "thermo", 1.0, 2.0),
        ("thermo-p3", "thermo", 3.0, -1.0),
    ):
        for r in range(reps):
            rows.append(
                {
                    "run": "run",
                    "dataset": "digits",
                    "cell": cell,
                    "objective": objective,
                    "trial_id": f"{cell}-r{r}",
                    "repetition": r,
                    "temp_power": p,
                    "batch_size": 50,
                    "val_ll": -200 + seed_effect[r] + shift + rng.normal(0, 0.1),
                    "val_ll_stderr": 3.0,
                    "grad_var_gen": 1e-4 * (1 + r),
                    "grad_noise_gen": 1e-5 * (1 + r),
                    "grad_var_ebm": 1e-3,
                    "grad_noise_ebm": 2e-3,
                    "extra": False,
                }
            )
    return pd.DataFrame(rows)


def test_paired_differences_recover_planted_shifts_despite_a_large_seed_effect():
    table = paired_differences(_final(), readings=("val_ll",))
    assert list(table["reference"].unique()) == ["vanilla"]
    got = dict(
        zip(
            table["cell"],
            zip(table["mean_diff"], table["ci_low"], table["ci_high"], strict=True),
            strict=True,
        )
    )
    for cell, shift in (("thermo-p1", 2.0), ("thermo-p3", -1.0)):
        mean, lo, hi = got[cell]
        assert mean == pytest.approx(shift, abs=0.2)
        assert lo < shift < hi and hi - lo < 1.0  # independent means would give an interval ~10 wide
    assert set(table["n_pairs"]) == {6}


def test_paired_differences_leave_out_unpaired_repetitions():
    final = _final()
    final = final[~((final["cell"] == "thermo-p1") & (final["repetition"] >= 4))]
    table = paired_differences(final, readings=("val_ll",))
    assert table.set_index("cell").loc["thermo-p1", "n_pairs"] == 4
    assert paired_differences(final.drop(columns="repetition")).empty


def test_figures_draw_from_final_readings_and_skip_without_them():
    final = _final()
    epochs = final[["run", "trial_id", "val_ll"]].assign(epoch=2)
    assert fig_val_ll(epochs, final, "digits") is not None
    assert fig_grad_noise_vs_grad_var(final, "digits") is not None
    assert fig_val_ll(epochs, final.drop(columns="val_ll"), "digits") is None
    no_noise = final.drop(columns=["grad_noise_gen", "grad_noise_ebm"])
    assert fig_grad_noise_vs_grad_var(no_noise, "digits") is None


def test_vanilla_and_thermo_train_loss_never_share_an_axis():
    final = _final(2)
    epochs = pd.concat(
        [
            final[["run", "trial_id"]].assign(
                epoch=e, train_loss=np.where(final["objective"] == "vanilla", 5.0, 300.0)
            )
            for e in (1, 2)
        ]
    )
    fig = F.fig_training_curves(epochs, final, "digits", readings=("train_loss",))
    axes = [ax for ax in fig.axes if ax.get_lines()]
    assert len(axes) == 2  # one row per objective
    for ax in axes:
        values = np.concatenate([line.get_ydata() for line in ax.get_lines()])
        assert set(np.unique(values)) in ({5.0}, {300.0})
