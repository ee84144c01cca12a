"""The readings taken every `eval_every` epochs beside image fidelity, the same for every model:
the validation log-likelihood by AIS (`model.ais`) and the gradient noise (`model.gradnoise`), each with
its wall time. Sizes come from the config (`val_ll_*`, `grad_noise_draws`; 0 turns a reading off).

`val_ll` uses a fixed validation subset, the same for every model and seed, so cells are compared on the
same images; its chains are seeded by (seed, epoch) and do not consume the training key. The gradient
noise is measured at the parameters after the epoch, with the training batch size and objective.

This module *takes* the readings, during training (on the device, from a train state). Their analysis
after a run, per cell and as paired differences between cells, is `analysis.readings` (from the Parquet
tables; it imports nothing from here).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model import streams
from model.ais import log_z_data, log_z_prior, val_ll_and_stderr
from model.config import ExperimentConfig
from model.gradnoise import NETWORKS, gradient_noise
from model.objectives import Hyper
from model.step import StepSpec, loss_fn, network_fns

VAL_LL_COLUMNS = ("val_ll", "val_ll_stderr", "val_ll_time_s")
GRAD_NOISE_COLUMNS = tuple(
    f"{stat}_{net}"
    for net in NETWORKS
    for stat in ("grad_noise", "grad_noise_data", "grad_noise_langevin", "grad_snr")
) + ("grad_noise_time_s",)
READING_NAMES = VAL_LL_COLUMNS + GRAD_NOISE_COLUMNS
_SUBSET_SEED = 20_251_125  # the validation subset: one fixed draw for every model and seed
_CHUNK = 64  # validation examples per AIS call (bounds memory at chunk * chains latents per step)


def validation_subset(images: np.ndarray, num: int) -> np.ndarray:
    """The first min(num, len(images)) of one fixed permutation of the validation images."""
    order = np.random.default_rng(_SUBSET_SEED).permutation(len(images))
    return images[np.sort(order[: min(num, len(images))])]


@functools.lru_cache(maxsize=16)
def _compiled_log_z_prior(spec: StepSpec, num_temps: int, chains: int) -> Callable[..., Any]:
    nets = network_fns(spec)
    return jax.jit(
        lambda ebm, key, sigma: log_z_prior(
            nets, ebm, key, prior_sigma=sigma, z_dim=spec.z_dim, num_temps=num_temps, chains=chains
        )
    )


@functools.lru_cache(maxsize=16)
def _compiled_log_z_data(spec: StepSpec, num_temps: int, chains: int) -> Callable[..., Any]:
    nets = network_fns(spec)
    return jax.jit(
        lambda params, x, key, prior_sigma, lkhood_sigma: log_z_data(
            nets,
            params,
            x,
            key,
            prior_sigma=prior_sigma,
            lkhood_sigma=lkhood_sigma,
            z_dim=spec.z_dim,
            num_temps=num_temps,
            chains=chains,
        )
    )


def validation_log_likelihood(
    config: ExperimentConfig, params: dict[str, Any], images: np.ndarray, key: jax.Array
) -> dict[str, float]:
    """{val_ll, val_ll_stderr}: mean over the fixed validation subset of log Z_hat(x) - log Z_hat_alpha,
    nats per image (higher is better), and its standard error (over the subset's examples, plus the Monte
    Carlo error of the shared log Z_hat_alpha)."""
    spec = StepSpec.from_config(config)
    hp = Hyper.from_config(config)
    x = validation_subset(images, config.val_ll_examples)
    k_prior, k_data = jax.random.split(key)
    lz_prior, _, lz_prior_var = _compiled_log_z_prior(spec, config.val_ll_temps, config.val_ll_prior_chains)(
        params["ebm"], k_prior, hp.prior_sigma
    )
    fn = _compiled_log_z_data(spec, config.val_ll_temps, config.val_ll_chains)
    lz_x = [
        fn(params, x[lo : lo + _CHUNK], jax.random.fold_in(k_data, i), hp.prior_sigma, hp.lkhood_sigma)[0]
        for i, lo in enumerate(range(0, len(x), _CHUNK))
    ]
    lz_x = np.concatenate(jax.device_get(lz_x)).astype(np.float64)
    val_ll, stderr = val_ll_and_stderr(lz_x, float(lz_prior), float(lz_prior_var))
    return {"val_ll": float(val_ll), "val_ll_stderr": float(stderr)}


@functools.lru_cache(maxsize=16)
def compiled_gradient(spec: StepSpec) -> Callable[..., Any]:
    """grad(params, x (B, H, W, C), key, hyper) -> {"ebm", "gen"}: the learning gradient of one minibatch
    on one device (the same numbers as the data-parallel step: chain noise follows the example's index)."""
    loss = loss_fn(spec)

    def grad(params: Any, x: jax.Array, key: jax.Array, hp: Hyper) -> Any:
        ids = jnp.arange(x.shape[0])
        return jax.grad(lambda p: loss(p, x, key, ids, hp)[0])(params)

    return jax.jit(grad)


def evaluation_readings(
    config: ExperimentConfig,
    params: dict[str, Any],
    train: np.ndarray,
    val: np.ndarray,
    epoch: int,
    key: jax.Array | None = None,
) -> dict[str, float]:
    """val_ll (+ stderr) and the gradient noise per network at `params`, with their wall times; the
    readings a config turns off (size 0) are NaN. `key` defaults to the epoch's own (seed, epoch) key,
    the one training uses; `sweep.reevaluate` passes others for independent Monte Carlo draws."""
    out = dict.fromkeys(READING_NAMES, float("nan"))
    if key is None:
        key = streams.epoch_key(config.seed, streams.READINGS, epoch)
    if config.val_ll_examples and len(val) >= 2:
        start = time.perf_counter()
        out.update(validation_log_likelihood(config, params, val, jax.random.fold_in(key, 0)))
        out["val_ll_time_s"] = time.perf_counter() - start
    if config.grad_noise_draws:
        start = time.perf_counter()
        grad = compiled_gradient(StepSpec.from_config(config))
        hp = Hyper.from_config(config)
        out.update(
            gradient_noise(
                lambda p, x, k: grad(p, x, k, hp),
                params,
                train,
                jax.random.fold_in(key, 1),
                batch_size=config.batch_size,
                draws=config.grad_noise_draws,
            )
        )
        out["grad_noise_time_s"] = time.perf_counter() - start
    return out
