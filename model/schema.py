"""The results schema: the columns of `trials.parquet` and `epochs.parquet`, their types and meanings.

This is the contract between the model's CLI, `sweep` (which writes the tables) and `analysis` (which
reads them). It imports only the standard library and pyarrow, so `analysis` can use it without pulling
in JAX or Ray. Column names are stable: add columns, never rename one. Extra keys written beside the
documented columns (an evaluator's extra readings, a search's columns) become extra columns after them.

`python -m model.schema docs/results.md` regenerates the column tables of that page between its
`<!-- schema:trials -->` and `<!-- schema:epochs -->` markers; a test fails when the page drifts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

RESULTS_DIR = "results"
TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
SEARCH_MANIFEST_FILE = "search.json"  # <run>/search.json: a search's metrics, directions, space, seeds
READINGS_PREFIX = (
    "readings-"  # results/readings-<tag>.parquet: a run's readings taken again (sweep.reevaluate)
)


def readings_file(tag: str) -> str:
    """The file name of the readings `python -m sweep.reevaluate --tag TAG` writes beside the run's tables."""
    return f"{READINGS_PREFIX}{tag}.parquet"


Columns = dict[str, tuple[pa.DataType, str]]  # name: (arrow type, meaning)

# Config fields that only a thermodynamic objective uses: null in the rows of vanilla trials.
THERMO_ONLY = (
    "temp_power",
    "num_temps",
    "kl_weight",
    "ti_rule",
    "chains_per_example",
    "ebm_gradient",
    "gen_gradient",
)

# Config fields written beside every reading, so a table read on its own says what produced it.
CONFIG_COLUMNS: Columns = {
    "seed": (pa.int64(), "PRNG seed of the trial: the grid's base seed + repetition"),
    "dataset": (pa.string(), "digits, cifar10, celeb_a or svhn_cropped"),
    "objective": (pa.string(), "`vanilla` (Eq. 7-9) or `thermo` (Eq. 15-22)"),
    "batch_size": (pa.int64(), "examples per step (split over the trial's devices)"),
    "temp_power": (pa.float64(), "p of the temperature schedule t_i = (i/(N_t-1))^p; null for vanilla"),
    "num_temps": (pa.int64(), "N_t, temperatures including both ends; null for vanilla"),
    "kl_weight": (pa.float64(), "eta, weight of the KL terms (Eq. 22); null for vanilla"),
    "ti_rule": (
        pa.string(),
        "how log p(x) is estimated from the chains: kl_batch (Eq. 20 as published), "
        "kl_example, variance, stepping_stone or trapezoid; null for vanilla",
    ),
    "chains_per_example": (pa.int64(), "M, posterior chains per example and temperature; null for vanilla"),
    "ebm_gradient": (
        pa.string(),
        "the EBM's gradient: chains (through the Langevin chains, the paper's "
        "text), none (stop-gradient chains, the published code) or ml; null for "
        "vanilla",
    ),
    "gen_gradient": (
        pa.string(),
        "the generator's gradient: ti (of the TI estimate) or ml (E_{t=1}[grad log "
        "p(x|z)]); null for vanilla",
    ),
    "prior_steps": (pa.int64(), "K_z, prior Langevin steps"),
    "posterior_steps": (pa.int64(), "K_post, posterior Langevin steps (per temperature for thermo)"),
    "prior_step_size": (pa.float64(), "s of the prior chain (Eq. 10)"),
    "posterior_step_size": (pa.float64(), "s of the posterior chain (Eq. 10)"),
    "epochs": (pa.int64(), "epochs the trial is configured to train"),
}

TRIAL_COLUMNS: Columns = {
    "run": (pa.string(), "run name (the directory `<storage>/<run>`)"),
    "trial_id": (pa.string(), "`<cell>-r<repetition>`; stable across resumes; key of the row"),
    "grid": (pa.string(), "grid the trial came from (`digits`, `paper-celeba`, a file name, ...)"),
    "cell": (pa.string(), "grid cell name (e.g. `vanilla-b25`, `thermo-p0.3`)"),
    "repetition": (pa.int64(), "repetition index 0..R-1"),
    **CONFIG_COLUMNS,
    "epochs_completed": (pa.int64(), "epochs with a row in epochs.parquet so far"),
    "status": (pa.string(), "PENDING, RUNNING, TERMINATED (finished) or ERROR (diverged or crashed)"),
    "error": (pa.string(), "why the trial ended in ERROR (e.g. the DivergenceError message); null otherwise"),
    "wall_time_s": (
        pa.float64(),
        "Ray Tune's total time of the trial (all epochs, evaluation, "
        "checkpointing, across restarts), seconds",
    ),
    "devices": (pa.int64(), "devices the trial trained on data-parallel (pmap)"),
    "device_kind": (pa.string(), "JAX device kind, e.g. `cpu` or `NVIDIA H100 80GB HBM3`"),
    "conv_impl": (
        pa.string(),
        "generator transposed convolutions the trial ran: `phases` or `lax` "
        "(`conv_impl=auto` resolved on the trial's backend)",
    ),
    "node": (pa.string(), "host name of the node that ran the trial's latest epoch"),
    "node_id": (pa.string(), "Ray node id of that node (tells nodes apart on one host)"),
    "final_train_loss": (pa.float64(), "train_loss of the last completed epoch"),
    "final_val_loss": (pa.float64(), "val_loss of the last completed epoch"),
    "final_grad_var": (pa.float64(), "grad_var of the last completed epoch"),
    "final_kid_rbf_inf": (pa.float64(), "the latest evaluated kid_rbf_inf (null if never evaluated)"),
    "final_fid_inf": (pa.float64(), "the latest evaluated fid_inf (null if never evaluated)"),
    "final_val_ll": (pa.float64(), "the latest evaluated val_ll (null if never evaluated)"),
    "checkpoint": (pa.string(), "path/URI of the trial's latest checkpoint (Orbax state + history)"),
    "ray_trial_id": (pa.string(), "Ray Tune's internal trial id"),
    "config_json": (pa.string(), "the trial's full ExperimentConfig as JSON"),
    "updated_at": (pa.string(), "UTC time this row was last written (ISO 8601)"),
}

# The readings of one epoch, as the training loop produces them (model.loop.run_epoch).
READING_COLUMNS: Columns = {
    "epoch": (pa.int64(), "1-based epoch"),
    "train_loss": (
        pa.float64(),
        "mean training objective over the epoch's steps (vanilla: EBM + generator "
        "loss; thermo: minus the TI log-evidence estimate, nats per image)",
    ),
    "val_loss": (pa.float64(), "the same objective on the validation set after the epoch"),
    "grad_mean": (
        pa.float64(),
        "mean over all entries of the concatenated EBM+generator gradient, averaged over the epoch's steps",
    ),
    "grad_var": (
        pa.float64(),
        "learning-gradient variance (the paper's reading): variance over all entries "
        "of the concatenated EBM+generator gradient per step, averaged over the "
        "epoch's steps; the spread of one gradient's entries, not gradient noise",
    ),
    "grad_var_ebm": (pa.float64(), "the same for the EBM prior's gradient alone"),
    "grad_var_gen": (pa.float64(), "the same for the generator's gradient alone"),
    "kid_rbf_inf": (pa.float64(), "KID_inf with the RBF kernel (paper's metric); NaN when not evaluated"),
    "kid_poly_inf": (pa.float64(), "KID_inf with the cubic polynomial kernel; NaN when not evaluated"),
    "fid_inf": (pa.float64(), "FID_inf; NaN when not evaluated"),
    "val_ll": (
        pa.float64(),
        "validation log-likelihood log p(x) by AIS, nats per image (higher is "
        "better), on a fixed validation subset, the same for every model; NaN when not "
        "evaluated",
    ),
    "val_ll_stderr": (pa.float64(), "standard error of val_ll over the subset's examples"),
    **{
        f"grad_noise_{net}": (
            pa.float64(),
            f"gradient noise of the {name}: mean per-entry variance of its "
            "gradient over minibatches and chain keys (units of grad_var)",
        )
        for net, name in (("ebm", "EBM prior"), ("gen", "generator"))
    },
    **{
        f"grad_noise_data_{net}": (
            pa.float64(),
            f"the data part of grad_noise_{net} (across minibatches), measured from its own draws",
        )
        for net in ("ebm", "gen")
    },
    **{
        f"grad_noise_langevin_{net}": (
            pa.float64(),
            f"the Langevin part of grad_noise_{net} (same batch, "
            "different chain keys), measured from its own draws",
        )
        for net in ("ebm", "gen")
    },
    **{
        f"grad_snr_{net}": (
            pa.float64(),
            f"signal-to-noise ratio of the {net} gradient, (||mean g||^2 - "
            "trace(Cov)/G) / trace(Cov); ~0 for pure noise, inf if noiseless; "
            "reads high, by up to (G-1)/(G-3) for noise in few directions "
            "(docs/readings.md)",
        )
        for net in ("ebm", "gen")
    },
    **{
        f"kid_{k}_nmax": (
            pa.float64(),
            f"KID ({k} kernel) of the N_max generated and real features, unbiased; NaN when not evaluated",
        )
        for k in ("rbf", "poly")
    },
    **{
        f"kid_{k}_nmax_stderr": (
            pa.float64(),
            f"jackknife standard error of kid_{k}_nmax over the pooled rows",
        )
        for k in ("rbf", "poly")
    },
    "feature_extractor": (
        pa.string(),
        "the network whose features FID and KID compare (`digits-mlp-v1`, `inception-v3-fid`; "
        "docs/metrics.md); null when not evaluated",
    ),
    "val_ll_time_s": (pa.float64(), "wall time of the val_ll reading, seconds"),
    "grad_noise_time_s": (pa.float64(), "wall time of the gradient-noise reading, seconds"),
    "epoch_time_s": (pa.float64(), "wall time of the epoch's training and validation, seconds"),
    "ebm_lr": (pa.float64(), "EBM learning rate used in the epoch"),
    "gen_lr": (pa.float64(), "generator learning rate used in the epoch"),
    "ti_temps": (pa.list_(pa.float64()), "the schedule t_0 = 0 .. t_{N_t-1} = 1; null for vanilla"),
    "ti_weights": (
        pa.list_(pa.float64()),
        "trapezoid weights w_i (sum_i w_i E_i is the trapezium; also the "
        "weights of the TI generator gradient); null for vanilla",
    ),
    "ti_expected_loglik": (
        pa.list_(pa.float64()),
        "E_i = E_{p(z|x,t_i)}[log p(x|z)] per temperature, "
        "nats per image, averaged over the epoch's steps (the TI "
        "curve); null for vanilla",
    ),
    "ti_kl_forward": (
        pa.list_(pa.float64()),
        "fitted KL(p_{i-1}||p_i) per interval i = 1..N_t-1, "
        "averaged over the steps; null unless ti_rule is kl_batch or "
        "kl_example",
    ),
    "ti_kl_backward": (pa.list_(pa.float64()), "fitted KL(p_i||p_{i-1}) per interval; null as ti_kl_forward"),
    "kl_identity_error": (
        pa.float64(),
        "sum_i |KL_f + KL_b - dt_i (E_i - E_{i-1})| of the fitted Gaussians "
        "(0 for the exact posteriors; for kl_example the residual is "
        "averaged over x before the absolute value, so it has a Monte Carlo "
        "floor that falls with M: docs/readings.md), nats, averaged over the "
        "steps; null unless ti_rule is kl_batch or kl_example",
    ),
    "kl_identity_z": (
        pa.float64(),
        "kl_example: max over intervals of |mean over x of the per-x identity "
        "residual| / its standard error over the epoch's examples; above "
        "model.thermo.identity_threshold(N_t) (2.77 at N_t = 10) the fit misses "
        "the identity beyond noise; null unless ti_rule is kl_example",
    ),
    "kl_identity_split_z": (
        pa.float64(),
        "kl_example: max over intervals of |mean over x of r_x^A r_x^B| / its "
        "standard error, r^A and r^B the residuals refitted on the two halves "
        "of x's chains; catches per-x residuals that cancel across x; same "
        "threshold; null unless ti_rule is kl_example and chains_per_example >= 12",
    ),
}

EPOCH_COLUMNS: Columns = {
    "run": (pa.string(), "run name"),
    "trial_id": (pa.string(), "the trial (joins trials.parquet); (trial_id, epoch) is the key"),
    "cell": (pa.string(), "grid cell name"),
    "repetition": (pa.int64(), "repetition index"),
    **READING_COLUMNS,
}

# The epochs table of one `python -m model.train` run: its readings with the config beside every row.
RUN_EPOCH_COLUMNS: Columns = {
    "trial_id": (pa.string(), "`<dataset>-<objective>-s<seed>`"),
    **READING_COLUMNS,
    **CONFIG_COLUMNS,
}

# Extra columns with a fixed type even when every value is null.
EXTRA_TYPES: dict[str, pa.DataType] = {
    "eval_time_s": pa.float64(),
    "search": pa.string(),
    "optuna_trial": pa.int64(),
    "optuna_state": pa.string(),
    "search_value": pa.float64(),
    "search_se": pa.float64(),
}
# A search's per-objective columns (`search_value_<metric>`, `search_se_<metric>`): numbers even when
# every value so far is null (no proposal COMPLETE yet).
EXTRA_PREFIX_TYPES: dict[str, pa.DataType] = {"search_value_": pa.float64(), "search_se_": pa.float64()}


def config_columns(config: Mapping[str, Any]) -> dict[str, Any]:
    """The `CONFIG_COLUMNS` of a config given as a dict (`ExperimentConfig.to_dict()`): thermo-only
    fields are None for a vanilla config."""
    thermo = config["objective"] == "thermo"
    return {name: None if name in THERMO_ONLY and not thermo else config.get(name) for name in CONFIG_COLUMNS}


def column_type(name: str, values: list[Any], columns: Columns) -> pa.DataType:
    """The arrow type of column `name`: documented, known extra, or inferred from its non-null values."""
    if name in columns:
        return columns[name][0]
    if name in EXTRA_TYPES:
        return EXTRA_TYPES[name]
    for prefix, typ in EXTRA_PREFIX_TYPES.items():
        if name.startswith(prefix):
            return typ
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


def to_table(rows: list[dict[str, Any]], columns: Columns) -> pa.Table:
    """Rows as an Arrow table: the documented `columns` first, with their types, then extra keys, sorted."""
    extra = sorted({k for r in rows for k in r} - set(columns))
    arrays = {}
    for name in [*columns, *extra]:
        values = [r.get(name) for r in rows]
        typ = column_type(name, values, columns)
        arrays[name] = pa.array([_cell_value(v, typ) for v in values], type=typ)
    return pa.table(arrays)


# ------------------------------------------------------------------------------------------- the docs

TABLES: dict[str, Columns] = {
    "trials": TRIAL_COLUMNS,
    "epochs": EPOCH_COLUMNS,
    "run-epochs": RUN_EPOCH_COLUMNS,
}


def read_table(fs: pafs.FileSystem, path: str, attempts: int = 20) -> pa.Table:
    """The Parquet table at `path` on `fs` (one of a run's results files), as one version of the file.

    A driver rewrites its tables after every epoch. Locally the rewrite is a rename, and an open file
    stays the version it was: the file is read as it is. On an object store pyarrow's own reader asks
    for the footer and the column chunks in separate requests (and a stream in 256 KiB ones), and a
    rewrite between them tears the read ("magic bytes not found", "page was smaller than expected").
    Here the object's size is looked up and the whole object fetched in one ranged request, then parsed
    from memory: one request returns one version. If the object changed between the lookup and the
    fetch, the fetch fails (it shrank) or returns a prefix of the new version (it grew), whose parse
    fails; such a read is taken again, up to `attempts` times. FileNotFoundError is raised at once.
    """
    if isinstance(fs, pafs.LocalFileSystem):
        return pq.read_table(path, filesystem=fs)
    for attempt in range(attempts):
        try:
            with fs.open_input_file(path) as f:
                data = f.read_at(f.size(), 0)
            return pq.read_table(pa.BufferReader(data))
        except FileNotFoundError:
            raise
        except (pa.ArrowInvalid, OSError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def markdown_columns(columns: Columns) -> str:
    """A Markdown table of `columns`: name, arrow type, meaning (pipes escaped)."""
    lines = ["| column | type | meaning |", "|---|---|---|"]
    for name, (typ, meaning) in columns.items():
        escaped = meaning.replace("|", "\\|")
        lines.append(f"| `{name}` | {typ} | {escaped} |")
    return "\n".join(lines)


def render_docs(text: str) -> str:
    """`text` with the content between each `<!-- schema:NAME -->` / `<!-- /schema:NAME -->` pair replaced
    by the Markdown table of that table's columns. Raises ValueError if a marker pair is missing."""
    for name, columns in TABLES.items():
        pattern = re.compile(rf"(<!-- schema:{name} -->\n).*?(<!-- /schema:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(
                f"no '<!-- schema:{name} -->' ... '<!-- /schema:{name} -->' markers; add them "
                "where the table belongs"
            )
        text = pattern.sub(lambda m, c=columns: m.group(1) + markdown_columns(c) + "\n" + m.group(2), text)
    return text


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m model.schema`."""
    parser = argparse.ArgumentParser(
        prog="python -m model.schema", description="Rewrite a page's generated column tables in place."
    )
    parser.add_argument("page", help="the page holding the schema markers, e.g. docs/results.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m model.schema PAGE.md`: rewrite the page's generated column tables in place."""
    from pathlib import Path

    page = Path(build_parser().parse_args(argv).page)
    try:
        page.write_text(render_docs(page.read_text(encoding="utf-8")), encoding="utf-8")
    except (OSError, ValueError) as err:
        print(f"error: {page}: {err}", file=sys.stderr)
        return 2
    print(f"wrote the column tables of {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
