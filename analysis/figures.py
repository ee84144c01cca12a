"""The paper's figures from the summary tables, drawn with matplotlib's object API and the Agg canvas
(no pyplot, no GUI, no global backend switch).

Each `fig_*` function takes DataFrames from `analysis.summary` and returns a matplotlib `Figure`
(or None when the data it needs are absent); `save` writes one to PNG.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from analysis.summary import REGIMES, cell_label, spans_decades

DATASET_TITLE = {"celeb_a": "CelebA", "cifar10": "CIFAR-10", "svhn_cropped": "SVHN", "digits": "digits"}
REGIME_COLOR = {
    "vanilla": "tab:blue",
    "thermo p>1": "tab:orange",
    "thermo 0<p<=1": "tab:green",
    "thermo p unknown": "tab:gray",
}
REGIME_TITLE = {
    "vanilla": "vanilla (batch size varies)",
    "thermo p>1": "thermo, p > 1",
    "thermo 0<p<=1": "thermo, 0 < p <= 1",
    "thermo p unknown": "thermo, p unknown",
}
RUN_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
RUN_COLORS = ["tab:blue", "tab:red", "tab:purple", "tab:brown", "tab:olive", "tab:cyan"]
METRIC_AXIS = {
    "kid_rbf_inf": "KID$_\\infty$ (RBF kernel; lower is better)",
    "kid_poly_inf": "KID$_\\infty$ (cubic kernel; lower is better)",
    "fid_inf": "FID$_\\infty$ (lower is better)",
    "grad_var": "learning-gradient variance",
    "train_loss": "training loss (nats per image)",
}
GRAD_VAR_AXIS = "final learning-gradient variance Var$_\\theta[\\nabla_\\theta L]$ (per entry)"


def dataset_title(ds: str) -> str:
    """The data set's display name (CelebA, CIFAR-10, SVHN ...)."""
    return DATASET_TITLE.get(ds, ds)


def save(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as PNG at `path` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # render with Agg explicitly; no pyplot, so a notebook's backend is left alone
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _sci(v: float, _pos: object = None) -> str:
    """Tick label: thousands separators for large values, 4 significant digits otherwise."""
    if v == 0:
        return "0"
    if abs(v) >= 1e4:
        return f"{v:,.0f}"
    return f"{v:.4g}" if abs(v) >= 1e-3 else f"{v:.2e}"


def _set_scale(ax, values, axis: str = "y") -> None:
    """Log scale when positive values span a decade or more; otherwise compact linear tick labels."""
    v = np.asarray(values, dtype=float)
    if spans_decades(v, 1.0) and (v[np.isfinite(v)] > 0).all():
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        # label 1, 2, 5 of each decade in plain numbers: readable where variances span decades
        ax_ = ax.yaxis if axis == "y" else ax.xaxis
        ax_.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax_.set_major_formatter(FuncFormatter(_sci))
        ax_.set_minor_formatter(NullFormatter())
    else:
        _linear(ax.yaxis if axis == "y" else ax.xaxis)


def _linear(axis) -> None:
    """At most 6 major ticks with compact labels, so small variances (0.00675 ...) do not collide."""
    axis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    axis.set_major_formatter(FuncFormatter(_sci))


def _run_style(runs: list[str]) -> dict[str, tuple[str, str]]:
    return {
        r: (RUN_MARKERS[i % len(RUN_MARKERS)], RUN_COLORS[i % len(RUN_COLORS)]) for i, r in enumerate(runs)
    }


def _boxes(ax, final: pd.DataFrame, key: str, reading: str, labeller) -> None:
    """Box plot of `reading` over repetitions for each value of `key`, one box per run side by side."""
    runs = list(dict.fromkeys(final["run"]))
    style = _run_style(runs)
    keys = sorted(final[key].dropna().unique())
    width = 0.7 / len(runs)
    rng = np.random.default_rng(0)
    for j, run in enumerate(runs):
        sub = final[final["run"] == run]
        data, pos = [], []
        for i, k in enumerate(keys):
            v = sub.loc[sub[key] == k, reading].dropna().to_numpy(float)
            if len(v):
                data.append(v)
                pos.append(i + (j - (len(runs) - 1) / 2) * width)
        if not data:
            continue
        marker, color = style[run]
        bp = ax.boxplot(
            data, positions=pos, widths=width * 0.85, patch_artist=True, showfliers=False, manage_ticks=False
        )
        for box in bp["boxes"]:
            box.set(facecolor=color, alpha=0.25, edgecolor=color)
        for part in ("medians", "whiskers", "caps"):
            for line in bp[part]:
                line.set(color=color)
        for p, v in zip(pos, data, strict=True):
            ax.scatter(
                p + rng.uniform(-width * 0.2, width * 0.2, len(v)),
                v,
                s=14,
                marker=marker,
                color=color,
                zorder=3,
                label=run if p == pos[0] else None,
            )
    ax.set_xticks(range(len(keys)), [labeller(k) for k in keys])
    ax.set_xlim(-0.6, len(keys) - 0.4)
    if len(runs) > 1:
        ax.legend(title="run", fontsize=8)


def fig_grad_var_vs_batch(final: pd.DataFrame, dataset: str) -> Figure | None:
    """Paper Fig. 3: final learning-gradient variance of vanilla cells against batch size (box plots over
    repetitions; points are the individual repetitions)."""
    sub = final[(final["dataset"] == dataset) & (final["regime"] == "vanilla") & ~final["extra"]]
    sub = sub[sub["batch_size"].notna() & sub["grad_var"].notna()] if "grad_var" in sub else sub.iloc[:0]
    if sub.empty:
        return None
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    _boxes(ax, sub, "batch_size", "grad_var", _num)
    _set_scale(ax, sub["grad_var"])
    ax.set_xlabel("batch size N$_{batch}$ (images)")
    ax.set_ylabel(GRAD_VAR_AXIS, fontsize=9)
    ax.set_title(f"{dataset_title(dataset)}: vanilla gradient variance vs batch size (Fig. 3)")
    ax.grid(axis="y", alpha=0.3)
    return fig


def fig_grad_var_vs_p(final: pd.DataFrame, dataset: str) -> Figure | None:
    """Paper Fig. 4: final learning-gradient variance of the main thermo cells against the power p."""
    sub = final[(final["dataset"] == dataset) & (final["objective"] == "thermo") & ~final["extra"]]
    sub = sub[sub["temp_power"].notna() & sub["grad_var"].notna()] if "grad_var" in sub else sub.iloc[:0]
    if sub.empty:
        return None
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    _boxes(ax, sub, "temp_power", "grad_var", _num)
    ps = sorted(sub["temp_power"].unique())
    n_low = sum(p <= 1 for p in ps)
    if 0 < n_low < len(ps):
        ax.axvline(n_low - 0.5, color="gray", ls="--", lw=1)
        ax.text(
            n_low - 0.55,
            1.0,
            "p <= 1 | p > 1 ",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color="gray",
        )
    _set_scale(ax, sub["grad_var"])
    nt = sub["num_temps"].dropna().unique()
    nt_txt = f", N$_t$ = {_num(nt[0])}" if len(nt) == 1 else ""
    ax.set_xlabel(f"temperature power p (Eq. 21; categorical){nt_txt}")
    ax.set_ylabel(GRAD_VAR_AXIS, fontsize=9)
    ax.set_title(f"{dataset_title(dataset)}: thermo gradient variance vs p (Fig. 4)", pad=14)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _fit_curve(ax, fit: pd.Series, color: str, ls: str, label: str) -> None:
    """The regime's quadratic over its cells' x range, R^2 in the legend; none where the quadratic passes
    through every cell (dof 0), and the legend says so."""
    if fit.get("dof", 1) == 0:
        note = f"{label}: no fit, {int(fit['n_cells'])} cells leave a quadratic no degrees of freedom"
        ax.plot([], [], color=color, ls="none", label=note)
        return
    lo, hi = float(fit["x_min"]), float(fit["x_max"])
    if str(fit["x"]).startswith("log10"):
        xs = np.logspace(np.log10(lo), np.log10(hi), 100)
        ys = fit["a"] * np.log10(xs) ** 2 + fit["b"] * np.log10(xs) + fit["c"]
    else:
        xs = np.linspace(lo, hi, 100)
        ys = fit["a"] * xs**2 + fit["b"] * xs + fit["c"]
    ax.plot(xs, ys, color=color, ls=ls, lw=1.3, label=f"{label} quadratic fit, R$^2$={fit['r2']:.2f}")


def _scatter_cells(
    ax, cells: pd.DataFrame, metric: str, color: str, marker: str, label: str, annotate: bool = True
) -> None:
    ax.errorbar(
        cells["grad_var_mean"],
        cells[f"{metric}_mean"],
        xerr=cells["grad_var_std"].fillna(0),
        yerr=cells[f"{metric}_std"].fillna(0),
        fmt=marker,
        color=color,
        ms=6,
        capsize=3,
        lw=1,
        label=label,
    )
    if annotate:
        for _, r in cells.iterrows():
            ax.annotate(
                r["label"],
                (r["grad_var_mean"], r[f"{metric}_mean"]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=7,
                color=color,
            )


def _metric_cells(summary: pd.DataFrame, dataset: str, metric: str) -> pd.DataFrame:
    need = ["grad_var_mean", f"{metric}_mean"]
    if any(c not in summary.columns for c in need):
        return summary.iloc[:0]
    sub = summary[(summary["dataset"] == dataset)]
    return sub[np.isfinite(sub[need].astype(float)).all(axis=1)]


def fig_metric_vs_grad_var(
    summary: pd.DataFrame,
    fits: pd.DataFrame,
    dataset: str,
    metric: str = "kid_rbf_inf",
    by_regime: bool = False,
) -> Figure | None:
    """Paper Fig. 10 (collated) or Fig. 5 (`by_regime`, one panel per regime); Fig. 12 with metric fid_inf:
    cell means of the final metric against cell means of the final gradient variance, error bars one std
    over repetitions, and each regime's quadratic fit (main-grid cells only)."""
    cells = _metric_cells(summary, dataset, metric)
    cells = cells[~cells["extra"].astype(bool)]
    if cells.empty:
        return None
    regimes = [r for r in REGIMES if (cells["regime"] == r).any()]
    runs = list(dict.fromkeys(cells["run"]))
    style = _run_style(runs)
    panels = regimes if by_regime else [None]
    fig = Figure(figsize=(5.0 * len(panels) if by_regime else 7.5, 4.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    use_log_x = fits["x"].astype(str).str.startswith("log10").any() if len(fits) else False
    for ax, panel in zip(axes, panels, strict=True):
        for regime in regimes if panel is None else [panel]:
            for run in runs:
                sub = cells[(cells["regime"] == regime) & (cells["run"] == run)]
                if sub.empty:
                    continue
                name = REGIME_TITLE[regime] + (f" [{run}]" if len(runs) > 1 else "")
                marker = style[run][0]
                _scatter_cells(ax, sub, metric, REGIME_COLOR[regime], marker, name)
                f = fits[(fits["dataset"] == dataset) & (fits["run"] == run) & (fits["regime"] == regime)]
                for _, fit in f[f["a"].notna()].iterrows():
                    _fit_curve(
                        ax,
                        fit,
                        REGIME_COLOR[regime],
                        "-" if runs.index(run) == 0 else "--",
                        regime if len(runs) == 1 else f"{regime} [{run}]",
                    )
        if use_log_x:
            ax.set_xscale("log")
        else:
            _linear(ax.xaxis)
        _linear(ax.yaxis)
        ax.set_xlabel(GRAD_VAR_AXIS, fontsize=8)
        ax.set_ylabel(METRIC_AXIS.get(metric, metric))
        ax.grid(alpha=0.3)
        if by_regime:
            ax.legend(fontsize=7)
        else:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        if panel is not None:
            ax.set_title(REGIME_TITLE[panel], fontsize=10)
    fig_no = {"kid_rbf_inf": "Fig. 5" if by_regime else "Fig. 10", "fid_inf": "Fig. 12"}.get(metric, "")
    what = METRIC_AXIS.get(metric, metric).split(" (")[0]
    fig.suptitle(
        f"{dataset_title(dataset)}: {what} vs gradient variance by regime"
        + (f" ({fig_no})" if fig_no else "")
    )
    fig.tight_layout()
    return fig


def fig_extras(
    summary: pd.DataFrame, fits: pd.DataFrame, dataset: str, metric: str = "kid_rbf_inf"
) -> Figure | None:
    """Paper Fig. 6: the extra thermo cells (other N_t, K, eta) overlaid on the 0 < p <= 1 regime; the main
    cell with the extras' p (their baseline) is circled."""
    cells = _metric_cells(summary, dataset, metric)
    extras = cells[cells["extra"].astype(bool)]
    if extras.empty:
        return None
    low = cells[(cells["regime"] == "thermo 0<p<=1") & ~cells["extra"].astype(bool)]
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    if not low.empty:
        _scatter_cells(ax, low, metric, "tab:gray", "o", "main grid, 0 < p <= 1")
        for _, fit in fits[
            (fits["dataset"] == dataset) & (fits["regime"] == "thermo 0<p<=1") & fits["a"].notna()
        ].iterrows():
            _fit_curve(ax, fit, "tab:gray", ":", "0 < p <= 1")
        base = low[low["temp_power"].isin(extras["temp_power"]) & low["run"].isin(extras["run"])]
        ax.scatter(
            base["grad_var_mean"],
            base[f"{metric}_mean"],
            s=400,
            facecolors="none",
            edgecolors="k",
            lw=1.2,
        )
        for _, b in base.iterrows():
            ax.annotate(
                "baseline",
                (b["grad_var_mean"], b[f"{metric}_mean"]),
                textcoords="offset points",
                xytext=(0, -24),
                ha="center",
                fontsize=8,
            )
    colors = matplotlib.colormaps["tab10"]
    for i, (_, r) in enumerate(extras.iterrows()):
        _scatter_cells(ax, pd.DataFrame([r]), metric, colors(i % 10), "s", r["label"], annotate=False)
    _set_scale(ax, cells["grad_var_mean"], "x")
    _linear(ax.yaxis)
    ax.set_xlabel(GRAD_VAR_AXIS, fontsize=8)
    ax.set_ylabel(METRIC_AXIS.get(metric, metric))
    ax.set_title(f"{dataset_title(dataset)}: extra thermo cells on the 0 < p <= 1 regime (Fig. 6)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def fig_training_curves(
    epochs: pd.DataFrame,
    final: pd.DataFrame,
    dataset: str,
    readings: tuple[str, ...] = ("train_loss", "grad_var", "kid_rbf_inf"),
) -> Figure | None:
    """Paper Fig. 9: per-epoch training loss, gradient variance and KID_inf of each cell, the mean over
    repetitions as a line and their min-max range as a band; one row per objective."""
    readings = tuple(r for r in readings if r in epochs.columns and epochs[r].notna().any())
    if not readings or "epoch" not in epochs.columns:
        return None
    mine = final[final["dataset"] == dataset].sort_values(
        ["extra", "batch_size", "temp_power", "cell"], kind="stable", na_position="first"
    )
    meta = mine[["run", "trial_id", "cell", "objective"]].copy()
    meta["label_short"] = [cell_label(r) for r in mine.to_dict("records")]
    # the sweep's epochs table repeats trial columns (cell, repetition): take them from the trials side
    clash = [c for c in meta.columns if c in epochs.columns and c not in ("run", "trial_id")]
    ep = meta.merge(epochs.drop(columns=clash), on=["run", "trial_id"], how="inner")
    if ep.empty:
        return None
    objectives = [o for o in ("vanilla", "thermo") if (ep["objective"] == o).any()]
    runs = list(dict.fromkeys(ep["run"]))
    fig = Figure(figsize=(4.6 * len(readings) + 2.2, 3.4 * len(objectives)))
    axes = fig.subplots(len(objectives), len(readings), squeeze=False)
    for i, obj in enumerate(objectives):
        sub = ep[ep["objective"] == obj]
        cells = list(dict.fromkeys(zip(sub["run"], sub["cell"], sub["label_short"], strict=True)))
        colors = matplotlib.colormaps["tab10" if len(cells) <= 10 else "tab20"]
        for j, reading in enumerate(readings):
            ax = axes[i][j]
            for k, (run, cell, label) in enumerate(cells):
                c = sub[(sub["run"] == run) & (sub["cell"] == cell)].dropna(subset=[reading])
                if c.empty:
                    continue
                g = c.groupby("epoch")[reading]
                m, lo, hi = g.mean(), g.min(), g.max()
                ls = "-" if runs.index(run) == 0 else "--"
                name = label + (f" [{run}]" if len(runs) > 1 else "")
                ax.plot(
                    m.index,
                    m.to_numpy(),
                    color=colors(k % 20),
                    ls=ls,
                    lw=1.2,
                    marker="." if g.ngroups < 15 else None,
                    label=name,
                )
                ax.fill_between(m.index, lo.to_numpy(), hi.to_numpy(), color=colors(k % 20), alpha=0.15)
            vals = sub[reading].dropna()
            _set_scale(ax, vals)
            ax.set_xlabel("epoch")
            ax.set_ylabel(METRIC_AXIS.get(reading, reading), fontsize=8)
            ax.set_title(f"{obj}: {reading}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[i][-1].legend(
            fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), title=f"{obj} cells", title_fontsize=8
        )
    fig.suptitle(
        f"{dataset_title(dataset)}: training curves, mean (line) and min-max (band) over repetitions (Fig. 9)"
    )
    fig.tight_layout()
    return fig


TI_CURVE_COLUMNS = ("ti_temps", "ti_expected_loglik")


def _is_list(v: object) -> bool:
    """A non-empty list reading (Parquet lists load as arrays; a missing one as None or NaN)."""
    return isinstance(v, list | tuple | np.ndarray) and len(v) > 0


def ti_curves(epochs: pd.DataFrame, final: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """The TI curve at each thermo trial's last epoch that recorded one, one row per temperature:
    run, cell, label, trial_id, i, t (t_i), e (E_i) and we (w_i E_i, NaN without `ti_weights`)."""
    if any(c not in epochs.columns for c in TI_CURVE_COLUMNS) or "epoch" not in epochs.columns:
        return pd.DataFrame()
    mine = final[(final["dataset"] == dataset) & (final["objective"] == "thermo")]
    meta = mine[["run", "trial_id", "cell"]].assign(label=[cell_label(r) for r in mine.to_dict("records")])
    ep = meta.merge(epochs.drop(columns=["cell"], errors="ignore"), on=["run", "trial_id"])
    has = ep["ti_temps"].map(_is_list) & ep["ti_expected_loglik"].map(_is_list)
    last = ep[has].sort_values("epoch").groupby(["run", "trial_id"]).tail(1)
    rows = []
    for r in last.to_dict("records"):
        w = r.get("ti_weights")
        w = np.asarray(w, float) if _is_list(w) and len(w) == len(r["ti_temps"]) else None
        for i, (t, e) in enumerate(zip(r["ti_temps"], r["ti_expected_loglik"], strict=True)):
            rows.append(
                dict(
                    run=r["run"],
                    cell=r["cell"],
                    label=r["label"],
                    trial_id=r["trial_id"],
                    i=i,
                    t=float(t),
                    e=float(e),
                    we=float(w[i] * e) if w is not None else np.nan,
                )
            )
    return pd.DataFrame(rows)


def fig_ti_curve(epochs: pd.DataFrame, final: pd.DataFrame, dataset: str) -> Figure | None:
    """The TI curve E_t = E_{p(z|x,t)}[log p(x|z)] against t (Eq. 16) from the epochs table's
    `ti_temps` and `ti_expected_loglik` at each thermo trial's final epoch: one line per cell, the mean
    over repetitions with a marker at each t_i, and their min-max range as a band. Right (when `ti_weights`
    was recorded): the trapezium's terms w_i E_i, whose sum is the trapezoid estimate of log p(x), so the
    temperatures that carry the estimate stand out. None without the columns or thermo trials."""
    long = ti_curves(epochs, final, dataset)
    if long.empty:
        return None
    weighted = long["we"].notna().any()
    fig = Figure(figsize=(11.0 if weighted else 6.4, 4.2))
    axes = fig.subplots(1, 2 if weighted else 1, squeeze=False)[0]
    cells = list(dict.fromkeys(zip(long["run"], long["cell"], long["label"], strict=True)))
    runs = list(dict.fromkeys(long["run"]))
    colors = matplotlib.colormaps["tab10" if len(cells) <= 10 else "tab20"]
    for ax, col, ylabel in zip(
        axes,
        ("e", "we"),
        ("E$_t$ = E$_{p(z|x,t)}$[log p(x|z)] (nats per image)", "w$_i$ E$_i$ (nats per image)"),
        strict=False,
    ):
        for k, (run, cell, label) in enumerate(cells):
            g = long[(long["run"] == run) & (long["cell"] == cell)].groupby("i")
            t, m, lo, hi = g["t"].mean(), g[col].mean(), g[col].min(), g[col].max()
            name = label + (f" [{run}]" if len(runs) > 1 else "")
            ax.plot(
                t,
                m,
                color=colors(k % 20),
                ls="-" if runs.index(run) == 0 else "--",
                lw=1.2,
                marker=".",
                label=name,
            )
            ax.fill_between(t, lo, hi, color=colors(k % 20), alpha=0.15)
        values = long[col].dropna().abs()  # E_0 can be orders of magnitude below E_1: symlog then
        if col == "e" and values.min() > 0 and values.max() / values.min() >= 100:
            ax.set_yscale("symlog", linthresh=float(values.min()))
        ax.set_xlabel("temperature t")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_title("the TI curve: mean (line), min-max (band) over repetitions", fontsize=9)
    if weighted:
        axes[1].set_title("the trapezium's terms (they sum to the trapezoid estimate)", fontsize=9)
    axes[-1].legend(
        fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), title="thermo cells", title_fontsize=8
    )
    fig.suptitle(f"{dataset_title(dataset)}: E_t against t at each thermo trial's final epoch")
    fig.tight_layout()
    return fig


def temperature_schedule(num_temps: int, power: float) -> np.ndarray:
    """The schedule t_i = (i / (N_t - 1))^p, i = 0..N_t-1 (docs/model.md; both ends included)."""
    return (np.arange(num_temps) / (num_temps - 1)) ** power


def fig_temperature_schedules(summary: pd.DataFrame) -> Figure | None:
    """Paper Figs. 1-2: every (p, N_t) schedule used by the thermo cells, as t_i against i (left) and as
    the points' positions on [0, 1] (right: where the trapezoid rule's evaluation points cluster)."""
    th = summary[(summary["objective"] == "thermo")].dropna(subset=["temp_power", "num_temps"])
    if th.empty:
        return None
    scheds = sorted({(float(p), int(n)) for p, n in zip(th["temp_power"], th["num_temps"], strict=True)})
    fig = Figure(figsize=(11, 0.9 + 0.35 * max(len(scheds), 8)))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    cmap = matplotlib.colormaps["viridis"]
    for k, (p, n) in enumerate(scheds):
        t = temperature_schedule(n, p)
        color = cmap(k / max(len(scheds) - 1, 1))
        ax1.plot(np.arange(n) / (n - 1), t, marker=".", color=color, label=f"p={_num(p)}, N$_t$={n}")
        ax2.scatter(t, np.full(n, k), color=color, s=14)
        ax2.hlines(k, 0, 1, color=color, lw=0.5, alpha=0.5)
    ax1.set_xlabel("i / (N$_t$ - 1)  (position in the schedule)")
    ax1.set_ylabel("temperature t$_i$")
    ax1.set_title("t$_i$ = (i/(N$_t$-1))$^p$ (Fig. 1)", fontsize=10)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ax2.set_yticks(range(len(scheds)), [f"p={_num(p)}, N$_t$={n}" for p, n in scheds], fontsize=8)
    ax2.set_xlabel("temperature t (0 = prior, 1 = posterior)")
    ax2.set_xlim(-0.03, 1.03)
    ax2.set_title("where each schedule puts its evaluation points (Fig. 2)", fontsize=10)
    fig.suptitle("Temperature schedules used by the thermo cells")
    fig.tight_layout()
    return fig


def cost_group(row: pd.Series | dict) -> str:
    """What a cell's training cost depends on: objective, batch size, N_t and the Langevin step counts."""
    if row["objective"] != "thermo":
        label = f"vanilla b={_num(row['batch_size'])}" if pd.notna(row["batch_size"]) else "vanilla"
    else:
        label = f"thermo N$_t$={_num(row['num_temps'])}" if pd.notna(row["num_temps"]) else "thermo"
        if pd.notna(row["batch_size"]):
            label += f" b={_num(row['batch_size'])}"
    steps = [
        f"K{s}={_num(row[c])}"
        for c, s in (("posterior_steps", "post"), ("prior_steps", "prior"))
        if pd.notna(row.get(c))
    ]
    return label + ("\n" + " ".join(steps) if steps else "")


def fig_training_time(final: pd.DataFrame, dataset: str, time_col: str = "wall_time_s") -> Figure | None:
    """Paper Fig. 14: training wall time per model type (cells grouped by what sets their cost), mean over
    trials with min-max whiskers."""
    if time_col not in final.columns:
        return None
    sub = final[(final["dataset"] == dataset) & final[time_col].notna()].copy()
    if sub.empty:
        return None
    sub["group"] = [cost_group(r) for r in sub.to_dict("records")]
    runs = list(dict.fromkeys(sub["run"]))
    style = _run_style(runs)
    sub["_thermo"] = sub["objective"] == "thermo"
    groups = list(dict.fromkeys(sub.sort_values(["_thermo", "num_temps", "batch_size"])["group"]))
    fig = Figure(figsize=(max(6.0, 1.3 * len(groups) + 2), 4.4))
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    for j, run in enumerate(runs):
        g = sub[sub["run"] == run].groupby("group")[time_col]
        m, lo, hi = g.mean(), g.min(), g.max()
        xs = [groups.index(k) + (j - (len(runs) - 1) / 2) * width for k in m.index]
        bars = ax.bar(
            xs,
            m.to_numpy(),
            width=width * 0.9,
            color=style[run][1],
            alpha=0.7,
            label=run,
            yerr=[(m - lo).clip(lower=0).to_numpy(), (hi - m).clip(lower=0).to_numpy()],
            capsize=3,
        )
        ax.bar_label(bars, labels=[_sci(v) for v in m.to_numpy()], fontsize=7, padding=2)
    ax.set_xticks(
        range(len(groups)),
        groups,
        fontsize=8,
        rotation=30 if len(groups) > 5 else 0,
        ha="right" if len(groups) > 5 else "center",
    )
    _linear(ax.yaxis)  # linear on purpose: bar lengths must compare as ratios of time
    ax.set_ylabel("training wall time per trial (s)")
    ax.set_title(f"{dataset_title(dataset)}: training time per model type (Fig. 14)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="run", fontsize=8)
    return fig
