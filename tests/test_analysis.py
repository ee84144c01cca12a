"""analysis: synthetic Parquet runs with planted structure must come back out of load/summary/report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import analysis
from analysis import report as R
from analysis.summary import fit_quadratic, quadratic_fits, table1

REPO = Path(__file__).resolve().parents[1]
REPS = 4
# deviations with mean 0 and sample std (ddof=1) exactly 1: a planted spread s is s * UNIT
UNIT = np.array([-1.5, -0.5, 0.5, 1.5]) / np.sqrt(5 / 3)
EPOCHS = 6
# planted KID_inf = a v^2 + b v + c per regime, v = cell-mean final gradient variance
PLANTED = {
    "vanilla": (2.0, -3.0, 1.5),
    "thermo p>1": (-4.0, 5.0, 0.2),
    "thermo 0<p<=1": (1.0, 0.5, 0.05),
}
PLANTED_FID = {
    "vanilla": (100.0, -50.0, 300.0),
    "thermo p>1": (10.0, 1.0, 250.0),
    "thermo 0<p<=1": (5.0, 2.0, 280.0),
}
VANILLA = {16: 0.90, 32: 0.60, 64: 0.45, 128: 0.25}  # batch -> planted mean variance (falls with batch)
THERMO_HI = {2.0: 0.28, 3.0: 0.32, 6.0: 0.35, 10.0: 0.39}  # p > 1: rises with p
THERMO_LO = {0.1: 0.80, 0.3: 0.47, 0.6: 0.33, 1.0: 0.21}  # p <= 1: falls with p
SPREAD_CV = {"vanilla": 0.25, "thermo p>1": 0.05, "thermo 0<p<=1": 0.04}  # planted std / mean


def _q(coef: tuple[float, float, float], v: float) -> float:
    a, b, c = coef
    return a * v * v + b * v + c


def synthetic_tables(
    run: str = "synth",
    dataset: str = "digits",
    thermo: bool = True,
    vanilla_var: dict[int, float] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, epochs) in the sweep's schema with the planted cell means, spreads and quadratics above.

    KID is evaluated on even epochs only and the last epoch is not evaluated, so the final KID reading
    sits at epoch EPOCHS-1; two extra thermo cells (N_t=20, eta=2) lie far off the planted curve.
    """
    cells: list[dict] = []
    for b, v in (vanilla_var or VANILLA).items():
        cells.append(
            dict(
                cell=f"vanilla-b{b}",
                objective="vanilla",
                batch_size=b,
                temp_power=None,
                num_temps=None,
                kl_weight=None,
                regime="vanilla",
                v=v,
            )
        )
    if thermo:
        for p, v in THERMO_HI.items():
            cells.append(
                dict(
                    cell=f"thermo-p{p:g}",
                    objective="thermo",
                    batch_size=50,
                    temp_power=p,
                    num_temps=5,
                    kl_weight=1.0,
                    regime="thermo p>1",
                    v=v,
                )
            )
        for p, v in THERMO_LO.items():
            cells.append(
                dict(
                    cell=f"thermo-p{p:g}",
                    objective="thermo",
                    batch_size=50,
                    temp_power=p,
                    num_temps=5,
                    kl_weight=1.0,
                    regime="thermo 0<p<=1",
                    v=v,
                )
            )
        cells.append(
            dict(
                cell="thermo-p0.1-nt20",
                objective="thermo",
                batch_size=50,
                temp_power=0.1,
                num_temps=20,
                kl_weight=1.0,
                regime="thermo 0<p<=1",
                v=0.6,
                kid=0.9,
            )
        )
        cells.append(
            dict(
                cell="thermo-p0.1-eta2",
                objective="thermo",
                batch_size=50,
                temp_power=0.1,
                num_temps=5,
                kl_weight=2.0,
                regime="thermo 0<p<=1",
                v=0.7,
                kid=0.95,
            )
        )
    trials, epochs = [], []
    for c in cells:
        kid = c.get("kid", _q(PLANTED[c["regime"]], c["v"]))
        fid = _q(PLANTED_FID[c["regime"]], c["v"])
        for r in range(REPS):
            tid = f"{c['cell']}_r{r}"
            v_final = c["v"] * (1 + SPREAD_CV[c["regime"]] * UNIT[r])
            trials.append(
                dict(
                    run=run,
                    trial_id=tid,
                    cell=c["cell"],
                    repetition=r,
                    seed=r,
                    dataset=dataset,
                    objective=c["objective"],
                    batch_size=c["batch_size"],
                    temp_power=c["temp_power"],
                    num_temps=c["num_temps"],
                    kl_weight=c["kl_weight"],
                    prior_steps=30,
                    posterior_steps=20,
                    epochs=EPOCHS,
                    status="completed",
                    error=None,
                    wall_time_s=(100.0 if c["objective"] == "vanilla" else 100.0 * c["num_temps"]) + r,
                    devices=1,
                    ebm_gradient=("chains" if c["objective"] == "thermo" else None),
                )
            )
            for e in range(1, EPOCHS + 1):
                last = e == EPOCHS
                evaluated = e % 2 == 1 and not last  # epochs 1, 3, 5; final KID reading at epoch 5
                final_eval = e == EPOCHS - 1
                epochs.append(
                    dict(
                        run=run,
                        trial_id=tid,
                        cell=c["cell"],  # the sweep repeats these trial columns in epochs.parquet
                        repetition=r,
                        epoch=e,
                        train_loss=1000.0 / e + r,
                        val_loss=1100.0 / e,
                        grad_mean=0.0,
                        grad_var=v_final if last else v_final * (3.0 + e),
                        grad_var_ebm=v_final / 10,
                        grad_var_gen=v_final * 0.9,
                        kid_rbf_inf=(kid + 0.01 * UNIT[r] if final_eval else 0.5 + e)
                        if evaluated or final_eval
                        else np.nan,
                        kid_poly_inf=(kid * 2 if final_eval else 1.0) if evaluated or final_eval else np.nan,
                        fid_inf=(fid + UNIT[r] if final_eval else 400.0)
                        if evaluated or final_eval
                        else np.nan,
                        val_ll=-200.0 - 10 * kid + r if evaluated or final_eval else np.nan,
                        val_ll_stderr=3.0 if evaluated or final_eval else np.nan,
                        grad_noise_gen=v_final / 5 if evaluated or final_eval else np.nan,
                        grad_noise_ebm=v_final / 20 if evaluated or final_eval else np.nan,
                        epoch_time_s=10.0,
                        **_ti_readings(c, r, e),
                    )
                )
    return pd.DataFrame(trials), pd.DataFrame(epochs)


def planted_ti_curve(
    temp_power: float, num_temps: int, repetition: int, epoch: int = EPOCHS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t_i, w_i, E_i) of a thermo trial: E_t = -100 - 300 (1 - t)^2 + 2 r, 50 nats lower per epoch
    before the last (so a figure that reads the wrong epoch is off)."""
    t = (np.arange(num_temps) / (num_temps - 1)) ** temp_power
    dt = np.diff(t)
    w = np.concatenate([[dt[0] / 2], (dt[:-1] + dt[1:]) / 2, [dt[-1] / 2]])
    return t, w, -100.0 - 300.0 * (1.0 - t) ** 2 + 2.0 * repetition - 50.0 * (EPOCHS - epoch)


def _ti_readings(cell: dict, repetition: int, epoch: int) -> dict:
    if cell["objective"] != "thermo":
        return dict(ti_temps=None, ti_weights=None, ti_expected_loglik=None)
    t, w, e = planted_ti_curve(cell["temp_power"], cell["num_temps"], repetition, epoch)
    return dict(ti_temps=t.tolist(), ti_weights=w.tolist(), ti_expected_loglik=e.tolist())


def write_run(root: Path, trials: pd.DataFrame, epochs: pd.DataFrame, name: str | None = None) -> Path:
    run_dir = root / (name or str(trials["run"].iloc[0]))
    (run_dir / "results").mkdir(parents=True, exist_ok=True)
    trials.to_parquet(run_dir / "results" / "trials.parquet", index=False)
    epochs.to_parquet(run_dir / "results" / "epochs.parquet", index=False)
    return run_dir


def _png(path: Path, value: float) -> None:
    import matplotlib.image

    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(path, np.full((8, 8), value), vmin=0, vmax=1, cmap="gray")


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("storage")
    run_dir = write_run(root, *synthetic_tables())
    for tid in ("vanilla-b16_r0", "thermo-p2_r1"):
        _png(run_dir / "samples" / tid / "epoch_0002.png", 0.2)
        _png(run_dir / "samples" / tid / "epoch_0004.png", 0.8)
    return run_dir


@pytest.fixture(scope="module")
def synth_report(synth_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert R.main([str(synth_run), "--out", str(out)]) == 0
    return out


def test_analysis_imports_no_ray_jax_model_sweep_or_pyplot():
    """analysis reads files only: of the model it imports the results schema and nothing else."""
    code = (
        "import sys, analysis, analysis.report, analysis.legacy, analysis.figures, analysis.summary\n"
        "roots = ('ray', 'jax', 'jaxlib', 'model', 'sweep')\n"
        "allowed = ('model', 'model.schema')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in roots and m not in allowed\n"
        "             or m == 'matplotlib.pyplot')\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"analysis imported {done.stdout} {done.stderr}"


def test_load_accepts_run_results_dirs_and_files_and_keeps_run_names(tmp_path):
    t1, e1 = synthetic_tables(run="alpha")
    t2, e2 = synthetic_tables(run="beta", thermo=False)
    a = write_run(tmp_path, t1.drop(columns="run"), e1.drop(columns="run"), name="alpha")  # run from dir name
    b = write_run(tmp_path, t2, e2)
    res = analysis.load(a, b / "results" / "trials.parquet")
    assert res.runs == ["alpha", "beta"]
    assert len(res.trials) == len(t1) + len(t2)
    assert set(res.epochs["run"]) == {"alpha", "beta"}
    assert res.epochs.groupby("run").size().to_dict() == {"alpha": len(e1), "beta": len(e2)}
    # same trial ids in both runs stay distinct rows, keyed by (run, trial_id)
    assert res.trials.duplicated(["trial_id"]).sum() == len(t2)
    assert not res.trials.duplicated(["run", "trial_id"]).any()
    # a storage dir holding both runs reads the same, and naming one run twice does not duplicate it
    assert len(analysis.load(tmp_path).trials) == len(res.trials)
    assert len(analysis.load(a, a / "results", a / "results" / "epochs.parquet").trials) == len(t1)


def test_load_maps_the_old_chain_gradient_column(tmp_path):
    """Runs written before ebm_gradient/gen_gradient: true -> (chains, ti), false -> (none, ti), with the
    estimator those runs used (kl_batch, one chain per example); vanilla rows stay null."""
    trials, epochs = synthetic_tables(run="old")
    thermo = trials["objective"] == "thermo"
    trials = trials.drop(columns="ebm_gradient")
    trials["chain_gradient"] = pd.array([None] * len(trials), dtype="boolean")
    trials.loc[thermo, "chain_gradient"] = [i % 2 == 0 for i in range(int(thermo.sum()))]
    res = analysis.load(write_run(tmp_path, trials, epochs))
    t = res.trials
    assert "chain_gradient" not in t.columns
    old = trials["chain_gradient"]
    assert (t.loc[thermo & (old == True), "ebm_gradient"] == "chains").all()  # noqa: E712
    assert (t.loc[thermo & (old == False), "ebm_gradient"] == "none").all()  # noqa: E712
    assert (t.loc[thermo, "gen_gradient"] == "ti").all() and (t.loc[thermo, "ti_rule"] == "kl_batch").all()
    assert (t.loc[thermo, "chains_per_example"] == 1).all()
    assert t.loc[~thermo, ["ebm_gradient", "gen_gradient", "ti_rule"]].isna().all().all()
    assert (old == False).any() and (old == True).any()  # noqa: E712


def test_load_errors_name_the_bad_value_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass a run directory"):
        analysis.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no trials.parquet"):
        analysis.load(tmp_path / "empty")
    t, e = synthetic_tables(run="same")
    write_run(tmp_path / "x", t, e, name="one")
    write_run(tmp_path / "y", t, e, name="two")  # the `run` column says "same" in both
    with pytest.raises(ValueError, match="appears more than once.*distinct name"):
        analysis.load(tmp_path / "x" / "one", tmp_path / "y" / "two")


def test_final_readings_take_last_epoch_and_last_evaluated_metric(synth_run):
    final = analysis.final_readings(analysis.load(synth_run))
    row = final.set_index("trial_id").loc["vanilla-b32_r2"]
    assert row["final_epoch"] == EPOCHS
    assert row["grad_var"] == pytest.approx(0.60 * (1 + 0.25 * UNIT[2]))
    assert row["kid_rbf_inf"] == pytest.approx(_q(PLANTED["vanilla"], 0.60) + 0.01 * UNIT[2])
    assert row["train_time_s"] == pytest.approx(10.0 * EPOCHS)
    assert set(final["regime"]) == set(PLANTED)
    assert final.loc[final["cell"].isin(["thermo-p0.1-nt20", "thermo-p0.1-eta2"]), "extra"].all()
    assert not final.loc[~final["cell"].isin(["thermo-p0.1-nt20", "thermo-p0.1-eta2"]), "extra"].any()


def test_cell_summary_and_controllability_recover_planted_spreads(synth_run):
    final = analysis.final_readings(analysis.load(synth_run))
    summary = analysis.cell_summary(final).set_index("cell")
    ctrl = analysis.controllability(final).set_index("cell")
    planted = {
        **{f"vanilla-b{b}": ("vanilla", v) for b, v in VANILLA.items()},
        **{f"thermo-p{p:g}": ("thermo p>1", v) for p, v in THERMO_HI.items()},
        **{f"thermo-p{p:g}": ("thermo 0<p<=1", v) for p, v in THERMO_LO.items()},
    }
    for cell, (regime, v) in planted.items():
        s = summary.loc[cell]
        assert s["regime"] == regime
        assert s["grad_var_count"] == REPS and s["n_trials"] == REPS
        assert s["grad_var_mean"] == pytest.approx(v)
        assert s["grad_var_std"] == pytest.approx(v * SPREAD_CV[regime])
        assert s["kid_rbf_inf_std"] == pytest.approx(0.01)
        assert ctrl.loc[cell, "cv"] == pytest.approx(SPREAD_CV[regime])
        assert ctrl.loc[cell, "rel_range"] == pytest.approx(SPREAD_CV[regime] * (UNIT[-1] - UNIT[0]))
    by = analysis.controllability_by_regime(analysis.controllability(final)).set_index("regime")
    for regime, cv in SPREAD_CV.items():
        assert by.loc[regime, "median_cv"] == pytest.approx(cv)


@pytest.mark.parametrize("metric,planted", [("kid_rbf_inf", PLANTED), ("fid_inf", PLANTED_FID)])
def test_quadratic_fits_recover_planted_coefficients_per_regime(synth_run, metric, planted):
    summary = analysis.cell_summary(analysis.final_readings(analysis.load(synth_run)))
    fits = quadratic_fits(summary, metric).set_index("regime")
    assert set(fits.index) == set(planted)
    for regime, (a, b, c) in planted.items():
        f = fits.loc[regime]
        assert f["x"] == "grad_var"
        assert f["n_cells"] == 4  # the two extra cells, far off the curve, are left out
        assert (f["a"], f["b"], f["c"]) == pytest.approx((a, b, c), rel=1e-6, abs=1e-6)
        assert f["r2"] == pytest.approx(1.0)


def test_fit_quadratic_r2_with_planted_residual():
    x = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    resid = np.array([-1.0, 2.0, 0.0, -2.0, 1.0])  # orthogonal to 1, x, x^2 on these points
    y = 0.5 * x**2 - 1.0 * x + 3.0 + 0.3 * resid
    q = fit_quadratic(x, y)
    assert (q.a, q.b, q.c) == pytest.approx((0.5, -1.0, 3.0))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    assert q.r2 == pytest.approx(1 - 0.09 * 10 / ss_tot)
    assert q(np.array([2.0]))[0] == pytest.approx(0.5 * 4 - 2 + 3)
    with pytest.raises(ValueError, match="at least 3 distinct x values, got 2"):
        fit_quadratic(np.array([1.0, 1.0, 2.0]), np.array([0.0, 1.0, 2.0]))


def test_fits_switch_to_log10_when_variances_span_decades():
    cells = pd.DataFrame(
        {
            "run": "r",
            "dataset": "d",
            "cell": [f"c{i}" for i in range(4)],
            "regime": "vanilla",
            "extra": False,
            "ebm_gradient": pd.NA,
            "grad_var_mean": [1e-3, 1e-2, 1e-1, 1.0],
        }
    )
    lx = np.log10(cells["grad_var_mean"])
    cells["kid_rbf_inf_mean"] = 0.02 * lx**2 + 0.01 * lx + 0.05
    auto = quadratic_fits(cells).iloc[0]
    assert auto["x"] == "log10(grad_var)"
    assert (auto["a"], auto["b"], auto["c"], auto["r2"]) == pytest.approx((0.02, 0.01, 0.05, 1.0))
    linear = quadratic_fits(cells, log_x=False).iloc[0]
    assert linear["x"] == "grad_var" and linear["r2"] < 0.99


@pytest.mark.parametrize("direction", ["falls", "rises"])
def test_table1_reports_measured_signs(tmp_path, direction):
    vanilla = VANILLA if direction == "falls" else {b: 1.2 - v for b, v in VANILLA.items()}
    run = write_run(tmp_path, *synthetic_tables(vanilla_var=vanilla))
    final = analysis.final_readings(analysis.load(run))
    summary = analysis.cell_summary(final)
    t = table1(summary, analysis.controllability(final)).set_index("parameter")
    assert t.loc["N_batch (vanilla)", "grad_var"] == direction
    assert t.loc["N_batch (vanilla)", "rho_grad_var"] == (-1.0 if direction == "falls" else 1.0)
    assert t.loc["p (thermo, p > 1)", "grad_var"] == "rises"
    assert t.loc["p (thermo, 0 < p <= 1)", "grad_var"] == "falls"
    assert t.loc["N_batch (vanilla)", "median_cv_grad_var"] == pytest.approx(SPREAD_CV["vanilla"])
    # the N_t extra cell against its baseline (p = 0.1, N_t = 5): variance 0.80 -> 0.60 falls
    assert t.loc["N_t (thermo, p = 0.1)", "grad_var"] == "falls"
    assert t.loc["eta (thermo, p = 0.1)", "n_cells"] == 2


EXPECTED_FIGURES = [
    "fig01_temperature_schedules.png",
    "fig03_grad_var_vs_batch_digits.png",
    "fig04_grad_var_vs_p_digits.png",
    "fig05_kid_vs_grad_var_regimes_digits.png",
    "fig06_extras_digits.png",
    "fig09_training_curves_digits.png",
    "fig10_kid_vs_grad_var_digits.png",
    "fig10b_kid_poly_vs_grad_var_digits.png",
    "fig15_val_ll_digits.png",
    "fig17_ti_curve_digits.png",
    "fig16_grad_noise_vs_grad_var_digits.png",
    "fig12_fid_vs_grad_var_digits.png",
    "fig14_training_time_digits.png",
]


def test_report_writes_every_figure_table_and_sample(synth_report):
    for name in EXPECTED_FIGURES:
        png = synth_report / name
        assert png.is_file(), f"{name} missing; have {sorted(p.name for p in synth_report.iterdir())}"
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert sorted(p.name for p in synth_report.glob("fig*.png")) == sorted(EXPECTED_FIGURES)
    for table in (
        "cell_summary.csv",
        "controllability.csv",
        "fits.csv",
        "table1.csv",
        "final_readings.csv",
        "paired_differences.csv",
    ):
        assert len(pd.read_csv(synth_report / table)) > 0, table
    samples = sorted(p.name for p in (synth_report / "samples" / "synth").iterdir())
    assert samples == ["thermo-p2_r1_epoch_0004.png", "vanilla-b16_r0_epoch_0004.png"]  # latest per trial
    md = (synth_report / "report.md").read_text()
    for name in EXPECTED_FIGURES:
        assert f"]({name})" in md
    assert "samples/synth/vanilla-b16_r0_epoch_0004.png" in md
    assert "## Skipped" in md and "Nothing was skipped." in md
    html = (synth_report / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == len(EXPECTED_FIGURES) + 2
    fits = pd.read_csv(synth_report / "fits.csv")
    kid = fits[fits["metric"] == "kid_rbf_inf"].set_index("regime")
    assert kid.loc["vanilla", "a"] == pytest.approx(PLANTED["vanilla"][0])


def test_ti_curve_is_the_final_epoch_mean_over_repetitions_and_skipped_without_its_columns(
    synth_run, tmp_path
):
    """One line per thermo cell at its trials' final epoch: x the schedule, y the mean of E_i over the
    repetitions (planted 2r apart, so min-max spans 6 nats); right panel w_i E_i."""
    from analysis import figures as F

    results = analysis.load(synth_run)
    final = analysis.final_readings(results)
    long = F.ti_curves(results.epochs, final, "digits")
    cell = long[long["cell"] == "thermo-p0.3"]
    assert cell["trial_id"].nunique() == REPS and len(cell) == REPS * 5
    by_i = cell.groupby("i")["e"]
    t, w, e0 = planted_ti_curve(0.3, 5, 0)
    np.testing.assert_allclose(by_i.mean(), e0 + 3.0)  # reps 0..3: mean offset 2 * 1.5
    np.testing.assert_allclose(by_i.max() - by_i.min(), 6.0)
    fig = F.fig_ti_curve(results.epochs, final, "digits")
    left, right = fig.axes[:2]
    labels = [line.get_label() for line in left.lines]
    k = labels.index("p=0.3")
    np.testing.assert_allclose(left.lines[k].get_xdata(), t)
    np.testing.assert_allclose(left.lines[k].get_ydata(), e0 + 3.0)
    np.testing.assert_allclose(right.lines[k].get_ydata(), w * (e0 + 3.0))
    assert len(left.lines) == final[final["objective"] == "thermo"]["cell"].nunique()

    trials, epochs = synthetic_tables()
    run = write_run(tmp_path, trials, epochs.drop(columns=["ti_temps", "ti_weights", "ti_expected_loglik"]))
    out = tmp_path / "report"
    skipped = R.build_report(analysis.load(run), out).read_text().split("## Skipped", 1)[1]
    assert "TI-curve figure (E_t against t): no per-temperature ti_temps and ti_expected_loglik" in skipped
    assert not (out / "fig17_ti_curve_digits.png").exists()


def test_report_without_thermo_and_with_missing_columns_says_what_it_skipped(tmp_path):
    trials, epochs = synthetic_tables(thermo=False)
    trials = trials.drop(columns=["cell", "wall_time_s", "kl_weight"])
    epochs = epochs.drop(columns=["fid_inf", "kid_poly_inf", "epoch_time_s"])
    run = write_run(tmp_path, trials, epochs)
    out = tmp_path / "report"
    md = R.build_report(analysis.load(run), out).read_text()
    skipped = md.split("## Skipped", 1)[1]
    assert "Fig. 4 (variance vs p): no thermo cells" in skipped
    assert "Fig. 6" in skipped and "Figs. 1-2" in skipped
    assert "no `fid_inf` readings" in skipped
    assert "Fig. 14 (training time)" in skipped
    assert "no `cell` column" in skipped and "no `kl_weight` column" in skipped
    assert (out / "fig03_grad_var_vs_batch_digits.png").stat().st_size > 0
    assert (out / "fig10_kid_vs_grad_var_digits.png").stat().st_size > 0
    assert not (out / "fig04_grad_var_vs_p_digits.png").exists()
    assert (out / "report.html").stat().st_size > 0
    assert "thermo p>1" not in pd.read_csv(out / "fits.csv")["regime"].tolist()


def test_report_with_failed_trials_and_no_epochs_still_writes(tmp_path):
    trials, epochs = synthetic_tables(thermo=False)
    trials.loc[0, ["status", "error"]] = ["error", "RuntimeError: boom"]
    run = write_run(tmp_path, trials, epochs.iloc[:0])
    md = R.build_report(analysis.load(run), tmp_path / "r").read_text()
    assert "nothing to summarise" in md and "## Skipped" in md
    run2 = write_run(tmp_path / "b", trials, epochs)
    final = analysis.final_readings(analysis.load(run2))
    assert trials.loc[0, "trial_id"] not in set(final["trial_id"]) and len(final) == len(trials) - 1


def test_report_cli_reports_a_bad_path_and_exits_2(tmp_path, capsys):
    assert R.main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist; pass a run directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_labels_name_the_estimator_where_a_run_compares_estimators():
    """Cells of one p that differ only in ebm_gradient must not share a label in the figures."""
    from analysis.summary import _mark_extras, cell_label

    base = dict(
        run="r",
        dataset="digits",
        objective="thermo",
        batch_size=32,
        temp_power=1.0,
        num_temps=4,
        posterior_steps=8,
        prior_steps=15,
        kl_weight=1.0,
        gen_gradient="ti",
        ti_rule="kl_batch",
        chains_per_example=1,
    )
    df = pd.DataFrame([dict(base, cell="a", ebm_gradient="none"), dict(base, cell="b", ebm_gradient="ml")])
    labels = [cell_label(r) for r in _mark_extras(df).to_dict("records")]
    assert labels == ["p=1, ebm none", "p=1, ebm ml"]
    same = pd.DataFrame(
        [dict(base, cell="a", ebm_gradient="none"), dict(base, cell="c", ebm_gradient="none", temp_power=3.0)]
    )
    assert [cell_label(r) for r in _mark_extras(same).to_dict("records")] == ["p=1", "p=3"]


def test_three_cells_leave_a_quadratic_no_degrees_of_freedom_and_no_r2():
    x, y = np.array([0.1, 0.2, 0.4]), np.array([0.3, 0.1, 0.25])
    q = fit_quadratic(x, y)
    assert q.dof == 0 and np.isnan(q.r2)
    assert q(x) == pytest.approx(y)  # it interpolates: R^2 would be 1 whatever the cells
    four = fit_quadratic(np.append(x, 0.3), np.append(y, 0.2))
    assert four.dof == 1 and np.isfinite(four.r2)


def test_a_regime_of_three_cells_gets_no_curve_and_the_figure_says_why(tmp_path):
    from analysis import figures as F

    run = write_run(tmp_path, *synthetic_tables(thermo=False, vanilla_var={16: 0.9, 32: 0.6, 64: 0.45}))
    summary = analysis.cell_summary(analysis.final_readings(analysis.load(run)))
    fits = quadratic_fits(summary)
    assert fits["dof"].tolist() == [0] and fits["r2"].isna().all() and fits["a"].notna().all()
    fig = F.fig_metric_vs_grad_var(summary, fits, "digits")
    ax = fig.axes[0]
    assert not [line for line in ax.lines if len(line.get_xdata()) > 3]  # no fitted curve drawn
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("no fit" in t and "no degrees of freedom" in t for t in legend), legend
    assert not any("R$^2$" in t for t in legend)


def test_a_report_section_with_nothing_to_show_says_why_in_one_line(tmp_path):
    run = write_run(tmp_path, *synthetic_tables(thermo=False))
    md = R.build_report(analysis.load(run), tmp_path / "r").read_text()
    section = md.split("### 4. Extra thermo cells", 1)[1].split("###", 1)[0].strip().splitlines()
    assert section[1:] == [
        "",
        "Nothing to show: digits Fig. 6 (extra cells): no thermo cell varies N_t, K or eta off the main "
        "setting.",
    ]


def test_the_report_on_a_run_with_every_schema_column_warns_nothing(tmp_path):
    """A real run carries every column of the schema; the report on it must print no warning a user
    cannot act on (pandas warned ~50 times about a frame built column by column)."""
    import warnings

    from model import schema

    trials, epochs = synthetic_tables()
    evaluator_extras = [f"{m}_{s}" for m in ("fid", "kid_rbf", "kid_poly") for s in ("slope", "inf_stderr")]
    for name, (typ, _) in schema.EPOCH_COLUMNS.items():
        if name not in epochs and pa.types.is_floating(typ):
            epochs[name] = 1.0
    for name in [*evaluator_extras, "eval_time_s"]:
        epochs[name] = 1.0
    for name, (typ, _) in schema.TRIAL_COLUMNS.items():
        if name not in trials and (pa.types.is_floating(typ) or pa.types.is_integer(typ)):
            trials[name] = 1
    run = write_run(tmp_path, trials, epochs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert R.main([str(run), "--out", str(tmp_path / "r")]) == 0
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
