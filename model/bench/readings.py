"""Cost of the evaluation readings against one training epoch: `python -m model.bench.readings`.

Trains one epoch of the cell (compiling), then times further epochs and the readings of `model.readings`
(val_ll and gradient noise at the config's sizes) at the parameters it reached, interleaved and warm
(medians of 3; the first call of the readings, which compiles, is reported too). Prints one JSON object
per objective.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from model.config import ExperimentConfig, apply_overrides, get_preset, parse_set_args
from model.data import load_dataset
from model.loop import init_state, train_epoch
from model.readings import evaluation_readings


def measure(config: ExperimentConfig, repeats: int = 3) -> dict[str, float]:
    """Seconds of a warm training epoch and of val_ll and gradient noise: medians of `repeats`
    interleaved warm runs, and the first (compiling) call of the readings."""
    dataset = load_dataset(config)
    state, _ = train_epoch(config, init_state(config), dataset)
    params = {"ebm": state.ebm_params, "gen": state.gen_params}
    cold = evaluation_readings(config, params, dataset.train, dataset.val, 2)
    epochs, val_ll, noise = [], [], []
    for _ in range(repeats):  # interleaved, so a change of the machine's load hits both alike
        start = time.perf_counter()
        train_epoch(config, state, dataset)
        epochs.append(time.perf_counter() - start)
        warm = evaluation_readings(config, params, dataset.train, dataset.val, 2)
        val_ll.append(warm["val_ll_time_s"])
        noise.append(warm["grad_noise_time_s"])
    epoch_s, val_ll_s, noise_s = (float(np.median(v)) for v in (epochs, val_ll, noise))
    return {
        "objective": config.objective,
        "repeats": repeats,
        "epoch_s": epoch_s,
        "val_ll_s": val_ll_s,
        "grad_noise_s": noise_s,
        "readings_over_epoch": (val_ll_s + noise_s) / epoch_s,
        "val_ll_cold_s": cold["val_ll_time_s"],
        "grad_noise_cold_s": cold["grad_noise_time_s"],
        "val_ll": warm["val_ll"],
        "val_ll_stderr": warm["val_ll_stderr"],
        "sizes": {
            k: getattr(config, k)
            for k in (
                "val_ll_examples",
                "val_ll_temps",
                "val_ll_chains",
                "val_ll_prior_chains",
                "grad_noise_draws",
            )
        },
        "load_average_1m": os.getloadavg()[0],
        "devices": len(jax.local_devices()),
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m model.bench.readings`."""
    parser = argparse.ArgumentParser(
        prog="python -m model.bench.readings", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", default="digits")
    parser.add_argument(
        "--objective",
        action="append",
        choices=("vanilla", "thermo"),
        help="objective(s) to measure (default both)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        base = apply_overrides(get_preset(args.preset), parse_set_args(args.set))
    except ValueError as err:
        parser.error(str(err))
    for objective in args.objective or ("vanilla", "thermo"):
        print(json.dumps(measure(apply_overrides(base, {"objective": objective}))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
