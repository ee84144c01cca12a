"""The pre-compile memory estimate (model.plan.memory) against XLA's compiled memory analysis.

The paper-shape steps compile with K = 2 Langevin steps instead of 20-60: the chains are `lax.scan`
loops whose steps are rematerialised, so K changes the memory only by K x (chains x z_dim) floats of
kept latents and noise (a few MB at the paper's shapes, counted by the estimate) and leaves the
per-step shapes, which dominate, unchanged. Compiling them with the paper's K would only cost time.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import loop
from model import step as steps
from model.bench.train_step import workloads
from model.config import get_preset
from model.objectives import Hyper
from model.plan import memory

TOLERANCE = 0.30


def _compiled_bytes(fn, *args) -> int:
    mem = fn.lower(*args).compile().memory_analysis()
    mem = mem[0] if isinstance(mem, list) else mem
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)


def compiled_step_bytes(config, n_devices: int = 1) -> int:
    devices = jax.local_devices()[:n_devices]
    fn = steps.compiled_train_step(steps.StepSpec.from_config(config), tuple(devices))
    state = loop.init_state(config)
    carry, lrs = loop.step_inputs(config, state, 1, devices)
    x = np.zeros((n_devices, config.batch_size // n_devices) + config.image_shape, np.float32)
    return _compiled_bytes(fn, carry, x, state.key, Hyper.from_config(config), lrs)


def _paper(preset: str, **kw):
    return get_preset(preset, eval_every=0, prior_steps=2, posterior_steps=2, **kw)


W = workloads()
CASES = {
    "digits-vanilla": W["digits-vanilla"],
    "digits-thermo-nt5": W["digits-thermo-nt5"],
    "digits-thermo-nt10-stopgrad": dataclasses.replace(W["digits-thermo-nt10"], ebm_gradient="none"),
    "digits-vanilla-lax": dataclasses.replace(W["digits-vanilla"], conv_impl="lax"),
    "ref-vanilla": W["ref-vanilla"],
    "ref-thermo-nt5": W["ref-thermo-nt5"],
    "ref-thermo-nt5-chain": W["ref-thermo-nt5-chain"],
    "ref-thermo-nt5-lax": dataclasses.replace(W["ref-thermo-nt5"], conv_impl="lax"),
}
PAPER_CASES = {
    "celeba-vanilla-b75": _paper("celeba"),
    "celeba-thermo-nt10-stopgrad": _paper("celeba", objective="thermo", ebm_gradient="none"),
    "cifar10-thermo-nt10-chain": _paper("cifar10", objective="thermo"),
}


def _check(config, n_devices: int = 1) -> None:
    compiled = compiled_step_bytes(config, n_devices)
    estimate = memory.estimate_step_memory(config, n_devices)
    assert abs(estimate - compiled) <= TOLERANCE * compiled, (estimate, compiled, estimate / compiled)


@pytest.mark.parametrize("name", list(CASES))
def test_step_estimate_within_30_percent_of_xla(name):
    _check(CASES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PAPER_CASES))
def test_step_estimate_within_30_percent_of_xla_at_paper_shapes(name):
    _check(PAPER_CASES[name])


def test_step_estimate_per_device_on_two_devices():
    assert len(jax.local_devices()) >= 2
    _check(get_preset("digits", eval_every=0, objective="thermo", num_temps=5, batch_size=50), 2)


def test_eval_and_generation_estimates_within_30_percent():
    for config in (CASES["ref-vanilla"], CASES["ref-thermo-nt5"]):
        devices = jax.local_devices()[:1]
        spec = steps.StepSpec.from_config(config)
        state = loop.init_state(config)
        params = {"ebm": state.ebm_params, "gen": state.gen_params}
        rep = steps.replicate(params, devices)
        x = np.zeros((1, config.batch_size) + config.image_shape, np.float32)
        compiled = _compiled_bytes(
            steps.compiled_eval_step(spec, tuple(devices)), rep, x, state.key, Hyper.from_config(config)
        )
        estimate = memory.estimate_eval_memory(config)
        assert abs(estimate - compiled) <= TOLERANCE * compiled, (config.objective, estimate, compiled)
    config = CASES["ref-vanilla"]
    fn = steps.compiled_generate(steps.StepSpec.from_config(config), 200)
    compiled = _compiled_bytes(fn, state.ebm_params, state.gen_params, state.key, Hyper.from_config(config))
    estimate = memory.estimate_generate_memory(config, 200)
    assert abs(estimate - compiled) <= TOLERANCE * compiled, ("generate", estimate, compiled)


def test_absurd_num_temps_is_sized_without_compiling():
    config = get_preset("celeba", objective="thermo", num_temps=100_000_000)
    # 1e8 temperatures x 75 chains x the generator's activations: far beyond any device
    assert memory.estimate_step_memory(config) > 1e15
    assert memory.estimate_step_memory(config, n_devices=8) < memory.estimate_step_memory(config)


def test_parameter_count_matches_the_networks():
    for config in (CASES["digits-vanilla"], CASES["ref-vanilla"], PAPER_CASES["celeba-vanilla-b75"]):
        state = loop.init_state(config)
        count = lambda tree: sum(int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(tree))  # noqa: E731
        assert memory.parameter_count(config) == (count(state.ebm_params), count(state.gen_params))
