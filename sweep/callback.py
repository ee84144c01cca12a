"""The driver-side Ray Tune callback that keeps a run's Parquet tables (`sweep.results`) current.

Kept apart from `sweep.results` so that importing the writer (or `sweep.grid` for a dry run) does not
import Ray.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from sweep.partial import is_epoch_result
from sweep.results import ResultsTables, config_columns, error_message, final_columns


class ResultsCallback(Callback):
    """Ray Tune callback run by the driver: writes every reported epoch and every trial state change to
    the run's Parquet tables, flushing after each event.

    `resolve(trial_config) -> (ExperimentConfig, meta dict)` turns a trial's Tune config into its config
    and metadata (trial_id, cell, repetition, grid, and optional extra `columns` for the trials table);
    `extra_trial_columns(trial)` may add more columns (e.g. an Optuna trial number).
    The callback pickles with the Tuner (for `Tuner.restore`): it reloads the tables in `setup`.
    """

    def __init__(
        self,
        results_uri: str,
        run: str,
        resolve: Callable[[dict], tuple[Any, dict]],
        extra_trial_columns: Callable[[Any], dict[str, Any]] | None = None,
    ) -> None:
        self.results_uri = results_uri
        self.run = run
        self.resolve = resolve
        self.extra_trial_columns = extra_trial_columns
        self._tables: ResultsTables | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tables"] = None
        return state

    @property
    def tables(self) -> ResultsTables:
        if self._tables is None:
            self._tables = ResultsTables(self.results_uri)
        return self._tables

    def setup(self, **info: Any) -> None:
        self.tables.reload()

    def _trial_base(self, trial: Any) -> tuple[str, dict[str, Any]]:
        config, meta = self.resolve(trial.config)
        trial_id = meta.get("trial_id") or trial.trial_id
        values = {
            "run": self.run,
            **config_columns(config),
            "cell": meta.get("cell"),
            "repetition": meta.get("repetition"),
            "grid": meta.get("grid"),
            "ray_trial_id": trial.trial_id,
            **meta.get("columns", {}),
        }
        if self.extra_trial_columns is not None:
            values.update(self.extra_trial_columns(trial))
        return trial_id, values

    def _sync_from_checkpoint(self, trial: Any, trial_id: str, common: dict[str, Any]) -> list | None:
        """Fill any epoch rows the driver missed (e.g. it was killed between a report and a flush) from
        the readings history stored in the trial's latest checkpoint."""
        from sweep.checkpoint import read_history

        checkpoint = trial.checkpoint
        if checkpoint is None:
            return None
        history = read_history(checkpoint)
        if history:
            self.tables.upsert_epochs(trial_id, history, **common)
        return history

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        trial_id, values = self._trial_base(trial)
        self.tables.upsert_trial(trial_id, **values, status="RUNNING", error=None)
        self.tables.flush()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if not is_epoch_result(result):  # a mid-epoch checkpoint: no row to write
            return
        trial_id, values = self._trial_base(trial)
        common = {"run": self.run, "cell": values["cell"], "repetition": values["repetition"]}
        if result.get("restored_history_json"):  # epochs done before a restart, maybe never flushed
            self.tables.upsert_epochs(trial_id, json.loads(result["restored_history_json"]), **common)
        if result.get("readings_json"):
            self.tables.upsert_epochs(trial_id, [json.loads(result["readings_json"])], **common)
        history = [self.tables.epochs[k] for k in sorted(self.tables.epochs) if k[0] == trial_id]
        checkpoint = trial.checkpoint
        self.tables.upsert_trial(
            trial_id,
            **values,
            **final_columns(history),
            status="RUNNING",
            error=result.get("error"),
            wall_time_s=result.get("time_total_s"),
            devices=result.get("devices"),
            device_kind=result.get("device_kind"),
            node=result.get("node"),
            node_id=result.get("node_id"),
            conv_impl=result.get("conv_impl"),
            checkpoint=checkpoint.path if checkpoint is not None else None,
        )
        self.tables.flush()

    def _finish(self, trial: Any, status: str, flush: bool = True) -> None:
        trial_id, values = self._trial_base(trial)
        common = {"run": self.run, "cell": values["cell"], "repetition": values["repetition"]}
        self._sync_from_checkpoint(trial, trial_id, common)
        history = [self.tables.epochs[k] for k in sorted(self.tables.epochs) if k[0] == trial_id]
        last = trial.last_result or {}
        error = None
        if status == "ERROR":
            error = (
                last.get("error")
                or error_message(trial.get_error())
                or "trial failed (see error.txt in its trial directory)"
            )
        checkpoint = trial.checkpoint
        self.tables.upsert_trial(
            trial_id,
            **values,
            **final_columns(history),
            status=status,
            error=error,
            wall_time_s=last.get("time_total_s"),
            devices=last.get("devices"),
            device_kind=last.get("device_kind"),
            node=last.get("node"),
            node_id=last.get("node_id"),
            conv_impl=last.get("conv_impl"),
            checkpoint=checkpoint.path if checkpoint is not None else None,
        )
        self.tables.upsert_epochs(trial_id, [], **common)  # refresh epochs_completed
        if flush:
            self.tables.flush()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "ERROR")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Reconcile every trial with its final state (covers trials restored as already finished, whose
        callbacks ran before a driver crash but whose rows may not have been flushed)."""
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR"):
                self._finish(trial, trial.status, flush=False)
        self.tables.flush()
