"""Progress inside epochs, beside Tune rather than through it: each trial rewrites a small JSON file,
`<run>/progress/<trial_id>.json`, at most every `--progress-every-s` seconds, and the driver's periodic
table reads the files of the running trials and adds the grid's ETA.

Progress is not a Tune result: Parquet, ASHA, Optuna and the trackers see one result per epoch, nothing
in between. The files are small and rewritten whole (a rename on a local disk or NFS, one PUT on S3), so a
reader sees the previous report or the next one, never half of one.
"""

from __future__ import annotations

import heapq
import time
from typing import Any

from sweep.storage import read_json_uri, write_json_uri
from sweep.text import text_table

PROGRESS_DIR = "progress"


def progress_uri(run_uri: str, trial_id: str) -> str:
    """`<run>/progress/<trial_id>.json`."""
    return f"{run_uri.rstrip('/')}/{PROGRESS_DIR}/{trial_id}.json"


def write_progress(uri: str, report: dict[str, Any]) -> None:
    """Replace the progress file at `uri` with `report` (plus the wall-clock `time` it was written) in one
    step (`sweep.storage.write_json_uri`: a rename locally, a single PUT on an object store)."""
    write_json_uri(uri, {**report, "time": time.time()})


def read_progress(uri: str) -> dict[str, Any] | None:
    """The newest report at `uri`, or None if there is none (yet)."""
    try:
        return read_json_uri(uri)
    except ValueError:  # never half-written, but a foreign file could be anything
        return None


def trial_seconds(report: dict[str, Any]) -> float:
    """A whole trial's seconds as one report sees it: its epochs times its seconds per epoch (the finished
    epochs' mean, or the current epoch's pace)."""
    return float(report["epochs"]) * float(report["epoch_s"])


def grid_eta_s(running: list[float], pending: list[float], slots: int) -> float:
    """Seconds until every trial has finished: `running` trials end after their ETAs, then each `pending`
    trial (its estimated seconds) starts on the first of `slots` concurrent places to come free, in order
    (Tune's order). Trials of unknown length should be left out by the caller."""
    free = sorted(running) + [0.0] * max(slots - len(running), 0)
    free = free[: max(slots, len(running), 1)] or [0.0]
    heapq.heapify(free)
    for seconds in pending:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return max(free)


def _trial_key(trial: Any) -> tuple[str, str | None]:
    spec = trial.config.get("trial") if isinstance(trial.config, dict) else None
    spec = spec if isinstance(spec, dict) else {}
    return str(spec.get("trial_id") or trial.trial_id), spec.get("cell")


def progress_block(trials: list[Any], run_uri: str) -> str:
    """The lines the driver adds under Tune's table: each running trial's epoch, step, images/s, elapsed
    time and ETAs from its progress file, and the grid's ETA: the running trials' ETAs, then the waiting
    trials, as many at once as are running now, each taken as long as the running or finished trials of
    its cell (else of the whole run)."""
    from model.progress import duration

    rows, running_etas, lengths = [], [], {}
    for trial in trials:
        trial_id, cell = _trial_key(trial)
        if trial.status == "TERMINATED" and (trial.last_result or {}).get("time_total_s"):
            lengths.setdefault(cell, []).append(float(trial.last_result["time_total_s"]))
        if trial.status != "RUNNING":
            continue
        report = read_progress(progress_uri(run_uri, trial_id))
        if report is None:
            rows.append([trial_id, "-", "-", "-", "-", "-", "-"])
            continue
        age = max(time.time() - float(report.get("time", time.time())), 0.0)
        eta = max(float(report["trial_eta_s"]) - age, 0.0)
        running_etas.append(eta)
        lengths.setdefault(cell, []).append(trial_seconds(report))
        rows.append(
            [
                trial_id,
                f"{report['epoch']}/{report['epochs']}",
                f"{report['step']}/{report['steps']}",
                f"{report['images_per_s']:.4g}",
                duration(report["elapsed_s"]),
                duration(max(float(report["epoch_eta_s"]) - age, 0.0)),
                duration(eta),
            ]
        )
    everything = [s for v in lengths.values() for s in v]
    pending = []
    for trial in trials:
        if trial.status in ("PENDING", "PAUSED"):
            cell = _trial_key(trial)[1]
            known = lengths.get(cell) or everything
            if known:
                pending.append(sum(known) / len(known))
    counts = {s: sum(t.status == s for t in trials) for s in ("TERMINATED", "ERROR", "RUNNING")}
    waiting = len(trials) - sum(counts.values())
    head = (
        f"grid: {counts['TERMINATED'] + counts['ERROR']}/{len(trials)} trials ended, {counts['RUNNING']} "
        f"running, {waiting} waiting"
    )
    unknown = waiting - len(pending) + counts["RUNNING"] - len(running_etas)
    if running_etas or pending:
        eta = grid_eta_s(running_etas, pending, max(counts["RUNNING"], 1))
        head += f"; ETA {duration(eta)}" + (f" (+ {unknown} trial(s) not yet timed)" if unknown else "")
    elif counts["RUNNING"] or waiting:
        head += "; ETA after the first progress report"
    lines = [head]
    if rows:
        header = ["trial", "epoch", "step", "img/s", "elapsed", "ETA epoch", "ETA trial"]
        lines.insert(0, text_table(header, rows))
    return "\n".join(lines)


def progress_reporter(run_uri: str, **kwargs: Any) -> Any:
    """Tune's CLIReporter (`kwargs`: its metric and parameter columns, report frequency) showing each trial's
    last epoch (`sweep.partial.epoch_reporter`), with the running trials' progress and the grid's ETA
    printed under each table."""
    from sweep.partial import epoch_reporter_class

    class ProgressReporter(epoch_reporter_class()):
        def report(self, trials: list, done: bool, *sys_info: str) -> None:
            super().report(trials, done, *sys_info)
            if not done:
                self._print(progress_block(trials, run_uri))

    return ProgressReporter(**kwargs)
