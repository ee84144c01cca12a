"""Mid-epoch checkpoints as Ray Tune sees them: results that carry a checkpoint and no epoch readings.

A trial launched with `--checkpoint-every-s S` reports, besides its result at every epoch's end, a
checkpoint after every S seconds of training inside an epoch (`model.loop.PartialEpoch`: the step
index, the carried PRNG key, the partial epoch's statistics). Tune counts every report as a result, so
such a result is marked with `PARTIAL_KEY` (the 1-based epoch in progress) and `PARTIAL_STEP_KEY` (the
steps of it done) and holds nothing else but the trial's static columns (devices, node): no `epoch`, no
loss, no metric. Every consumer of results keeps to epochs by asking `is_epoch_result`: the Parquet
callback (one row per epoch), the searcher (Optuna hears epochs), the progress table and trackers; ASHA
decides on `epoch` and the metric, which these results lack, so it passes them by as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PARTIAL_KEY = "partial_epoch"  # in a result: the epoch in progress when the mid-epoch checkpoint was taken
PARTIAL_STEP_KEY = "partial_step"  # in a result: steps of that epoch done


def is_epoch_result(result: Mapping[str, Any] | None) -> bool:
    """True for a result that reports an epoch (or an error), False for a mid-epoch checkpoint's result
    (and for None)."""
    return result is not None and not result.get(PARTIAL_KEY)


def partial_result(epoch: int, step: int, static: Mapping[str, Any]) -> dict[str, Any]:
    """The result reported with a mid-epoch checkpoint of 1-based `epoch` after `step` of its steps:
    the marker keys and the trial's static columns, no readings."""
    return {**static, PARTIAL_KEY: int(epoch), PARTIAL_STEP_KEY: int(step)}


def epoch_view(result: Mapping[str, Any], metric_analysis: Mapping[str, Any]) -> dict[str, Any]:
    """What a display shows for a trial whose last result is `result`: the result itself after an epoch;
    after a mid-epoch checkpoint, its keys plus the last epoch's value of every number it lacks (Tune's
    `trial.metric_analysis` keeps each metric's last value)."""
    if is_epoch_result(result):
        return dict(result)
    last = {k: v["last"] for k, v in metric_analysis.items() if isinstance(v, Mapping) and "last" in v}
    return {**last, **result}


class _EpochTrial:
    """A trial seen through `epoch_view`: everything of the trial, with its last epoch's readings."""

    def __init__(self, trial: Any) -> None:
        self._trial = trial
        self.last_result = epoch_view(trial.last_result or {}, trial.metric_analysis or {})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trial, name)

    def __str__(self) -> str:
        return str(self._trial)

    def __repr__(self) -> str:
        return repr(self._trial)


def epoch_reporter(**kwargs: Any) -> Any:
    """Ray Tune's `CLIReporter(**kwargs)` whose table shows every trial's last epoch, also while its last
    result is a mid-epoch checkpoint's."""
    return epoch_reporter_class()(**kwargs)


def epoch_reporter_class() -> type:
    """The CLIReporter subclass behind `epoch_reporter` (for reporters that add to its table)."""
    from ray import tune

    class EpochReporter(tune.CLIReporter):
        def _progress_str(self, trials: list, done: bool, *sys_info: str, **kw: Any) -> str:
            return super()._progress_str([_EpochTrial(t) for t in trials], done, *sys_info, **kw)

    return EpochReporter
