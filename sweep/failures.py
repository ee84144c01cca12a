"""Which trial failures a retry can cure, and the driver-side policy that acts on it.

Ray Tune retries every failed trial up to `FailureConfig(max_failures)` times, whatever the error. Some
errors cannot go away: training diverged (`DivergenceError`), the trial's config is invalid, none of its
checkpoints can be read (`CheckpointError`). The trial reports such an error (`FATAL_KEY` in its last
result) before raising it, and `TrialFailures` then ends that trial at once: one line with the reason, no
retries. A lost worker or node, an I/O error or anything else is still retried from the last checkpoint.

Importing this module imports Ray (the callback); the trial side uses only `is_fatal` and `one_line`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ray.tune import Callback

FATAL_KEY = "fatal"  # in a trial's result: the error it reports cannot be cured by a retry


def is_fatal(err: BaseException) -> bool:
    """True for errors that a retry from the last checkpoint would meet again: a divergence, an unreadable
    set of checkpoints, a data set not prepared where the trial reads it, and the ValueError/TypeError of
    an invalid config or shape."""
    from model.loop import DivergenceError
    from model.tfds_data import DatasetNotPreparedError
    from sweep.checkpoint import CheckpointError

    incurable = DivergenceError | CheckpointError | DatasetNotPreparedError | ValueError | TypeError
    return isinstance(err, incurable)


def one_line(err: BaseException) -> str:
    """`Type: message` on one line (the trial's `error` column and the line printed for it)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class TrialFailures(Callback):
    """Driver-side retry policy and its messages (pass `max_failures`, the run's FailureConfig value).

    - A trial whose result carries `FATAL_KEY` gets no retry: Tune recovers a trial while its failure
      count is <= `trial.max_failures`, so that trial's own limit drops to 0 until it starts again.
    - Every failure prints one line: which trial, why, and whether it is retried. Tune's own traceback
      per failure is switched off by the launcher (`TUNE_PRINT_ALL_TRIAL_ERRORS=0`); the full trace stays
      in the trial's `error.txt`.
    """

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        trial.max_failures = self.max_failures  # a resumed trial gets the run's retries again

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(FATAL_KEY):
            trial.max_failures = 0

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        limit = "unlimited" if self.max_failures < 0 else str(self.max_failures)
        print(
            f"trial {trial} failed ({_reason(trial)}); retrying from its last checkpoint "
            f"(retry {trial.num_failures} of {limit})",
            file=sys.stderr,
            flush=True,
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if last.get(FATAL_KEY):
            why = f"{last.get('error')}; not retried, a retry would fail the same way"
        else:
            why = f"{_reason(trial)}; failed {trial.num_failures} time(s), no retries left"
        print(f"trial {trial} ended in ERROR: {why}", file=sys.stderr, flush=True)


def _reason(trial: Any) -> str:
    """The last error line of the trial's error.txt (the driver's own copy: the one in the storage is
    synced later)."""
    from sweep.results import error_message

    try:
        text = Path(trial.error_file).read_text() if trial.error_file else None
    except OSError:
        text = None
    return error_message(text) or "see error.txt in its trial directory"
