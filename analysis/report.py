"""`python -m analysis.report RUN_DIR [RUN_DIR ...] --out DIR`: the paper's figures and tables for runs.

Writes PNG figures, CSV tables, `report.md` and `report.html` (figures inline as base64) to DIR.
Whatever cannot be drawn from the data given (a missing column, no thermo cells ...) is listed under
"Skipped" in the report instead of failing.
"""

from __future__ import annotations

import argparse
import base64
import html
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import figures as F
from analysis.load import Results, load
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


@dataclass
class Report:
    """The report's content as blocks (heading, paragraph, figure, table, list) plus what was skipped."""

    blocks: list[tuple] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def items(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("list", items))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def image(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", path, caption))


def _fmt(v: object) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)) or v is pd.NA:
        return ""
    if isinstance(v, bool | np.bool_):
        return str(bool(v)).lower()
    if isinstance(v, int | np.integer):
        return str(v)
    if isinstance(v, float | np.floating):
        return str(int(v)) if float(v).is_integer() and abs(v) < 1e6 else f"{v:.4g}"
    return str(v)


def _md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(empty)_"
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = [
        "| " + " | ".join(_fmt(v).replace("|", "\\|").replace("\n", " ") for v in r) + " |"
        for r in df.itertuples(index=False)
    ]
    return "\n".join([head, sep, *rows])


def _html_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p><em>(empty)</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>"
        for r in df.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_markdown(rep: Report, out: Path) -> str:
    """The report as Markdown; figures are linked by their path relative to `out`."""
    lines: list[str] = []
    for b in rep.blocks:
        if b[0] == "h":
            lines += ["#" * b[1] + " " + b[2], ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "list":
            lines += [f"- {i}" for i in b[1]] + [""]
        elif b[0] == "table":
            lines += [_md_table(b[1]), ""]
        elif b[0] == "img":
            lines += [f"![{b[2]}]({b[1].relative_to(out).as_posix()})", "", f"*{b[2]}*", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)


def render_html(rep: Report, title: str) -> str:
    """The report as one self-contained HTML page with every figure inline (base64 PNG)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;font-size:12px;margin:0.5em 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}"
        "img{max-width:100%}figure{margin:1em 0}figcaption{font-style:italic;font-size:13px}",
        "</style></head><body>",
    ]
    for b in rep.blocks:
        if b[0] == "h":
            parts.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            parts.append(f"<p>{_inline(b[1])}</p>")
        elif b[0] == "list":
            parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
        elif b[0] == "table":
            parts.append(_html_table(b[1]))
        elif b[0] == "img":
            data = base64.b64encode(b[1].read_bytes()).decode("ascii")
            parts.append(
                f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(b[2])}'>"
                f"<figcaption>{html.escape(b[2])}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def _pm(summary: pd.DataFrame, col: str) -> pd.Series:
    m, s = summary.get(f"{col}_mean"), summary.get(f"{col}_std")
    return pd.Series(
        [f"{_fmt(a)} ± {_fmt(b)}" if np.isfinite(b) else _fmt(a) for a, b in zip(m, s, strict=True)],
        index=summary.index,
    )


def summary_view(summary: pd.DataFrame) -> pd.DataFrame:
    """The per-cell table as shown in the report: mean ± std of the key final readings."""
    view = summary[["run", "dataset", "cell", "label", "regime", "n_trials"]].copy()
    for col in ("grad_var", "kid_rbf_inf", "kid_poly_inf", "fid_inf", "train_loss", "wall_time_s"):
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
        shutil.copyfile(r.path, dst)
        where = (
            f"{F.dataset_title(r.dataset)} {r.cell}, repetition {r.repetition}" if meta is not None else ""
        )
        rep.image(dst, f"{r.run} / {r.trial_id} ({where}), epoch {r.epoch}".replace(" ()", ""))


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
    if "epochs" in final.columns and "final_epoch" in final.columns:
        short = final[pd.to_numeric(final["epochs"], errors="coerce") > final["final_epoch"]]
        if len(short):
            rep.p(
                f"**{len(short)} trials stopped before their configured epochs**; their last epoch is used."
            )
    if "chain_gradient" in final.columns:
        stopped = final[(final["objective"] == "thermo") & ~final["chain_gradient"].fillna(True).astype(bool)]
        if len(stopped):
            rep.p(
                f"{len(stopped)} thermo trials ran with `chain_gradient` false (stop-gradient chains, as the "
                "paper's published code did): their EBM prior received no gradient (DESIGN.md §3)."
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
        have_vanilla = ((final["dataset"] == ds) & (final["objective"] == "vanilla")).any()
        have_thermo = ((final["dataset"] == ds) & (final["objective"] == "thermo")).any()
        rep.h(3, "1-2. Gradient variance vs batch size and vs p (Figs. 3-4)")
        why3 = "no vanilla cells" if not have_vanilla else "no grad_var or batch_size readings"
        _save(
            rep,
            F.fig_grad_var_vs_batch(final, ds) if have_vanilla and "grad_var" in final else None,
            out,
            f"fig03_grad_var_vs_batch_{tag}.png",
            f"{name}: final gradient variance of vanilla cells vs batch size; "
            "boxes over repetitions (Fig. 3)",
            f"{name} Fig. 3 (variance vs batch size): {why3}",
        )
        why4 = "no thermo cells" if not have_thermo else "no grad_var or temp_power readings"
        _save(
            rep,
            F.fig_grad_var_vs_p(final, ds) if have_thermo and "grad_var" in final else None,
            out,
            f"fig04_grad_var_vs_p_{tag}.png",
            f"{name}: final gradient variance of main thermo cells vs p; boxes over repetitions (Fig. 4)",
            f"{name} Fig. 4 (variance vs p): {why4}",
        )
        rep.h(3, "3. Image fidelity vs gradient variance, quadratic fits per regime (Figs. 5, 10, 12)")
        for metric, fname, fig_no in (
            ("kid_rbf_inf", "fig10_kid_vs_grad_var", "Fig. 10"),
            ("kid_poly_inf", "fig10b_kid_poly_vs_grad_var", "Fig. 10, cubic kernel"),
            ("fid_inf", "fig12_fid_vs_grad_var", "Fig. 12"),
        ):
            f_ds = fits[(fits["dataset"] == ds) & (fits["metric"] == metric)]
            fig = F.fig_metric_vs_grad_var(summary, f_ds, ds, metric) if "grad_var_mean" in summary else None
            _save(
                rep,
                fig,
                out,
                f"{fname}_{tag}.png",
                f"{name}: {metric} vs gradient variance, cell means ± std, "
                f"quadratic fit per regime ({fig_no})",
                f"{name} {fig_no} ({metric} vs variance): no {metric} or grad_var readings",
            )
            if metric == "kid_rbf_inf" and fig is not None:
                _save(
                    rep,
                    F.fig_metric_vs_grad_var(summary, f_ds, ds, metric, by_regime=True),
                    out,
                    f"fig05_kid_vs_grad_var_regimes_{tag}.png",
                    f"{name}: the same, one panel per regime (Fig. 5)",
                    "",
                )
        rep.h(3, "4. Extra thermo cells on the 0 < p <= 1 regime (Fig. 6)")
        f_kid = fits[(fits["dataset"] == ds) & (fits["metric"] == "kid_rbf_inf")]
        _save(
            rep,
            F.fig_extras(summary, f_kid, ds),
            out,
            f"fig06_extras_{tag}.png",
            f"{name}: cells varying N_t, K or eta overlaid on the 0 < p <= 1 regime; "
            "baseline circled (Fig. 6)",
            f"{name} Fig. 6 (extra cells): no thermo cells off the main setting, or no kid_rbf_inf",
        )
        rep.h(3, "5. Training curves (Fig. 9)")
        _save(
            rep,
            F.fig_training_curves(results.epochs, final, ds),
            out,
            f"fig09_training_curves_{tag}.png",
            f"{name}: training loss, gradient variance and KID_inf per epoch; "
            "mean line, min-max band over repetitions (Fig. 9)",
            f"{name} Fig. 9 (training curves): no per-epoch train_loss/grad_var/kid_rbf_inf",
        )
        rep.h(3, "6. Training time (Fig. 14)")
        time_col = (
            "wall_time_s" if "wall_time_s" in final and final["wall_time_s"].notna().any() else "train_time_s"
        )
        _save(
            rep,
            F.fig_training_time(final, ds, time_col),
            out,
            f"fig14_training_time_{tag}.png",
            f"{name}: training wall time per model type, mean and min-max over trials ({time_col}; Fig. 14)",
            f"{name} Fig. 14 (training time): no wall_time_s or epoch_time_s readings",
        )
    rep.skipped = [s for s in rep.skipped if s]

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
        "R^2 = 1 - SS_res/SS_tot. With three cells a quadratic interpolates exactly (R^2 = 1)."
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m analysis.report",
        description="Figures and tables of the paper (Figs. 1-6, 9-12, 14; Table 1) from sweep results.",
    )
    ap.add_argument(
        "runs", nargs="+", type=Path, help="run directories (holding results/), results dirs or files"
    )
    ap.add_argument("--out", type=Path, required=True, help="output directory for the report")
    ap.add_argument("--title", default=None, help="report title (default: thermosweep report: <runs>)")
    ap.add_argument(
        "--log-x",
        choices=("auto", "yes", "no"),
        default="auto",
        help="fit against log10(grad_var): auto = when cell means span two decades (default)",
    )
    args = ap.parse_args(argv)
    try:
        results = load(*args.runs)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    title = args.title or f"thermosweep report: {', '.join(results.runs)}"
    md = build_report(results, args.out, title, {"auto": None, "yes": True, "no": False}[args.log_x])
    print(f"wrote {md} and {md.with_suffix('.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
