"""analysis.legacy: the paper's CSV readings converted into our schema, checked against the CSVs."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analysis
from analysis import legacy
from analysis.report import build_report

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
READINGS = SHARED / "paper-readings"
needs_readings = pytest.mark.skipif(
    not (READINGS / "logs").is_dir(),
    reason=f"the paper's readings are not at {READINGS} (the shared/ folder beside the repo is absent)",
)
HEADER = "Epoch,Train Loss,Train Grad,Train Grad Var,Val Loss,FID_inf,MIFID_inf,KID_inf,IS_inf"


def _final_rows(cell_dir: Path) -> list[dict[str, str]]:
    """The last row of every experiment<k>.csv in a cell folder, read with the csv module only."""
    rows = []
    for f in sorted(cell_dir.glob("experiment*.csv")):
        with f.open(newline="") as fh:
            rows.append(list(csv.DictReader(fh))[-1])
    return rows


def _direct_means(cell_dir: Path) -> tuple[float, float, int]:
    rows = _final_rows(cell_dir)
    return (
        statistics.fmean(float(r["Train Grad Var"]) for r in rows),
        statistics.fmean(float(r["KID_inf"]) for r in rows),
        len(rows),
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    if not (READINGS / "logs").is_dir():
        pytest.skip(
            f"the paper's readings are not at {READINGS} (the shared/ folder beside the repo is absent)"
        )
    out = tmp_path_factory.mktemp("paper")
    assert legacy.main([str(READINGS), "--out", str(out), "--run", "paper"]) == 0
    return out


@needs_readings
def test_converted_trials_match_the_csv_tree(converted):
    res = analysis.load(converted)
    csvs = sorted(READINGS.rglob("experiment*.csv"))
    assert len(res.trials) == len(csvs) and res.runs == ["paper"]
    assert not res.trials.duplicated(["run", "trial_id"]).any()
    assert set(res.trials["status"]) == {"completed"}
    t = res.trials.set_index("trial_id")
    v = t.loc["CelebA/p=0/batch=25/experiment0"]
    assert v["objective"] == "vanilla" and pd.isna(v["temp_power"]) and pd.isna(v["num_temps"])
    assert pd.isna(v["kl_weight"]) and v["batch_size"] == 25 and v["posterior_steps"] == 20
    th = t.loc["CelebA/temps=20/p=0.1/batch=75/experiment0"]
    assert th["objective"] == "thermo" and th["temp_power"] == 0.1 and th["num_temps"] == 20
    assert (th["ebm_gradient"], th["gen_gradient"], th["ti_rule"]) == ("none", "ti", "kl_batch")
    assert t.loc["CelebA/posterior_mcmc=40/p=0.1/batch=75/experiment0", "posterior_steps"] == 40
    assert t.loc["CelebA/prior_mcmc=80/p=0.1/batch=75/experiment0", "prior_steps"] == 80
    assert t.loc["CelebA/beta=4.0/p=0.1/batch=75/experiment0", "kl_weight"] == 4.0
    svhn = t.loc["SVHN/p=3/batch=75/experiment1"]
    assert svhn["dataset"] == "svhn_cropped" and svhn["posterior_steps"] == 40 and svhn["num_temps"] == 10
    assert (res.trials.loc[res.trials["objective"] == "thermo", "ebm_gradient"] == "none").all()
    # epochs: the CSVs count 0..49; ours count 1..50, so the final reading is epoch 50 == `epochs`
    e = res.epochs[res.epochs["trial_id"] == "CelebA/p=0/batch=25/experiment0"]
    assert e["epoch"].tolist() == list(range(1, 51)) and (res.trials["epochs"] == 50).all()
    for col in ("grad_var_ebm", "grad_var_gen", "kid_poly_inf"):
        assert res.epochs[col].isna().all()
    assert {"mifid_inf", "is_inf"} <= set(res.epochs.columns)


@needs_readings
def test_per_cell_means_match_values_computed_from_the_csvs(converted):
    final = analysis.final_readings(analysis.load(converted))
    summary = analysis.cell_summary(final).set_index(["dataset", "cell"])
    cell_dirs = sorted({f.parent for f in READINGS.rglob("experiment*.csv")})
    assert len(summary) == len(cell_dirs)
    for d in cell_dirs:
        rel = d.relative_to(READINGS).parts
        ds = legacy.dataset_name(rel[1])
        var, kid, n = _direct_means(d)
        s = summary.loc[(ds, "/".join(rel[2:]))]
        assert s["n_trials"] == n
        assert s["grad_var_mean"] == pytest.approx(var, rel=1e-6), d
        assert s["kid_rbf_inf_mean"] == pytest.approx(kid, rel=1e-6), d
    # the paper's Fig. 3 / Table 1: smaller batches give larger variance and (on CelebA) better KID_inf
    b25, b150 = summary.loc[("celeb_a", "p=0/batch=25")], summary.loc[("celeb_a", "p=0/batch=150")]
    var25, kid25, _ = _direct_means(READINGS / "logs/CelebA/p=0/batch=25")
    var150, kid150, _ = _direct_means(READINGS / "logs/CelebA/p=0/batch=150")
    assert (b25["grad_var_mean"], b150["grad_var_mean"]) == pytest.approx((var25, var150), rel=1e-6)
    assert (b25["kid_rbf_inf_mean"], b150["kid_rbf_inf_mean"]) == pytest.approx((kid25, kid150), rel=1e-6)
    assert var25 > var150 and kid25 < kid150


@needs_readings
def test_report_over_the_paper_readings(converted, tmp_path):
    md = build_report(analysis.load(converted), tmp_path, "paper readings").read_text()
    for name in (
        "fig03_grad_var_vs_batch_celeb_a.png",
        "fig04_grad_var_vs_p_celeb_a.png",
        "fig06_extras_celeb_a.png",
        "fig10_kid_vs_grad_var_celeb_a.png",
        "fig12_fid_vs_grad_var_svhn_cropped.png",
        "fig14_training_time_celeb_a.png",
        "fig01_temperature_schedules.png",
    ):
        assert (tmp_path / name).stat().st_size > 5000, name
        assert name in md
    t1 = pd.read_csv(tmp_path / "table1.csv").set_index(["dataset", "parameter"])
    assert t1.loc[("celeb_a", "N_batch (vanilla)"), "grad_var"] == "falls"
    assert t1.loc[("celeb_a", "p (thermo, p > 1)"), "grad_var"] == "rises"
    assert t1.loc[("celeb_a", "p (thermo, 0 < p <= 1)"), "grad_var"] == "falls"
    assert "kid_poly_inf" in md.split("## Skipped", 1)[1]  # the paper recorded no cubic-kernel KID
    n_thermo = sum("/p=0/" not in f.as_posix() for f in READINGS.rglob("experiment*.csv"))
    assert f"{n_thermo} thermo trials ran with `ebm_gradient` none" in md


def _write_csv(path: Path, epochs: int = 3, var: float = 0.5, kid: float = 0.04) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [HEADER] + [
        f"{e},100.0,0.0,{var + (epochs - 1 - e)},101.0,250.0,300.0,{kid},2.0" for e in range(epochs)
    ]
    path.write_text("\n".join(lines) + "\n")


def test_convert_a_small_tree_without_the_shared_readings(tmp_path):
    src = tmp_path / "src"
    _write_csv(src / "logs/CIFAR10/p=0/batch=25/experiment0.csv", var=0.7)
    _write_csv(src / "logs/CIFAR10/p=0/batch=25/experiment1.csv", var=0.9)
    _write_csv(src / "logs/CIFAR10/p=3/batch=75/experiment0.csv", var=0.3, kid=0.05)
    _write_csv(src / "extra_logs/CIFAR10/beta=2.0/p=3/batch=75/experiment0.csv", var=0.2)
    trials, epochs = legacy.convert_readings(src, run="mini")
    assert len(trials) == 4 and set(trials["dataset"]) == {"cifar10"}
    assert trials.set_index("cell").loc["beta=2.0/p=3/batch=75", "kl_weight"] == 2.0
    assert (trials["posterior_steps"] == 40).all()  # CIFAR-10 family default (Table 4)
    assert trials["wall_time_s"].isna().all()  # the paper timed CelebA only
    final = analysis.final_readings(analysis.Results(trials=trials, epochs=epochs))
    s = analysis.cell_summary(final).set_index("cell")
    assert s.loc["p=0/batch=25", "grad_var_mean"] == pytest.approx(0.8)
    assert s.loc["p=0/batch=25", "grad_var_std"] == pytest.approx(np.std([0.7, 0.9], ddof=1))
    assert s.loc["p=3/batch=75", "kid_rbf_inf_mean"] == pytest.approx(0.05)
    assert s.loc["beta=2.0/p=3/batch=75", "extra"]


def test_bad_paths_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no experiment<k>.csv under"):
        legacy.convert_readings(tmp_path)
    with pytest.raises(ValueError, match="lacks p=<p> or batch=<b>"):
        legacy.parse_path(Path("logs/CelebA/p=1/experiment0.csv"))
    with pytest.raises(ValueError, match="unknown parameter 'steps'"):
        legacy.parse_path(Path("extra_logs/CelebA/steps=3/p=1/batch=75/experiment0.csv"))
    with pytest.raises(ValueError, match="not key=value"):
        legacy.parse_path(Path("logs/CelebA/weird/p=1/batch=75/experiment0.csv"))
    bad = tmp_path / "logs/CelebA/p=1/batch=75/experiment0.csv"
    bad.parent.mkdir(parents=True)
    bad.write_text("Epoch,Train Loss\n0,1.0\n")
    with pytest.raises(ValueError, match="missing columns"):
        legacy.convert_readings(tmp_path)


def test_legacy_cli_writes_parquet_and_reports_bad_input(tmp_path, capsys):
    _write_csv(tmp_path / "src/logs/SVHN/p=0/batch=25/experiment0.csv")
    assert legacy.main([str(tmp_path / "src"), "--out", str(tmp_path / "run")]) == 0
    res = analysis.load(tmp_path / "run")
    assert res.runs == ["run"] and res.trials["dataset"].tolist() == ["svhn_cropped"]
    assert res.epochs["epoch"].tolist() == [1, 2, 3]
    assert legacy.main([str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "no experiment<k>.csv under" in capsys.readouterr().err
