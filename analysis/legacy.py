"""Convert the paper's published per-epoch CSVs into the sweep's Parquet schema (`model.schema`).

`python -m analysis.legacy SRC --out DIR [--run NAME]` reads
`SRC/logs/<dataset>/p=<p>/batch=<b>/experiment<k>.csv` and
`SRC/extra_logs/<dataset>/<param>=<value>/p=<p>/batch=<b>/experiment<k>.csv` (one trial per CSV; p = 0 is
the vanilla model) and writes `DIR/results/trials.parquet` and `DIR/results/epochs.parquet`, so that
`python -m analysis.report DIR ...` can put the paper's readings beside a new run.

Choices (docs/analysis.md): the CSVs number epochs 0..49 and each row holds that epoch's training averages,
so `epoch = Epoch + 1` (1..50; the final reading is epoch 50 = `epochs`). Parameters not in the path take
the paper's defaults (Table 3 for CelebA; Table 4, the CIFAR-10 family, for SVHN and CIFAR-10).
`ebm_gradient` is `none` for thermo trials: the published code stopped gradients at the chain outputs
(`gen_gradient` `ti`, `ti_rule` `kl_batch`, one chain per example).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from model.schema import EPOCHS_FILE, TRIALS_FILE

COLUMN_MAP = {
    "Train Loss": "train_loss",
    "Train Grad": "grad_mean",
    "Train Grad Var": "grad_var",
    "Val Loss": "val_loss",
    "FID_inf": "fid_inf",
    "MIFID_inf": "mifid_inf",
    "KID_inf": "kid_rbf_inf",
    "IS_inf": "is_inf",
}
PARAM_MAP = {
    "temps": "num_temps",
    "posterior_mcmc": "posterior_steps",
    "prior_mcmc": "prior_steps",
    "beta": "kl_weight",
}
DATASET_MAP = {"celeba": "celeb_a", "svhn": "svhn_cropped", "cifar10": "cifar10", "cifar-10": "cifar10"}
# Paper Table 3 (CelebA) and Table 4 (CIFAR-10); SVHN runs at 32x32 like CIFAR-10.
DEFAULTS = {
    "celeb_a": {"num_temps": 10, "posterior_steps": 20, "prior_steps": 60, "kl_weight": 1.0},
    "cifar10": {"num_temps": 10, "posterior_steps": 40, "prior_steps": 60, "kl_weight": 1.0},
    "svhn_cropped": {"num_temps": 10, "posterior_steps": 40, "prior_steps": 60, "kl_weight": 1.0},
}
# The paper's 50-epoch CelebA training times on one GPU (Fig. 14, restated in paper-readings/README.md):
# one figure per model type, given only to the cells that are that model.
PAPER_WALL_TIME_S = {
    ("vanilla", None): 3205.51,
    ("thermo", 10): 28261.13,
    ("thermo", 20): 53971.03,
    ("thermo", 30): 79509.17,
}
_CSV_RE = re.compile(r"^experiment(\d+)\.csv$")
_KV_RE = re.compile(r"^([A-Za-z_]+)=([-+0-9.eE]+)$")


def dataset_name(raw: str) -> str:
    """Our dataset name (the TFDS one the sweep writes) for a folder name of the paper's logs."""
    return DATASET_MAP.get(raw.lower(), raw.lower())


def parse_path(rel: Path) -> dict:
    """The trial row's identity and parameters from a CSV path relative to the readings root.

    Returns dataset, cell (the key=value part of the path), repetition, objective, and every
    parameter (batch_size, temp_power, num_temps, posterior_steps, prior_steps, kl_weight) with defaults.
    """
    parts = rel.parts
    m = _CSV_RE.match(parts[-1])
    if m is None:
        raise ValueError(
            f"{rel}: file name is not experiment<k>.csv; only the paper's CSV layout is converted"
        )
    if parts[0] in ("logs", "extra_logs"):
        parts = parts[1:]
    raw_ds, kvs = parts[0], parts[1:-1]
    params: dict[str, float] = {}
    for kv in kvs:
        km = _KV_RE.match(kv)
        if km is None:
            raise ValueError(
                f"{rel}: folder {kv!r} is not key=value; expected <dataset>/[<param>=<v>/]p=<p>/batch=<b>/"
            )
        params[km.group(1)] = float(km.group(2))
    if "p" not in params or "batch" not in params:
        raise ValueError(
            f"{rel}: path lacks p=<p> or batch=<b>; expected <dataset>/[<param>=<v>/]p=<p>/batch=<b>/"
        )
    ds = dataset_name(raw_ds)
    row = dict(DEFAULTS.get(ds, DEFAULTS["cifar10"]))
    for key, value in params.items():
        if key in ("p", "batch"):
            continue
        if key not in PARAM_MAP:
            raise ValueError(f"{rel}: unknown parameter {key!r}; known: {', '.join(PARAM_MAP)}")
        row[PARAM_MAP[key]] = value
    thermo = params["p"] != 0
    row.update(
        dataset=ds,
        cell="/".join(kvs),
        repetition=int(m.group(1)),
        objective="thermo" if thermo else "vanilla",
        batch_size=int(params["batch"]),
        temp_power=params["p"] if thermo else np.nan,
        ebm_gradient="none" if thermo else pd.NA,
        gen_gradient="ti" if thermo else pd.NA,
        ti_rule="kl_batch" if thermo else pd.NA,
        chains_per_example=1 if thermo else pd.NA,
    )
    if not thermo:
        row["num_temps"] = np.nan
        row["kl_weight"] = np.nan
    return row


def _paper_wall_time(row: dict) -> float:
    """The paper's Fig. 14 time for the CelebA models it timed (default K, batch 75), else NaN."""
    if row["dataset"] != "celeb_a" or row["batch_size"] != 75:
        return np.nan
    d = DEFAULTS["celeb_a"]
    if row["posterior_steps"] != d["posterior_steps"] or row["prior_steps"] != d["prior_steps"]:
        return np.nan
    if row["objective"] == "vanilla":
        return PAPER_WALL_TIME_S[("vanilla", None)]
    if row["kl_weight"] != d["kl_weight"]:
        return np.nan
    return PAPER_WALL_TIME_S.get(("thermo", int(row["num_temps"])), np.nan)


def convert_readings(src: str | Path, run: str = "paper") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's CSV tree as (trials, epochs) DataFrames in our schema: one trial per CSV.

    Returns trials with the contract's columns (plus `source`, the CSV path, and `wall_time_source`)
    and epochs with grad_mean, grad_var, kid_rbf_inf, fid_inf, train/val loss and the extra
    mifid_inf, is_inf; grad_var_ebm/gen, kid_poly_inf and epoch_time_s are NaN (not recorded).
    """
    src = Path(src)
    files = sorted(p for p in src.rglob("experiment*.csv") if _CSV_RE.match(p.name))
    if not files:
        raise FileNotFoundError(
            f"no experiment<k>.csv under {src}; pass the folder holding logs/ and extra_logs/ "
            "(e.g. path/to/paper-readings)"
        )
    trials, epochs = [], []
    for f in files:
        rel = f.relative_to(src)
        row = parse_path(rel)
        trial_id = (
            f"{rel.parts[1] if rel.parts[0] in ('logs', 'extra_logs') else rel.parts[0]}/{row['cell']}"
            f"/experiment{row['repetition']}"
        )
        csv = pd.read_csv(f)
        missing = [c for c in ("Epoch", *COLUMN_MAP) if c not in csv.columns]
        if missing:
            raise ValueError(f"{f}: missing columns {missing}; expected {['Epoch', *COLUMN_MAP]}")
        ep = csv.rename(columns=COLUMN_MAP)[list(COLUMN_MAP.values())].astype("float64")
        ep.insert(0, "epoch", csv["Epoch"].astype("int64") + 1)
        ep.insert(0, "trial_id", trial_id)
        ep.insert(0, "run", run)
        for col in ("grad_var_ebm", "grad_var_gen", "kid_poly_inf", "epoch_time_s"):
            ep[col] = np.nan
        epochs.append(ep)
        wall = _paper_wall_time(row)
        trials.append(
            {
                "run": run,
                "trial_id": trial_id,
                **row,
                "seed": pd.NA,
                "epochs": int(ep["epoch"].max()),
                "status": "completed",
                "error": None,
                "wall_time_s": wall,
                "devices": 1,
                "wall_time_source": "paper Fig. 14 (one time per model type)" if np.isfinite(wall) else None,
                "source": str(rel),
            }
        )
    order = [
        "run",
        "trial_id",
        "cell",
        "repetition",
        "seed",
        "dataset",
        "objective",
        "batch_size",
        "temp_power",
        "num_temps",
        "kl_weight",
        "prior_steps",
        "posterior_steps",
        "epochs",
        "status",
        "error",
        "wall_time_s",
        "devices",
        "ti_rule",
        "chains_per_example",
        "ebm_gradient",
        "gen_gradient",
        "wall_time_source",
        "source",
    ]
    t = pd.DataFrame(trials)[order]
    t["seed"] = t["seed"].astype("Int64")
    for col in ("ti_rule", "ebm_gradient", "gen_gradient"):
        t[col] = t[col].astype("string")
    t["chains_per_example"] = t["chains_per_example"].astype("Int64")
    for col in ("batch_size", "prior_steps", "posterior_steps", "repetition", "epochs", "devices"):
        t[col] = t[col].astype("int64")
    for col in ("temp_power", "num_temps", "kl_weight", "wall_time_s"):
        t[col] = t[col].astype("float64")
    t["num_temps"] = t["num_temps"].astype("Int64")
    return t, pd.concat(epochs, ignore_index=True)


def write_results(trials: pd.DataFrame, epochs: pd.DataFrame, out: str | Path) -> Path:
    """Write the tables as `<out>/results/{trials,epochs}.parquet`; returns the results directory."""
    results = Path(out) / "results"
    results.mkdir(parents=True, exist_ok=True)
    trials.to_parquet(results / TRIALS_FILE, index=False)
    epochs.to_parquet(results / EPOCHS_FILE, index=False)
    return results


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m analysis.legacy`."""
    ap = argparse.ArgumentParser(
        prog="python -m analysis.legacy",
        description="Convert the paper's per-epoch CSVs (logs/, extra_logs/) into trials/epochs Parquet.",
    )
    ap.add_argument(
        "src", type=Path, help="folder holding logs/ and/or extra_logs/ (e.g. path/to/paper-readings)"
    )
    ap.add_argument("--out", type=Path, required=True, help="run directory to write (results/ goes inside)")
    ap.add_argument(
        "--run", default=None, help="run name stored in every row (default: the --out folder name)"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    run = args.run or args.out.resolve().name
    try:
        trials, epochs = convert_readings(args.src, run=run)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = write_results(trials, epochs, args.out)
    print(f"wrote {len(trials)} trials, {len(epochs)} epoch rows of run {run!r} to {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
