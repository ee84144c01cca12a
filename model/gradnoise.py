"""Gradient noise: how much the learning gradient changes between minibatches and Langevin chains.

`grad_var` (the paper's Var_theta[grad L]) is the spread of the entries of one gradient, about ||g||^2 / P
for P entries: it includes the mean signal. The noise the paper's argument is about is the variance of the
gradient g(b, k) over minibatches b and chain keys k at fixed parameters. With m(b) = E_k g(b, k):

    Var g = Var_b m(b) + E_b Var_k g(b, k)    (data part + Langevin part).

`gradient_noise` draws G minibatches b_i (each B examples without replacement, independent across i) and
two independent chain keys per batch, g_i = g(b_i, k_i) and g'_i = g(b_i, k'_i). Per entry:

- total: the sample variance of g_1..g_G (independent batches and keys), divisor G - 1;
- Langevin part: sum_i (g_i - g'_i)^2 / (2G) (same batch, different keys): unbiased for E_b Var_k g;
- data part: the sample covariance of g_i with g'_i across batches: the chain noise of the two
  replicates is independent given the batch, so it is unbiased for Var_b m(b).

Each is measured from its own contrast, none as another's remainder, so total ~ data + Langevin is a check.
Each is reported as the mean over a network's entries (trace(Cov) / P, the units of `grad_var`). The SNR
is ||mean g||^2 / trace(Cov) with the signal's noise bias removed: E||g_bar||^2 = ||mu||^2 + trace(Cov)/G,
so signal = ||g_bar||^2 - trace(Cov)/G. Pure noise reads ~0 (the naive ratio would read 1/G) and may read
below 0; a noiseless gradient reads inf.

Only the SNR's numerator is unbiased: the ratio of an unbiased signal to an estimated trace reads high,
E[1/trace_hat] > 1/trace. When the noise is concentrated in a few directions the trace is read from
about G - 1 degrees of freedom and the bias approaches (G - 1)/(G - 3) (1.4 at G = 8): rank-1 noise of true
SNR 1 reads (1 + 1/G)(G - 1)/(G - 3) - 1/G = 1.45 at G = 8; noise spread over many entries reads ~1.00.
A jackknife over the G draws does not remove it. We keep G = 8 (DEFAULT_DRAWS) for cost: the reading
takes 2G gradients, and G = 32, which would bound the bias near 7%, costs four times as much; compare
SNRs between cells at equal G, where the bias factor is common as long as the noise's rank is similar.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_DRAWS = 8  # G: the reading costs 2G gradients, so G = 32 would cost 4x (docs/readings.md)
GradFn = Callable[[Any, np.ndarray, jax.Array], dict[str, Any]]  # (params, x_batch, key) -> {net: grads}
NETWORKS = ("ebm", "gen")


def _flat(tree: Any) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


@jax.jit
def _accumulate(
    acc: dict[str, jax.Array], shift: jax.Array, g: jax.Array, g2: jax.Array
) -> dict[str, jax.Array]:
    """Running per-entry sums of the shifted draws (the shift keeps float32 sums well conditioned)."""
    a, b = g - shift, g2 - shift
    return {
        "s1": acc["s1"] + a,
        "s11": acc["s11"] + a * a,
        "s2": acc["s2"] + b,
        "s12": acc["s12"] + a * b,
        "dd": acc["dd"] + (a - b) ** 2,
    }


@jax.jit
def _summarise(acc: dict[str, jax.Array], shift: jax.Array, draws: int) -> dict[str, jax.Array]:
    g = jnp.asarray(draws, jnp.float32)
    var = (acc["s11"] - acc["s1"] ** 2 / g) / (g - 1.0)
    cross = (acc["s12"] - acc["s1"] * acc["s2"] / g) / (g - 1.0)
    langevin = acc["dd"] / (2.0 * g)
    mean = shift + acc["s1"] / g
    trace = jnp.sum(var)
    signal = jnp.sum(mean**2) - trace / g
    # Without noise: a signal reads inf; a gradient that is exactly 0 (e.g. the EBM's under stop-gradient
    # chains) has no signal and reads 0, never NaN.
    noiseless = jnp.where(signal > 0, jnp.inf, 0.0)
    snr = jnp.where(trace > 0, signal / jnp.where(trace > 0, trace, 1.0), noiseless)
    return {"total": jnp.mean(var), "data": jnp.mean(cross), "langevin": jnp.mean(langevin), "snr": snr}


def minibatches(num: int, batch_size: int, draws: int, seed: Any) -> list[np.ndarray]:
    """`draws` index sets of `batch_size` examples, each without replacement from range(num) and
    independent of the others."""
    if not 1 <= batch_size <= num:
        raise ValueError(f"batch_size={batch_size} must be between 1 and the {num} examples available")
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(num, batch_size, replace=False)) for _ in range(draws)]


def gradient_noise(
    grad_fn: GradFn,
    params: Any,
    data: np.ndarray,
    key: jax.Array,
    *,
    batch_size: int,
    draws: int = DEFAULT_DRAWS,
) -> dict[str, float]:
    """Gradient noise at fixed `params` from `draws` (G >= 2) minibatches of `data`, two chain keys each.

    grad_fn(params, x_batch, key) must return {"ebm": pytree, "gen": pytree} (the minibatch gradient).
    Returns, per network n in (ebm, gen): grad_noise_n (mean per-entry variance over minibatches and
    chains), grad_noise_data_n and grad_noise_langevin_n (its two parts, each from its own draws) and
    grad_snr_n (bias-corrected signal over trace(Cov); inf when noiseless). Costs 2G gradients."""
    if draws < 2:
        raise ValueError(f"grad_noise_draws={draws} must be >= 2 (a variance needs two draws)")
    seed = np.asarray(jax.random.key_data(jax.random.fold_in(key, 0)), np.uint32).ravel()
    batches = minibatches(len(data), batch_size, draws, seed)
    acc: dict[str, dict[str, jax.Array]] = {}
    shift: dict[str, jax.Array] = {}
    for i, idx in enumerate(batches):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i + 1))
        x = data[idx]
        g1, g2 = grad_fn(params, x, k1), grad_fn(params, x, k2)
        for net in NETWORKS:
            a, b = _flat(g1[net]), _flat(g2[net])
            if net not in shift:
                shift[net] = a
                acc[net] = {name: jnp.zeros_like(a) for name in ("s1", "s11", "s2", "s12", "dd")}
            acc[net] = _accumulate(acc[net], shift[net], a, b)
    out: dict[str, float] = {}
    for net in NETWORKS:
        s = jax.device_get(_summarise(acc[net], shift[net], draws))
        out.update(
            {
                f"grad_noise_{net}": float(s["total"]),
                f"grad_noise_data_{net}": float(s["data"]),
                f"grad_noise_langevin_{net}": float(s["langevin"]),
                f"grad_snr_{net}": float(s["snr"]),
            }
        )
    return out
