"""Which trial failures a retry can cure, and the driver-side policy that acts on it.

Ray Tune retries every failed trial up to `FailureConfig(max_failures)` times, whatever the error. Some
errors cannot go away: training diverged (`DivergenceError`), the trial's config is invalid, none of its
checkpoints can be read (`CheckpointError`). The trial reports such an error (`FATAL_KEY` in its last
result) before raising it, and `TrialFailures` then ends that trial at once: one line with the reason, no
retries. A crashed worker process, an I/O error or anything else is still retried from the last checkpoint,
up to `--max-failures` times.

A lost node (a spot instance reclaimed, a machine gone) is not the trial's fault: it is retried from the
last checkpoint without limit and does not use up `--max-failures`, so a long sweep on preemptible nodes
does not end in ERROR. Ray Tune itself leaves out of the count only the failures Ray marks as preempted
(a node its autoscaler drained for preemption); `count_node_losses_apart` extends that to the two errors a
lost node gives: `ActorUnavailableError` (the driver's connection to the trial broke and Ray does not
report the trial's process dead: its node's raylet is gone or unreachable; seen first when a node dies)
and `ActorDiedError` "...because its node has died" (once Ray has marked the node dead). A trial process
that crashes on a live node (a segfault, the kernel's OOM killer) is reported by its raylet as
`ActorDiedError` "...its worker process has died" and still counts. `RAY_TRAIN_COUNT_PREEMPTION_AS_FAILURE=1`
(Ray's own switch) counts them all again.

Importing this module imports Ray (the callback); the trial side uses only `is_fatal` and `one_line`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ray.tune import Callback

FATAL_KEY = "fatal"  # in a trial's result: the error it reports cannot be cured by a retry
NODE_DIED = "because its node has died"  # Ray's words for an actor lost with its node (gcs_actor_manager)


def is_fatal(err: BaseException) -> bool:
    """True for errors that a retry from the last checkpoint would meet again: a divergence, an unreadable
    set of checkpoints, a data set not prepared where the trial reads it, and the ValueError/TypeError of
    an invalid config or shape."""
    from model.loop import DivergenceError
    from model.tfds_data import DatasetNotPreparedError
    from sweep.checkpoint import CheckpointError

    incurable = DivergenceError | CheckpointError | DatasetNotPreparedError | ValueError | TypeError
    return isinstance(err, incurable)


_NODE_LOSSES: dict[str, int] = {}  # Tune trial id -> node losses this driver has seen (a retry pops it)


def is_node_loss(err: BaseException | None) -> bool:
    """True for the error of a trial whose node died, was preempted or cannot be reached (not for a crash
    of its process on a live node, nor for an error the trial raised)."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    if isinstance(err, ActorUnavailableError):
        return True
    return isinstance(err, RayActorError) and (err.preempted or NODE_DIED in str(err))


def count_node_losses_apart() -> None:
    """Make this driver's Ray Tune treat a lost node as it treats a preempted one: the trial is retried
    and the failure is not counted against its `max_failures`. Idempotent.

    Tune counts a failure in `Trial._handle_ray_actor_error` unless `exc.preempted` (Ray 2.60; pinned by
    tests/test_failures.py): this marks node losses preempted on their way in."""
    from ray.tune.experiment.trial import Trial

    original = Trial._handle_ray_actor_error
    if getattr(original, "counts_node_losses_apart", False):
        return

    def handle(self: Any, exc: Any) -> Any:
        if is_node_loss(exc):
            exc._preempted = True
            _NODE_LOSSES[self.trial_id] = _NODE_LOSSES.get(self.trial_id, 0) + 1
        return original(self, exc)

    handle.counts_node_losses_apart = True  # type: ignore[attr-defined]
    Trial._handle_ray_actor_error = handle


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
        if _NODE_LOSSES.pop(trial.trial_id, 0):
            print(
                f"trial {trial} lost its node ({_reason(trial)}); retrying from its last checkpoint "
                "(a lost node does not count against --max-failures)",
                file=sys.stderr,
                flush=True,
            )
            return
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


def _last_failure(trial: Any) -> str | None:
    """The text of the newest failure in the trial's error.txt (the driver's own copy: the one in the
    storage is synced later), or None."""
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else None
    except OSError:
        return None
    return text.rpartition("Failure # ")[2] if text else None


def _reason(trial: Any) -> str:
    """The last error line of the trial's newest failure."""
    from sweep.results import error_message

    return error_message(_last_failure(trial)) or "see error.txt in its trial directory"
