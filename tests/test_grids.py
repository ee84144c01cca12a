"""Grid files: loading, expansion, seeds, the built-in paper grids, and bad grids refused before any run."""

from __future__ import annotations

import json

import pytest

from sweep.grid import main
from sweep.grid_file import GridError, builtin_grids, expand, load_grid, parse_grid_text


def test_builtin_grids_are_installed_and_valid() -> None:
    names = builtin_grids()
    assert {"digits", "paper-celeba", "paper-cifar10", "paper-svhn"} <= set(names)
    for name in names:
        plans = expand(load_grid(name))
        assert len({p.trial_id for p in plans}) == len(plans)


def test_paper_celeba_dry_run_lists_85_trials(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert main(["--grid", "paper-celeba", "--dry-run", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    trials_part = out.split("\ncell ")[0]  # the plan per cell follows the trials (tests/test_cost.py)
    rows = [line for line in trials_part.splitlines()[2:] if line.strip()]
    assert len(rows) == 85 and "85 trials, 17 cells" in out
    assert not list(tmp_path.iterdir()), "a dry run must not create anything"
    plans = expand(load_grid("paper-celeba"))
    cells = {p.cell for p in plans}
    assert {"vanilla-b25", "vanilla-b150", "thermo-p0.1", "thermo-p10", "thermo-p0.1-nt30",
            "thermo-p0.1-kpost40", "thermo-p0.1-kprior80", "thermo-p0.1-eta4"} <= cells
    assert all(p.config.batch_size == 75 for p in plans if p.config.is_thermo)
    nt30 = next(p for p in plans if p.cell == "thermo-p0.1-nt30")
    assert nt30.config.num_temps == 30 and nt30.config.temp_power == 0.1
    assert len(expand(load_grid("paper-cifar10"))) == 50


def test_lists_expand_and_repetition_fixes_seed() -> None:
    grid = parse_grid_text(json.dumps({
        "preset": "digits", "base": {"seed": 10}, "repetitions": 3,
        "cells": [{"name": "v-b{batch_size}", "objective": "vanilla", "batch_size": [16, 32]},
                  {"objective": "thermo", "temp_power": [0.5, 2]}],
    }), "json", "t")
    plans = expand(grid)
    assert len(plans) == 4 * 3
    assert [p.cell for p in plans[:4]] == ["v-b16", "v-b32", "thermo-temp_power=0.5", "thermo-temp_power=2"]
    assert {(p.cell, p.repetition, p.seed) for p in plans if p.cell == "v-b16"} == {
        ("v-b16", 0, 10), ("v-b16", 1, 11), ("v-b16", 2, 12)}
    assert all(p.config.seed == p.seed and p.trial_id == f"{p.cell}-r{p.repetition}" for p in plans)
    assert expand(grid, repetitions=1, overrides={"epochs": "3"})[0].config.epochs == 3


def test_toml_grid(tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('preset = "digits"\nrepetitions = 2\n[[cells]]\nname = "v"\nobjective = "vanilla"\n')
    plans = expand(load_grid(str(path)))
    assert [p.trial_id for p in plans] == ["v-r0", "v-r1"]


@pytest.mark.parametrize(("cell", "named"), [
    ({"name": "fast", "objective": "vanilla", "batch_sise": 25}, ["'fast'", "'batch_sise'"]),
    ({"name": "hot", "objective": "thermo", "temp_power": -1}, ["'hot'", "'temp_power'"]),
    ({"name": "big", "batch_size": "many"}, ["'big'", "'batch_size'"]),
    ({"name": "obj", "objective": "annealed"}, ["'obj'", "'objective'"]),
])
def test_bad_grid_refused_before_scheduling(tmp_path, capsys: pytest.CaptureFixture[str], cell: dict,
                                            named: list[str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"preset": "digits", "cells": [{"name": "ok"}, cell]}))
    with pytest.raises(GridError) as info:
        expand(load_grid(str(path)))
    for word in named:
        assert word in str(info.value)
    storage = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        main(["--grid", str(path), "--storage", str(storage), "--name", "never"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(word in err for word in named)
    assert not storage.exists(), "nothing may be written or scheduled for a bad grid"


def test_bad_grid_shape_refused(tmp_path) -> None:
    for raw, word in [({"cells": []}, "cells"), ({"cells": [{}], "repeats": 2}, "repeats"),
                      ({"cells": [{}], "base": {"zdim": 3}}, "zdim"),
                      ({"cells": [{"name": "a"}, {"name": "a"}]}, "'a' appears twice")]:
        with pytest.raises(GridError, match=word):
            parse_grid_text(json.dumps(raw), "json", "g")


def test_batch_not_divisible_by_devices_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--grid", "paper-celeba", "--dry-run", "--cpus-per-trial", "2"])
    assert "batch_size 25 is not divisible by 2 devices" in capsys.readouterr().err
