"""Read the sweep's Parquet tables (`model.schema`) into pandas, one or several runs at a time.

A run lives at `<storage>/<run>/results/{trials,epochs}.parquet`, with sample grids at
`<storage>/<run>/samples/<trial_id>/epoch_XXXX.png`. Rows are keyed by (run, trial_id).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis.remote import RemotePath, as_path, read_parquet
from model.schema import EPOCHS_FILE, TRIALS_FILE

_SAMPLE_RE = re.compile(r"epoch_(\d+)\.png$")


@dataclass(frozen=True)
class Results:
    """One or more runs' readings.

    trials: one row per trial (a cell x repetition of the paper's grid), with its run name.
    epochs: one row per trial and epoch, with the run name of its trial.
    samples: the latest saved sample-image grid per trial (run, trial_id, epoch, path); may be empty.
    sources: the results directories read, in order.
    """

    trials: pd.DataFrame
    epochs: pd.DataFrame
    samples: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["run", "trial_id", "epoch", "path"])
    )
    sources: tuple[Path | RemotePath, ...] = ()

    @property
    def runs(self) -> list[str]:
        """The run names present, in order of first appearance."""
        return list(dict.fromkeys(self.trials["run"].astype(str))) if len(self.trials) else []


def _results_dirs(path: Path) -> list[Path]:
    """The results directories `path` names (run dir, results dir, Parquet file, or storage dir)."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; pass a run directory (containing results/), a results directory "
            f"or a {TRIALS_FILE}/{EPOCHS_FILE} file"
        )
    if path.is_file():
        if path.name not in (TRIALS_FILE, EPOCHS_FILE):
            raise ValueError(
                f"{path} is not {TRIALS_FILE} or {EPOCHS_FILE}; "
                "pass one of those or the directory holding them"
            )
        return [path.parent]
    if (path / TRIALS_FILE).exists():
        return [path]
    if (path / "results" / TRIALS_FILE).exists():
        return [path / "results"]
    runs = sorted(p.parent for p in path.glob(f"*/results/{TRIALS_FILE}"))
    if runs:
        return runs
    raise FileNotFoundError(
        f"no {TRIALS_FILE} in {path}, {path / 'results'} or {path}/*/results; "
        "pass a run directory written by the sweep (or converted with `python -m analysis.legacy`)"
    )


def _run_name(results_dir: Path) -> str:
    """The run's name: the directory above results/ (or the results dir itself if not named results)."""
    return results_dir.parent.name if results_dir.name == "results" else results_dir.name


def latest_samples(run_dir: Path, run: str) -> pd.DataFrame:
    """The newest `samples/<trial_id>/epoch_XXXX.png` of each trial under `run_dir` (may be empty)."""
    rows = []
    root = run_dir / "samples"
    if root.is_dir():
        for trial_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            found = [
                (int(m.group(1)), p)
                for p in trial_dir.glob("epoch_*.png")
                if (m := _SAMPLE_RE.search(p.name))
            ]
            if found:
                epoch, png = max(found)
                rows.append({"run": run, "trial_id": trial_dir.name, "epoch": epoch, "path": str(png)})
    return pd.DataFrame(rows, columns=["run", "trial_id", "epoch", "path"])


def estimator_columns(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials written before `ebm_gradient`/`gen_gradient` replaced `chain_gradient`: the old column mapped
    (true -> chains/ti, false -> none/ti) and the estimator fields those runs used (kl_batch, M = 1) filled
    in for thermo rows. Tables that already have `ebm_gradient` are returned unchanged."""
    if "chain_gradient" not in trials.columns or "ebm_gradient" in trials.columns:
        return trials
    t = trials.drop(columns=["chain_gradient"])
    thermo = (t["objective"] == "thermo") if "objective" in t.columns else trials["chain_gradient"].notna()
    old = trials["chain_gradient"].astype("boolean")
    t["ebm_gradient"] = pd.Series(pd.NA, index=t.index, dtype="string")
    t.loc[thermo, "ebm_gradient"] = old[thermo].map({True: "chains", False: "none"}).fillna("chains")
    t["gen_gradient"] = pd.Series(pd.NA, index=t.index, dtype="string")
    t.loc[thermo, "gen_gradient"] = "ti"
    if "ti_rule" not in t.columns:
        t["ti_rule"] = pd.Series(pd.NA, index=t.index, dtype="string")
        t.loc[thermo, "ti_rule"] = "kl_batch"
    if "chains_per_example" not in t.columns:
        t["chains_per_example"] = pd.Series(pd.NA, index=t.index, dtype="Int64")
        t.loc[thermo, "chains_per_example"] = 1
    return t


def _read_one(results_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    trials = read_parquet(results_dir / TRIALS_FILE)
    if "trial_id" not in trials.columns:
        raise ValueError(
            f"{results_dir / TRIALS_FILE} has no trial_id column; it is not a sweep trials table"
        )
    name = _run_name(results_dir)
    if "run" not in trials.columns:
        trials.insert(0, "run", name)
    trials["run"] = trials["run"].fillna(name).astype(str)
    trials["trial_id"] = trials["trial_id"].astype(str)
    trials = estimator_columns(trials)
    epochs_path = results_dir / EPOCHS_FILE
    epochs = (
        read_parquet(epochs_path) if epochs_path.exists() else pd.DataFrame(columns=["trial_id", "epoch"])
    )
    epochs["trial_id"] = epochs["trial_id"].astype(str)
    if "run" not in epochs.columns or epochs["run"].isna().any():
        run_of = dict(zip(trials["trial_id"], trials["run"], strict=False))
        filled = epochs["trial_id"].map(run_of).fillna(name)
        epochs["run"] = epochs["run"].fillna(filled) if "run" in epochs.columns else filled
    epochs["run"] = epochs["run"].astype(str)
    run_dir = results_dir.parent if results_dir.name == "results" else results_dir
    samples = pd.concat([latest_samples(run_dir, r) for r in dict.fromkeys(trials["run"])], ignore_index=True)
    samples = samples[samples["trial_id"].isin(set(trials["trial_id"]))]
    return trials, epochs, samples


def load(*paths: str | Path) -> Results:
    """Load one or several runs' Parquet tables into a `Results` (each row keeps its run name).

    Each path may be a run directory (holding results/), a results directory, a trials/epochs Parquet
    file, or a storage directory holding several runs; local, or a URI such as s3://bucket/runs/run
    (S3-compatible stores through AWS_ENDPOINT_URL). Returns the trials (one per cell x repetition),
    their per-epoch readings, and the latest sample grid of each trial.
    """
    if not paths:
        raise ValueError("load() needs at least one path; pass a run directory such as runs/my-sweep")
    dirs = list(dict.fromkeys(d.resolve() for p in paths for d in _results_dirs(as_path(p))))
    parts = [_read_one(d) for d in dirs]
    trials = pd.concat([p[0] for p in parts], ignore_index=True)
    epochs = (
        pd.concat([p[1] for p in parts if len(p[1])], ignore_index=True)
        if any(len(p[1]) for p in parts)
        else parts[0][1]
    )
    samples = pd.concat([p[2] for p in parts], ignore_index=True)
    dup = trials.duplicated(["run", "trial_id"], keep=False)
    if dup.any():
        first = trials.loc[dup, ["run", "trial_id"]].iloc[0]
        raise ValueError(
            f"trial {first['trial_id']!r} of run {first['run']!r} appears more than once across "
            f"{[str(d) for d in dirs]}; "
            "give each run directory a distinct name (the run column) or pass each run once"
        )
    if len(epochs) and "epoch" in epochs.columns:
        epochs = epochs.drop_duplicates(["run", "trial_id", "epoch"], keep="last")
        epochs = epochs.sort_values(["run", "trial_id", "epoch"], kind="stable").reset_index(drop=True)
    return Results(trials=trials, epochs=epochs, samples=samples.reset_index(drop=True), sources=tuple(dirs))
