"""The Parquet results of a run (DESIGN §6): `<storage>/<run>/results/{trials,epochs}.parquet`.

`ResultsTables` holds both tables in memory keyed by `trial_id` and `(trial_id, epoch)`, so writing a row
twice (Ray may re-run an epoch after a resume) replaces it instead of duplicating it; `flush()` writes both
files atomically (a temporary file, then a rename), so `pandas.read_parquet` works at any moment.
`sweep.callback.ResultsCallback` is the Ray Tune callback that keeps them current from the driver.

Column names are a contract with `analysis/`: add columns, never rename. `TRIAL_COLUMNS` and
`EPOCH_COLUMNS` document each one (the README's results table is made from them). Extra keys given to
`upsert_trial` / `upsert_epochs` (e.g. `search`, `optuna_trial`, an evaluator's extra readings) become
extra columns after the documented ones.
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

TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
STATUSES = ("PENDING", "RUNNING", "TERMINATED", "ERROR")

# name: (arrow type, meaning)
TRIAL_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "run": (pa.string(), "run name (the directory `<storage>/<run>`)"),
    "trial_id": (pa.string(), "`<cell>-r<repetition>`; stable across resumes; key of the row"),
    "grid": (pa.string(), "grid the trial came from (`digits`, `paper-celeba`, a file name, ...)"),
    "cell": (pa.string(), "grid cell name (e.g. `vanilla-b25`, `thermo-p0.3`)"),
    "repetition": (pa.int64(), "repetition index 0..R-1"),
    "seed": (pa.int64(), "PRNG seed of the trial: the grid's base seed + repetition"),
    "dataset": (pa.string(), "digits, cifar10, celeb_a or svhn_cropped"),
    "objective": (pa.string(), "`vanilla` (Eq. 7-9) or `thermo` (Eq. 15-22)"),
    "batch_size": (pa.int64(), "examples per step (split over the trial's devices)"),
    "temp_power": (pa.float64(), "p of the temperature schedule t_i = (i/(N_t-1))^p; null for vanilla"),
    "num_temps": (pa.int64(), "N_t, temperatures including both ends; null for vanilla"),
    "kl_weight": (pa.float64(), "eta, weight of the KL terms (Eq. 22); null for vanilla"),
    "chain_gradient": (pa.bool_(), "true: gradients flow through the Langevin chains (the method as "
                                   "described); false: stop-gradient chains (the published code)"),
    "prior_steps": (pa.int64(), "K_z, prior Langevin steps"),
    "posterior_steps": (pa.int64(), "K_post, posterior Langevin steps (per temperature for thermo)"),
    "prior_step_size": (pa.float64(), "s of the prior chain (Eq. 10)"),
    "posterior_step_size": (pa.float64(), "s of the posterior chain (Eq. 10)"),
    "epochs": (pa.int64(), "epochs the trial is configured to train"),
    "epochs_completed": (pa.int64(), "epochs with a row in epochs.parquet so far"),
    "status": (pa.string(), "PENDING, RUNNING, TERMINATED (finished) or ERROR (diverged or crashed)"),
    "error": (pa.string(), "why the trial ended in ERROR (e.g. the DivergenceError message); null otherwise"),
    "wall_time_s": (pa.float64(), "Ray Tune's total time of the trial (all epochs, evaluation, "
                                  "checkpointing, across restarts), seconds"),
    "devices": (pa.int64(), "devices the trial trained on data-parallel (pmap)"),
    "device_kind": (pa.string(), "JAX device kind, e.g. `cpu` or `NVIDIA H100 80GB HBM3`"),
    "node": (pa.string(), "host name of the node that ran the trial's latest epoch"),
    "node_id": (pa.string(), "Ray node id of that node (tells nodes apart on one host)"),
    "final_train_loss": (pa.float64(), "train_loss of the last completed epoch"),
    "final_val_loss": (pa.float64(), "val_loss of the last completed epoch"),
    "final_grad_var": (pa.float64(), "grad_var of the last completed epoch"),
    "final_kid_rbf_inf": (pa.float64(), "the latest evaluated kid_rbf_inf (null if never evaluated)"),
    "final_fid_inf": (pa.float64(), "the latest evaluated fid_inf (null if never evaluated)"),
    "checkpoint": (pa.string(), "path/URI of the trial's latest checkpoint (Orbax state + history)"),
    "ray_trial_id": (pa.string(), "Ray Tune's internal trial id"),
    "config_json": (pa.string(), "the trial's full ExperimentConfig as JSON"),
    "updated_at": (pa.string(), "UTC time this row was last written (ISO 8601)"),
}

EPOCH_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "run": (pa.string(), "run name"),
    "trial_id": (pa.string(), "the trial (joins trials.parquet); (trial_id, epoch) is the key"),
    "cell": (pa.string(), "grid cell name"),
    "repetition": (pa.int64(), "repetition index"),
    "epoch": (pa.int64(), "1-based epoch"),
    "train_loss": (pa.float64(), "mean training objective over the epoch's steps (vanilla: EBM + generator "
                                 "loss; thermo: minus the TI log-evidence estimate, nats per image)"),
    "val_loss": (pa.float64(), "the same objective on the validation set after the epoch"),
    "grad_mean": (pa.float64(), "mean over all entries of the concatenated EBM+generator gradient, "
                                "averaged over the epoch's steps"),
    "grad_var": (pa.float64(), "learning-gradient variance: variance over all entries of the concatenated "
                               "EBM+generator gradient per step, averaged over the epoch's steps"),
    "grad_var_ebm": (pa.float64(), "the same for the EBM prior's gradient alone"),
    "grad_var_gen": (pa.float64(), "the same for the generator's gradient alone"),
    "kid_rbf_inf": (pa.float64(), "KID_inf with the RBF kernel (paper's metric); NaN when not evaluated"),
    "kid_poly_inf": (pa.float64(), "KID_inf with the cubic polynomial kernel; NaN when not evaluated"),
    "fid_inf": (pa.float64(), "FID_inf; NaN when not evaluated"),
    "epoch_time_s": (pa.float64(), "wall time of the epoch's training and validation, seconds"),
    "ebm_lr": (pa.float64(), "EBM learning rate used in the epoch"),
    "gen_lr": (pa.float64(), "generator learning rate used in the epoch"),
}

# Extra columns with a fixed type even when every value is null (search columns come from sweep.search).
_KNOWN_READING_TYPES = {"eval_time_s": pa.float64(), "search": pa.string(), "optuna_trial": pa.int64(),
                        "optuna_state": pa.string(), "search_value": pa.float64()}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) for a local path or a URI such as s3://bucket/prefix."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(uri)


def read_json_uri(uri: str) -> Any:
    """The JSON document at a local path or URI (s3://...), or None if there is none."""
    fs, path = filesystem_for(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.readall().decode())
    except (FileNotFoundError, OSError):
        return None


def write_json_uri(uri: str, value: Any) -> None:
    """Write `value` as JSON to a local path or URI, creating its directory."""
    fs, path = filesystem_for(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(json.dumps(value, indent=1).encode())


def _column_type(name: str, values: list[Any], documented: dict[str, tuple[pa.DataType, str]]) -> pa.DataType:
    if name in documented:
        return documented[name][0]
    if name in _KNOWN_READING_TYPES:
        return _KNOWN_READING_TYPES[name]
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.int64()
    if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return pa.float64()
    return pa.string()


def _cell_value(value: Any, typ: pa.DataType) -> Any:
    if value is None:
        return None
    if typ == pa.string() and not isinstance(value, str):
        return json.dumps(value) if isinstance(value, dict | list) else str(value)
    if typ == pa.float64():
        return float(value)
    if typ == pa.int64():
        return int(value)
    return value


def to_table(rows: list[dict[str, Any]], documented: dict[str, tuple[pa.DataType, str]]) -> pa.Table:
    """Rows as an Arrow table: documented columns first with their types, extra keys after, sorted."""
    extra = sorted({k for r in rows for k in r} - set(documented))
    columns = {}
    for name in [*documented, *extra]:
        values = [r.get(name) for r in rows]
        typ = _column_type(name, values, documented)
        columns[name] = pa.array([_cell_value(v, typ) for v in values], type=typ)
    return pa.table(columns)


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
        return pq.read_table(path, filesystem=self.fs).to_pylist()

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
            pq.write_table(table, tmp, filesystem=self.fs)
            self.fs.move(tmp, final)  # a rename: readers see the old or the new file, never half of one
        else:  # object stores: a single PUT is atomic already
            pq.write_table(table, final, filesystem=self.fs)

    def flush(self) -> None:
        """Write both tables (epochs first, so a trial row never claims epochs the file lacks)."""
        self._write(EPOCHS_FILE, to_table(self.epoch_rows(), EPOCH_COLUMNS))
        self._write(TRIALS_FILE, to_table(self.trial_rows(), TRIAL_COLUMNS))


def config_columns(config: Any) -> dict[str, Any]:
    """The trials-table columns that come from an `ExperimentConfig` (thermo-only ones null for vanilla)."""
    thermo = config.objective == "thermo"
    return {
        "dataset": config.dataset,
        "objective": config.objective,
        "batch_size": config.batch_size,
        "temp_power": config.temp_power if thermo else None,
        "num_temps": config.num_temps if thermo else None,
        "kl_weight": config.kl_weight if thermo else None,
        "chain_gradient": config.chain_gradient,
        "prior_steps": config.prior_steps,
        "posterior_steps": config.posterior_steps,
        "prior_step_size": config.prior_step_size,
        "posterior_step_size": config.posterior_step_size,
        "epochs": config.epochs,
        "seed": config.seed,
        "config_json": json.dumps(config.to_dict(), sort_keys=True),
    }


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
    for name in ("kid_rbf_inf", "fid_inf"):
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
            return ln[ln.index("DivergenceError"):]
    for ln in reversed(lines):
        if ln.split(":", 1)[0].endswith(("Error", "Exception", "Interrupt")):
            return ln
    return lines[-1] if lines else None


def summarize(trials: Any, epochs: Any) -> Any:
    """Per cell (in trial order): repetitions done, errors, and mean +- std (ddof=1) over repetitions of
    the final grad_var, KID_inf (kid_rbf_inf, latest evaluated) and train_loss. Returns a DataFrame."""
    import pandas as pd

    rows = []
    for cell, group in trials.groupby("cell", sort=False):
        done = group[group["status"] == "TERMINATED"]
        errors = int((group["status"] == "ERROR").sum())
        row: dict[str, Any] = {"cell": cell, "finished": len(done), "errors": errors, "trials": len(group)}
        for name, col in (("grad_var", "final_grad_var"), ("kid_rbf_inf", "final_kid_rbf_inf"),
                          ("train_loss", "final_train_loss")):
            values = pd.to_numeric(done[col], errors="coerce").dropna() if col in done else pd.Series([])
            row[f"{name}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def format_summary(summary: Any) -> str:
    """The per-cell summary as aligned text: `mean +- std` over repetitions."""
    def pm(row: Any, name: str, fmt: str) -> str:
        mean, std = row[f"{name}_mean"], row[f"{name}_std"]
        if math.isnan(mean):
            return "-"
        return f"{mean:{fmt}} +- {std:{fmt}}" if not math.isnan(std) else f"{mean:{fmt}}"

    header = ["cell", "done", "err", "final grad_var", "final KID_inf (rbf)", "final train_loss"]
    body = [[str(r["cell"]), f"{r['finished']}/{r['trials']}", str(r["errors"]), pm(r, "grad_var", ".3e"),
             pm(r, "kid_rbf_inf", ".4f"), pm(r, "train_loss", ".4g")] for _, r in summary.iterrows()]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
                     for line in [header, *body])
