"""Checks a launch makes before Ray starts: every cell's data set is there to read.

A grid on an unprepared data set used to start every trial, fail each on DatasetNotPreparedError and retry
it `--max-failures` times. Where the driver sees the data the trials will read (a local Ray instance, or a
cluster whose data directory is mounted at the same path on the driver), a missing data set is refused
here in one line with the prepare command. Where it cannot (a cluster whose head does not hold the
workers' data), each trial checks at its start and ends at once, not retried (`sweep.failures.is_fatal`).
"""

from __future__ import annotations

from collections.abc import Iterable

from model.config import ExperimentConfig
from sweep.launch import LaunchError


def check_data(cells: Iterable[tuple[str, ExperimentConfig]], *, local: bool) -> None:
    """Refuse a launch whose cells' data sets are not prepared where they point. With `local` False (a
    cluster) a data directory the driver does not have is left to the trials. Raises LaunchError naming
    the cell, the directory and the prepare command."""
    from model.data import DataNotReadyError, check_data_ready

    checked: set[tuple[str, str | None]] = set()
    for cell, config in cells:
        key = (config.dataset, config.data_dir)
        if config.dataset == "digits" or key in checked:
            continue
        checked.add(key)
        if not local:
            from model.tfds_data import resolve_data_dir

            if not resolve_data_dir(config.data_dir).exists():
                continue
        try:
            check_data_ready(config)
        except DataNotReadyError as err:
            raise LaunchError(f"cell {cell!r}: {err}") from None
