"""The plan a launch prints and checks before it schedules anything: `--target` and its flags.

`sweep.grid --dry-run` and `sweep.search --dry-run` print, per cell, the numbers of `model.plan.cost` (FLOPs
per train step and per evaluation, steps per epoch, peak device memory from `model.plan.memory`) and, for a
target device, hours per trial, device-hours of the whole run and the `--gpus-per-trial` fraction that fits.
With a target, a cell whose step cannot fit the device's memory refuses the launch, dry or not.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from model.config import ExperimentConfig
from model.plan.cost import TARGETS, CellPlan, Target, format_plan, plan_cell, refusal, target_from
from sweep.bill import BillError, add_price_arguments, check_price_arguments

__all__ = ["PlanError", "add_target_arguments", "format_plan", "plan", "target_of"]


class PlanError(ValueError):
    """A cell cannot run on the target as asked; the message names the cell, its memory and the fix."""


def add_target_arguments(p: argparse.ArgumentParser) -> None:
    """--target, --target-flops, --target-memory-gib, and the price flags of `sweep.bill`."""
    p.add_argument(
        "--target",
        choices=sorted(TARGETS),
        default=None,
        help="plan for this device: hours per trial, device-hours, memory fit (refuses cells "
        "that do not fit)",
    )
    p.add_argument(
        "--target-flops",
        type=float,
        default=None,
        help="float32 peak FLOP/s of the target (overrides --target's; with --target-memory-gib "
        "alone, a custom device)",
    )
    p.add_argument(
        "--target-memory-gib",
        type=float,
        default=None,
        help="device memory in GiB (overrides --target's, e.g. 79 for an 80 GB A100)",
    )
    add_price_arguments(p)  # the bill: sweep.bill


def target_of(args: argparse.Namespace) -> Target | None:
    """The target the flags name, or None when none is named. Raises PlanError on bad values."""
    if args.target is None and args.target_flops is None and args.target_memory_gib is None:
        return None
    for flag in ("target_flops", "target_memory_gib"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise PlanError(f"--{flag.replace('_', '-')} {value} must be > 0")
    try:
        return target_from(args.target, args.target_flops, args.target_memory_gib)
    except ValueError as err:
        raise PlanError(str(err)) from None


def plan(
    cells: Sequence[tuple[str, ExperimentConfig]], args: argparse.Namespace
) -> tuple[list[CellPlan], Target | None]:
    """Plans of `cells` on the flags' target (None when none is named: memory and FLOPs only); raises
    PlanError naming every cell that does not fit a named target."""
    target = target_of(args)
    try:
        check_price_arguments(args, target is not None)
    except BillError as err:
        raise PlanError(str(err)) from None
    gpus = args.gpus_per_trial if args.gpus_per_trial > 0 else 1.0
    shown = target or TARGETS["cpu" if args.gpus_per_trial <= 0 else "h100"]
    plans = [plan_cell(name, config, shown, gpus) for name, config in cells]
    if target is not None:
        message = refusal(plans, target)
        if message:
            raise PlanError(message)
    return plans, target
