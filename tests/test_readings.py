"""The evaluation readings in the training loop (model/readings.py): columns, cadence, sizes, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.config import ExperimentConfig, get_preset
from model.data import load_dataset
from model.loop import init_state, run_epoch
from model.readings import READING_NAMES, evaluation_readings, validation_subset
from model.schema import READING_COLUMNS

TINY = dict(
    num_train=64,
    num_val=24,
    batch_size=16,
    z_dim=4,
    ebm_width=8,
    gen_width=1,
    prior_steps=2,
    posterior_steps=2,
    epochs=2,
    eval_every=2,
    sample_every=0,
    val_ll_examples=6,
    val_ll_temps=5,
    val_ll_chains=2,
    val_ll_prior_chains=8,
    grad_noise_draws=3,
)


def test_readings_arrive_at_the_eval_cadence_with_their_times():
    config = get_preset("digits", **TINY)
    dataset = load_dataset(config)
    state = init_state(config)
    state, first = run_epoch(config, state, dataset)
    assert all(math.isnan(first[name]) for name in READING_NAMES)  # epoch 1: not on the cadence
    state, second = run_epoch(config, state, dataset)
    assert all(math.isfinite(second[name]) for name in READING_NAMES), second
    assert second["val_ll_stderr"] > 0 and second["val_ll_time_s"] > 0 and second["grad_noise_time_s"] > 0
    assert second["grad_noise_gen"] > 0 and second["grad_noise_ebm"] > 0
    assert set(READING_NAMES) <= set(READING_COLUMNS)  # every reading is a documented column


def test_a_reading_turned_off_is_nan_and_the_subset_is_fixed():
    config = get_preset(
        "digits", **dict(TINY, val_ll_examples=0, grad_noise_draws=0, objective="thermo", num_temps=3)
    )
    dataset = load_dataset(config)
    params = init_state(config)
    out = evaluation_readings(
        config, {"ebm": params.ebm_params, "gen": params.gen_params}, dataset.train, dataset.val, 1
    )
    assert all(math.isnan(v) for v in out.values())
    images = np.arange(50, dtype=np.float32)[:, None, None, None]
    np.testing.assert_array_equal(validation_subset(images, 10), validation_subset(images, 10))
    assert len(validation_subset(images, 80)) == 50


@pytest.mark.parametrize(
    ("field", "value"),
    [("val_ll_examples", 1), ("grad_noise_draws", 1), ("val_ll_temps", 0), ("val_ll_chains", 0)],
)
def test_bad_sizes_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"{field}={value}"):
        ExperimentConfig(**{field: value})
