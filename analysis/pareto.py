"""The Pareto front of a multi-objective search run (`python -m sweep.search --metric A --metric B`).

A search run's `search.json` names its metrics and their directions; its trials table holds one row per
(proposal, seed) with the proposal's seed means told to Optuna (`search_value_<metric>`) and their
standard errors (`search_se_<metric>`, with several seeds per proposal). `search_proposals` makes one row
per COMPLETE proposal of those columns, `pareto_front` marks the non-dominated ones, and `fig_pareto`
draws them. Nothing here imports JAX, Ray or model code other than the results schema.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.remote import RemotePath
from model.schema import SEARCH_MANIFEST_FILE


def pareto_front(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of `values` (one row per proposal, one column per objective,
    `directions` "minimize" or "maximize" per column). A row dominates another when it is no worse in
    every objective and strictly better in at least one; identical rows do not dominate each other (both
    stay on the front); a row with a NaN is never on the front and dominates nothing."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.shape[1] != len(directions):
        raise ValueError(f"values of shape {values.shape} need one column per direction {list(directions)}")
    bad = [d for d in directions if d not in ("minimize", "maximize")]
    if bad:
        raise ValueError(f"direction {bad[0]!r} is neither 'minimize' nor 'maximize'")
    sign = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    cost = values * sign  # every objective minimised
    finite = np.isfinite(cost).all(axis=1)
    c = cost[finite]
    no_worse = (c[:, None, :] <= c[None, :, :]).all(axis=2)  # [j, i]: j no worse than i everywhere
    better = (c[:, None, :] < c[None, :, :]).any(axis=2)  # [j, i]: j strictly better somewhere
    dominated = (no_worse & better).any(axis=0)
    mask = np.zeros(len(values), dtype=bool)
    mask[np.flatnonzero(finite)] = ~dominated
    return mask


def search_objectives(results_dir: Path | RemotePath) -> tuple[list[str], list[str], list[str]] | None:
    """(metrics, directions, searched fields) of the multi-objective search whose results directory is
    `results_dir`, read from its run's `search.json`; None for a grid run or a single-objective search."""
    run_dir = results_dir.parent if results_dir.name == "results" else results_dir
    path = run_dir / SEARCH_MANIFEST_FILE
    try:
        manifest = json.loads(path.read_bytes().decode()) if path.exists() else None
    except (OSError, ValueError):
        return None
    metrics = (manifest or {}).get("metrics") or []
    directions = (manifest or {}).get("directions") or []
    if len(metrics) < 2 or len(directions) != len(metrics):
        return None
    return list(metrics), list(directions), list(manifest.get("space") or [])


def search_proposals(
    trials: pd.DataFrame, metrics: Sequence[str], fields: Sequence[str] = ()
) -> pd.DataFrame:
    """One row per COMPLETE proposal of a search's trials table: `optuna_trial`, the searched `fields`
    (their values on the proposal's first seed row), `seeds` (rows of the proposal), and per metric its
    seed mean `<metric>` (what Optuna was told) and standard error `<metric>_se` (NaN with one seed)."""
    cols = ["optuna_trial", *fields, "seeds", *(c for m in metrics for c in (m, f"{m}_se"))]
    need = {"optuna_trial", "optuna_state", *(f"search_value_{m}" for m in metrics)}
    if not need <= set(trials.columns):
        return pd.DataFrame(columns=cols)
    done = trials[trials["optuna_state"] == "COMPLETE"]
    rows = []
    for number, group in done.groupby("optuna_trial", sort=True):
        first = group.sort_values("repetition").iloc[0] if "repetition" in group else group.iloc[0]
        row = {"optuna_trial": int(number), **{f: first.get(f) for f in fields}, "seeds": len(group)}
        for m in metrics:
            row[m] = float(first[f"search_value_{m}"])
            se = first.get(f"search_se_{m}")
            row[f"{m}_se"] = float(se) if se is not None and pd.notna(se) else np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def front_table(proposals: pd.DataFrame, metrics: Sequence[str], directions: Sequence[str]) -> pd.DataFrame:
    """The proposals with an `on_front` column, front first, each objective shown as mean ± SE."""
    table = proposals.copy()
    table["on_front"] = pareto_front(table[list(metrics)].to_numpy(), directions) if len(table) else []
    for m in metrics:
        table[f"{m} (mean ± SE)"] = [
            f"{v:.4g}" if not np.isfinite(s) else f"{v:.4g} ± {s:.2g}"
            for v, s in zip(table[m], table[f"{m}_se"], strict=True)
        ]
    table = table.drop(columns=[c for m in metrics for c in (m, f"{m}_se")])
    return table.sort_values(["on_front", "optuna_trial"], ascending=[False, True]).reset_index(drop=True)


def fig_pareto(
    proposals: pd.DataFrame, metrics: Sequence[str], directions: Sequence[str], title: str = ""
) -> Figure | None:
    """Two objectives: every proposal at (mean of the first, mean of the second) with ± SE bars, the front
    highlighted and joined by its staircase, dominated proposals faded, each labelled with its Optuna
    trial number. None without two objectives or a complete proposal."""
    if len(metrics) != 2 or proposals.empty:
        return None
    x, y = (proposals[m].to_numpy(dtype=float) for m in metrics)
    xe, ye = (proposals[f"{m}_se"].to_numpy(dtype=float) for m in metrics)
    front = pareto_front(np.column_stack([x, y]), directions)
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for on, alpha, color, label in (
        (False, 0.3, "tab:gray", "dominated"),
        (True, 1.0, "tab:red", "Pareto front"),
    ):
        sel = front == on
        if sel.any():
            ax.errorbar(
                x[sel],
                y[sel],
                xerr=np.nan_to_num(xe[sel]),
                yerr=np.nan_to_num(ye[sel]),
                fmt="o",
                color=color,
                alpha=alpha,
                capsize=2,
                label=label,
            )
    order = np.argsort(x[front])
    ax.step(x[front][order], y[front][order], where="post", color="tab:red", lw=1, alpha=0.6)
    labels: dict[tuple[float, float, bool], list[int]] = {}  # proposals at one point share one label
    for number, xi, yi, on in zip(proposals["optuna_trial"], x, y, front, strict=True):
        labels.setdefault((xi, yi, bool(on)), []).append(int(number))
    for (xi, yi, on), numbers in labels.items():
        text = ",".join(str(n) for n in sorted(numbers))
        ax.annotate(
            text, (xi, yi), fontsize=7, alpha=1.0 if on else 0.4, xytext=(3, 3), textcoords="offset points"
        )
    better = {"minimize": "lower is better", "maximize": "higher is better"}
    ax.set_xlabel(f"{metrics[0]} ({better[directions[0]]})")
    ax.set_ylabel(f"{metrics[1]} ({better[directions[1]]})")
    ax.set_title(title or "Pareto front of the search (mean ± SE over each proposal's seeds)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
