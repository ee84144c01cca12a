"""`python -m model.train`: train one configuration without Ray and write its readings to Parquet.

`python -m model.train --preset digits --epochs 3 --out DIR` prints one line per epoch and writes
DIR/epochs.parquet (the readings of `model.schema.RUN_EPOCH_COLUMNS`, rewritten atomically after every
epoch) and DIR/config.json. The step lives in `model.step`, the loop in `model.loop`: import their names
from there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from model.config import ExperimentConfig, apply_overrides, check_devices, get_preset, parse_set_args
from model.data import check_data_ready
from model.loop import DivergenceError, fit
from model.nets import resolve_config
from model.plan.device_memory import DeviceMemoryError, check_step_fits
from model.progress import ProgressMeter, TerminalBar, format_progress

DEFAULT_PROGRESS_EVERY_S = 30.0


def write_epochs_parquet(rows: list[dict[str, Any]], config: ExperimentConfig, path: Path) -> None:
    """Write the readings as the run's epochs table atomically (a temporary file, then a rename): the
    schema's `RUN_EPOCH_COLUMNS` (the config beside every reading, thermo-only fields null for vanilla)
    and any extra readings (e.g. the metrics' slopes and standard errors) after them."""
    import pyarrow.parquet as pq

    from model import schema

    trial_id = f"{config.dataset}-{config.objective}-s{config.seed}"
    run = schema.config_columns(config.to_dict())
    table = schema.to_table([{**r, **run, "trial_id": trial_id} for r in rows], schema.RUN_EPOCH_COLUMNS)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m model.train`."""
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        default="digits",
        help="celeba | cifar10 | svhn | digits (default; z 16, N_t 5, batch 50: not the digits grid's "
        "smaller model, whose base overrides this preset)",
    )
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set objective=thermo --set temp_power=6",
    )
    parser.add_argument("--out", type=Path, help="directory for epochs.parquet (and config.json)")
    parser.add_argument(
        "--progress-every-s",
        type=float,
        default=DEFAULT_PROGRESS_EVERY_S,
        metavar="S",
        help="report the epoch's step, images/s and ETAs at most every S seconds: an updating line in a "
        f"terminal, plain lines otherwise (default {DEFAULT_PROGRESS_EVERY_S:g}; 0: off)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        overrides = parse_set_args(args.set)
        if args.epochs is not None:
            overrides["epochs"] = str(args.epochs)
        config = apply_overrides(get_preset(args.preset), overrides)
        import jax

        check_devices(config.batch_size, jax.local_devices())
        requested = config
        config = resolve_config(config, jax.local_devices()[0].platform)  # once: state, step, memory
        check_step_fits(config, jax.local_devices())
        if args.progress_every_s < 0:
            raise ValueError(f"--progress-every-s {args.progress_every_s:g} must be >= 0 (0: no progress)")
        check_data_ready(config)  # one line and the prepare command, before anything compiles
        if args.out is not None and args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out {args.out} is a file; pass a directory (created if missing)")
    except ValueError as err:
        parser.error(str(err))

    print(
        f"training {config.objective} on {config.dataset} for {config.epochs} epochs on "
        f"{len(jax.local_devices())} {jax.default_backend()} device(s)",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    bar = TerminalBar(config.epochs) if sys.stderr.isatty() else None
    meter = ProgressMeter(
        args.progress_every_s,
        config.epochs,
        bar or (lambda p: print(format_progress(p), flush=True)),
    )

    def on_epoch(readings: dict[str, Any]) -> None:
        rows.append(readings)
        meter.epoch_done(readings["epoch_time_s"])
        if args.out:
            write_epochs_parquet(rows, config, args.out / "epochs.parquet")

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "config.json").write_text(json.dumps(requested.to_dict(), indent=2))  # as given
    try:
        log = bar.write if bar else lambda s: print(s, flush=True)
        fit(config, on_epoch=on_epoch, log=log, on_step=meter)
    except DivergenceError as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 3
    except DeviceMemoryError as err:  # XLA ran out of memory although the estimate let the step through
        parser.error(str(err))
    finally:
        if bar is not None:
            bar.close()
    if args.out:
        print(f"readings: {args.out / 'epochs.parquet'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
