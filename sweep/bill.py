"""Dollars before launch: the plan's device-hours times the user's prices, on demand and on spot capacity.

`--dry-run --target T --price-per-gpu-hour P` prints each cell's cost beside its device-hours and the
whole run's; `--spot-price-per-gpu-hour S` adds the spot bill. Spot capacity can be taken back
(reclaimed) at any moment; the trial then resumes from its newest checkpoint and trains again what it had
done since. Per trial, with

- H: the plan's hours of the trial without reclaims,
- w: the work repeated per reclaim, counted as one whole checkpoint interval (`--checkpoint-every-s`),
  or one epoch of the cell when trials checkpoint only at epoch ends (a reclaim lands on average halfway
  through the interval; the other half stands for the restart: rescheduling, reading the checkpoint,
  compiling again),
- r: reclaims per hour a trial runs (`--reclaims-per-hour`, default `DEFAULT_RECLAIMS_PER_HOUR`),

the expected hours are T = H / (1 - r w): each hour of running, repeated hours included, loses r w hours
again. With r w >= 1 a trial would on average never finish, and the bill says so. Prices are the user's:
nothing here knows a provider's price list.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence

from model.config import ExperimentConfig
from model.plan.cost import CellPlan
from sweep.text import text_table

DEFAULT_RECLAIMS_PER_HOUR = 0.05  # one reclaim per 20 hours a trial runs: an assumption, not a measurement


class BillError(ValueError):
    """Price flags that cannot make a bill; the message names the flag and the fix."""


def add_price_arguments(p: argparse.ArgumentParser) -> None:
    """--price-per-gpu-hour, --spot-price-per-gpu-hour, --reclaims-per-hour."""
    p.add_argument(
        "--price-per-gpu-hour",
        type=float,
        default=None,
        metavar="P",
        help="with --dry-run and a target: the cost of each cell and of the run at P dollars per device-hour",
    )
    p.add_argument(
        "--spot-price-per-gpu-hour",
        type=float,
        default=None,
        metavar="S",
        help="also the spot bill at S dollars per device-hour, with the work repeated after reclaims",
    )
    p.add_argument(
        "--reclaims-per-hour",
        type=float,
        default=None,
        metavar="R",
        help="expected spot reclaims per hour a trial runs (default "
        f"{DEFAULT_RECLAIMS_PER_HOUR:g}, an assumption: use your provider's interruption rate)",
    )


def check_price_arguments(args: argparse.Namespace, has_target: bool) -> None:
    """Refuse prices that cannot make a bill. Raises BillError."""
    for flag in ("price_per_gpu_hour", "spot_price_per_gpu_hour", "reclaims_per_hour"):
        value = getattr(args, flag, None)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise BillError(f"--{flag.replace('_', '-')} {value:g} must be a finite number >= 0")
    priced = args.price_per_gpu_hour is not None or args.spot_price_per_gpu_hour is not None
    if priced and not has_target:
        raise BillError(
            "a price needs device-hours: add --target h100|a100|a10g|cpu (or --target-flops with "
            "--target-memory-gib)"
        )
    if args.reclaims_per_hour is not None and args.spot_price_per_gpu_hour is None:
        raise BillError("--reclaims-per-hour prices spot capacity: add --spot-price-per-gpu-hour S")


@dataclasses.dataclass(frozen=True)
class CellBill:
    """One cell's bill over its trials: device-hours and dollars on demand; on spot capacity, the expected
    device-hours with repeated work, reclaims per trial and dollars (NaN without a spot price; inf when
    reclaims outpace the work)."""

    name: str
    trials: int
    device_hours: float
    cost: float
    spot_device_hours: float
    reclaims_per_trial: float
    spot_cost: float


def spot_hours(hours: float, repeated_hours: float, reclaims_per_hour: float) -> float:
    """Expected hours of a trial of `hours` on spot capacity: hours / (1 - r w) (inf when r w >= 1)."""
    loss = reclaims_per_hour * repeated_hours
    return hours / (1.0 - loss) if loss < 1.0 else math.inf


def cell_bill(
    plan: CellPlan,
    config: ExperimentConfig,
    trials: int,
    *,
    price: float | None,
    spot_price: float | None,
    reclaims_per_hour: float,
    checkpoint_interval_s: float | None,
) -> CellBill:
    """The bill of `trials` trials of one cell: the plan's hours x devices x price, and on spot capacity
    the same with each trial's hours grown by the repeated work (one checkpoint interval per reclaim, or
    one epoch of the cell without an interval)."""
    device_hours = plan.trial_hours * plan.devices * trials
    repeated = checkpoint_interval_s / 3600 if checkpoint_interval_s else plan.trial_hours / config.epochs
    repeated = min(repeated, plan.trial_hours)  # never more than the whole trial
    nan = float("nan")
    if spot_price is None:
        return CellBill(plan.name, trials, device_hours, _dollars(device_hours, price), nan, nan, nan)
    hours = spot_hours(plan.trial_hours, repeated, reclaims_per_hour)
    spot_device_hours = hours * plan.devices * trials
    return CellBill(
        plan.name,
        trials,
        device_hours,
        _dollars(device_hours, price),
        spot_device_hours,
        reclaims_per_hour * hours,
        spot_device_hours * spot_price,
    )


def _dollars(device_hours: float, price: float | None) -> float:
    return device_hours * price if price is not None else float("nan")


def run_bill(
    cells: Sequence[tuple[CellPlan, ExperimentConfig, int]], args: argparse.Namespace
) -> list[CellBill]:
    """Every cell's bill (its plan, config and number of trials) from the launch's price flags and its
    checkpoint interval `--checkpoint-every-s` (one epoch when not set)."""
    reclaims = args.reclaims_per_hour if args.reclaims_per_hour is not None else DEFAULT_RECLAIMS_PER_HOUR
    return [
        cell_bill(
            plan,
            config,
            trials,
            price=args.price_per_gpu_hour,
            spot_price=args.spot_price_per_gpu_hour,
            reclaims_per_hour=reclaims,
            checkpoint_interval_s=args.checkpoint_every_s,
        )
        for plan, config, trials in cells
    ]


def _money(value: float) -> str:
    if math.isnan(value):
        return "-"
    return "never ends" if math.isinf(value) else f"${value:,.0f}" if value >= 100 else f"${value:,.2f}"


def _hours(value: float) -> str:
    return "-" if math.isnan(value) else "never ends" if math.isinf(value) else f"{value:,.1f}"


def format_bill(bills: list[CellBill], args: argparse.Namespace) -> str:
    """The bill under the --dry-run plan: per cell and for the whole run, and what it assumed."""
    spot = args.spot_price_per_gpu_hour is not None
    header = ["cell", "trials", "device-h", "cost"]
    if spot:
        header += ["spot device-h", "reclaims/trial", "spot cost"]
    total = CellBill(
        "whole run",
        sum(b.trials for b in bills),
        sum(b.device_hours for b in bills),
        sum(b.cost for b in bills),
        sum(b.spot_device_hours for b in bills),
        float("nan"),
        sum(b.spot_cost for b in bills),
    )
    rows = []
    for b in [*bills, total]:
        row = [b.name, str(b.trials), _hours(b.device_hours), _money(b.cost)]
        if spot:
            reclaims = "-" if math.isnan(b.reclaims_per_trial) else f"{b.reclaims_per_trial:.2f}"
            row += [_hours(b.spot_device_hours), reclaims, _money(b.spot_cost)]
        rows.append(row)
    lines = [text_table(header, rows)]
    if args.price_per_gpu_hour is not None:
        lines.append(f"on demand: ${args.price_per_gpu_hour:g} per device-hour (your price)")
    if spot:
        interval = args.checkpoint_every_s
        repeated = f"{interval:g} s (the checkpoint interval)" if interval else "one epoch of the cell"
        reclaims = args.reclaims_per_hour
        rate = f"{reclaims:g} (yours)" if reclaims is not None else f"{DEFAULT_RECLAIMS_PER_HOUR:g} (default)"
        lines.append(
            f"spot: ${args.spot_price_per_gpu_hour:g} per device-hour (your price), {rate} reclaims per "
            f"hour a trial runs, each repeating {repeated}: hours / (1 - reclaims x repeated hours)"
        )
    return "\n".join(lines)
