"""The two training objectives, as losses whose gradients are the paper's learning gradients.

vanilla (Eq. 7-9): prior and posterior chains are stop-gradient samples;
    loss = [mean f(z_prior) - mean f(z_post)] + mean ||x - g(z_post)||^2 / (2 sigma_l^2).
thermo (Eq. 15-22): one posterior chain per example at every temperature t_i;
    loss = -[ sum_i dt_i (E_{i-1}+E_i)/2 + eta/2 sum_i (KL(p_{i-1}||p_i) - KL(p_i||p_{i-1})) ],
    alpha's gradient flows only through the chains (or nowhere, with chain_gradient=False: the
    published code's behaviour).

Data parallelism: under `axis_name`, per-example means stay local (the caller averages gradients with
pmean), while the Gaussians fitted for the KL term use the statistics of the whole batch (psum). That
makes the averaged gradient equal to the full-batch gradient whatever the device count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from model.langevin import langevin_chain, power_posterior_log_density, prior_log_density
from model.nets import log_likelihood
from model.thermo import adjacent_gaussian_kls, temperature_schedule, trapezoid_log_evidence

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


def _chain_inputs(key: Array, example_ids: Array, lead: tuple[int, ...], steps: int, z_dim: int,
                  prior_sigma: Array) -> tuple[Array, Array]:
    """z0 ~ N(0, sigma_0^2 I) and the Langevin noise for chains shaped lead + (B, d), B = len(ids).
    Returns z0: lead + (B, d) and noise: (K,) + lead + (B, d)."""
    draws = example_noise(key, example_ids, (steps + 1,) + lead + (z_dim,))  # (B, K+1, *lead, d)
    draws = jnp.moveaxis(draws, 0, -2)  # (K+1, *lead, B, d)
    return prior_sigma * draws[0], draws[1:]


def sample_prior(nets: Networks, ebm_params: Any, key: Array, example_ids: Array, steps: int,
                 z_dim: int, hp: Hyper, unroll: bool = False) -> Array:
    """z ~ p_alpha(z) by K prior Langevin steps from N(0, sigma_0^2 I) (Eq. 11): (B, d)."""
    z0, noise = _chain_inputs(key, example_ids, (), steps, z_dim, hp.prior_sigma)
    density = prior_log_density(lambda z: nets.energy(ebm_params, z), hp.prior_sigma)
    return langevin_chain(density, z0, noise, hp.prior_step_size, unroll)


def sample_power_posteriors(nets: Networks, params: Params, x: Array, temps: Array, key: Array,
                            example_ids: Array, steps: int, z_dim: int, hp: Hyper,
                            unroll: bool = False) -> Array:
    """z ~ p(z|x, t_i) for every temperature and example by K Langevin steps (Eq. 17): (N_t, B, d)."""
    z0, noise = _chain_inputs(key, example_ids, (temps.shape[0],), steps, z_dim, hp.prior_sigma)
    density = power_posterior_log_density(
        lambda z: nets.energy(params["ebm"], z),
        lambda z: log_likelihood(x, nets.generate(params["gen"], z), hp.lkhood_sigma),
        temps[:, None],
        hp.prior_sigma,
    )
    return langevin_chain(density, z0, noise, hp.posterior_step_size, unroll)


def vanilla_loss(params: Params, x: Array, key: Array, example_ids: Array, hp: Hyper, *, nets: Networks,
                 prior_steps: int, posterior_steps: int, z_dim: int, axis_name: str | None = None,
                 unroll: bool = False) -> tuple[Array, dict[str, Array]]:
    """The vanilla LEBM loss (Eq. 7-9) on the local batch; its gradient is -(delta_alpha, delta_beta).

    Returns (loss, aux) with aux = {ebm_loss, gen_loss}. The loss value is a surrogate whose gradient is
    the learning gradient; it is not log p(x)."""
    k_prior, k_post = jax.random.split(key)
    z_prior = jax.lax.stop_gradient(
        sample_prior(nets, params["ebm"], k_prior, example_ids, prior_steps, z_dim, hp, unroll))
    temps_one = jnp.ones((1,), jnp.float32)
    z_post = sample_power_posteriors(nets, params, x, temps_one, k_post, example_ids, posterior_steps,
                                     z_dim, hp, unroll)[0]
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


def thermo_loss(params: Params, x: Array, key: Array, example_ids: Array, hp: Hyper, *, nets: Networks,
                num_temps: int, posterior_steps: int, z_dim: int, chain_gradient: bool = True,
                axis_name: str | None = None, unroll: bool = False) -> tuple[Array, dict[str, Array]]:
    """The negative TI estimate of log p(x) (Eq. 22 with the KL terms as a difference), in nats per image.

    Returns (loss, aux) with aux = {log_evidence, expected_loglik (N_t,), kl_forward, kl_backward (N_t-1,)}.
    Under `axis_name`, E_i is the local batch mean and the KL term uses the whole batch's Gaussians."""
    temps = temperature_schedule(num_temps, hp.temp_power)
    z = sample_power_posteriors(nets, params, x, temps, key, example_ids, posterior_steps, z_dim, hp,
                                unroll)
    if not chain_gradient:
        z = jax.lax.stop_gradient(z)
    loglik = log_likelihood(x, nets.generate(params["gen"], z), hp.lkhood_sigma)  # (N_t, B)
    expected = jnp.mean(loglik, axis=1)
    mean, cov = fitted_gaussians(z, hp.kl_ridge, axis_name)
    kl_forward, kl_backward = adjacent_gaussian_kls(mean, cov)
    log_evidence = trapezoid_log_evidence(temps, expected, kl_forward, kl_backward, hp.kl_weight)
    aux = {"log_evidence": log_evidence, "expected_loglik": expected, "kl_forward": kl_forward,
           "kl_backward": kl_backward}
    return -log_evidence, aux
