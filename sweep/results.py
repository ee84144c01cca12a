"""The Parquet results of a run: `<storage>/<run>/results/{trials,epochs}.parquet`.

`ResultsTables` holds both tables in memory keyed by `trial_id` and `(trial_id, epoch)`, so writing a row
twice (Ray may re-run an epoch after a resume) replaces it instead of duplicating it; `flush()` writes both
files atomically (a temporary file, then a rename; one PUT on an object store), so a reader finds a
whole file at any moment (in an object store through `model.schema.read_table`, which reads one version).
`sweep.callback.ResultsCallback` is the Ray Tune callback that keeps them current from the driver.

The columns, their types and meanings are `model.schema`'s (the contract with `analysis`). Extra keys
given to `upsert_trial` / `upsert_epochs` (e.g. `search`, `optuna_trial`, an evaluator's extra readings)
become extra columns after the documented ones.
"""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from model import schema
from model.schema import EPOCH_COLUMNS, EPOCHS_FILE, TRIAL_COLUMNS, TRIALS_FILE
from sweep.storage import filesystem_for
from sweep.text import text_table

STATUSES = ("PENDING", "RUNNING", "TERMINATED", "ERROR")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ResultsTables:
    """The trials and epochs tables of one run, kept in memory and flushed atomically to `results_uri`."""

    def __init__(self, results_uri: str) -> None:
        self.uri = results_uri
        self.fs, self.path = filesystem_for(results_uri)
        self.trials: dict[str, dict[str, Any]] = {}
        self.epochs: dict[tuple[str, int], dict[str, Any]] = {}
        self._order: list[str] = []
        self.reload()

    def reload(self) -> None:
        """Read the tables already on storage (a resumed run keeps every row it had)."""
        self.trials.clear()
        self.epochs.clear()
        self._order.clear()
        for row in self._read(TRIALS_FILE):
            self.trials[row["trial_id"]] = row
            self._order.append(row["trial_id"])
        for row in self._read(EPOCHS_FILE):
            self.epochs[(row["trial_id"], int(row["epoch"]))] = row

    def _read(self, name: str) -> list[dict[str, Any]]:
        path = f"{self.path}/{name}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return []
        return schema.read_table(self.fs, path).to_pylist()

    def upsert_trial(self, trial_id: str, **values: Any) -> None:
        """Create or update the row of `trial_id` (None values do not erase known ones, except `error`)."""
        row = self.trials.get(trial_id)
        if row is None:
            row = {"trial_id": trial_id}
            self.trials[trial_id] = row
            self._order.append(trial_id)
        for key, value in values.items():
            if value is not None or key == "error":
                row[key] = value
        row["updated_at"] = _now()

    def upsert_epochs(self, trial_id: str, readings: Iterable[dict[str, Any]], **common: Any) -> None:
        """Write each reading dict as the row (trial_id, reading['epoch']), replacing any earlier one."""
        for r in readings:
            epoch = int(r["epoch"])
            self.epochs[(trial_id, epoch)] = {**common, **r, "trial_id": trial_id, "epoch": epoch}
        done = sum(1 for t, _ in self.epochs if t == trial_id)
        if trial_id in self.trials:
            self.trials[trial_id]["epochs_completed"] = done

    def trial_rows(self) -> list[dict[str, Any]]:
        return [self.trials[t] for t in self._order]

    def epoch_rows(self) -> list[dict[str, Any]]:
        rank = {t: i for i, t in enumerate(self._order)}
        keys = sorted(self.epochs, key=lambda k: (rank.get(k[0], len(rank)), k[0], k[1]))
        return [self.epochs[k] for k in keys]

    def _write(self, name: str, table: pa.Table) -> None:
        final = f"{self.path}/{name}"
        self.fs.create_dir(self.path, recursive=True)
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = f"{final}.tmp-{socket.gethostname()}"
            try:
                pq.write_table(table, tmp, filesystem=self.fs)
            except BaseException:  # e.g. a full disk: the old file stays whole, the partial one goes
                self.fs.delete_file(tmp) if self.fs.get_file_info(tmp).is_file else None
                raise
            self.fs.move(tmp, final)  # a rename: readers see the old or the new file, never half of one
        else:  # object stores: a single PUT is atomic already
            pq.write_table(table, final, filesystem=self.fs)

    def flush(self) -> None:
        """Write both tables (epochs first, so a trial row never claims epochs the file lacks)."""
        self._write(EPOCHS_FILE, schema.to_table(self.epoch_rows(), EPOCH_COLUMNS))
        self._write(TRIALS_FILE, schema.to_table(self.trial_rows(), TRIAL_COLUMNS))


def config_columns(config: Any) -> dict[str, Any]:
    """The trials-table columns that come from an `ExperimentConfig` (`model.schema.config_columns`: the
    thermo-only ones null for vanilla) and the whole config as JSON."""
    values = config.to_dict()
    return {**schema.config_columns(values), "config_json": json.dumps(values, sort_keys=True)}


def final_columns(history: list[dict[str, Any]]) -> dict[str, Any]:
    """final_* columns of a trial from its readings history (latest evaluated value for the metrics)."""
    if not history:
        return {}
    last = history[-1]
    out = {
        "final_train_loss": last.get("train_loss"),
        "final_val_loss": last.get("val_loss"),
        "final_grad_var": last.get("grad_var"),
    }
    for name in ("kid_rbf_inf", "fid_inf", "val_ll"):
        evaluated = [r[name] for r in history if r.get(name) is not None and not math.isnan(r[name])]
        out[f"final_{name}"] = evaluated[-1] if evaluated else None
    return out


def error_message(text: str | None) -> str | None:
    """The useful line of a Ray error trace: the DivergenceError message if there is one, else the last
    exception line."""
    if not text:
        return None
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "DivergenceError" in ln:
            return ln[ln.index("DivergenceError") :]
    for ln in reversed(lines):
        if ln.split(":", 1)[0].endswith(("Error", "Exception", "Interrupt")):
            return ln
    return lines[-1] if lines else None


def summarize(trials: Any, epochs: Any) -> Any:
    """Per cell (in trial order): repetitions done, errors, and mean +- std (ddof=1) over repetitions of
    the final grad_var, KID_inf (kid_rbf_inf, latest evaluated) and train_loss, and the mean seconds per
    epoch over every epoch row of the cell (`epoch_s`; the first epochs include compiling). Returns a
    DataFrame."""
    import pandas as pd

    rows = []
    for cell, group in trials.groupby("cell", sort=False):
        done = group[group["status"] == "TERMINATED"]
        errors = int((group["status"] == "ERROR").sum())
        row: dict[str, Any] = {"cell": cell, "finished": len(done), "errors": errors, "trials": len(group)}
        for name, col in (
            ("grad_var", "final_grad_var"),
            ("kid_rbf_inf", "final_kid_rbf_inf"),
            ("train_loss", "final_train_loss"),
        ):
            values = pd.to_numeric(done[col], errors="coerce").dropna() if col in done else pd.Series([])
            row[f"{name}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        times = pd.Series([], dtype=float)
        if "epoch_time_s" in epochs:
            mine = epochs[epochs["trial_id"].isin(group["trial_id"])]
            times = pd.to_numeric(mine["epoch_time_s"], errors="coerce").dropna()
        row["epoch_s"] = float(times.mean()) if len(times) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def format_summary(summary: Any) -> str:
    """The per-cell summary as aligned text: `mean +- std` over repetitions."""

    def pm(row: Any, name: str, fmt: str) -> str:
        mean, std = row[f"{name}_mean"], row[f"{name}_std"]
        if math.isnan(mean):
            return "-"
        return f"{mean:{fmt}} +- {std:{fmt}}" if not math.isnan(std) else f"{mean:{fmt}}"

    header = ["cell", "done", "err", "final grad_var", "final KID_inf (rbf)", "final train_loss", "s/epoch"]
    body = [
        [
            str(r["cell"]),
            f"{r['finished']}/{r['trials']}",
            str(r["errors"]),
            pm(r, "grad_var", ".3e"),
            pm(r, "kid_rbf_inf", ".4f"),
            pm(r, "train_loss", ".4g"),
            "-" if math.isnan(r.get("epoch_s", float("nan"))) else f"{r['epoch_s']:.3g}",
        ]
        for _, r in summary.iterrows()
    ]
    return text_table(header, body)
