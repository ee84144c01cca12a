"""A trial's checkpoint directory: the Orbax-saved train state plus the readings history as JSON.

Layout of one checkpoint (the directory handed to `tune.Checkpoint.from_directory`):

    state/          Orbax StandardCheckpointer output of the whole `TrainState` pytree
    history.json    the list of per-epoch readings so far (the epochs rows of this trial)
    trial.json      who wrote it: trial_id, cell, repetition, epoch, config
    diverged.json   only in a checkpoint written when training diverged: the error message

The state is restored against an abstract target built from a freshly initialised state, so optax
states, typed PRNG keys and dtypes come back exactly (a restore without a target would turn optax
states into plain lists).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATE_DIR = "state"
HISTORY_FILE = "history.json"
TRIAL_FILE = "trial.json"
DIVERGED_FILE = "diverged.json"


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
    Path(path).write_text(json.dumps(_jsonable(value), indent=1, sort_keys=True))


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

    def save(self, directory: str | os.PathLike, state: Any, history: list[dict[str, Any]],
             meta: dict[str, Any]) -> None:
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


def mark_diverged(directory: str | os.PathLike, error: str, meta: dict[str, Any],
                  history: list[dict[str, Any]]) -> None:
    """Write a checkpoint that records a divergence (no state): restoring it re-raises the error."""
    directory = Path(directory)
    write_json(directory / DIVERGED_FILE, {"error": error})
    write_json(directory / HISTORY_FILE, history)
    write_json(directory / TRIAL_FILE, meta)


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
