"""Per-trial final readings, per-cell summaries, controllability, quadratic fits and Table 1 signs.

Every function takes DataFrames and returns a new DataFrame; nothing is read or written here.
Vocabulary (the paper's): a *cell* is one setting of the grid (batch size for vanilla, p, N_t, K, eta
for thermo); a *regime* is vanilla, thermo p > 1 or thermo 0 < p <= 1 (Fig. 5); the *final* reading
of a trial is its last epoch's value (for FID/KID: the last epoch that was evaluated).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.load import Results

CELL_PARAMS = [
    "dataset",
    "objective",
    "batch_size",
    "temp_power",
    "num_temps",
    "kl_weight",
    "prior_steps",
    "posterior_steps",
    "ebm_gradient",
]
# Settings that, besides p, define a thermo cell; cells off the run's most common setting are the
# "extra" cells of the paper's Section 4 / Fig. 6.
EXTRA_PARAMS = ["batch_size", "num_temps", "posterior_steps", "prior_steps", "kl_weight"]
EXTRA_SYMBOL = {
    "batch_size": "N_batch",
    "num_temps": "N_t",
    "posterior_steps": "K_post",
    "prior_steps": "K_prior",
    "kl_weight": "eta",
}
REGIMES = ("vanilla", "thermo p>1", "thermo 0<p<=1")
METRIC_LABEL = {
    "grad_var": "final learning-gradient variance",
    "kid_rbf_inf": "KID_inf (RBF kernel)",
    "kid_poly_inf": "KID_inf (cubic kernel)",
    "fid_inf": "FID_inf",
}
_NOT_READINGS = {"run", "trial_id", "epoch", "epoch_time_s"}
_FAILED = {"error", "errored", "failed", "failure", "crashed"}


def normalise_trials(trials: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Trials with the key columns the analysis needs filled in, and a note for every assumption made.

    Missing `dataset` -> "unknown"; missing `objective` -> thermo where temp_power is set, else vanilla;
    missing `cell` -> a label built from the parameters; missing parameter columns -> null.
    """
    t = trials.copy()
    notes: list[str] = []
    if "dataset" not in t.columns:
        t["dataset"] = "unknown"
        notes.append("trials have no `dataset` column: all trials treated as one data set 'unknown'")
    t["dataset"] = t["dataset"].fillna("unknown").astype(str)
    if "objective" not in t.columns:
        has_p = t["temp_power"].notna() if "temp_power" in t.columns else pd.Series(False, index=t.index)
        t["objective"] = np.where(has_p, "thermo", "vanilla")
        notes.append("trials have no `objective` column: thermo inferred where temp_power is set")
    for col in CELL_PARAMS:
        if col not in t.columns:
            t[col] = pd.NA
            if col != "ebm_gradient":
                notes.append(f"trials have no `{col}` column: figures and fits that need it are skipped")
    for col in ("batch_size", "temp_power", "num_temps", "kl_weight", "prior_steps", "posterior_steps"):
        t[col] = pd.to_numeric(t[col], errors="coerce").astype("float64")
    t["ebm_gradient"] = t["ebm_gradient"].astype("string")
    if "cell" not in t.columns:
        t["cell"] = [_param_label(r) for r in t.to_dict("records")]
        notes.append("trials have no `cell` column: cells named from their parameters")
    t["cell"] = t["cell"].astype(str)
    return t, notes


def _num(v: object) -> str:
    f = float(v)  # type: ignore[arg-type]
    return str(int(f)) if f.is_integer() else f"{f:g}"


def _param_label(row: dict) -> str:
    if row.get("objective") == "thermo":
        return f"thermo p={_num(row['temp_power'])}" if pd.notna(row.get("temp_power")) else "thermo"
    return f"vanilla b={_num(row['batch_size'])}" if pd.notna(row.get("batch_size")) else "vanilla"


def regime_of(objective: object, temp_power: object) -> str:
    """The paper's regime of a cell: 'vanilla', 'thermo p>1', 'thermo 0<p<=1' (or 'thermo p unknown')."""
    if objective != "thermo":
        return "vanilla"
    if pd.isna(temp_power):
        return "thermo p unknown"
    return "thermo p>1" if float(temp_power) > 1 else "thermo 0<p<=1"  # type: ignore[arg-type]


def failed_mask(trials: pd.DataFrame) -> pd.Series:
    """True for trials whose status says they failed or whose error column is set."""
    bad = pd.Series(False, index=trials.index)
    if "status" in trials.columns:
        bad |= trials["status"].astype("string").str.lower().isin(_FAILED).fillna(False).astype(bool)
    if "error" in trials.columns:
        err = trials["error"].astype("string")
        bad |= (err.notna() & (err.str.strip() != "")).fillna(False).astype(bool)
    return bad


def final_readings(results: Results) -> pd.DataFrame:
    """One row per successful trial: its parameters, regime, and final (last-epoch) readings.

    Metric columns that are NaN on epochs without evaluation take the last evaluated value;
    `final_epoch` is the last epoch recorded, `train_time_s` the sum of epoch_time_s where present.
    """
    trials, _ = normalise_trials(results.trials)
    trials = trials[~failed_mask(trials)]
    ep = results.epochs
    if len(ep) == 0 or "epoch" not in ep.columns:
        out = trials.iloc[:0].copy()  # no epoch rows: no trial has a final reading
        out["final_epoch"] = pd.Series(dtype="float64")
    else:
        ep = ep.sort_values(["run", "trial_id", "epoch"], kind="stable")
        cols = [c for c in ep.columns if c not in _NOT_READINGS and pd.api.types.is_numeric_dtype(ep[c])]
        g = ep.groupby(["run", "trial_id"], sort=False)
        last = g[cols].last() if cols else pd.DataFrame(index=g.size().index)  # last() skips NaN
        last["final_epoch"] = g["epoch"].max()
        if "epoch_time_s" in ep.columns:
            last["train_time_s"] = g["epoch_time_s"].sum(min_count=1)
        clash = [c for c in last.columns if c in trials.columns]
        out = trials.merge(last.drop(columns=clash).reset_index(), on=["run", "trial_id"], how="inner")
    out["regime"] = [regime_of(o, p) for o, p in zip(out["objective"], out["temp_power"], strict=True)]
    return _mark_extras(out).reset_index(drop=True)


def _mark_extras(df: pd.DataFrame) -> pd.DataFrame:
    """Flag thermo cells off the run's most common (batch, N_t, K_post, K_prior, eta) setting."""
    df = df.copy()
    df["extra"] = False
    df["varied"] = ""
    df["estimator"] = ""
    thermo = df[df["objective"] == "thermo"]
    for _, grp in thermo.groupby(["run", "dataset"], sort=False):
        _mark_estimators(df, grp)
        cells = grp.drop_duplicates("cell")
        # baseline: the setting shared by most cells; ties go to the smaller values (the paper's
        # extensions all raised N_t, K or eta above its defaults)
        vals = cells[EXTRA_PARAMS].astype("float64").fillna(-np.inf)
        combos = [tuple(r) for r in vals.to_numpy()]
        counts = pd.Series(combos).value_counts()
        base = min(counts.index, key=lambda c: (-counts[c], c))
        base_row = cells.iloc[combos.index(base)]
        for cell, row in zip(cells["cell"], cells.to_dict("records"), strict=True):
            diff = [
                f"{EXTRA_SYMBOL[p]}={_num(row[p])}"
                for p in EXTRA_PARAMS
                if pd.notna(row[p]) and not (pd.notna(base_row[p]) and float(row[p]) == float(base_row[p]))
            ]
            if diff:
                sel = (df["run"] == row["run"]) & (df["dataset"] == row["dataset"]) & (df["cell"] == cell)
                df.loc[sel, "extra"] = True
                df.loc[sel, "varied"] = ", ".join(diff)
    return df


ESTIMATOR_PARAMS = {
    "ebm_gradient": "ebm",
    "gen_gradient": "gen",
    "ti_rule": "rule",
    "chains_per_example": "M",
}


def _mark_estimators(df: pd.DataFrame, grp: pd.DataFrame) -> None:
    """Where a run's thermo cells of one data set use more than one estimator (ebm_gradient, gen_gradient,
    ti_rule, chains_per_example; docs/estimators.md), name each cell's in `estimator`, e.g. 'ebm ml'."""
    present = [p for p in ESTIMATOR_PARAMS if p in grp.columns]
    varying = [p for p in present if grp[p].astype("string").nunique(dropna=False) > 1]
    if not varying:
        return
    for idx, row in grp.iterrows():
        values = [_num(row[p]) if p == "chains_per_example" else row[p] for p in varying]
        df.loc[idx, "estimator"] = ", ".join(
            f"{ESTIMATOR_PARAMS[p]} {v}" for p, v in zip(varying, values, strict=True)
        )


def cell_label(row: pd.Series | dict) -> str:
    """A short display label for a cell: 'b=25' (vanilla) or 'p=0.1' plus any varied setting and, where a
    run compares estimators, the cell's (e.g. 'p=1, ebm ml')."""
    if row["objective"] != "thermo":
        return f"b={_num(row['batch_size'])}" if pd.notna(row["batch_size"]) else str(row["cell"])
    base = f"p={_num(row['temp_power'])}" if pd.notna(row["temp_power"]) else str(row["cell"])
    extras = [s for s in (row.get("varied"), row.get("estimator")) if isinstance(s, str) and s]
    return ", ".join([base, *extras])


def reading_columns(final: pd.DataFrame) -> list[str]:
    """The numeric final-reading columns of a `final_readings` table (losses, gradients, metrics)."""
    skip = set(CELL_PARAMS) | {
        "repetition",
        "seed",
        "epochs",
        "wall_time_s",
        "devices",
        "optuna_trial",
        "final_epoch",
        "extra",
        "chains_per_example",
    }
    readings = [
        "train_loss",
        "val_loss",
        "grad_mean",
        "grad_var",
        "grad_var_ebm",
        "grad_var_gen",
        "kid_rbf_inf",
        "kid_poly_inf",
        "fid_inf",
    ]
    extra = [
        c
        for c in final.columns
        if c not in skip
        and c not in readings
        and pd.api.types.is_numeric_dtype(final[c])
        and not pd.api.types.is_bool_dtype(final[c])
    ]
    return (
        [c for c in readings if c in final.columns]
        + extra
        + (["wall_time_s"] if "wall_time_s" in final.columns else [])
    )


def cell_summary(final: pd.DataFrame) -> pd.DataFrame:
    """Per (run, dataset, cell): parameters, regime, label, and mean/std/count over repetitions of
    every final reading (columns `<reading>_mean`, `<reading>_std`, `<reading>_count`; std with ddof=1)."""
    keys = ["run", "dataset", "cell"]
    if len(final) == 0:
        return pd.DataFrame(columns=[*keys, "regime", "label", "n_trials"])
    first = [c for c in [*CELL_PARAMS, "regime", "extra", "varied"] if c in final.columns and c not in keys]
    g = final.groupby(keys, sort=False, dropna=False)
    stats: dict[str, pd.Series] = {"n_trials": g.size()}
    for col in reading_columns(final):
        vals = pd.to_numeric(final[col], errors="coerce").astype("float64")
        gg = vals.groupby([final[k] for k in keys], sort=False, dropna=False)
        stats[f"{col}_mean"] = gg.mean()
        stats[f"{col}_std"] = gg.std(ddof=1)
        stats[f"{col}_count"] = gg.count()
    # built at once, not column by column: inserting ~100 columns one by one fragments the frame
    out = pd.concat([g[first].first(), pd.DataFrame(stats)], axis=1).reset_index()
    out["label"] = [cell_label(r) for _, r in out.iterrows()]
    order = {r: i for i, r in enumerate(REGIMES)}
    out["_o"] = out["regime"].map(order).fillna(len(order))
    out = out.sort_values(
        ["run", "dataset", "_o", "extra", "batch_size", "temp_power", "cell"], kind="stable"
    )
    return out.drop(columns="_o").reset_index(drop=True)


def controllability(final: pd.DataFrame, reading: str = "grad_var") -> pd.DataFrame:
    """Per cell: how repeatable the final gradient variance is across repetitions (paper §5.1, Table 1
    'Controllable?'): mean, std (ddof=1), coefficient of variation cv = std/mean, min, max and the
    relative range (max-min)/mean, with the number of repetitions n."""
    cols = ["run", "dataset", "cell", "regime", "extra", "n", "mean", "std", "cv", "min", "max", "rel_range"]
    if reading not in final.columns or len(final) == 0:
        return pd.DataFrame(columns=cols)
    keys = ["run", "dataset", "cell"]
    v = pd.to_numeric(final[reading], errors="coerce").astype("float64")
    g = v.groupby([final[k] for k in keys], sort=False)
    out = pd.DataFrame(
        {"n": g.count(), "mean": g.mean(), "std": g.std(ddof=1), "min": g.min(), "max": g.max()}
    )
    out["cv"] = out["std"] / out["mean"].abs()
    out["rel_range"] = (out["max"] - out["min"]) / out["mean"].abs()
    meta = final.groupby(keys, sort=False)[["regime", "extra"]].first()
    return out.join(meta).reset_index()[cols]


def controllability_by_regime(ctrl: pd.DataFrame) -> pd.DataFrame:
    """Per (run, dataset, regime), main-grid cells only: the median and max cv across cells."""
    main = ctrl[~ctrl["extra"].astype(bool)]
    if len(main) == 0:
        return pd.DataFrame(columns=["run", "dataset", "regime", "cells", "median_cv", "max_cv"])
    g = main.groupby(["run", "dataset", "regime"], sort=False)["cv"]
    return pd.DataFrame({"cells": g.size(), "median_cv": g.median(), "max_cv": g.max()}).reset_index()


@dataclass(frozen=True)
class Quadratic:
    """y = a x^2 + b x + c fitted by least squares, with its coefficient of determination r2 and its
    residual degrees of freedom dof = points - 3 (with dof 0 the curve passes through every point and r2,
    NaN then, would say nothing)."""

    a: float
    b: float
    c: float
    r2: float
    dof: int = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.a * x**2 + self.b * x + self.c


def fit_quadratic(x: np.ndarray, y: np.ndarray) -> Quadratic:
    """Least-squares quadratic y(x), its R^2 = 1 - SS_res / SS_tot and dof = len(x) - 3 (needs 3 distinct
    x). Through exactly three points the quadratic interpolates them: no degrees of freedom are left to
    judge it by, and R^2 is NaN rather than a vacuous 1."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(np.unique(x)) < 3:
        raise ValueError(
            f"a quadratic needs at least 3 distinct x values, got {len(np.unique(x))}; add cells"
        )
    a, b, c = np.polyfit(x, y, 2)
    res = float(np.sum((y - (a * x**2 + b * x + c)) ** 2))
    tot = float(np.sum((y - y.mean()) ** 2))
    dof = len(x) - 3
    r2 = 1.0 - res / tot if tot > 0 and dof > 0 else float("nan")
    return Quadratic(float(a), float(b), float(c), r2, dof)


def spans_decades(values: pd.Series | np.ndarray, decades: float = 2.0) -> bool:
    """True when positive values span at least `decades` orders of magnitude (max/min >= 10**decades)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    return len(v) > 1 and v.max() / v.min() >= 10**decades


def quadratic_fits(
    summary: pd.DataFrame, metric: str = "kid_rbf_inf", x: str = "grad_var", log_x: bool | None = None
) -> pd.DataFrame:
    """Per (run, dataset, regime): the paper's quadratic regression of a cell-mean metric (KID_inf, FID_inf)
    on the cell-mean final gradient variance (Fig. 5/10/12), main-grid cells only.

    The regressor is grad_var itself, or log10(grad_var) when `log_x` is True; `log_x=None` picks log10 for
    a data set whose cell means span two decades or more. Returns a, b, c of y = a X^2 + b X + c, r2, the
    residual degrees of freedom `dof` (n_cells - 3; with 0 the curve interpolates and r2 is NaN), the
    regressor used (column `x`), n_cells, the x range, and `note` when a regime has too few cells to fit.
    """
    cols = [
        "run",
        "dataset",
        "regime",
        "ebm_gradient",
        "metric",
        "x",
        "n_cells",
        "a",
        "b",
        "c",
        "r2",
        "dof",
        "x_min",
        "x_max",
        "note",
    ]
    mx, my = f"{x}_mean", f"{metric}_mean"
    if mx not in summary.columns or my not in summary.columns:
        return pd.DataFrame(columns=cols)
    rows = []
    main = summary[~summary["extra"].astype(bool)]
    for (run, ds), grp in main.groupby(["run", "dataset"], sort=False):
        use_log = spans_decades(grp[mx]) if log_x is None else log_x
        cg = grp["ebm_gradient"].astype("string").fillna("-") if "ebm_gradient" in grp else "-"
        for (regime, chain), sub in grp.groupby([grp["regime"], cg], sort=False):
            if regime not in REGIMES:
                continue
            ok = sub[np.isfinite(sub[mx].astype(float)) & np.isfinite(sub[my].astype(float))]
            xv = ok[mx].to_numpy(float)
            if use_log:
                ok, xv = ok[xv > 0], np.log10(xv[xv > 0])
            row = {
                "run": run,
                "dataset": ds,
                "regime": regime,
                "ebm_gradient": chain,
                "metric": metric,
                "x": f"log10({x})" if use_log else x,
                "n_cells": len(ok),
                "x_min": float(ok[mx].min()) if len(ok) else np.nan,
                "x_max": float(ok[mx].max()) if len(ok) else np.nan,
                "a": np.nan,
                "b": np.nan,
                "c": np.nan,
                "r2": np.nan,
                "dof": np.nan,
                "note": "",
            }
            try:
                q = fit_quadratic(xv, ok[my].to_numpy(float))
                row.update(a=q.a, b=q.b, c=q.c, r2=q.r2, dof=q.dof)
            except ValueError as e:
                row["note"] = f"not fitted: {e}"
            rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson on average ranks); NaN when either side is constant."""
    rx = pd.Series(x).rank().to_numpy()
    ry = pd.Series(y).rank().to_numpy()
    if len(rx) < 2 or np.std(rx) == 0 or np.std(ry) == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _trend(rho: float, rising: str = "rises", falling: str = "falls") -> str:
    if not np.isfinite(rho):
        return "no trend (constant or too few cells)"
    return rising if rho > 0 else falling if rho < 0 else "no trend"


_PAPER_CLAIMS = {
    "batch_size": (
        "decreasing N_batch increases variance (falls with N_batch)",
        "decreasing N_batch improves quality until a minimum",
        "no: large range across repetitions",
    ),
    "p>1": (
        "increasing p increases variance (rises with p)",
        "increasing p improves quality until a minimum at p~6",
        "yes: small range across repetitions",
    ),
    "0<p<=1": (
        "decreasing p increases variance (falls with p)",
        "much poorer quality (mode collapse); increasing p improves it",
        "yes: small range",
    ),
    "num_temps": ("increasing N_t decreases variance", "increasing N_t improves quality", ""),
    "posterior_steps": ("increasing K_post decreases variance", "no impact or worse", ""),
    "prior_steps": ("(not in the paper's tables)", "", ""),
    "kl_weight": ("increasing eta decreases variance", "increasing eta slightly improves quality", ""),
}


def table1(summary: pd.DataFrame, ctrl: pd.DataFrame, metric: str = "kid_rbf_inf") -> pd.DataFrame:
    """The paper's Tables 1-2 restated as measured signs, per (run, dataset).

    For each parameter (N_batch over vanilla cells; p within each thermo regime; N_t, K_post, K_prior,
    eta over extra cells that vary only that setting): the number of cells, the Spearman rank correlation
    of the cell-mean final gradient variance (and of the metric; lower KID_inf = better images) with
    the parameter, the measured direction, the median cv across those cells, and the paper's claim.
    """
    rows = []
    med_cv = ctrl.set_index(["run", "dataset", "cell"])["cv"] if len(ctrl) else pd.Series(dtype=float)
    for (run, ds), grp in summary.groupby(["run", "dataset"], sort=False):
        groups: list[tuple[str, str, pd.DataFrame]] = []
        main = grp[~grp["extra"].astype(bool)]
        groups.append(("N_batch (vanilla)", "batch_size", main[main["regime"] == "vanilla"]))
        groups.append(("p (thermo, p > 1)", "p>1", main[main["regime"] == "thermo p>1"]))
        groups.append(("p (thermo, 0 < p <= 1)", "0<p<=1", main[main["regime"] == "thermo 0<p<=1"]))
        thermo = grp[grp["objective"] == "thermo"]
        for param in ("num_temps", "posterior_steps", "prior_steps", "kl_weight") if len(thermo) else ():
            others = [c for c in ["temp_power", *EXTRA_PARAMS] if c != param]
            key = thermo[others].astype("string").fillna("-").agg("|".join, axis=1)
            for _, sub in thermo.groupby(key, sort=False):
                if sub[param].nunique() >= 2 and sub["extra"].astype(bool).any():
                    p = _num(sub["temp_power"].iloc[0]) if pd.notna(sub["temp_power"].iloc[0]) else "?"
                    groups.append((f"{EXTRA_SYMBOL[param]} (thermo, p = {p})", param, sub))
        for name, claim_key, sub in groups:
            if sub.empty:
                continue
            param_col = "temp_power" if claim_key in ("p>1", "0<p<=1") else claim_key
            row = {"run": run, "dataset": ds, "parameter": name, "n_cells": len(sub)}
            if len(sub) >= 2 and "grad_var_mean" in sub.columns:
                rho_v = _spearman(sub[param_col].to_numpy(float), sub["grad_var_mean"].to_numpy(float))
                row["rho_grad_var"] = rho_v
                row["grad_var"] = _trend(rho_v)
            else:
                row["rho_grad_var"], row["grad_var"] = np.nan, "too few cells"
            if len(sub) >= 2 and f"{metric}_mean" in sub.columns:
                rho_m = _spearman(sub[param_col].to_numpy(float), sub[f"{metric}_mean"].to_numpy(float))
                row[f"rho_{metric}"] = rho_m
                row["image_fidelity"] = _trend(rho_m, "worsens (metric rises)", "improves (metric falls)")
            else:
                row[f"rho_{metric}"], row["image_fidelity"] = (
                    np.nan,
                    f"no {metric}" if len(sub) >= 2 else "too few cells",
                )
            cvs = [med_cv.get((run, ds, c), np.nan) for c in sub["cell"]]
            row["median_cv_grad_var"] = float(np.nanmedian(cvs)) if np.isfinite(cvs).any() else np.nan
            claim = _PAPER_CLAIMS[claim_key]
            row["paper_grad_var"], row["paper_fidelity"], row["paper_controllable"] = claim
            rows.append(row)
    cols = [
        "run",
        "dataset",
        "parameter",
        "n_cells",
        "grad_var",
        "rho_grad_var",
        "image_fidelity",
        f"rho_{metric}",
        "median_cv_grad_var",
        "paper_grad_var",
        "paper_fidelity",
        "paper_controllable",
    ]
    return pd.DataFrame(rows, columns=cols)
