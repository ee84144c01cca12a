"""Resume a grid whose Ray Tune state cannot be read, from thermosweep's own files.

Tune keeps a run's state in `experiment_state-*.json`, `basic-variant-state-*.json` and `tuner.pkl`; a full
disk or a crash while Tune copies them into the storage leaves them cut off, and `Tuner.restore` then
fails (JSONDecodeError). The run does not depend on them: the manifest (`sweep.json`) holds every trial's
spec, the Parquet tables say which trials finished, and each trial's checkpoints lie under
`<run>/<trial_id>/checkpoint_*/` with their epoch in `trial.json`. `pending_specs` turns those into the
trials still to run, each pointing at its own directory (`CHECKPOINTS_KEY`), and the trainable restores the
newest complete checkpoint it finds there (`own_checkpoint`) when Tune hands it none.
"""

from __future__ import annotations

import json
from typing import Any

from sweep.checkpoint import CHECKPOINT_NAME, HISTORY_FILE, TRIAL_FILE
from sweep.storage import filesystem_for, read_json_uri, subdirectories

CHECKPOINTS_KEY = "checkpoints_uri"  # in a rebuilt trial's spec: its trial directory in the storage
TUNE_STATE_FILES = ("experiment_state-", "basic-variant-state-")


def unreadable_tune_state(run_uri: str) -> str | None:
    """Why Tune's newest state of the run cannot be used (a file cut off, not JSON), or None when it can
    (or when there is none: a run stopped before Tune wrote any starts afresh anyway)."""
    import pyarrow.fs as pafs

    fs, path = filesystem_for(run_uri)
    try:
        names = [
            i.base_name
            for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
            if i.type == pafs.FileType.File
        ]
    except OSError as err:
        return f"cannot list {run_uri} ({err})"
    for prefix in TUNE_STATE_FILES:
        found = sorted(n for n in names if n.startswith(prefix) and n.endswith(".json"))
        if not found:
            continue
        try:
            with fs.open_input_stream(f"{path}/{found[-1]}") as stream:
                state = json.loads(stream.readall().decode())
        except (OSError, ValueError) as err:
            return f"{found[-1]} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:80]})"
        if prefix == "experiment_state-" and "trial_data" not in state:
            return f"{found[-1]} holds no trial data"
    if any(n.startswith("experiment_state-") for n in names) and "tuner.pkl" not in names:
        return "tuner.pkl is missing"
    return None


def newest_checkpoint_uri(trial_uri: str) -> str | None:
    """The newest complete checkpoint under a trial directory: the one with the highest epoch among those
    whose `trial.json` and `history.json` read back (a rebuilt run numbers its checkpoints from 0 again,
    so the directory names do not order them). None if there is none."""
    best: tuple[int, str] | None = None
    for name in subdirectories(trial_uri, "checkpoint_"):
        if not CHECKPOINT_NAME.match(name):
            continue
        uri = f"{trial_uri.rstrip('/')}/{name}"
        meta, history = _json_or_none(f"{uri}/{TRIAL_FILE}"), _json_or_none(f"{uri}/{HISTORY_FILE}")
        if not isinstance(meta, dict) or not isinstance(history, list) or "epoch" not in meta:
            continue
        if best is None or int(meta["epoch"]) > best[0]:
            best = (int(meta["epoch"]), uri)
    return None if best is None else best[1]


def own_checkpoint(trial_uri: str) -> Any | None:
    """`newest_checkpoint_uri` as a `ray.tune.Checkpoint` (what `tune.get_checkpoint()` would give)."""
    from ray import tune

    uri = newest_checkpoint_uri(trial_uri)
    if uri is None:
        return None
    fs, path = filesystem_for(uri)
    return tune.Checkpoint(path, filesystem=fs)


def own_history(trial_uri: str) -> list[dict[str, Any]] | None:
    """The readings history of the trial's newest complete checkpoint, or None."""
    uri = newest_checkpoint_uri(trial_uri)
    return None if uri is None else _json_or_none(f"{uri}/{HISTORY_FILE}")


def _json_or_none(uri: str) -> Any:
    """The JSON document at `uri`, or None if it is missing or cut off."""
    try:
        return read_json_uri(uri)
    except ValueError:
        return None


def pending_specs(
    run_uri: str, specs: list[dict[str, Any]], tables: Any, *, retry_errored: bool
) -> list[dict[str, Any]]:
    """The specs of the trials still to run, each with `CHECKPOINTS_KEY` set, after bringing the Parquet
    rows of every unfinished trial in line with its newest checkpoint (a trial whose checkpoint holds all
    its epochs is marked TERMINATED and not run again). A trial that ended in ERROR runs again only with
    `retry_errored`, or when its error was a full storage. Flushes the tables."""
    from model.config import ExperimentConfig
    from sweep.diskfull import is_storage_full
    from sweep.results import final_columns

    pending = []
    for spec in specs:
        trial_id = spec["trial_id"]
        row = tables.trials.get(trial_id, {})
        if row.get("status") == "TERMINATED":
            continue
        if row.get("status") == "ERROR" and not (retry_errored or is_storage_full(row.get("error") or "")):
            continue
        trial_uri = f"{run_uri.rstrip('/')}/{trial_id}"
        history = own_history(trial_uri)
        if history:
            tables.upsert_epochs(
                trial_id,
                history,
                run=row.get("run"),
                cell=spec.get("cell"),
                repetition=spec.get("repetition"),
            )
            if len(history) >= ExperimentConfig(**spec["experiment"]).epochs:
                tables.upsert_trial(trial_id, **final_columns(history), status="TERMINATED", error=None)
                continue
        pending.append({**spec, CHECKPOINTS_KEY: trial_uri})
    tables.flush()
    return pending
