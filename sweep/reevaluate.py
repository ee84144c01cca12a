"""`python -m sweep.reevaluate RUN --set val_ll_temps=1000 --tag t1000`: read a finished run's final
checkpoints again with other reading settings, without retraining.

For each trial of the run (`<run>/results/trials.parquet`), the newest readable checkpoint
(`<run>/<trial_id>/checkpoint_NNNNNN/`, `sweep.checkpoint`) is restored and the readings of an evaluation
epoch are taken again at its parameters: `val_ll`, the gradient noise (`model.readings`) and KID/FID
(`model.metrics`), with the same keys the trial used at that epoch. Only reading settings may change
(`READING_SETTINGS`); a setting that would change training is refused. With the run's own settings the
readings come out as the run wrote them (on CPU, one thread per process as in a sweep's trials).

The readings go to `<run>/results/readings-<tag>.parquet` (`model.schema.readings_file`), one row per
(trial_id, epoch), with the settings used; `python -m analysis.report RUN --readings TAG` reads them in
place of the run's own. A rerun with the same tag and settings skips the trials already done.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from model.config import ExperimentConfig, apply_overrides, parse_set_args
from model.schema import RESULTS_DIR, TRIALS_FILE, read_table, readings_file
from sweep.storage import filesystem_for, storage_join

# Config fields that only change how a trained model is read, never how it trains.
READING_SETTINGS = (
    "val_ll_examples",
    "val_ll_temps",
    "val_ll_chains",
    "val_ll_prior_chains",
    "grad_noise_draws",
    "eval_num_min",
    "eval_num_max",
    "eval_num_points",
    "eval_with_replacement",
)
READINGS = ("val_ll", "grad_noise", "fidelity")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DRAW_OFFSET = 7_000_000  # --draw K > 0: fold_in(K + offset) into the epoch's keys, apart from training's


class ReevaluateError(ValueError):
    """A request that cannot be carried out as given; the message names the value and the fix."""


def reading_overrides(items: list[str]) -> dict[str, Any]:
    """The `--set KEY=VALUE` items as typed reading settings; raises ReevaluateError for any field
    that would change training (or is unknown)."""
    try:
        raw = parse_set_args(items)
    except ValueError as err:
        raise ReevaluateError(str(err)) from None
    for name, value in raw.items():
        if name not in READING_SETTINGS:
            raise ReevaluateError(
                f"--set {name}={value}: not a reading setting, it would change training (or is "
                f"unknown); re-evaluation takes only {', '.join(READING_SETTINGS)}; to change {name} "
                "train a new run with python -m sweep.grid --set"
            )
    try:
        base = apply_overrides(ExperimentConfig(), raw)
    except ValueError as err:
        raise ReevaluateError(f"--set: {err}") from None
    return {name: getattr(base, name) for name in raw}


def _read_table(uri: str) -> Any:
    import pyarrow.fs as pafs

    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    return read_table(fs, path).to_pandas()


def _write_table(uri: str, rows: list[dict[str, Any]]) -> None:
    """All rows at `uri` in one atomic write (local: a temporary file, then a rename)."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = filesystem_for(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    table = pa.Table.from_pylist(rows)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, path)
    else:
        pq.write_table(table, path, filesystem=fs)


def run_trials(run_uri: str, select: list[str] | None) -> list[dict[str, Any]]:
    """The trials rows of the run (trial_id, cell, repetition, status, config_json), in table order,
    restricted to the trial ids or cell names in `select`; raises ReevaluateError when none is left."""
    trials = _read_table(f"{run_uri}/{RESULTS_DIR}/{TRIALS_FILE}")
    if trials is None:
        raise ReevaluateError(
            f"{run_uri}/{RESULTS_DIR}/{TRIALS_FILE} does not exist; pass a run directory written by "
            "python -m sweep.grid or sweep.search (<storage>/<run>)"
        )
    rows = trials.to_dict("records")
    if select:
        known = {r["trial_id"] for r in rows} | {r["cell"] for r in rows}
        unknown = [s for s in select if s not in known]
        if unknown:
            raise ReevaluateError(
                f"--trials {','.join(unknown)}: no such trial id or cell in the run; it has "
                f"{', '.join(sorted({str(r['cell']) for r in rows}))}"
            )
        rows = [r for r in rows if r["trial_id"] in select or r["cell"] in select]
    return rows


def _key_of(config: ExperimentConfig, offset: int, epoch: int, draw: int) -> Any:
    import jax

    key = jax.random.fold_in(jax.random.key(config.seed), offset + epoch)
    return key if draw == 0 else jax.random.fold_in(key, _DRAW_OFFSET + draw)


def trial_readings(
    config: ExperimentConfig,
    state: Any,
    dataset: Any,
    readings: tuple[str, ...],
    *,
    draw: int = 0,
    evaluator_for: Callable[[ExperimentConfig], Any] | None = None,
) -> dict[str, Any]:
    """The readings `readings` (names from READINGS) of the evaluation epoch `state.epoch` at `state`'s
    parameters: the same numbers the trial wrote at that epoch when `config` holds its settings and
    `draw` is 0 (the same keys); draw K > 0 takes independent AIS chains, gradient-noise batches and
    generated images, for the Monte Carlo spread of each reading."""
    from model.loop import generate_images
    from model.readings import GRAD_NOISE_COLUMNS, VAL_LL_COLUMNS, evaluation_readings

    epoch = int(state.epoch)
    params = {"ebm": state.ebm_params, "gen": state.gen_params}
    off = {}
    if "val_ll" not in readings:
        off["val_ll_examples"] = 0
    if "grad_noise" not in readings:
        off["grad_noise_draws"] = 0
    out: dict[str, Any] = {}
    if set(readings) & {"val_ll", "grad_noise"}:
        cfg = apply_overrides(config, off) if off else config
        values = evaluation_readings(
            cfg, params, dataset.train, dataset.val, epoch, key=_key_of(cfg, 3_000_000, epoch, draw)
        )
        wanted = (VAL_LL_COLUMNS if "val_ll" in readings else ()) + (
            GRAD_NOISE_COLUMNS if "grad_noise" in readings else ()
        )
        out.update({k: values[k] for k in wanted})
    if "fidelity" in readings:
        from model.metrics import make_evaluator

        evaluator = evaluator_for(config) if evaluator_for else make_evaluator(config, dataset)
        start = time.perf_counter()
        metrics = evaluator(
            lambda k, n: generate_images(config, state, k, n), _key_of(config, 2_000_000, epoch, draw)
        )
        out.update({k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()})
        out["eval_time_s"] = time.perf_counter() - start
    return out


def _restore(trial_uri: str, config: ExperimentConfig) -> tuple[Any, str] | None:
    """(state, checkpoint name) of the newest readable checkpoint of a trial, or None if it has none."""
    from ray import tune

    from model.loop import init_state
    from sweep.checkpoint import TrialCheckpointer, restore_newest_readable
    from sweep.storage import subdirectories

    names = subdirectories(trial_uri, "checkpoint_")
    if not names:
        return None
    fs, path = filesystem_for(f"{trial_uri}/{names[-1]}")
    newest = tune.Checkpoint(path, filesystem=fs)
    with TrialCheckpointer() as checkpointer:
        found = restore_newest_readable(checkpointer, newest, init_state(config), log=print)
    if found is None:
        return None
    state, _, _ = found
    return state, f"checkpoint of epoch {int(state.epoch)}"


def reevaluate(
    run_uri: str,
    overrides: dict[str, Any],
    tag: str,
    *,
    readings: tuple[str, ...] = READINGS,
    select: list[str] | None = None,
    draw: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[str, int]:
    """Re-evaluate every selected trial's final checkpoint with `overrides` (reading settings only) and
    write `<run>/results/readings-<tag>.parquet`. Returns (its URI, trials written now). Trials already
    in the file with the same settings are skipped; other settings under the same tag are refused."""
    from model.data import load_dataset
    from model.loop import DivergenceError
    from model.metrics import make_evaluator

    out_uri = f"{run_uri}/{RESULTS_DIR}/{readings_file(tag)}"
    settings = {"set": overrides, "readings": list(readings), "draw": draw}
    settings_json = json.dumps(settings, sort_keys=True)
    old = _read_table(out_uri)
    rows: list[dict[str, Any]] = [] if old is None else old.to_dict("records")
    if rows and rows[0].get("settings_json") != settings_json:
        raise ReevaluateError(
            f"--tag {tag}: {out_uri} holds readings taken with {rows[0].get('settings_json')}, not "
            f"{settings_json}; pick another --tag (or delete that file)"
        )
    done = {r["trial_id"] for r in rows}
    trials = run_trials(run_uri, select)
    evaluators: dict[tuple, Any] = {}

    def evaluator_for(config: ExperimentConfig) -> Any:
        fields = ("dataset", "image_size", "channels", "num_train", "num_val", "data_dir")
        key = tuple(getattr(config, f) for f in (*fields, *READING_SETTINGS[5:]))
        if key not in evaluators:
            evaluators[key] = make_evaluator(config, load_dataset(config))
        return evaluators[key]

    written = 0
    for i, trial in enumerate(trials, 1):
        trial_id = str(trial["trial_id"])
        where = f"[{i}/{len(trials)}] {trial_id}"
        if trial_id in done:
            log(f"{where}: already in {readings_file(tag)}, skipped")
            continue
        if trial.get("status") in ("PENDING", "RUNNING"):
            log(f"{where}: {trial['status']}, not finished: skipped (run the command again once it is)")
            continue
        config = apply_overrides(ExperimentConfig(**json.loads(trial["config_json"])), overrides)
        start = time.perf_counter()
        try:
            restored = _restore(f"{run_uri}/{trial_id}", config)
        except DivergenceError as err:
            log(f"{where}: diverged in training, nothing to read ({err})")
            continue
        if restored is None:
            log(f"{where}: no checkpoint, skipped")
            continue
        state, _ = restored
        values = trial_readings(
            config, state, load_dataset(config), readings, draw=draw, evaluator_for=evaluator_for
        )
        seconds = time.perf_counter() - start
        row = {
            "run": str(trial.get("run") or run_uri.rstrip("/").rpartition("/")[2]),
            "trial_id": trial_id,
            "cell": trial.get("cell"),
            "repetition": trial.get("repetition"),
            "epoch": int(state.epoch),
            "tag": tag,
            "settings_json": settings_json,
            "draw": draw,
            **{name: getattr(config, name) for name in READING_SETTINGS},
            **values,
            "reevaluate_time_s": seconds,
            "reevaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        rows.append(row)
        _write_table(out_uri, rows)  # after every trial: an interrupted re-evaluation keeps what it did
        written += 1
        shown = "  ".join(
            f"{k} {values[k]:.4g}" for k in ("val_ll", "grad_noise_gen", "kid_rbf_nmax") if k in values
        )
        log(f"{where} epoch {int(state.epoch)}: {shown}  ({seconds:.1f} s)")
    return out_uri, written


def _cpu_environment() -> None:
    """One XLA thread on the CPU, as in a sweep's trials (`sweep.launch.trial_env` with one CPU), so that
    a re-evaluation at the run's settings reproduces its numbers; set before JAX is imported."""
    from sweep.launch import trial_env

    env = trial_env(gpus_per_trial=0, cpus_per_trial=1, cpu_devices=1)
    flags = os.environ.get("XLA_FLAGS", "").split()
    for flag in env.get("XLA_FLAGS", "").split():
        if flag not in flags:
            flags.append(flag)
    os.environ["XLA_FLAGS"] = " ".join(flags)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TF_CPP_MIN_LOG_LEVEL"):
        os.environ.setdefault(name, env[name])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sweep.reevaluate",
        description="Read a finished run's final checkpoints again with other reading settings "
        "(val_ll_*, grad_noise_draws, eval_*), without retraining; writes "
        "<run>/results/readings-<tag>.parquet.",
    )
    p.add_argument("run", help="the run directory <storage>/<run>: a local path or s3://bucket/prefix/run")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a reading setting, e.g. --set val_ll_temps=1000 (repeatable): {', '.join(READING_SETTINGS)}",
    )
    p.add_argument("--tag", required=True, help="names the output, results/readings-<tag>.parquet")
    p.add_argument(
        "--only",
        default=",".join(READINGS),
        help=f"comma-separated readings to take: {', '.join(READINGS)} (default: all)",
    )
    p.add_argument("--trials", default=None, help="comma-separated trial ids or cell names (default: all)")
    p.add_argument(
        "--draw",
        type=int,
        default=0,
        help="0: the trial's own keys (default); K > 0: independent Monte Carlo draws (K-th)",
    )
    p.add_argument("--gpu", action="store_true", help="read on the GPU instead of one CPU thread")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if not _TAG.match(args.tag):
            raise ReevaluateError(
                f"--tag {args.tag!r}: use letters, digits, '.', '_' or '-' (at most 64), e.g. t1000"
            )
        readings = tuple(r.strip() for r in args.only.split(",") if r.strip())
        bad = [r for r in readings if r not in READINGS]
        if bad or not readings:
            raise ReevaluateError(f"--only {args.only!r}: choose from {', '.join(READINGS)}")
        if args.draw < 0:
            raise ReevaluateError(f"--draw {args.draw}: use 0 (the trial's keys) or a positive integer")
        overrides = reading_overrides(args.set)
        run_uri = storage_join(args.run)
        run_trials(run_uri, [s for s in (args.trials or "").split(",") if s])  # fail before JAX starts
    except ReevaluateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.gpu:
        _cpu_environment()
    print(f"re-evaluating {run_uri} with {overrides or 'its own settings'} -> tag {args.tag}", flush=True)
    try:
        out, written = reevaluate(
            run_uri,
            overrides,
            args.tag,
            readings=readings,
            select=[s for s in (args.trials or "").split(",") if s] or None,
            draw=args.draw,
            log=lambda s: print(s, flush=True),
        )
    except ReevaluateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written} trial(s) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
