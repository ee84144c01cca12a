"""`sweep.space`: the search space of `--space FILE` (any config field). Distributions from the file, the
proposal's config, a combination the config refuses (the proposal's FAIL), every refusal of a bad file,
`--set` on a searched field, the dry run's most expensive corner against the plan's own numbers, and the
--p/--eta shorthands. No Ray."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from model.config import ExperimentConfig, get_preset
from model.plan.cost import trial_flops
from sweep.space import (
    NOT_SEARCHABLE,
    SHORTHANDS,
    check_sets,
    describe,
    load_space,
    most_expensive_corner,
    proposal_config,
    proposal_fields,
)
from sweep.study import SearchError, search_space

ROOT = Path(__file__).resolve().parents[1]
# The search's base: the digits preset, thermo, two chains per example (so variance is a valid rule).
BASE = get_preset("digits", objective="thermo", chains_per_example=2)


def write(tmp_path: Path, data: object) -> str:
    path = tmp_path / "space.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


SPACE = {
    "temp_power": {"low": 0.1, "high": 10, "log": True},
    "kl_weight": {"low": 0.5, "high": 4},
    "num_temps": {"low": 3, "high": 12, "type": "int"},
    "chains_per_example": {"low": 1, "high": 8, "type": "int", "step": 7},
    "ebm_lr": {"low": 1e-5, "high": 1e-3, "log": True},
    "ebm_gradient": {"choices": ["none", "chains", "ml"]},
    "gen_gradient": {"choices": ["ti", "ml"]},
    "ti_rule": {"choices": ["kl_batch", "trapezoid", "variance"]},
}


def test_distributions_and_proposals_round_trip(tmp_path):
    space = load_space(write(tmp_path, SPACE), BASE)
    assert list(space) == list(SPACE)
    assert space["temp_power"] == FloatDistribution(0.1, 10.0, log=True)
    assert space["kl_weight"] == FloatDistribution(0.5, 4.0)
    assert space["num_temps"] == IntDistribution(3, 12)
    assert space["chains_per_example"] == IntDistribution(1, 8, step=7)
    assert space["ebm_lr"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert space["ebm_gradient"] == CategoricalDistribution(["none", "chains", "ml"])
    assert space["gen_gradient"] == CategoricalDistribution(["ti", "ml"])
    assert space["ti_rule"] == CategoricalDistribution(["kl_batch", "trapezoid", "variance"])
    assert describe(space) == (
        "temp_power in [0.1, 10] (log), kl_weight in [0.5, 4], num_temps in [3, 12] (int), "
        "chains_per_example in [1, 8] (int, step 7), ebm_lr in [1e-05, 0.001] (log), "
        "ebm_gradient in {none, chains, ml}, gen_gradient in {ti, ml}, "
        "ti_rule in {kl_batch, trapezoid, variance}"
    )
    # Proposals as Optuna makes them, from these very distributions.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    built = failed = 0
    for _ in range(40):
        params = study.ask(space).params
        fields = proposal_fields(params)
        assert fields == params  # field names already; values keep their types
        assert isinstance(fields["num_temps"], int) and isinstance(fields["temp_power"], float)
        try:
            config = proposal_config(BASE.to_dict(), params)
        except ValueError as err:  # the one combination this space refuses
            assert params["ti_rule"] == "variance" and params["chains_per_example"] == 1, err
            failed += 1
            continue
        built += 1
        for name, value in dataclasses.asdict(config).items():
            assert value == params.get(name, getattr(BASE, name)), name
            assert type(value) is type(params.get(name, getattr(BASE, name))), name
    assert built and failed  # both kinds of proposal were drawn


def test_refused_combination_is_the_configs_valueerror(tmp_path):
    space = load_space(write(tmp_path, SPACE), BASE)
    with pytest.raises(ValueError) as err:
        proposal_config(BASE.to_dict(), {"ti_rule": "variance", "chains_per_example": 1})
    with pytest.raises(ValueError) as direct:
        dataclasses.replace(BASE, ti_rule="variance", chains_per_example=1)
    assert str(err.value) == str(direct.value)
    assert "chains_per_example=1 is too few for ti_rule=variance" in str(err.value)
    assert not isinstance(err.value, SearchError)  # a proposal's FAIL, not a space error
    assert "chains_per_example" in space and "ti_rule" in space


def test_value_refused_with_the_bases_unsearched_field_is_a_space_error(tmp_path):
    """chains_per_example=1 is a proposal's FAIL when ti_rule is searched (above), but with the base's
    ti_rule=variance fixed every proposal drawing it would fail: the file is refused."""
    base = dataclasses.replace(BASE, ti_rule="variance")
    with pytest.raises(SearchError, match=r"chains_per_example = 1 .*too few for ti_rule=variance"):
        load_space(write(tmp_path, {"chains_per_example": {"low": 1, "high": 8, "type": "int"}}), base)
    space = {
        "chains_per_example": {"low": 1, "high": 8, "type": "int"},
        "ti_rule": {"choices": ["variance", "trapezoid"]},
    }
    assert set(load_space(write(tmp_path, space), base)) == {"chains_per_example", "ti_rule"}


REFUSALS = [
    ("not json {", "not JSON"),
    ("[1, 2]", "holds a list, not an object"),
    ("{}", "is empty"),
    ({"temp_pwer": {"low": 1, "high": 2}}, "'temp_pwer' is not a config field; did you mean 'temp_power'"),
    ({"p": {"low": 1, "high": 2}}, "'p' is the --p shorthand.*'temp_power'"),
    (
        {"chain_gradient": {"choices": [True]}},
        "'chain_gradient' no longer exists; it is replaced by ebm_gradient",
    ),
    ({"seed": {"low": 0, "high": 5, "type": "int"}}, "seed cannot be searched: the seeds are the search's"),
    ({"objective": {"choices": ["thermo", "vanilla"]}}, "objective cannot be searched"),
    ({"epochs": {"low": 1, "high": 5, "type": "int"}}, "epochs cannot be searched.*--epochs"),
    ({"dataset": {"choices": ["digits", "cifar10"]}}, "dataset cannot be searched: it changes the data"),
    (
        {"eval_num_max": {"low": 100, "high": 300, "type": "int"}},
        "eval_num_max cannot be searched: .*KID/FID",
    ),
    ({"val_ll_temps": {"low": 10, "high": 30, "type": "int"}}, "val_ll_temps cannot be searched: .*val_ll"),
    (
        {"ebm_gradient": {"choices": ["ml"], "low": 1, "high": 2}},
        "ebm_gradient has both choices and high, low",
    ),
    ({"num_temps": {"type": "int"}}, "num_temps .* has no low and no high"),
    ({"kl_weight": {"low": 0, "hgih": 2}}, "kl_weight has unknown key.*hgih"),
    ({"kl_weight": 3}, "kl_weight = 3 is not an object"),
    ('{"kl_weight": {"low": NaN, "high": 2}}', "kl_weight low = nan must be a finite number"),
    ('{"kl_weight": {"low": 0, "high": Infinity}}', "kl_weight high = inf must be a finite number"),
    ({"kl_weight": {"low": 2, "high": 2}}, "kl_weight low = 2 must be smaller than high = 2"),
    ({"kl_weight": {"low": 0, "high": 2, "log": True}}, "kl_weight low = 0 must be > 0 on a log scale"),
    ({"num_temps": {"low": 2.5, "high": 8, "type": "int"}}, "low = 2.5 must be an integer"),
    ({"num_temps": {"low": 2, "high": 8}}, 'num_temps holds int values; add "type": "int"'),
    ({"kl_weight": {"low": 1, "high": 3, "type": "int"}}, 'kl_weight holds float values; drop "type": "int"'),
    ({"ti_rule": {"low": 1, "high": 3}}, "ti_rule holds str values, which have no range.*choices"),
    (
        {"num_temps": {"low": 2, "high": 9, "type": "int", "step": 2}},
        "high - low = 7 is not a multiple of step = 2",
    ),
    ({"ebm_gradient": {"choices": []}}, r"ebm_gradient choices \[\] must be a non-empty list"),
    ({"ebm_gradient": {"choices": ["ml", "ml"]}}, "ebm_gradient choice 'ml' is listed twice"),
    ({"num_temps": {"choices": [5, "9"]}}, "num_temps choice '9' is not a int"),
    (
        {"ebm_gradient": {"choices": ["ml", "mle"]}},
        "ebm_gradient = 'mle' is refused.*use one of chains, none, ml",
    ),
    ({"num_temps": {"low": 1, "high": 9, "type": "int"}}, "num_temps = 1 is refused.*must be >= 2"),
    ({"kl_weight": {"low": -1, "high": 2}}, r"kl_weight = -1.0 is refused.*must be a finite number >= 0"),
    ({"lr_decay": {"low": 0.9, "high": 1.5}}, r"lr_decay = 1.5 is refused.*must be in \(0, 1\]"),
    (
        {"batch_size": {"low": 10, "high": 5000, "type": "int"}},
        "batch_size = 5000 is refused.*exceeds num_train",
    ),
]


@pytest.mark.parametrize(("content", "message"), REFUSALS, ids=[m.split()[0] for _, m in REFUSALS])
def test_bad_space_files_are_refused_naming_the_value(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(SearchError, match=message) as err:
        load_space(path, BASE)
    assert path in str(err.value) and "\n" not in str(err.value)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(SearchError, match=r"--space .*nope\.json: cannot read it"):
        load_space(str(tmp_path / "nope.json"), BASE)


def test_every_not_searchable_field_is_a_field_and_refused(tmp_path):
    fields = {f.name: f.default for f in dataclasses.fields(ExperimentConfig)}
    for name in NOT_SEARCHABLE:
        default = fields[name]  # a KeyError here: a stale entry
        with pytest.raises(SearchError, match=f"{name} cannot be searched"):
            load_space(write(tmp_path, {name: {"choices": [default]}}), BASE)


def test_check_sets_refuses_searched_fields_only(tmp_path):
    space = load_space(write(tmp_path, SPACE), BASE)
    check_sets(space, {"batch_size": "25", "prior_steps": "5"})
    with pytest.raises(SearchError, match="--set ti_rule=...: ti_rule is searched by the space file"):
        check_sets(space, {"batch_size": "25", "ti_rule": "trapezoid"})
    shorthand = search_space((0.1, 10.0), (0.5, 4.0))
    check_sets(shorthand, {"num_temps": "7"})
    for key, flag in (("temp_power", "--p"), ("kl_weight", "--eta")):
        with pytest.raises(SearchError, match=f"{key} is searched by {flag}; give its range with {flag} LOW"):
            check_sets(shorthand, {key: "1"})


def test_shorthands_map_p_and_eta():
    assert SHORTHANDS == {"p": "temp_power", "eta": "kl_weight"}
    shorthand = search_space((0.1, 10.0), (0.5, 4.0))
    assert describe(shorthand) == "temp_power in [0.1, 10] (log), kl_weight in [0.5, 4]"
    assert proposal_fields({"p": 2, "eta": 1}) == {"temp_power": 2.0, "kl_weight": 1.0}
    assert isinstance(proposal_fields({"p": 2})["temp_power"], float)
    config = proposal_config(BASE.to_dict(), {"p": 0.3, "eta": 2.5})
    assert (config.temp_power, config.kl_weight) == (0.3, 2.5)
    assert dataclasses.replace(config, temp_power=BASE.temp_power, kl_weight=BASE.kl_weight) == BASE
    with pytest.raises(SearchError, match="'pp' is not a config field"):
        proposal_fields({"pp": 1.0})


def test_most_expensive_corner_follows_the_plan(tmp_path):
    space_file = {
        "num_temps": {"low": 5, "high": 30, "type": "int"},
        "ebm_gradient": {"choices": ["none", "chains", "ml"]},
        "ti_rule": {"choices": ["kl_batch", "variance"]},
        "chains_per_example": {"choices": [1, 3]},
        "kl_weight": {"low": 0.5, "high": 4},
    }
    space = load_space(write(tmp_path, space_file), BASE)
    chosen = most_expensive_corner(space, BASE)
    corners, refused = [], 0
    names = list(space_file)
    values = [[5, 30], ["none", "chains", "ml"], ["kl_batch", "variance"], [1, 3], [0.5, 4.0]]
    for point in itertools.product(*values):
        try:
            corners.append(dataclasses.replace(BASE, **dict(zip(names, point, strict=True))))
        except ValueError:
            refused += 1
    assert refused == 3 * 2 * 2  # variance with one chain, at every other corner
    costs = [trial_flops(c) for c in corners]
    assert trial_flops(chosen) == max(costs)
    assert chosen in corners  # never a refused corner
    # The plan's numbers: more temperatures, more chains and differentiating through them cost more.
    lo = dataclasses.replace(BASE, num_temps=5, ebm_gradient="chains", chains_per_example=3)
    hi = dataclasses.replace(lo, num_temps=30)
    assert trial_flops(hi) > 5 * trial_flops(lo) / 1.2
    assert trial_flops(dataclasses.replace(hi, ebm_gradient="none")) < trial_flops(hi)
    assert (chosen.num_temps, chosen.ebm_gradient, chosen.chains_per_example) == (30, "chains", 3)
    unsearched = {k: v for k, v in dataclasses.asdict(chosen).items() if k not in space_file}
    assert unsearched == {k: v for k, v in BASE.to_dict().items() if k not in space_file}


def test_kl_example_needs_a_corner_with_six_chains(tmp_path):
    """kl_example needs 6 chains: a chains range up to 5 leaves it no corner (a space error); up to 6 it is
    a value some proposals take, its 2-chain corners are skipped, and the 6-chain, 30-temperature corner is
    the most expensive."""
    space_file = {
        "num_temps": {"low": 5, "high": 30, "type": "int"},
        "ti_rule": {"choices": ["trapezoid", "kl_example"]},
        "chains_per_example": {"low": 2, "high": 5, "type": "int"},
    }
    base = dataclasses.replace(BASE, ebm_gradient="chains")
    with pytest.raises(SearchError, match="ti_rule = 'kl_example' is refused.*too few"):
        load_space(write(tmp_path, space_file), base)  # no corner lets kl_example run: a space error
    space_file["chains_per_example"]["high"] = 6
    space = load_space(write(tmp_path, space_file), base)
    chosen = most_expensive_corner(space, base)
    assert (chosen.num_temps, chosen.chains_per_example) == (30, 6)
    # trapezoid and kl_example plan alike at equal shapes: the first corner wins the tie.
    assert chosen.ti_rule == "trapezoid"


def test_a_space_of_too_many_corners_climbs_and_says_so(tmp_path, monkeypatch):
    """Above MAX_CORNERS the corner is found field by field, with a warning: here the climb still finds
    the enumeration's answer (the plan grows in num_temps, chains_per_example and ebm_gradient=chains)."""
    space_file = {
        "num_temps": {"low": 5, "high": 30, "type": "int"},
        "ebm_gradient": {"choices": ["none", "chains", "ml"]},
        "chains_per_example": {"choices": [1, 3]},
    }
    space = load_space(write(tmp_path, space_file), BASE)
    enumerated = most_expensive_corner(space, BASE)
    monkeypatch.setattr("sweep.space.MAX_CORNERS", 4)
    with pytest.warns(UserWarning, match="the space has 12 corners, more than 4"):
        climbed = most_expensive_corner(space, BASE)
    assert climbed == enumerated
    assert (climbed.num_temps, climbed.ebm_gradient, climbed.chains_per_example) == (30, "chains", 3)


def test_importing_space_loads_neither_ray_nor_jax():
    code = "import sys, sweep.space; print(sorted({'ray', 'jax'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
