"""Watching a launch: `--progress-every-s` and `--tracker mlflow[=URI]|wandb[=PROJECT]`, their checks, and
what a tracker is told about each trial and epoch.

Nothing here imports Ray, MLflow or W&B: a dry run or a bad flag never starts them. The Tune callbacks
that send the readings are in `sweep.tracker_callbacks` (Ray Tune's own MLflow, W&B and TensorBoard
callbacks, subclassed).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import re
from typing import Any

TRACKERS = ("mlflow", "wandb")
EXTRA_MODULES = {"mlflow": "mlflow", "wandb": "wandb"}
MLFLOW_DB_FILE = "mlflow.db"
DEFAULT_WANDB_PROJECT = "thermosweep"
DEFAULT_PROGRESS_EVERY_S = 30.0


@dataclasses.dataclass(frozen=True)
class Tracker:
    """One `--tracker` value: the kind and its target (MLflow tracking URI, W&B project; None: default)."""

    kind: str
    target: str | None = None


def parse_tracker(value: str) -> Tracker:
    """`mlflow`, `mlflow=URI`, `wandb` or `wandb=PROJECT` as a Tracker; argparse's `type`."""
    kind, _, target = value.partition("=")
    if kind not in TRACKERS:
        raise argparse.ArgumentTypeError(
            f"{value!r}: use mlflow[=TRACKING_URI] or wandb[=PROJECT] (TensorBoard files are always written)"
        )
    if "=" in value and not target:
        raise argparse.ArgumentTypeError(f"{value!r}: give a value after '=' or leave '=' out")
    return Tracker(kind, target or None)


def add_watch_arguments(p: argparse.ArgumentParser) -> None:
    """--progress-every-s and --tracker, shared by sweep.grid and sweep.search."""
    p.add_argument(
        "--progress-every-s",
        type=float,
        default=DEFAULT_PROGRESS_EVERY_S,
        metavar="S",
        help="each trial reports its epoch's step, images/s and ETAs at most every S seconds; the "
        f"driver's table shows them with the run's ETA (default {DEFAULT_PROGRESS_EVERY_S:g}; 0: off)",
    )
    p.add_argument(
        "--tracker",
        action="append",
        type=parse_tracker,
        default=[],
        metavar="mlflow[=URI]|wandb[=PROJECT]",
        help="also send every epoch's readings to MLflow (default store sqlite:///<run dir>/"
        f"{MLFLOW_DB_FILE}) or W&B (default project {DEFAULT_WANDB_PROJECT}); repeatable",
    )


def check_watch_arguments(args: argparse.Namespace, storage: str) -> None:
    """Refuse watch flags no launch can honour, before anything starts. Raises ValueError naming the fix."""
    if args.progress_every_s < 0:
        raise ValueError(f"--progress-every-s {args.progress_every_s:g} must be >= 0 (0: no progress)")
    kinds = [t.kind for t in args.tracker]
    for kind in sorted(set(kinds)):
        if kinds.count(kind) > 1:
            raise ValueError(f"--tracker {kind} is given {kinds.count(kind)} times; give it once")
        if importlib.util.find_spec(EXTRA_MODULES[kind]) is None:
            raise ValueError(
                f"--tracker {kind} needs the {kind} extra, which is not installed: "
                f"pip install 'thermosweep[{kind}]'"
            )
    for t in args.tracker:
        if t.kind == "mlflow" and t.target is None and "://" in storage:
            raise ValueError(
                f"--tracker mlflow: --storage {storage} is remote and SQLite cannot live there; pass "
                "--tracker mlflow=TRACKING_URI (e.g. http://mlflow-host:5000 or postgresql://user@host/db)"
            )


def mlflow_uri(tracker: Tracker, run_uri: str) -> str:
    """The tracking URI: the one given, else `sqlite:///<run dir>/mlflow.db` (local storage only)."""
    return tracker.target or f"sqlite:///{run_uri}/{MLFLOW_DB_FILE}"


def is_epoch_result(result: dict[str, Any]) -> bool:
    """Whether a Tune result is an epoch's readings (what trackers log), not e.g. a trial's error report
    or a mid-epoch checkpoint's (`sweep.partial.is_epoch_result`): the mark, and the epoch readings there."""
    from sweep.partial import is_epoch_result as not_partial

    return not_partial(result) and "train_loss" in result and "epoch" in result


def epoch_readings(result: dict[str, Any]) -> dict[str, float]:
    """Every finite number among an epoch's readings (the same readings as its epochs.parquet row): the
    trial's `readings_json` when it is there, else the result's own numbers."""
    readings = json.loads(result["readings_json"]) if result.get("readings_json") else result
    return _numbers(readings)


def restored_epochs(result: dict[str, Any]) -> list[dict[str, float]]:
    """The readings of the epochs a restarted trial had trained before its restart (the first result after
    a restore carries them): a driver killed mid-run may never have sent them all to its trackers."""
    if not result.get("restored_history_json"):
        return []
    return [_numbers(r) for r in json.loads(result["restored_history_json"]) if "epoch" in r]


def _numbers(readings: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in readings.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def trial_identity(tune_config: dict[str, Any], ray_trial_id: str, run: str) -> dict[str, Any]:
    """What a tracker run is named and tagged with: run, trial_id, cell, repetition, seed, grid, and the
    trial's whole ExperimentConfig as `params` (its search proposals applied)."""
    from sweep.trainable import resolve_trial

    config, meta = resolve_trial(tune_config)
    params = {**config.to_dict(), **{k: v for k, v in tune_config.items() if k != "trial"}}
    return {
        "run": run,
        "trial_id": str(meta.get("trial_id") or ray_trial_id),
        "cell": meta.get("cell"),
        "repetition": meta.get("repetition"),
        "seed": config.seed,
        "grid": meta.get("grid"),
        "params": params,
    }


def tracker_tags(identity: dict[str, Any]) -> dict[str, str]:
    """The tags of a trial's tracker run (values as text; missing ones left out)."""
    keys = ("run", "trial_id", "cell", "repetition", "seed", "grid")
    return {k: str(identity[k]) for k in keys if identity.get(k) is not None}


def wandb_run_id(run: str, trial_id: str) -> str:
    """The W&B run id of a trial: `<run>-<trial_id>` in the characters W&B ids allow, with a short hash of
    the exact pair when characters had to be replaced or the id shortened. A function of the names only,
    so every resume of the trial (whatever Tune's own trial id then) continues the same W&B run."""
    name = f"{run}-{trial_id}"
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    if safe == name and len(name) <= 64:
        return name
    return f"{safe[:55]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
