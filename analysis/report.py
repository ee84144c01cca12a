"""`python -m analysis.report RUN_DIR [RUN_DIR ...] --out DIR`: the paper's figures and tables for runs.

Writes PNG figures, CSV tables, `report.md` and `report.html` (figures inline as base64) to DIR.
Whatever cannot be drawn from the data given (a missing column, no thermo cells ...) is listed under
"Skipped" in the report instead of failing.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import figures as F
from analysis import pareto as P
from analysis import readings as R
from analysis.load import Results, load
from analysis.remote import read_bytes
from analysis.render import Report, fmt, render_html, render_markdown
from analysis.summary import (
    cell_label,
    cell_summary,
    controllability,
    controllability_by_regime,
    final_readings,
    normalise_trials,
    quadratic_fits,
    table1,
)

REQUIRED_EPOCH_COLUMNS = ["grad_var", "kid_rbf_inf", "fid_inf", "train_loss"]


def _pm(summary: pd.DataFrame, col: str) -> pd.Series:
    m, s = summary.get(f"{col}_mean"), summary.get(f"{col}_std")
    return pd.Series(
        [f"{fmt(a)} ± {fmt(b)}" if np.isfinite(b) else fmt(a) for a, b in zip(m, s, strict=True)],
        index=summary.index,
    )


def summary_view(summary: pd.DataFrame) -> pd.DataFrame:
    """The per-cell table as shown in the report: mean ± std of the key final readings."""
    view = summary[["run", "dataset", "cell", "label", "regime", "n_trials"]].copy()
    for col in (
        "grad_var",
        "grad_noise_gen",
        "val_ll",
        "kid_rbf_nmax",
        "kid_rbf_inf",
        "kid_poly_inf",
        "fid_inf",
        "train_loss",
        "wall_time_s",
    ):
        if f"{col}_mean" in summary.columns and summary[f"{col}_mean"].notna().any():
            view[col] = _pm(summary, col)
    return view


def _save(rep: Report, fig, out: Path, name: str, caption: str, skip_reason: str) -> None:
    if fig is None:
        rep.skipped.append(skip_reason)
        return
    path = F.save(fig, out / name)
    rep.figures.append(path)
    rep.image(path, caption)


def _say_why_empty(rep: Report, reasons: list[str] | None) -> None:
    """Under a section that drew nothing, one line saying why (the reasons also go under Skipped)."""
    if reasons is not None:
        said = "; ".join(r for r in reasons if r)
        rep.p(f"Nothing to show: {said}." if said else "Nothing to show.")


def _missing(df: pd.DataFrame, cols: list[str]) -> list[str]:
    return [c for c in cols if c not in df.columns or df[c].isna().all()]


def _copy_samples(results: Results, final: pd.DataFrame, out: Path, rep: Report) -> None:
    if results.samples.empty:
        rep.p("No sample image grids were found (`<run>/samples/<trial_id>/epoch_XXXX.png`).")
        rep.skipped.append("7. sample grids: none saved under <run>/samples/")
        return
    meta = final[["run", "trial_id", "dataset", "cell", "repetition"]] if "repetition" in final else None
    s = results.samples
    if meta is not None:
        s = s.merge(meta, on=["run", "trial_id"], how="left")
    for r in s.sort_values(["run", "trial_id"]).itertuples(index=False):
        safe = re.sub(r"[^A-Za-z0-9._=-]+", "_", r.trial_id)
        dst = out / "samples" / re.sub(r"[^A-Za-z0-9._=-]+", "_", r.run) / f"{safe}_epoch_{r.epoch:04d}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(read_bytes(r.path))  # a local path or an s3:// URI
        where = (
            f"{F.dataset_title(r.dataset)} {r.cell}, repetition {r.repetition}" if meta is not None else ""
        )
        rep.image(dst, f"{r.run} / {r.trial_id} ({where}), epoch {r.epoch}".replace(" ()", ""))


@dataclass
class DatasetContext:
    """What the figures of one data set are drawn from; `drawn` records which figures were drawn."""

    dataset: str
    name: str
    final: pd.DataFrame
    summary: pd.DataFrame
    fits: pd.DataFrame
    epochs: pd.DataFrame
    drawn: dict[str, bool] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.drawn = {}

    @property
    def time_col(self) -> str:
        """The training-time column of Fig. 14: Ray's wall time, else the sum of epoch times."""
        wall = self.final["wall_time_s"] if "wall_time_s" in self.final else None
        return "wall_time_s" if wall is not None and wall.notna().any() else "train_time_s"

    def has(self, objective: str) -> bool:
        return bool(((self.final["dataset"] == self.dataset) & (self.final["objective"] == objective)).any())

    def fits_of(self, metric: str) -> pd.DataFrame:
        return self.fits[(self.fits["dataset"] == self.dataset) & (self.fits["metric"] == metric)]


@dataclass(frozen=True)
class FigureSpec:
    """One figure of a data set's section: its file (`{tag}`: the data set), caption (`{name}`), the
    reason given under Skipped when it cannot be drawn (a template or a function of the context; "" means
    skip silently), an optional precondition, and the function that draws it (None: nothing to draw)."""

    file: str
    caption: str
    why_skipped: str | Callable[[DatasetContext], str]
    draw: Callable[[DatasetContext], Any]
    needs: Callable[[DatasetContext], bool] | None = None
    section: str | None = None  # a heading printed before this figure


def _metric_figure(metric: str, by_regime: bool = False) -> Callable[[DatasetContext], Any]:
    def draw(c: DatasetContext) -> Any:
        return F.fig_metric_vs_grad_var(c.summary, c.fits_of(metric), c.dataset, metric, by_regime=by_regime)

    return draw


def _why_no(objective: str, fig: str, what: str, readings: str) -> Callable[[DatasetContext], str]:
    return lambda c: (
        f"{c.name} {fig} ({what}): "
        + (f"no {objective} cells" if not c.has(objective) else f"no {readings} readings")
    )


def _why_no_extras(c: DatasetContext) -> str:
    s = c.summary
    has_extras = bool((s["dataset"].eq(c.dataset) & s["extra"].astype(bool)).any())
    return f"{c.name} Fig. 6 (extra cells): " + (
        "no kid_rbf_inf readings of the extra cells"
        if has_extras
        else "no thermo cell varies N_t, K or eta off the main setting"
    )


_FIDELITY = "quadratic fit per regime"
DATASET_FIGURES: list[FigureSpec] = [
    FigureSpec(
        "fig03_grad_var_vs_batch_{tag}.png",
        "{name}: final gradient variance of vanilla cells vs batch size; boxes over repetitions (Fig. 3)",
        _why_no("vanilla", "Fig. 3", "variance vs batch size", "grad_var or batch_size"),
        lambda c: F.fig_grad_var_vs_batch(c.final, c.dataset),
        needs=lambda c: c.has("vanilla") and "grad_var" in c.final,
        section="1-2. Gradient variance vs batch size and vs p (Figs. 3-4)",
    ),
    FigureSpec(
        "fig04_grad_var_vs_p_{tag}.png",
        "{name}: final gradient variance of main thermo cells vs p; boxes over repetitions (Fig. 4)",
        _why_no("thermo", "Fig. 4", "variance vs p", "grad_var or temp_power"),
        lambda c: F.fig_grad_var_vs_p(c.final, c.dataset),
        needs=lambda c: c.has("thermo") and "grad_var" in c.final,
    ),
    FigureSpec(
        "fig10_kid_vs_grad_var_{tag}.png",
        f"{{name}}: kid_rbf_inf vs gradient variance, cell means ± std, {_FIDELITY} (Fig. 10)",
        "{name} Fig. 10 (kid_rbf_inf vs variance): no kid_rbf_inf or grad_var readings",
        _metric_figure("kid_rbf_inf"),
        needs=lambda c: "grad_var_mean" in c.summary,
        section="3. Image fidelity vs gradient variance, quadratic fits per regime (Figs. 5, 10, 12)",
    ),
    FigureSpec(
        "fig05_kid_vs_grad_var_regimes_{tag}.png",
        "{name}: the same, one panel per regime (Fig. 5)",
        "",
        _metric_figure("kid_rbf_inf", by_regime=True),
        needs=lambda c: c.drawn.get("fig10_kid_vs_grad_var_{tag}.png", False),
    ),
    FigureSpec(
        "fig10b_kid_poly_vs_grad_var_{tag}.png",
        f"{{name}}: kid_poly_inf vs gradient variance, cell means ± std, {_FIDELITY} (Fig. 10, cubic kernel)",
        "{name} Fig. 10, cubic kernel (kid_poly_inf vs variance): no kid_poly_inf or grad_var readings",
        _metric_figure("kid_poly_inf"),
        needs=lambda c: "grad_var_mean" in c.summary,
    ),
    FigureSpec(
        "fig12_fid_vs_grad_var_{tag}.png",
        f"{{name}}: fid_inf vs gradient variance, cell means ± std, {_FIDELITY} (Fig. 12)",
        "{name} Fig. 12 (fid_inf vs variance): no fid_inf or grad_var readings",
        _metric_figure("fid_inf"),
        needs=lambda c: "grad_var_mean" in c.summary,
    ),
    FigureSpec(
        "fig06_extras_{tag}.png",
        "{name}: cells varying N_t, K or eta overlaid on the 0 < p <= 1 regime; baseline circled (Fig. 6)",
        _why_no_extras,
        lambda c: F.fig_extras(c.summary, c.fits_of("kid_rbf_inf"), c.dataset),
        section="4. Extra thermo cells on the 0 < p <= 1 regime (Fig. 6)",
    ),
    FigureSpec(
        "fig09_training_curves_{tag}.png",
        "{name}: training loss, gradient variance and KID_inf per epoch; mean line, min-max band over "
        "repetitions (Fig. 9)",
        "{name} Fig. 9 (training curves): no per-epoch train_loss/grad_var/kid_rbf_inf",
        lambda c: F.fig_training_curves(c.epochs, c.final, c.dataset),
        section="5. Training curves (Fig. 9)",
    ),
    FigureSpec(
        "fig17_ti_curve_{tag}.png",
        "{name}: the TI curve E_t against t at each thermo trial's final epoch, one line per cell "
        "(mean over repetitions, min-max band), and the trapezium's terms w_i E_i",
        _why_no(
            "thermo", "TI-curve figure", "E_t against t", "per-temperature ti_temps and ti_expected_loglik"
        ),
        lambda c: F.fig_ti_curve(c.epochs, c.final, c.dataset),
        section="5a. The TI curve (per-temperature readings)",
    ),
    FigureSpec(
        "fig15_val_ll_{tag}.png",
        "{name}: validation log-likelihood by AIS per cell, the same estimate for every model "
        "(docs/readings.md); per epoch (mean over repetitions) and final (mean ± std)",
        "{name} val_ll figure: no val_ll readings (evaluation off, or runs older than the reading)",
        lambda c: R.fig_val_ll(c.epochs, c.final, c.dataset),
        section="5b. Log-likelihood and gradient noise, the same for every model",
    ),
    FigureSpec(
        "fig16_grad_noise_vs_grad_var_{tag}.png",
        "{name}: gradient noise (over minibatches and chains) against grad_var (the spread of one "
        "gradient's entries), per network, one point per trial",
        "{name} gradient-noise figure: no grad_noise readings",
        lambda c: R.fig_grad_noise_vs_grad_var(c.final, c.dataset),
    ),
    FigureSpec(
        "fig14_training_time_{tag}.png",
        "{name}: training wall time per model type, mean and min-max over trials ({time_col}; Fig. 14)",
        "{name} Fig. 14 (training time): no wall_time_s or epoch_time_s readings",
        lambda c: F.fig_training_time(c.final, c.dataset, c.time_col),
        section="6. Training time (Fig. 14)",
    ),
]


def build_report(
    results: Results, out: str | Path, title: str = "thermosweep report", log_x: bool | None = None
) -> Path:
    """Write figures, CSV tables, report.md and report.html for `results` into `out`; returns report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = Report()
    _, notes = normalise_trials(results.trials)
    rep.skipped += notes
    final = final_readings(results)
    n_failed = len(results.trials) - len(final)
    rep.h(1, title)
    rep.p(
        f"Runs: {', '.join(f'`{r}`' for r in results.runs)}; {len(results.trials)} trials, "
        f"{len(final)} with readings used below"
        + (f", {n_failed} failed or without epochs (left out)" if n_failed else "")
        + ". Final readings are each trial's last epoch (KID/FID: the last evaluated epoch). "
        "Error bars and ± are one standard deviation over repetitions (ddof=1)."
    )
    rep.items([f"`{d}`" for d in results.sources])
    for r in results.readings.itertuples(index=False):
        rep.p(
            f"Readings `{r.columns}` are re-evaluated ones (`{r.source}`, tag `{r.tag}`, settings "
            f"`{r.settings}`; {r.trials} trials), in place of the run's own: a trial without them has none."
        )
    if "epochs" in final.columns and "final_epoch" in final.columns:
        short = final[pd.to_numeric(final["epochs"], errors="coerce") > final["final_epoch"]]
        if len(short):
            rep.p(
                f"**{len(short)} trials stopped before their configured epochs**; their last epoch is used."
            )
    if "ebm_gradient" in final.columns:
        stopped = final[(final["objective"] == "thermo") & (final["ebm_gradient"].astype("string") == "none")]
        if len(stopped):
            rep.p(
                f"{len(stopped)} thermo trials ran with `ebm_gradient` none (stop-gradient chains, as the "
                "paper's published code did): their EBM prior received no gradient (docs/estimators.md)."
            )
    if "wall_time_source" in results.trials.columns:
        for src in results.trials["wall_time_source"].dropna().unique():
            rep.p(f"`wall_time_s` of some trials comes from: {src}.")
    missing = _missing(results.epochs, REQUIRED_EPOCH_COLUMNS)
    for c in missing:
        rep.skipped.append(f"epochs have no `{c}` readings: everything that needs {c} is skipped")
    if final.empty:
        rep.p("No trial has per-epoch readings, so there is nothing to summarise.")
        return _finish(rep, out, title)

    summary = cell_summary(final)
    ctrl = controllability(final)
    fits = pd.concat(
        [quadratic_fits(summary, m, log_x=log_x) for m in ("kid_rbf_inf", "kid_poly_inf", "fid_inf")],
        ignore_index=True,
    )
    t1 = table1(summary, ctrl)
    for f in fits[(fits["note"] != "") & (fits["n_cells"] > 0)].itertuples(index=False):
        rep.skipped.append(f"{F.dataset_title(f.dataset)} {f.regime} quadratic fit of {f.metric}: {f.note}")
    final.assign(label=[cell_label(r) for r in final.to_dict("records")]).to_csv(
        out / "final_readings.csv", index=False
    )
    summary.to_csv(out / "cell_summary.csv", index=False)
    ctrl.to_csv(out / "controllability.csv", index=False)
    fits.to_csv(out / "fits.csv", index=False)
    t1.to_csv(out / "table1.csv", index=False)

    for ds in dict.fromkeys(final["dataset"]):
        name = F.dataset_title(ds)
        tag = re.sub(r"[^A-Za-z0-9]+", "_", ds)
        rep.h(2, f"{name} (`{ds}`)")
        ctx = DatasetContext(ds, name, final, summary, fits, results.epochs)
        empty_section: list[str] | None = None  # the current section's skip reasons while nothing is drawn
        for spec in DATASET_FIGURES:
            if spec.section:
                _say_why_empty(rep, empty_section)
                rep.h(3, spec.section)
                empty_section = []
            fig = spec.draw(ctx) if spec.needs is None or spec.needs(ctx) else None
            ctx.drawn[spec.file] = fig is not None
            why = spec.why_skipped(ctx) if callable(spec.why_skipped) else spec.why_skipped.format(name=name)
            caption = spec.caption.format(name=name, time_col=ctx.time_col)
            _save(rep, fig, out, spec.file.format(tag=tag), caption, why)
            if empty_section is not None:
                empty_section = None if fig is not None else [*empty_section, why]
        _say_why_empty(rep, empty_section)
    rep.skipped = [s for s in rep.skipped if s]

    _pareto_sections(results, out, rep)

    rep.h(2, "Temperature schedules (Figs. 1-2)")
    _save(
        rep,
        F.fig_temperature_schedules(summary),
        out,
        "fig01_temperature_schedules.png",
        "Every (p, N_t) schedule t_i = (i/(N_t-1))^p used by the thermo cells (Figs. 1-2)",
        "Figs. 1-2 (temperature schedules): no thermo cells with temp_power and num_temps",
    )

    rep.h(2, "7. Sample image grids (latest per trial)")
    _copy_samples(results, final, out, rep)
    rep.h(2, "8. Tables")
    rep.h(3, "Per-cell summary (mean ± std over repetitions of the final readings)")
    rep.p(
        "Every final reading's mean, std and count is in `cell_summary.csv`; "
        "per trial in `final_readings.csv`."
    )
    rep.table(summary_view(summary))
    paired = R.paired_differences(final)
    paired.to_csv(out / "paired_differences.csv", index=False)
    if len(paired):
        rep.h(3, "Paired comparisons between cells")
        rep.p(
            "Repetition r of every cell shares its seed, so each cell is compared with the reference cell "
            "through the differences of its final readings repetition by repetition: mean difference and "
            "its 95% t interval (cell - reference; val_ll higher is better, KID and noise lower)."
        )
        rep.table(paired)
    rep.h(3, "Controllability of the final gradient variance")
    rep.p(
        "cv = std/mean over repetitions; rel_range = (max-min)/mean. The paper calls batch size "
        "uncontrollable (large range) and p controllable (small range); compare the medians per regime."
    )
    order = summary[["run", "dataset", "cell", "label"]]
    rep.table(order.merge(ctrl, on=["run", "dataset", "cell"]))
    rep.table(controllability_by_regime(ctrl))
    rep.h(3, "Quadratic fits per regime")
    rep.p(
        "y = a X^2 + b X + c fitted by least squares to the cell means of main-grid cells; X is the column "
        "`x` (grad_var, or log10(grad_var) when a data set's cell means span two decades or more); "
        "R^2 = 1 - SS_res/SS_tot; `dof` = n_cells - 3. Through three cells a quadratic passes exactly "
        "(dof 0): no degrees of freedom are left to judge it, so R^2 is left empty and the figures draw "
        "no curve."
    )
    rep.table(fits[fits["n_cells"] > 0])
    rep.h(3, "Table 1 (and 2) restated as measured signs")
    rep.p(
        "Per parameter: Spearman rank correlation of the cell means with the parameter; "
        "`grad_var` says whether "
        "the variance rises or falls as the parameter increases; `image_fidelity` whether images improve "
        "(KID_inf falls) or worsen as it increases. The paper's statements are in the last columns."
    )
    rep.table(t1)
    return _finish(rep, out, title)


def _pareto_sections(results: Results, out: Path, rep: Report) -> None:
    """For every multi-objective search run: its Pareto front as a figure (two objectives) and a table
    of all complete proposals, front first (`analysis.pareto`)."""
    for source in results.sources:
        found = P.search_objectives(source)
        if found is None:
            continue
        metrics, directions, fields = found
        run = source.parent.name if source.name == "results" else source.name
        trials = results.trials[results.trials["run"] == run]
        fields = [f for f in fields if f in trials.columns]
        proposals = P.search_proposals(trials, metrics, fields)
        tag = re.sub(r"[^A-Za-z0-9]+", "_", run)
        rep.h(2, f"Search `{run}`: Pareto front of {', '.join(metrics)}")
        if proposals.empty:
            rep.p("Nothing to show: no proposal of the search is COMPLETE.")
            rep.skipped.append(f"Pareto front of {run}: no COMPLETE proposal")
            continue
        table = P.front_table(proposals, metrics, directions)
        table.to_csv(out / f"pareto_{tag}.csv", index=False)
        front = int(table["on_front"].sum())
        goals = ", ".join(f"{m} {d[:3]}" for m, d in zip(metrics, directions, strict=True))
        rep.p(
            f"{len(proposals)} complete proposals, {front} on the front: no other proposal is as good in "
            f"every objective ({goals}) "
            "and better in one, comparing the seed means Optuna was told. ± is the standard error of that "
            "mean over the proposal's seeds; proposals whose bars overlap are not told apart by the search "
            "(compare them seed by seed before calling one better)."
        )
        _save(
            rep,
            P.fig_pareto(proposals, metrics, directions),
            out,
            f"pareto_{tag}.png",
            f"Search {run}: proposals by their seed means (± SE), the front highlighted",
            f"Pareto figure of {run}: drawn for two objectives only ({len(metrics)} here; see the table)",
        )
        rep.table(table)


def _finish(rep: Report, out: Path, title: str) -> Path:
    rep.h(2, "Skipped")
    if rep.skipped:
        rep.items(list(dict.fromkeys(rep.skipped)))
    else:
        rep.p("Nothing was skipped.")
    md = out / "report.md"
    md.write_text(render_markdown(rep, out), encoding="utf-8")
    (out / "report.html").write_text(render_html(rep, title), encoding="utf-8")
    return md


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m analysis.report`."""
    ap = argparse.ArgumentParser(
        prog="python -m analysis.report",
        description="Figures and tables of the paper (Figs. 1-6, 9-12, 14; Table 1) from sweep results.",
    )
    ap.add_argument(
        "runs",
        nargs="+",
        help="run directories (holding results/), results dirs or files; local or s3://bucket/prefix/run",
    )
    ap.add_argument("--out", type=Path, required=True, help="output directory for the report")
    ap.add_argument("--title", default=None, help="report title (default: thermosweep report: <runs>)")
    ap.add_argument(
        "--readings",
        default=None,
        metavar="TAG",
        help="use each run's results/readings-TAG.parquet (python -m sweep.reevaluate) in place of its "
        "own readings",
    )
    ap.add_argument(
        "--log-x",
        choices=("auto", "yes", "no"),
        default="auto",
        help="fit against log10(grad_var): auto = when cell means span two decades (default)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} is a file; pass a directory (created if missing)")
    try:
        results = load(*args.runs, readings=args.readings)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    title = args.title or f"thermosweep report: {', '.join(results.runs)}"
    md = build_report(results, args.out, title, {"auto": None, "yes": True, "no": False}[args.log_x])
    print(f"wrote {md} and {md.with_suffix('.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
