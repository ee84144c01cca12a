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
    assert {
        "vanilla-b25",
        "vanilla-b150",
        "thermo-p0.1",
        "thermo-p10",
        "thermo-p0.1-nt30",
        "thermo-p0.1-kpost40",
        "thermo-p0.1-kprior80",
        "thermo-p0.1-eta4",
    } <= cells
    assert all(p.config.batch_size == 75 for p in plans if p.config.is_thermo)
    nt30 = next(p for p in plans if p.cell == "thermo-p0.1-nt30")
    assert nt30.config.num_temps == 30 and nt30.config.temp_power == 0.1
    assert len(expand(load_grid("paper-cifar10"))) == 50


def test_lists_expand_and_repetition_fixes_seed() -> None:
    grid = parse_grid_text(
        json.dumps(
            {
                "preset": "digits",
                "base": {"seed": 10},
                "repetitions": 3,
                "cells": [
                    {"name": "v-b{batch_size}", "objective": "vanilla", "batch_size": [16, 32]},
                    {"objective": "thermo", "temp_power": [0.5, 2]},
                ],
            }
        ),
        "json",
        "t",
    )
    plans = expand(grid)
    assert len(plans) == 4 * 3
    assert [p.cell for p in plans[:4]] == ["v-b16", "v-b32", "thermo-temp_power=0.5", "thermo-temp_power=2"]
    assert {(p.cell, p.repetition, p.seed) for p in plans if p.cell == "v-b16"} == {
        ("v-b16", 0, 10),
        ("v-b16", 1, 11),
        ("v-b16", 2, 12),
    }
    assert all(p.config.seed == p.seed and p.trial_id == f"{p.cell}-r{p.repetition}" for p in plans)
    assert expand(grid, repetitions=1, overrides={"epochs": "3"})[0].config.epochs == 3


def test_toml_grid(tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('preset = "digits"\nrepetitions = 2\n[[cells]]\nname = "v"\nobjective = "vanilla"\n')
    plans = expand(load_grid(str(path)))
    assert [p.trial_id for p in plans] == ["v-r0", "v-r1"]


@pytest.mark.parametrize(
    ("cell", "named"),
    [
        ({"name": "fast", "objective": "vanilla", "batch_sise": 25}, ["'fast'", "'batch_sise'"]),
        ({"name": "hot", "objective": "thermo", "temp_power": -1}, ["'hot'", "'temp_power'"]),
        ({"name": "big", "batch_size": "many"}, ["'big'", "'batch_size'"]),
        ({"name": "obj", "objective": "annealed"}, ["'obj'", "'objective'"]),
    ],
)
def test_bad_grid_refused_before_scheduling(
    tmp_path, capsys: pytest.CaptureFixture[str], cell: dict, named: list[str]
) -> None:
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
    for raw, word in [
        ({"cells": []}, "cells"),
        ({"cells": [{}], "repeats": 2}, "repeats"),
        ({"cells": [{}], "base": {"zdim": 3}}, "zdim"),
        ({"cells": [{"name": "a"}, {"name": "a"}]}, "'a' appears twice"),
    ]:
        with pytest.raises(GridError, match=word):
            parse_grid_text(json.dumps(raw), "json", "g")


def test_batch_not_divisible_by_devices_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--grid", "paper-celeba", "--dry-run", "--cpus-per-trial", "2"])
    assert "batch_size 25 is not divisible by 2 devices" in capsys.readouterr().err


def test_dry_run_names_cells_that_train_identically(capsys: pytest.CaptureFixture[str]) -> None:
    """Finding 2: with stop-gradient chains eta is inert, so the paper's eta cells train like thermo-p0.1;
    K_prior enters thermo only at evaluation unless ebm_gradient=ml."""
    assert main(["--grid", "paper-celeba", "--dry-run", "--set", "ebm_gradient=none"]) == 0
    err = capsys.readouterr().err
    assert (
        "cells 'thermo-p0.1' and 'thermo-p0.1-eta2' train identically: they differ only in kl_weight "
        "(with ebm_gradient=none the chains are stop-gradient, so the KL term is a constant)"
    ) in err
    assert "'thermo-p0.1' and 'thermo-p0.1-eta4'" in err
    assert "'thermo-p0.1-eta2' and 'thermo-p0.1-eta4'" in err
    assert (
        "'thermo-p0.1' and 'thermo-p0.1-kprior80' train identically: they differ only in prior_steps" in err
    )
    assert main(["--grid", "paper-celeba", "--dry-run"]) == 0  # chains: eta changes the gradient
    err = capsys.readouterr().err
    assert "eta2" not in err and "'thermo-p0.1' and 'thermo-p0.1-kprior80'" in err
    assert main(["--grid", "paper-celeba", "--dry-run", "--set", "ebm_gradient=ml"]) == 0
    err = capsys.readouterr().err  # ml: the prior chain trains the EBM, eta is still inert
    assert "kprior80" not in err and "'thermo-p0.1' and 'thermo-p0.1-eta2'" in err


def test_identical_cells_by_estimator() -> None:
    from sweep.grid_file import identical_cells

    grid = parse_grid_text(
        json.dumps(
            {
                "preset": "digits",
                "repetitions": 1,
                "cells": [
                    {"name": "v1", "objective": "vanilla", "kl_weight": 1.0},
                    {"name": "v2", "objective": "vanilla", "kl_weight": 2.0, "temp_power": 3},
                    {"name": "trap-eta1", "objective": "thermo", "ti_rule": "trapezoid", "kl_weight": 1.0},
                    {"name": "trap-eta2", "objective": "thermo", "ti_rule": "trapezoid", "kl_weight": 2.0},
                    {"name": "mlml-p1", "objective": "thermo", "ebm_gradient": "ml", "gen_gradient": "ml"},
                    {
                        "name": "mlml-p3",
                        "objective": "thermo",
                        "ebm_gradient": "ml",
                        "gen_gradient": "ml",
                        "temp_power": 3,
                    },
                    {
                        "name": "ml-kprior",
                        "objective": "thermo",
                        "ebm_gradient": "ml",
                        "gen_gradient": "ml",
                        "prior_steps": 7,
                    },
                ],
            }
        ),
        "json",
        "t",
    )
    lines = identical_cells(expand(grid))
    pairs = {tuple(line.split("'")[1:4:2]) for line in lines}
    assert pairs == {("v1", "v2"), ("trap-eta1", "trap-eta2"), ("mlml-p1", "mlml-p3")}, lines
    assert any("ti_rule=trapezoid has no KL term" in line for line in lines)


def test_stop_gradient_chains_make_trapezoid_and_kl_rules_identical() -> None:
    """With ebm_gradient in {none, ml} and gen_gradient=ti the chains are stop-gradient, so the KL terms of
    kl_batch and kl_example are constants: at equal M those rules train like trapezoid. variance and
    stepping_stone do not (their corrections depend on log p(x|z), which carries the generator's gradient),
    nor do the KL rules when the chains carry the EBM's gradient."""
    from sweep.grid_file import identical_cells

    cells = []
    for ebm in ("none", "ml", "chains"):
        for rule in ("trapezoid", "kl_batch", "kl_example", "variance"):
            cells.append(
                {
                    "name": f"{ebm}-{rule}",
                    "objective": "thermo",
                    "ebm_gradient": ebm,
                    "ti_rule": rule,
                    "chains_per_example": 6,
                    "batch_size": 20,
                }
            )
    cells.append(
        {
            "name": "none-kl_batch-m7",
            "objective": "thermo",
            "ebm_gradient": "none",
            "ti_rule": "kl_batch",
            "chains_per_example": 7,
            "batch_size": 20,
        }
    )
    grid = parse_grid_text(json.dumps({"preset": "digits", "repetitions": 1, "cells": cells}), "json", "t")
    lines = identical_cells(expand(grid))
    pairs = {tuple(line.split("'")[1:4:2]) for line in lines}
    alike = (("trapezoid", "kl_batch"), ("trapezoid", "kl_example"), ("kl_batch", "kl_example"))
    expected = {(f"{ebm}-{a}", f"{ebm}-{b}") for ebm in ("none", "ml") for a, b in alike}
    assert pairs == expected, lines
    assert all("differ only in ti_rule (" in line and "stop-gradient" in line for line in lines), lines
