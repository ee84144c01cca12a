"""Dollars before launch: the bill is the plan's device-hours times the user's prices, spot hours grow by
the repeated work per reclaim, and price flags that cannot make a bill exit with one line."""

from __future__ import annotations

import math
import re

import pytest

from model.config import get_preset
from model.plan.cost import TARGETS, plan_cell
from sweep import grid, search
from sweep.bill import DEFAULT_RECLAIMS_PER_HOUR, cell_bill, run_bill, spot_hours


def test_spot_hours() -> None:
    assert spot_hours(10.0, 0.5, 0.0) == 10.0  # never reclaimed: no repeated work
    assert spot_hours(10.0, 0.5, 0.2) == 10.0 / (1 - 0.1)
    assert math.isinf(spot_hours(10.0, 2.0, 0.5))  # a reclaim per repeated interval: never ends


def test_cell_bill_is_device_hours_times_price() -> None:
    config = get_preset("celeba", objective="thermo", epochs=50)
    plan = plan_cell("thermo", config, TARGETS["a10g"], 2.0)
    assert plan.devices == 2
    rate = {"reclaims_per_hour": 0.1}
    b = cell_bill(plan, config, 5, price=1.5, spot_price=None, **rate, checkpoint_interval_s=None)
    assert b.device_hours == plan.trial_hours * 2 * 5 and b.cost == b.device_hours * 1.5
    assert math.isnan(b.spot_cost)
    epoch_h = plan.trial_hours / 50
    s = cell_bill(plan, config, 5, price=None, spot_price=0.5, **rate, checkpoint_interval_s=None)
    hours = plan.trial_hours / (1 - 0.1 * epoch_h)  # one epoch repeated per reclaim
    assert s.spot_device_hours == pytest.approx(hours * 2 * 5, rel=1e-12)
    assert s.spot_cost == pytest.approx(hours * 2 * 5 * 0.5, rel=1e-12)
    assert s.reclaims_per_trial == pytest.approx(0.1 * hours, rel=1e-12)
    # a 10-minute checkpoint interval repeats less than an epoch, so the spot bill shrinks
    t = cell_bill(plan, config, 5, price=None, spot_price=0.5, **rate, checkpoint_interval_s=600)
    assert t.spot_device_hours == pytest.approx(plan.trial_hours / (1 - 0.1 / 6) * 10, rel=1e-12)
    assert epoch_h > 1 / 6 and t.spot_cost < s.spot_cost


def test_run_bill_reads_the_flags() -> None:
    config = get_preset("digits", epochs=4)
    plan = plan_cell("d", config, TARGETS["cpu"], 1.0)
    args = grid.build_parser().parse_args(["--price-per-gpu-hour", "2", "--spot-price-per-gpu-hour", "1"])
    (b,) = run_bill([(plan, config, 3)], args)
    assert b.reclaims_per_trial == pytest.approx(DEFAULT_RECLAIMS_PER_HOUR * b.spot_device_hours / 3)
    args.checkpoint_every_s = 0.01  # --checkpoint-every-s: less than an epoch is repeated per reclaim
    (c,) = run_bill([(plan, config, 3)], args)
    assert c.spot_device_hours < b.spot_device_hours


def _row(out: str, name: str) -> list[str]:
    """The bill's row of `name` (the last line starting with it: the plan's table comes first)."""
    return re.split(r"\s{2,}", [line for line in out.splitlines() if line.startswith(name + " ")][-1])


def test_grid_dry_run_prints_the_bill(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--grid", "paper-celeba", "--dry-run", "--target", "a10g", "--gpus-per-trial", "1"]
    assert grid.main([*argv, "--price-per-gpu-hour", "2", "--spot-price-per-gpu-hour", "0.5"]) == 0
    out = capsys.readouterr().out
    hours = float(re.search(r"whole run: 85 trials, ([\d.]+) device-hours", out).group(1))
    total = _row(out, "whole run")
    assert total[1] == "85" and float(total[2].replace(",", "")) == pytest.approx(hours, abs=0.05)
    assert float(total[3].strip("$").replace(",", "")) == pytest.approx(2 * hours, abs=1)
    assert float(total[6].strip("$").replace(",", "")) > 0.5 * hours  # spot repeats work
    vanilla = _row(out, "vanilla-b25")
    assert vanilla[1] == "5"
    assert f"{DEFAULT_RECLAIMS_PER_HOUR:g} (default) reclaims per hour" in out
    assert "each repeating one epoch of the cell" in out


def test_search_dry_run_prints_the_bill(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--base", "celeba", "--dry-run", "--target", "h100", "--trials", "4", "--price-per-gpu-hour", "3"]
    assert search.main(argv) == 0
    total = _row(capsys.readouterr().out, "whole run")
    assert total[1] == "4" and total[3].startswith("$")
    assert search.main([*argv, "--repetitions", "3"]) == 0  # every proposal trains three seeds
    assert _row(capsys.readouterr().out, "whole run")[1] == "12"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--price-per-gpu-hour", "1"], "a price needs device-hours: add --target"),
        (["--target", "a10g", "--price-per-gpu-hour", "-1"], "--price-per-gpu-hour -1 must be a finite"),
        (["--target", "a10g", "--reclaims-per-hour", "0.1"], "add --spot-price-per-gpu-hour"),
    ],
)
def test_bad_price_flags_exit_2(extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        grid.main(["--grid", "digits", "--dry-run", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
