"""A full storage stops a run in one line and loses nothing.

When the storage fills up, every write fails at once: trials cannot persist checkpoints, the driver cannot
flush Parquet, Tune cannot snapshot its state. Retrying a trial then only burns its retries (`--max-failures`)
and ends it in ERROR, so the first failure caused by a full storage stops the whole experiment instead
(`StorageGuard`, which raises `StorageFull` out of Tune's loop), and the launcher prints
`storage_full_message`: the storage, what is kept and the fix. Nothing written before is damaged: every
file thermosweep writes appears whole or not at all (a temporary name, then a rename; one PUT on S3), and
`--resume` continues from each trial's newest complete checkpoint (`sweep.rebuild` when Tune's own state
was cut off).

Importing this module imports Ray (the callback); `is_storage_full` needs nothing.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Any

from ray.tune import Callback

# What a full disk, a quota or a full SQLite database look like once an error has become text (a trial's
# error crosses processes as a trace).
_MARKERS = (
    "No space left on device",
    "[Errno 28]",
    "ENOSPC",
    "Disk quota exceeded",
    "[Errno 122]",
    "database or disk is full",
)


class StorageFull(OSError):
    """The run's storage is full: the experiment was stopped (not its trials failed)."""


def is_storage_full(err: BaseException | str | None) -> bool:
    """True when `err` (an exception, its chain, or a trace as text) says the storage ran out of space."""
    seen = set()
    while isinstance(err, BaseException) and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, StorageFull) or getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(err) for m in _MARKERS):
            return True
        err = err.__cause__ or err.__context__
    return isinstance(err, str) and any(m in err for m in _MARKERS)


def storage_full_message(storage: str, run: str, resume_command: str) -> str:
    """The one line a driver ends with when the storage is full."""
    return (
        f"storage {storage} is full (no space left on device): run {run!r} stopped. Kept: its plan, the "
        "Parquet rows written before the storage filled, and each trial's newest complete checkpoint "
        "(interrupted epochs are trained again). Free space or grow the volume, then continue with: "
        f"{resume_command}"
    )


class _DropStorageFull(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        return not is_storage_full(text)


class StorageGuard(Callback):
    """Stops the experiment at the first trial failure caused by a full storage, before Tune retries the
    trial (a retry would fail the same way and use up `--max-failures`). Also keeps Tune's own warnings
    about failed syncs of a full storage (each with a traceback) off the console: the launcher reports it
    once."""

    def setup(self, **info: Any) -> None:
        for name in ("ray.train._internal.syncer", "ray.tune.execution.experiment_state"):
            logging.getLogger(name).addFilter(_DropStorageFull())

    def _check(self, trial: Any) -> None:
        try:  # the driver's own copy of the trial's trace (the one in the storage may never be written)
            text = Path(trial.error_file).read_text() if trial.error_file else ""
        except OSError:
            text = ""
        error = trial.get_error() if hasattr(trial, "get_error") else None
        if is_storage_full(error) or is_storage_full(f"{error} {text}"):
            raise StorageFull(errno.ENOSPC, f"trial {trial} could not write its checkpoint: storage full")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial)
