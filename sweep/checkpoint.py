"""A trial's checkpoint directory: the Orbax-saved train state plus the readings history as JSON.

Layout of one checkpoint (the directory handed to `tune.Checkpoint.from_directory`):

    state/          Orbax StandardCheckpointer output of the whole `TrainState` pytree
    history.json    the list of per-epoch readings so far (the epochs rows of this trial)
    trial.json      who wrote it: trial_id, cell, repetition, epoch, config
    diverged.json   only in a checkpoint written when training diverged: the error message
    unreadable.json only in a checkpoint written when no older checkpoint could be read: the error

Ray keeps a trial's newest checkpoints side by side (`<trial dir>/checkpoint_NNNNNN/`, `num_to_keep`);
`restore_newest_readable` falls back to an older one when the newest cannot be read (a truncated file
after a crash), and raises `CheckpointError`, which retrying cannot cure, when none can. The trial then
reports an `unreadable.json` checkpoint, so that Ray, on a later `--retry-errored`, restores a checkpoint
that exists: the trial retries the older ones, or starts from epoch 0 if the user deleted them.

The state is restored against an abstract target built from a freshly initialised state, so optax
states, typed PRNG keys and dtypes come back exactly (a restore without a target would turn optax
states into plain lists).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

STATE_DIR = "state"
HISTORY_FILE = "history.json"
TRIAL_FILE = "trial.json"
DIVERGED_FILE = "diverged.json"
UNREADABLE_FILE = "unreadable.json"
CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)$")  # Ray's name for a trial's checkpoint directories


class CheckpointError(RuntimeError):
    """None of a trial's checkpoints can be read: a retry would fail the same way."""


def _jsonable(value: Any) -> Any:
    """Readings as plain JSON values; floats keep their exact repr (NaN is written as NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / jax scalars
        return value.item()
    return value


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Write `value` as JSON, atomically (`sweep.storage.atomic_write`): never a file cut off."""
    from sweep.storage import atomic_write

    atomic_write(path, json.dumps(_jsonable(value), indent=1, sort_keys=True).encode())


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


class TrialCheckpointer:
    """Saves and restores one trial's checkpoints with one Orbax `StandardCheckpointer`.

    Use as a context manager (it closes the checkpointer, which waits for pending writes).
    """

    def __init__(self) -> None:
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self._ckptr = ocp.StandardCheckpointer()

    def __enter__(self) -> TrialCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._ckptr.close()

    def save(
        self, directory: str | os.PathLike, state: Any, history: list[dict[str, Any]], meta: dict[str, Any]
    ) -> None:
        """Write `state` (Orbax), `history` and `meta` into the existing empty `directory`, and wait until
        the asynchronous Orbax write has finished, so the directory is complete when this returns."""
        directory = Path(directory).absolute()
        self._ckptr.save(directory / STATE_DIR, state)
        self._ckptr.wait_until_finished()
        write_json(directory / HISTORY_FILE, history)
        write_json(directory / TRIAL_FILE, meta)

    def restore(self, directory: str | os.PathLike, template: Any) -> tuple[Any, list[dict[str, Any]], dict]:
        """(state, history, meta) from a checkpoint `directory`; `template` is a state of the same
        config (e.g. `init_state(config)`) that gives the shapes, dtypes and tree structure.

        Raises the trial's `DivergenceError` again if the checkpoint records a divergence, so a
        retried trial that diverged stops at once instead of training the diverging epoch again."""
        import jax

        directory = Path(directory).absolute()
        diverged = directory / DIVERGED_FILE
        if diverged.exists():
            from model.loop import DivergenceError

            raise DivergenceError(read_json(diverged)["error"])
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, template)
        state = self._ckptr.restore(directory / STATE_DIR, abstract)
        history = read_json(directory / HISTORY_FILE)
        meta = read_json(directory / TRIAL_FILE)
        return state, history, meta


def mark_diverged(
    directory: str | os.PathLike, error: str, meta: dict[str, Any], history: list[dict[str, Any]]
) -> None:
    """Write a checkpoint that records a divergence (no state): restoring it re-raises the error."""
    directory = Path(directory)
    write_json(directory / DIVERGED_FILE, {"error": error})
    write_json(directory / HISTORY_FILE, history)
    write_json(directory / TRIAL_FILE, meta)


def mark_unreadable(directory: str | os.PathLike, error: str, meta: dict[str, Any]) -> None:
    """Write a checkpoint that records that none before it could be read (no state, no history)."""
    write_json(Path(directory) / UNREADABLE_FILE, {"error": error})
    write_json(Path(directory) / TRIAL_FILE, meta)


def read_history(checkpoint: Any) -> list[dict[str, Any]] | None:
    """The readings history stored in a `ray.tune.Checkpoint` (local or remote), or None if absent."""
    from sweep.storage import read_json_at

    return read_json_at(checkpoint.filesystem, f"{checkpoint.path.rstrip('/')}/{HISTORY_FILE}")


def latest_history(run_uri: str, trial_id: str) -> list[dict[str, Any]] | None:
    """The readings history in the newest readable checkpoint of `trial_id` under the run directory
    (`<run>/<trial_id>/checkpoint_XXXXXX/history.json`), or None if there is none."""
    from sweep.storage import read_json_uri, subdirectories

    trial_uri = f"{run_uri.rstrip('/')}/{trial_id}"
    for name in reversed(subdirectories(trial_uri, "checkpoint_")):
        history = read_json_uri(f"{trial_uri}/{name}/{HISTORY_FILE}")
        if history is not None:
            return history
    return None


def _read_json_at(checkpoint: Any, name: str) -> Any:
    """A JSON file of a `ray.tune.Checkpoint` (local or remote); raises OSError/ValueError if unreadable."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path.rstrip('/')}/{name}") as stream:
        return json.loads(stream.readall().decode())


def recorded_divergence(checkpoint: Any) -> str | None:
    """The error a divergence checkpoint (`mark_diverged`) records, or None for any other checkpoint."""
    try:
        return _read_json_at(checkpoint, DIVERGED_FILE)["error"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def trial_checkpoints(checkpoint: Any) -> list[Any]:
    """`checkpoint` (a `ray.tune.Checkpoint`) and the older `checkpoint_NNNNNN` directories beside it in
    its trial directory, newest first; only those that exist (none if every one was deleted)."""
    from pyarrow import fs as pafs
    from ray import tune

    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, _, name = path.rpartition("/")
    own = CHECKPOINT_NAME.match(name)
    if own is None:  # not in Ray's layout: only this directory
        exists = fs.get_file_info(path).type == pafs.FileType.Directory
        return [checkpoint] if exists else []
    listing = fs.get_file_info(pafs.FileSelector(parent or "/", allow_not_found=True))
    found = {}
    for info in listing:
        match = CHECKPOINT_NAME.match(info.base_name)
        if match and info.type == pafs.FileType.Directory and int(match.group(1)) <= int(own.group(1)):
            found[int(match.group(1))] = info.path
    return [tune.Checkpoint(found[i], filesystem=fs) for i in sorted(found, reverse=True)]


def _exists(checkpoint: Any, name: str) -> bool:
    from pyarrow import fs as pafs

    info = checkpoint.filesystem.get_file_info(f"{checkpoint.path.rstrip('/')}/{name}")
    return info.type != pafs.FileType.NotFound


def _why(err: BaseException) -> str:
    """An exception as one short line (TensorStore errors run to hundreds of characters)."""
    text = " ".join(str(err).split()) or "no message"
    return f"{type(err).__name__}: {text[:120]}{'...' if len(text) > 120 else ''}"


def _epoch_of(checkpoint: Any) -> int | None:
    try:
        return int(_read_json_at(checkpoint, TRIAL_FILE)["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


Restored = tuple[Any, list[dict[str, Any]], dict[str, Any]]  # (state, history, meta)


def restore_newest_readable(
    checkpointer: TrialCheckpointer, checkpoint: Any, template: Any, log: Callable[[str], None] = print
) -> Restored | None:
    """(state, history, meta) from the newest readable checkpoint of the trial, starting at
    `checkpoint` (the one Ray restores) and going back through the older ones beside it.

    Logs which checkpoints could not be read, which one it fell back to and how many epochs that costs.
    Skips `mark_unreadable` checkpoints. Returns None when the trial has no checkpoint with a state left
    (they were deleted: the trial starts again).
    A recorded divergence is raised as the trial's `DivergenceError`, not skipped. Raises
    `CheckpointError`, naming every checkpoint and the fix, when none can be read."""
    from model.loop import DivergenceError

    _quiet_closed_loop_callbacks()
    candidates = trial_checkpoints(checkpoint)
    failed: list[tuple[Any, BaseException]] = []
    for candidate in candidates:
        if _exists(candidate, UNREADABLE_FILE):
            continue
        try:
            with candidate.as_directory() as directory:
                restored = checkpointer.restore(directory, template)
        except DivergenceError:  # the trial's outcome, not a damaged checkpoint
            raise
        except Exception as err:  # noqa: BLE001 - any failure to read it (Orbax, TensorStore, JSON, I/O)
            failed.append((candidate, err))
            continue
        if failed:
            epoch, newest = int(restored[0].epoch), _epoch_of(failed[0][0])
            cost = (
                "the epochs after it will be trained again"
                if newest is None
                else f"{newest - epoch} epoch(s) ({epoch + 1}..{newest}) will be trained again"
            )
            unreadable = "; ".join(f"{_name(c)} cannot be read ({_why(e)})" for c, e in failed)
            log(f"{unreadable}; fell back to {_name(candidate)} (epoch {epoch}): {cost}")
        return restored
    if not failed:
        return None
    where = checkpoint.path.rstrip("/").rpartition("/")[0] or checkpoint.path
    names = ", ".join(f"{_name(c)} ({_why(e)})" for c, e in failed)
    raise CheckpointError(
        f"no readable checkpoint in {where}: {names}; delete {' '.join(_name(c) for c, _ in failed)} "
        "there and resume the run with --retry-errored to restart this trial from epoch 0"
    )


def _quiet_closed_loop_callbacks() -> None:
    """Drop the "Event loop is closed" errors that a failed Orbax restore leaves behind.

    The TensorStore reads of an aborted restore complete later and call back into the asyncio loop Orbax
    has already closed; each callback's RuntimeError reaches `sys.unraisablehook`, which would print a
    traceback per array (dozens). They carry no information: the restore error itself is reported.
    Every other unraisable exception still goes to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "quiets_closed_loop", False):
        return

    def hook(unraisable: Any) -> None:
        err = unraisable.exc_value
        if not (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"):
            previous(unraisable)

    hook.quiets_closed_loop = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _name(checkpoint: Any) -> str:
    return checkpoint.path.rstrip("/").rpartition("/")[2]
