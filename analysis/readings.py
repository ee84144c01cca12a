"""The report's readings that compare every model on one footing (docs/readings.md): the validation
log-likelihood per cell, gradient noise against the paper's `grad_var`, and paired comparisons between
cells. Repetition r of every cell of a grid shares its seed, so cells are compared through the
within-repetition differences (one per repetition present in both cells), not through independent means.

This module *analyses* the readings after a run, from the Parquet tables (pandas, no JAX). Taking them
during training is `model.readings`; the columns they land in are `model.schema`'s.
"""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.summary import cell_label

PAIRED_READINGS = ("val_ll", "kid_rbf_nmax", "kid_rbf_inf", "grad_noise_gen", "grad_noise_ebm")
_CI = 0.95


def fig_val_ll(epochs: pd.DataFrame, final: pd.DataFrame, dataset: str) -> Figure | None:
    """Left: val_ll per evaluation epoch, the mean over repetitions per cell (one axis for vanilla and
    thermo: it is the same estimate for both). Right: the final val_ll per cell, mean +- one std over
    repetitions, beside the mean AIS standard error over the validation subset."""
    mine = final[(final["dataset"] == dataset)]
    if "val_ll" not in mine or mine["val_ll"].notna().sum() == 0:
        return None
    fig = Figure(figsize=(11.0, 4.2))
    ax_t, ax_c = fig.subplots(1, 2)
    cells = list(dict.fromkeys(zip(mine["run"], mine["cell"], strict=True)))
    colors = matplotlib.colormaps["tab10" if len(cells) <= 10 else "tab20"]
    labels = {(r["run"], r["cell"]): cell_label(r) for r in mine.to_dict("records")}
    if "val_ll" in epochs:
        ep = epochs.merge(mine[["run", "trial_id"]], on=["run", "trial_id"]).dropna(subset=["val_ll"])
        cell_of = dict(
            zip(
                zip(mine["run"], mine["trial_id"], strict=True),
                zip(mine["run"], mine["cell"], strict=True),
                strict=True,
            )
        )
        ep = ep.assign(_cell=[cell_of[k] for k in zip(ep["run"], ep["trial_id"], strict=True)])
        for k, key in enumerate(cells):
            g = ep[ep["_cell"] == key].groupby("epoch")["val_ll"].mean()
            if len(g):
                ax_t.plot(g.index, g.to_numpy(), marker=".", color=colors(k % 20), label=labels[key])
    ax_t.set_xlabel("epoch")
    ax_t.set_ylabel("val_ll (nats per image)")
    ax_t.grid(alpha=0.3)
    ax_t.legend(fontsize=7)
    g = mine.groupby(["run", "cell"], sort=False)
    mean, std = g["val_ll"].mean(), g["val_ll"].std(ddof=1)
    ais = g["val_ll_stderr"].mean() if "val_ll_stderr" in mine else mean * np.nan
    x = np.arange(len(mean))
    ax_c.errorbar(
        x,
        mean.to_numpy(),
        yerr=std.fillna(0).to_numpy(),
        fmt="o",
        capsize=4,
        label="mean ± std over repetitions",
    )
    ax_c.errorbar(
        x + 0.15,
        mean.to_numpy(),
        yerr=ais.fillna(0).to_numpy(),
        fmt="none",
        ecolor="gray",
        capsize=2,
        label="± AIS stderr over the subset",
    )
    ax_c.set_xticks(x, [labels[k] for k in mean.index], rotation=30, ha="right", fontsize=7)
    ax_c.set_ylabel("final val_ll (nats per image)")
    ax_c.grid(alpha=0.3)
    ax_c.legend(fontsize=7)
    fig.suptitle(f"{dataset}: validation log-likelihood by AIS (higher is better)")
    fig.tight_layout()
    return fig


def fig_grad_noise_vs_grad_var(final: pd.DataFrame, dataset: str) -> Figure | None:
    """One point per trial: gradient noise (variance over minibatches and chains) against `grad_var` (the
    spread of one gradient's entries), per network, both in the same units, with the y = x line."""
    mine = final[final["dataset"] == dataset]
    nets = [
        n
        for n in ("gen", "ebm")
        if f"grad_noise_{n}" in mine and f"grad_var_{n}" in mine and mine[f"grad_noise_{n}"].notna().any()
    ]
    if not nets:
        return None
    fig = Figure(figsize=(5.2 * len(nets), 4.4))
    axes = fig.subplots(1, len(nets), squeeze=False)[0]
    markers = {"vanilla": "o", "thermo": "^"}
    for ax, net in zip(axes, nets, strict=True):
        sub = mine.dropna(subset=[f"grad_noise_{net}", f"grad_var_{net}"])
        sub = sub[(sub[f"grad_noise_{net}"] > 0) & (sub[f"grad_var_{net}"] > 0)]
        for obj, grp in sub.groupby("objective", sort=False):
            ax.scatter(
                grp[f"grad_var_{net}"],
                grp[f"grad_noise_{net}"],
                marker=markers.get(obj, "s"),
                label=obj,
                alpha=0.8,
            )
        if len(sub):
            lo = min(sub[f"grad_var_{net}"].min(), sub[f"grad_noise_{net}"].min())
            hi = max(sub[f"grad_var_{net}"].max(), sub[f"grad_noise_{net}"].max())
            ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls=":", label="noise = grad_var")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"grad_var_{net} (spread of one gradient's entries)")
        ax.set_ylabel(f"grad_noise_{net} (variance over minibatches and chains)")
        ax.set_title({"gen": "generator", "ebm": "EBM prior"}[net], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{dataset}: gradient noise against the paper's grad_var (final epoch, one point per trial)")
    fig.tight_layout()
    return fig


def paired_differences(
    final: pd.DataFrame, readings: tuple[str, ...] = PAIRED_READINGS, reference: str | None = None
) -> pd.DataFrame:
    """Per (run, dataset), reading and cell other than the reference cell (default: the first cell in
    table order, vanilla first when there is one): the within-repetition differences cell - reference,
    their mean, a 95% t confidence interval and the number of repetitions paired. Repetitions missing
    from either cell are left out; with one pair the interval is nan."""
    cols = ["run", "dataset", "reading", "cell", "reference", "n_pairs", "mean_diff", "ci_low", "ci_high"]
    if "repetition" not in final or final.empty:
        return pd.DataFrame(columns=cols)
    from scipy import stats  # installed with jax, a dependency of the project

    rows = []
    for (run, ds), grp in final.groupby(["run", "dataset"], sort=False):
        order = grp.sort_values("objective", key=lambda s: s != "vanilla", kind="stable")["cell"]
        cells = list(dict.fromkeys(order))
        ref = reference if reference in cells else cells[0]
        for reading in readings:
            if reading not in grp or grp[reading].notna().sum() == 0:
                continue
            wide = grp.pivot_table(index="repetition", columns="cell", values=reading, aggfunc="first")
            if ref not in wide:
                continue
            for cell in cells:
                if cell == ref or cell not in wide:
                    continue
                d = (wide[cell] - wide[ref]).dropna().to_numpy(dtype=float)
                if len(d) == 0:
                    continue
                mean = float(d.mean())
                half = (
                    float(stats.t.ppf(0.5 + _CI / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
                    if len(d) > 1
                    else math.nan
                )
                rows.append(
                    {
                        "run": run,
                        "dataset": ds,
                        "reading": reading,
                        "cell": cell,
                        "reference": ref,
                        "n_pairs": len(d),
                        "mean_diff": mean,
                        "ci_low": mean - half,
                        "ci_high": mean + half,
                    }
                )
    return pd.DataFrame(rows, columns=cols)
