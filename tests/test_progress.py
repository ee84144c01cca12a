"""Progress inside an epoch: the meter's throttle and numbers, that it leaves training bit-exact, the
per-trial progress files, the driver's block with the grid's ETA, and model.train's lines."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from model import loop
from model.config import get_preset
from model.loop import StepProgress
from model.progress import Progress, ProgressMeter, TerminalBar, duration, format_progress, progress_of
from model.train import main as train_main
from sweep.progress import grid_eta_s, progress_block, progress_uri, read_progress, write_progress

TINY = dict(
    z_dim=4,
    ebm_width=8,
    gen_width=1,
    prior_steps=2,
    posterior_steps=2,
    num_train=64,
    num_val=32,
    batch_size=16,
    eval_every=0,
    sample_every=0,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_meter_reports_at_most_every_interval_and_syncs_only_then() -> None:
    clock, emitted, synced = Clock(), [], []
    meter = ProgressMeter(10.0, 3, emitted.append, clock=clock, sync=lambda: synced.append(clock.now))
    for step in range(1, 101):  # one step a second
        clock.now = float(step)
        meter(StepProgress(1, step, 100, float(step), 8))
    # the clock starts at the first step: reports at 11, 21, ..., 91
    assert [p.step for p in emitted] == [11, 21, 31, 41, 51, 61, 71, 81, 91]
    assert len(synced) == len(emitted)
    off = ProgressMeter(0.0, 3, emitted.append, clock=clock, sync=lambda: synced.append(0))
    off(StepProgress(1, 1, 100, 1.0, 8))
    assert len(synced) == 9 and len(emitted) == 9


def test_progress_numbers() -> None:
    # 30 of 120 steps of epoch 2 of 5 in 60 s, batch 16; the one finished epoch took 200 s
    p = progress_of(StepProgress(2, 30, 120, 55.0, 16), 5, [200.0], elapsed_s=60.0)
    assert p.images_per_s == 30 * 16 / 60.0
    assert p.epoch_eta_s == 2.0 * 90
    assert p.trial_eta_s == 180 + 3 * 200.0 and p.epoch_s == 200.0
    # no finished epoch yet: later epochs at this epoch's pace
    q = progress_of(StepProgress(1, 30, 120, 60.0, 16), 3, [], elapsed_s=60.0)
    assert q.trial_eta_s == 180 + 2 * 240
    assert format_progress(p).startswith("epoch 2/5 step 30/120 (25%)  8 img/s  elapsed 1m00s")
    assert (duration(42), duration(185), duration(7620)) == ("42s", "3m05s", "2h07m")


def test_meter_leaves_the_numbers_bit_exact() -> None:
    config = get_preset("digits", **TINY, epochs=1)
    data = loop.load_dataset(config)
    devices = jax.local_devices()[:1]
    plain, readings = loop.train_epoch(config, loop.init_state(config), data, devices=devices)
    emitted: list[Progress] = []
    meter = ProgressMeter(1e-9, 1, emitted.append)  # a report at every step but the first, each synced
    metered, metered_readings = loop.train_epoch(
        config, loop.init_state(config), data, devices=devices, on_step=meter
    )
    assert [p.step for p in emitted] == list(range(2, 5))
    assert all(p.images_per_s > 0 and p.epochs == 1 for p in emitted)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(metered), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    timing = {"epoch_time_s"}
    assert {k: v for k, v in readings.items() if k not in timing} == {
        k: v for k, v in metered_readings.items() if k not in timing
    }


def test_progress_file_is_replaced_whole(tmp_path: Path) -> None:
    uri = progress_uri(str(tmp_path / "run"), "cell-r0")
    assert read_progress(uri) is None
    write_progress(uri, {"step": 1})
    write_progress(uri, {"step": 2})
    assert read_progress(uri)["step"] == 2 and time.time() - read_progress(uri)["time"] < 600
    assert sorted(p.name for p in Path(uri).parent.iterdir()) == ["cell-r0.json"]  # no temporary left


def test_grid_eta() -> None:
    assert grid_eta_s([10.0, 20.0], [30.0, 30.0], 2) == 50.0  # each waiting trial takes the next free slot
    assert grid_eta_s([10.0], [5.0, 5.0, 5.0], 1) == 25.0
    assert grid_eta_s([], [4.0, 4.0, 4.0], 2) == 8.0
    assert grid_eta_s([7.0, 3.0], [], 2) == 7.0


def _trial(trial_id: str, cell: str, status: str, **last: float) -> SimpleNamespace:
    config = {"trial": {"trial_id": trial_id, "cell": cell}}
    return SimpleNamespace(trial_id="ray" + trial_id, config=config, status=status, last_result=last)


def test_progress_block_shows_running_trials_and_the_grid_eta(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    report = progress_of(StepProgress(1, 30, 120, 60.0, 16), 2, [], elapsed_s=60.0)  # 180 + 240 s to go
    write_progress(progress_uri(run, "a-r0"), {"trial_id": "a-r0", **report.to_dict()})
    trials = [
        _trial("a-r0", "a", "RUNNING"),
        _trial("a-r1", "a", "PENDING"),
        _trial("b-r0", "b", "TERMINATED", time_total_s=100.0),
        _trial("b-r1", "b", "PENDING"),
    ]
    text = progress_block(trials, run)
    row = next(line for line in text.splitlines() if line.startswith("a-r0"))
    assert row.split()[:4] == ["a-r0", "1/2", "30/120", "8"]
    # one slot (one trial running): a-r0 ends in ~420 s, then a-r1 (480 s, its cell's length), then b-r1
    # (100 s, its finished trial's): 1000 s = 16m40s, give or take the seconds since the report
    assert "grid: 1/4 trials ended, 1 running, 2 waiting; ETA 16m" in text


def test_train_cli_prints_progress_lines(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    assert train_main(["--preset", "digits", "--epochs", "2", *sets, "--progress-every-s", "1e-9"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("epoch 2/2 step")]
    assert [line.split()[3] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]  # epoch 2: every step
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--preset", "digits", "--progress-every-s", "-1"])
    assert exit_info.value.code == 2
    assert "--progress-every-s -1 must be >= 0" in capsys.readouterr().err


def test_progress_is_a_plain_record() -> None:
    p = Progress(1, 2, 3, 4, 5.0, 6.0, 7.0, 8.0, 9.0)
    assert json.loads(json.dumps(p.to_dict())) == dataclasses.asdict(p)


def test_progress_file_on_s3(s3_server) -> None:
    uri = progress_uri(s3_server.uri("runs", "r"), "cell-r0")
    write_progress(uri, {"step": 1})
    write_progress(uri, {"step": 2})
    assert read_progress(uri)["step"] == 2
    files = [k for k in s3_server.keys("runs/r/progress/") if not k.endswith("/")]  # no directory markers
    assert files == ["runs/r/progress/cell-r0.json"]


def test_terminal_bar_is_one_updating_line() -> None:
    stream = io.StringIO()
    bar = TerminalBar(2, stream=stream)
    bar.write("before any step")
    for step in (1, 3):
        bar(progress_of(StepProgress(2, step, 4, 1.0 * step, 16), 2, [5.0], elapsed_s=1.0 * step))
    bar.write("epoch 2 done")
    bar.close()
    text = stream.getvalue()
    assert text.startswith("before any step\n") and "epoch 2 done\n" in text
    assert "epoch 2/2 step 3/4 (75%)" in text and "7/8" not in text  # our numbers, not tqdm's counter
    assert bar._bar.n == 4 + 3  # epoch 1's 4 steps, then 3 of epoch 2
