"""The two training objectives, as losses whose gradients are the paper's learning gradients.

vanilla (Eq. 7-9): prior and posterior chains are stop-gradient samples;
    loss = [mean f(z_prior) - mean f(z_post)] + mean ||x - g(z_post)||^2 / (2 sigma_l^2).
thermo (Eq. 15-22): M posterior chains per example at every temperature t_i; the loss value is minus a
    TI estimate of log p(x) by one of TI_RULES, e.g. (kl_batch, the paper's)
    -[ sum_i dt_i (E_{i-1}+E_i)/2 + eta/2 sum_i (KL(p_{i-1}||p_i) - KL(p_i||p_{i-1})) ].
    Its gradient is chosen per network. EBM (`ebm_gradient`): `chains` differentiates the estimate
    through the Langevin chains (the paper's text; both networks' gradients then flow through them),
    `none` stops gradients at the chains (the published code: alpha gets none), `ml` is the
    maximum-likelihood gradient mean grad f(z_{t=1}) - mean grad f(z_prior). Generator (`gen_gradient`):
    `ti` differentiates the estimate, `ml` is E_{t=1}[grad_beta log p(x|z)].

Data parallelism: under `axis_name`, per-example means stay local (the caller averages gradients with
pmean), while the Gaussians fitted across the batch (kl_batch) use the statistics of the whole batch
(psum). That makes the averaged gradient equal to the full-batch gradient whatever the device count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from model.config import EBM_GRADIENTS, GEN_GRADIENTS, TI_RULES
from model.langevin import langevin_chain, power_posterior_log_density, prior_log_density
from model.nets import log_likelihood
from model.thermo import (
    adjacent_gaussian_kls,
    example_gaussian_kls,
    example_identity_moments,
    kl_identity_residual,
    stepping_stone_log_evidence,
    temperature_schedule,
    trapezoid_log_evidence,
    trapezoid_weights,
    variance_corrected_log_evidence,
)

Params = dict[str, Any]  # {"ebm": ..., "gen": ...}


class Networks(NamedTuple):
    """How to apply the two networks: energy(ebm_params, z) -> f_alpha(z); generate(gen_params, z) -> g(z)."""

    energy: Callable[[Any, Array], Array]
    generate: Callable[[Any, Array], Array]


class Hyper(NamedTuple):
    """Hyper-parameters that are traced, not static: cells differing only in these share a compiled step."""

    temp_power: Array
    kl_weight: Array
    prior_step_size: Array
    posterior_step_size: Array
    prior_sigma: Array
    lkhood_sigma: Array
    kl_ridge: Array

    @classmethod
    def from_config(cls, config: Any) -> Hyper:
        return cls(*(jnp.asarray(getattr(config, f), jnp.float32) for f in cls._fields))


def example_noise(key: Array, example_ids: Array, shape: tuple[int, ...]) -> Array:
    """Standard normal draws of `shape` for each example, from fold_in(key, global example id):
    (len(example_ids),) + shape. Independent of how the batch is split across devices."""
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(example_ids)


def _chain_inputs(
    key: Array, example_ids: Array, lead: tuple[int, ...], steps: int, z_dim: int, prior_sigma: Array
) -> tuple[Array, Array]:
    """z0 ~ N(0, sigma_0^2 I) and the Langevin noise for chains shaped lead + (B, d), B = len(ids).
    Returns z0: lead + (B, d) and noise: (K,) + lead + (B, d)."""
    draws = example_noise(key, example_ids, (steps + 1,) + lead + (z_dim,))  # (B, K+1, *lead, d)
    draws = jnp.moveaxis(draws, 0, -2)  # (K+1, *lead, B, d)
    return prior_sigma * draws[0], draws[1:]


def sample_prior(
    nets: Networks,
    ebm_params: Any,
    key: Array,
    example_ids: Array,
    steps: int,
    z_dim: int,
    hp: Hyper,
    unroll: bool = False,
) -> Array:
    """z ~ p_alpha(z) by K prior Langevin steps from N(0, sigma_0^2 I) (Eq. 11): (B, d)."""
    z0, noise = _chain_inputs(key, example_ids, (), steps, z_dim, hp.prior_sigma)
    density = prior_log_density(lambda z: nets.energy(ebm_params, z), hp.prior_sigma)
    return langevin_chain(density, z0, noise, hp.prior_step_size, unroll)


def sample_power_posteriors(
    nets: Networks,
    params: Params,
    x: Array,
    temps: Array,
    key: Array,
    example_ids: Array,
    steps: int,
    z_dim: int,
    hp: Hyper,
    unroll: bool = False,
    chains: int = 1,
) -> Array:
    """z ~ p(z|x, t_i) by K Langevin steps (Eq. 17), `chains` = M chains per example and temperature:
    (N_t, B, d), or (N_t, M, B, d) when chains > 1."""
    lead = (temps.shape[0], chains)
    z0, noise = _chain_inputs(key, example_ids, lead, steps, z_dim, hp.prior_sigma)
    density = power_posterior_log_density(
        lambda z: nets.energy(params["ebm"], z),
        lambda z: log_likelihood(x, nets.generate(params["gen"], z), hp.lkhood_sigma),
        temps[:, None, None],
        hp.prior_sigma,
    )
    z = langevin_chain(density, z0, noise, hp.posterior_step_size, unroll)
    return z[:, 0] if chains == 1 else z


def vanilla_loss(
    params: Params,
    x: Array,
    key: Array,
    example_ids: Array,
    hp: Hyper,
    *,
    nets: Networks,
    prior_steps: int,
    posterior_steps: int,
    z_dim: int,
    axis_name: str | None = None,
    unroll: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """The vanilla LEBM loss (Eq. 7-9) on the local batch; its gradient is -(delta_alpha, delta_beta).

    Returns (loss, aux) with aux = {ebm_loss, gen_loss}. The loss value is a surrogate whose gradient is
    the learning gradient; it is not log p(x)."""
    k_prior, k_post = jax.random.split(key)
    z_prior = jax.lax.stop_gradient(
        sample_prior(nets, params["ebm"], k_prior, example_ids, prior_steps, z_dim, hp, unroll)
    )
    temps_one = jnp.ones((1,), jnp.float32)
    z_post = sample_power_posteriors(
        nets, params, x, temps_one, k_post, example_ids, posterior_steps, z_dim, hp, unroll
    )[0]
    z_post = jax.lax.stop_gradient(z_post)
    ebm_loss = jnp.mean(nets.energy(params["ebm"], z_prior)) - jnp.mean(nets.energy(params["ebm"], z_post))
    sq = jnp.sum((x - nets.generate(params["gen"], z_post)) ** 2, axis=(-3, -2, -1))
    gen_loss = jnp.mean(sq) / (2.0 * hp.lkhood_sigma**2)
    return ebm_loss + gen_loss, {"ebm_loss": ebm_loss, "gen_loss": gen_loss}


def fitted_gaussians(z: Array, ridge: Array, axis_name: str | None = None) -> tuple[Array, Array]:
    """Mean and covariance (+ ridge I) of the batch of chain samples at each temperature.

    z: (N_t, B, d). Under `axis_name` the sufficient statistics are summed over devices, so the fit uses
    the whole batch. Returns means (N_t, d) and covariances (N_t, d, d) (unbiased, divisor n - 1)."""
    n = jnp.asarray(z.shape[1], z.dtype)
    s1 = jnp.sum(z, axis=1)
    s2 = jnp.einsum("tbi,tbj->tij", z, z)
    if axis_name is not None:
        n, s1, s2 = jax.lax.psum((n, s1, s2), axis_name)
    mean = s1 / n
    cov = (s2 - n * mean[:, :, None] * mean[:, None, :]) / (n - 1.0)
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2)) + ridge * jnp.eye(z.shape[-1], dtype=z.dtype)
    return mean, cov


def ti_estimate(
    rule: str, temps: Array, loglik: Array, z: Array, hp: Hyper, axis_name: str | None = None
) -> tuple[Array, dict[str, Array]]:
    """log p(x) from the chains by `rule` (one of TI_RULES), in nats per image, averaged over the local batch.

    loglik: (N_t, M, B) log p(x_b|z) per chain; z: (N_t, M, B, d). Returns (estimate, readings) with
    readings = {expected_loglik (N_t,), kl_forward, kl_backward, kl_identity (N_t - 1,)}; the KL readings
    are NaN for rules that fit no Gaussians. kl_identity is the residual of the KL identity per interval:
    of the batch's Gaussians (kl_batch), or the signed mean over x of the per-x residuals (kl_example);
    kl_identity_moments (5, N_t - 1) are `example_identity_moments` for kl_example, NaN otherwise.
    kl_weight (eta) scales the KL correction of both KL rules. variance and stepping_stone need M >= 2 (with
    M = 1 the variance is NaN and stepping-stone is the left Riemann sum), as the config does; M is static.
    """
    if rule in ("variance", "stepping_stone") and loglik.shape[1] < 2:
        raise ValueError(
            f"chains_per_example={loglik.shape[1]} is too few for ti_rule={rule}, which works "
            "from the spread of each example's chains; set chains_per_example=2 or more"
        )
    expected = jnp.mean(loglik, axis=(1, 2))
    nan = jnp.full((temps.shape[0] - 1,), jnp.nan, loglik.dtype)
    kl_forward = kl_backward = identity = nan
    moments = jnp.full((5, temps.shape[0] - 1), jnp.nan, loglik.dtype)
    if rule == "kl_batch":
        n_t, m, b, d = z.shape
        mean, cov = fitted_gaussians(z.reshape(n_t, m * b, d), hp.kl_ridge, axis_name)
        kl_forward, kl_backward = adjacent_gaussian_kls(mean, cov)
        identity = kl_identity_residual(temps, expected, kl_forward, kl_backward)
    elif rule == "kl_example":
        per_example = example_gaussian_kls(z)
        kl_forward, kl_backward = (jnp.mean(k, axis=-1) for k in per_example)
        # The signed mean over examples, so Monte Carlo noise cancels; residuals systematic per x that
        # cancel across examples are the split-half check's (example_identity_moments).
        identity = jnp.mean(kl_identity_residual(temps, jnp.mean(loglik, axis=1), *per_example), axis=-1)
        moments = example_identity_moments(temps, loglik, z)
    if rule in ("kl_batch", "kl_example"):
        estimate = trapezoid_log_evidence(temps, expected, kl_forward, kl_backward, hp.kl_weight)
    elif rule == "variance":
        variance = jnp.mean(jnp.var(loglik, axis=1, ddof=1), axis=-1)
        estimate = variance_corrected_log_evidence(temps, expected, variance)
    elif rule == "stepping_stone":
        estimate = jnp.mean(stepping_stone_log_evidence(temps, loglik))
    elif rule == "trapezoid":
        estimate = trapezoid_log_evidence(temps, expected)
    else:
        raise ValueError(f"ti_rule={rule!r} is unknown; use one of {', '.join(TI_RULES)}")
    readings = {
        "expected_loglik": expected,
        "kl_forward": kl_forward,
        "kl_backward": kl_backward,
        "kl_identity": identity,
        "kl_identity_moments": moments,
    }
    return estimate, readings


def _surrogate(term: Array) -> Array:
    """A term with value 0 and gradient grad(term): adds a gradient without changing the loss value."""
    return term - jax.lax.stop_gradient(term)


def thermo_loss(
    params: Params,
    x: Array,
    key: Array,
    example_ids: Array,
    hp: Hyper,
    *,
    nets: Networks,
    num_temps: int,
    posterior_steps: int,
    z_dim: int,
    ti_rule: str = "kl_batch",
    chains_per_example: int = 1,
    ebm_gradient: str = "chains",
    gen_gradient: str = "ti",
    prior_steps: int = 0,
    axis_name: str | None = None,
    unroll: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """Minus the TI estimate of log p(x) by `ti_rule` (Eq. 22 for kl_batch), in nats per image, with the
    gradients chosen by `ebm_gradient` and `gen_gradient` (see the module docstring).

    Static: num_temps, posterior_steps, prior_steps (the prior chain of ebm_gradient=ml), z_dim, ti_rule,
    chains_per_example (M), ebm_gradient, gen_gradient. Traced: everything in `hp`. The loss value is the
    estimate whatever the gradients; the ml gradients enter as zero-valued surrogates.
    Returns (loss, aux) with aux = {log_evidence, temps, weights (N_t,), and ti_estimate's readings}.
    Under `axis_name`, means are over the local batch and kl_batch's Gaussians over the whole batch."""
    if ebm_gradient not in EBM_GRADIENTS:
        raise ValueError(f"ebm_gradient={ebm_gradient!r} is unknown; use one of {', '.join(EBM_GRADIENTS)}")
    if gen_gradient not in GEN_GRADIENTS:
        raise ValueError(f"gen_gradient={gen_gradient!r} is unknown; use one of {', '.join(GEN_GRADIENTS)}")
    through_chains = ebm_gradient == "chains"
    # The TI estimate carries a network's gradient only where that network's gradient is `chains`/`ti`.
    ti_params = {
        "ebm": params["ebm"] if through_chains else jax.lax.stop_gradient(params["ebm"]),
        "gen": params["gen"] if gen_gradient == "ti" else jax.lax.stop_gradient(params["gen"]),
    }
    temps = temperature_schedule(num_temps, hp.temp_power)
    z = sample_power_posteriors(
        nets, ti_params, x, temps, key, example_ids, posterior_steps, z_dim, hp, unroll, chains_per_example
    )
    if chains_per_example == 1:
        z = z[:, None]  # (N_t, M, B, d)
    if not through_chains:
        z = jax.lax.stop_gradient(z)
    loglik = log_likelihood(x, nets.generate(ti_params["gen"], z), hp.lkhood_sigma)  # (N_t, M, B)
    log_evidence, readings = ti_estimate(ti_rule, temps, loglik, z, hp, axis_name)
    loss = -log_evidence
    z_post = jax.lax.stop_gradient(z[-1])  # the t = 1 chains: posterior samples, (M, B, d)
    if ebm_gradient == "ml":
        k_prior = jax.random.split(key)[1]  # the posterior chains keep `key` itself
        z_prior = jax.lax.stop_gradient(
            sample_prior(nets, params["ebm"], k_prior, example_ids, prior_steps, z_dim, hp, unroll)
        )
        loss = loss + _surrogate(
            jnp.mean(nets.energy(params["ebm"], z_prior)) - jnp.mean(nets.energy(params["ebm"], z_post))
        )
    if gen_gradient == "ml":
        loss = loss - _surrogate(
            jnp.mean(log_likelihood(x, nets.generate(params["gen"], z_post), hp.lkhood_sigma))
        )
    aux = {"log_evidence": log_evidence, "temps": temps, "weights": trapezoid_weights(temps), **readings}
    return loss, aux
