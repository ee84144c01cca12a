"""Ray Tune's own tracker callbacks, told one result per epoch at step = epoch, one tracker run per trial.

- `EpochTBXLoggerCallback`: Tune's TensorBoard writer (the event files in every trial directory), with
  the epoch as its step.
- `TrialMLflowCallback`: `MLflowLoggerCallback`, one MLflow run per trial named by its trial_id, the
  trial's ExperimentConfig as parameters, tags run/trial_id/cell/repetition/seed/grid. A trial resumed by
  a new driver (`--resume`) finds its run by those tags and goes on logging into it.
- `TrialWandbCallback`: `WandbLoggerCallback`, one W&B run per trial (its id made from the run name and
  trial_id, `sweep.trackers.wandb_run_id`, grouped by the run name), resumed with `resume="allow"`, so a
  resumed trial continues its run.

Each logs the epoch's readings (`sweep.trackers.epoch_readings`, what epochs.parquet gets) and nothing
of other results (`sweep.trackers.is_epoch_result`); after a restart, also the epochs before it that the
tracker run lacks (a driver killed between an epoch and its upload may never have sent it). This module
imports Ray: the launch imports it only when it starts Tune.
"""

from __future__ import annotations

import argparse
from typing import Any

from ray.air.constants import TRAINING_ITERATION
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback
from ray.tune.logger import TBXLoggerCallback

from sweep.trackers import (
    DEFAULT_WANDB_PROJECT,
    epoch_readings,
    is_epoch_result,
    mlflow_uri,
    restored_epochs,
    tracker_tags,
    trial_identity,
    wandb_run_id,
)


class EpochTBXLoggerCallback(TBXLoggerCallback):
    """Tune's TensorBoard event files, epoch results only, at step = epoch."""

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if is_epoch_result(result):
            super().log_trial_result(iteration, trial, {**result, TRAINING_ITERATION: int(result["epoch"])})


class TrialMLflowCallback(MLflowLoggerCallback):
    """One MLflow run per trial in the experiment named after the run (see the module's docstring)."""

    def __init__(self, tracking_uri: str, *, run: str) -> None:
        super().__init__(tracking_uri=tracking_uri, experiment_name=run)
        self.run = run

    def _existing_run(self, trial_id: str) -> str | None:
        runs = self.mlflow_util._get_client().search_runs(
            experiment_ids=[self.mlflow_util.experiment_id],
            filter_string=f"tags.trial_id = '{trial_id}' and tags.run = '{self.run}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def log_trial_start(self, trial: Any) -> None:
        if trial in self._trial_runs:
            return
        identity = trial_identity(trial.config, trial.trial_id, self.run)
        run_id = self._existing_run(identity["trial_id"])
        client = self.mlflow_util._get_client()
        if run_id is not None:  # resumed by a new driver: the same run goes on
            client.update_run(run_id, status="RUNNING")
        else:
            tags = {**self.tags, **tracker_tags(identity)}
            run_id = self.mlflow_util.start_run(tags=tags, run_name=identity["trial_id"]).info.run_id
            self.mlflow_util.log_params(run_id=run_id, params_to_log=identity["params"])
        self._trial_runs[trial] = run_id

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if not is_epoch_result(result):
            return
        if trial not in self._trial_runs:
            self.log_trial_start(trial)
        run_id = self._trial_runs[trial]
        restored = restored_epochs(result)
        if restored:  # after a restart: the epochs a killed driver may not have logged
            history = self.mlflow_util._get_client().get_metric_history(run_id, "train_loss")
            logged = {m.step for m in history}
            for readings in restored:
                if int(readings["epoch"]) not in logged:
                    self.mlflow_util.log_metrics(
                        run_id=run_id, metrics_to_log=readings, step=int(readings["epoch"])
                    )
        self.mlflow_util.log_metrics(
            run_id=run_id, metrics_to_log=epoch_readings(result), step=int(result["epoch"])
        )

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        if trial in self._trial_runs:
            super().log_trial_end(trial, failed)


class TrialWandbCallback(WandbLoggerCallback):
    """One W&B run per trial in the group named after the run (see the module's docstring)."""

    def __init__(self, project: str, *, run: str, directory: str | None) -> None:
        kwargs: dict[str, Any] = {"resume": "allow"}
        if directory is not None:
            kwargs["dir"] = directory
        super().__init__(project=project, group=run, **kwargs)
        self.run = run

    def _start_logging_actor(self, trial: Any, exclude_results: list[str], **init: Any) -> None:
        identity = trial_identity(trial.config, trial.trial_id, self.run)
        tags = tracker_tags(identity)
        init.update(
            id=wandb_run_id(self.run, identity["trial_id"]),
            name=identity["trial_id"],
            config={**identity["params"], **tags},
            tags=[f"{k}={v}" for k, v in tags.items() if k != "trial_id"],
        )
        super()._start_logging_actor(trial, exclude_results, **init)

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if not is_epoch_result(result):
            return
        # After a restart, first the epochs before it (a killed driver may not have sent them; W&B drops
        # steps its run already has), then this epoch.
        for readings in [*restored_epochs(result), epoch_readings(result)]:
            super().log_trial_result(
                iteration, trial, {**readings, TRAINING_ITERATION: int(readings["epoch"])}
            )


def tracker_callbacks(args: argparse.Namespace, *, run: str, run_uri: str) -> list[Any]:
    """The TensorBoard writer and a callback per `--tracker` of a launch."""
    callbacks: list[Any] = [EpochTBXLoggerCallback()]
    for tracker in getattr(args, "tracker", []):
        if tracker.kind == "mlflow":
            callbacks.append(TrialMLflowCallback(mlflow_uri(tracker, run_uri), run=run))
        else:
            local = "://" not in run_uri
            callbacks.append(
                TrialWandbCallback(
                    tracker.target or DEFAULT_WANDB_PROJECT, run=run, directory=run_uri if local else None
                )
            )
    return callbacks
