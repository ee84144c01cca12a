"""The two training objectives, as losses whose gradients are the paper's learning gradients.

vanilla (Eq. 7-9): prior and posterior chains are stop-gradient samples;
    loss = [mean f(z_prior) - mean f(z_post)] + mean ||x - g(z_post)||^2 / (2 sigma_l^2).
thermo (Eq. 15-22): M posterior chains per example at every temperature t_i; the loss value is minus a
    TI estimate of log p(x) by one of the evidence rules (model/rules.py), e.g. (kl_batch, the paper's)
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

from model import rules
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


class NetworkFns(NamedTuple):
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
    """Standard normal draws of `shape` for each example, from fold_in(key, global example id).
    Independent of how the batch is split across devices.

    Args:
      key: the step's key.
      example_ids: each example's index in the whole batch, shape (B,).
      shape: the draws' shape per example.

    Returns:
      The draws, shape (B,) + shape.
    """
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
    nets: NetworkFns,
    ebm_params: Any,
    key: Array,
    example_ids: Array,
    steps: int,
    z_dim: int,
    hp: Hyper,
    unroll: bool = False,
) -> Array:
    """z ~ p_alpha(z) by K prior Langevin steps from N(0, sigma_0^2 I) (Eq. 11), one chain per example.

    Args:
      nets: how to apply the networks (only `energy`, f_alpha, is used).
      ebm_params: alpha.
      key: the chains' key; each example's noise is folded from it by its id (`example_noise`).
      example_ids: each example's index in the whole batch, shape (B,).
      steps: K, the Langevin steps (static).
      z_dim: d (static).
      hp: the traced hyper-parameters (prior_sigma sigma_0, prior_step_size s).
      unroll: unroll the chain's loop (same numbers).

    Returns:
      The prior samples z_K, shape (B, d).
    """
    z0, noise = _chain_inputs(key, example_ids, (), steps, z_dim, hp.prior_sigma)
    density = prior_log_density(lambda z: nets.energy(ebm_params, z), hp.prior_sigma)
    return langevin_chain(density, z0, noise, hp.prior_step_size, unroll)


def sample_power_posteriors(
    nets: NetworkFns,
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
    """z ~ p(z|x, t_i) by K Langevin steps (Eq. 17) from N(0, sigma_0^2 I), M chains per example and
    temperature.

    Args:
      nets: how to apply the networks.
      params: {"ebm": alpha, "gen": beta}; gradients flow into whichever is not stop-gradient.
      x: the local batch of images, shape (B, H, W, C).
      temps: the temperatures t_i, shape (N_t,).
      key: the chains' key; each example's noise is folded from it by its id (`example_noise`).
      example_ids: each example's index in the whole batch, shape (B,).
      steps: K, the Langevin steps (static).
      z_dim: d (static).
      hp: the traced hyper-parameters (prior_sigma, lkhood_sigma sigma_l, posterior_step_size s).
      unroll: unroll the chain's loop (same numbers).
      chains: M, chains per example and temperature (static).

    Returns:
      The samples z_K, shape (N_t, B, d), or (N_t, M, B, d) when chains > 1.
    """
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
    nets: NetworkFns,
    prior_steps: int,
    posterior_steps: int,
    z_dim: int,
    unroll: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """The vanilla LEBM loss (Eq. 7-9) on the local batch; its gradient is -(delta_alpha, delta_beta).
    It has no statistic across the batch, so data parallelism needs no axis name: the caller averages
    the per-device gradients (pmean).

    Args:
      params: {"ebm": alpha, "gen": beta}, the parameters differentiated.
      x: the local batch of images, shape (B, H, W, C).
      key: the step's key (split into the prior and the posterior chains' keys).
      example_ids: each example's index in the whole batch, shape (B,).
      hp: the traced hyper-parameters.
      nets: how to apply the networks (static, as are the rest).
      prior_steps: K of the prior chain (Eq. 11).
      posterior_steps: K of the posterior chain (Eq. 12).
      z_dim: d.
      unroll: unroll the chains' loops (same numbers).

    Returns:
      (loss, aux) with aux = {ebm_loss, gen_loss}. The loss value is a surrogate whose gradient is the
      learning gradient; it is not log p(x).
    """
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

    Args:
      z: the chains at each temperature, shape (N_t, B, d) (the rows of every example and chain).
      ridge: kl_ridge, added to each covariance's diagonal (a batch of n <= d rows is rank-deficient).
      axis_name: under pmap, the device axis: the sufficient statistics are summed over devices, so the
        fit uses the whole batch.

    Returns:
      (means (N_t, d), covariances (N_t, d, d)), the covariances unbiased (divisor n - 1) plus ridge I.
    """
    n = jnp.asarray(z.shape[1], z.dtype)
    s1 = jnp.sum(z, axis=1)
    s2 = jnp.einsum("tbi,tbj->tij", z, z)
    if axis_name is not None:
        n, s1, s2 = jax.lax.psum((n, s1, s2), axis_name)
    mean = s1 / n
    cov = (s2 - n * mean[:, :, None] * mean[:, None, :]) / (n - 1.0)
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2)) + ridge * jnp.eye(z.shape[-1], dtype=z.dtype)
    return mean, cov


# Each evidence rule's function (model/rules.py has its metadata): (temps, loglik, z, expected, hp,
# axis_name) -> (estimate, the readings it has among _RULE_READINGS); ti_estimate fills the rest with NaN.
_Estimate = tuple[Array, dict[str, Array]]
_RULE_READINGS = {"kl_forward": (), "kl_backward": (), "kl_identity": (), "kl_identity_moments": (5,)}


def _kl_batch(temps, loglik, z, expected, hp, axis_name) -> _Estimate:
    """Gaussians fitted across the batch at each temperature (Eq. 20-22 as the paper computes them)."""
    n_t, m, b, d = z.shape
    mean, cov = fitted_gaussians(z.reshape(n_t, m * b, d), hp.kl_ridge, axis_name)
    kl_forward, kl_backward = adjacent_gaussian_kls(mean, cov)
    identity = kl_identity_residual(temps, expected, kl_forward, kl_backward)
    estimate = trapezoid_log_evidence(temps, expected, kl_forward, kl_backward, hp.kl_weight)
    return estimate, {"kl_forward": kl_forward, "kl_backward": kl_backward, "kl_identity": identity}


def _kl_example(temps, loglik, z, expected, hp, axis_name) -> _Estimate:
    """Gaussians fitted per example from its M chains."""
    per_example = example_gaussian_kls(z)
    kl_forward, kl_backward = (jnp.mean(k, axis=-1) for k in per_example)
    residual = kl_identity_residual(temps, jnp.mean(loglik, axis=1), *per_example)
    estimate = trapezoid_log_evidence(temps, expected, kl_forward, kl_backward, hp.kl_weight)
    return estimate, {
        "kl_forward": kl_forward,
        "kl_backward": kl_backward,
        # The signed mean over examples, so Monte Carlo noise cancels; residuals systematic per x that
        # cancel across examples are the split-half check's (the moments' rows 3-4).
        "kl_identity": jnp.mean(residual, axis=-1),
        "kl_identity_moments": example_identity_moments(temps, loglik, z, residual),
    }


def _variance(temps, loglik, z, expected, hp, axis_name) -> _Estimate:
    variance = jnp.mean(jnp.var(loglik, axis=1, ddof=1), axis=-1)
    return variance_corrected_log_evidence(temps, expected, variance), {}


def _stepping_stone(temps, loglik, z, expected, hp, axis_name) -> _Estimate:
    return jnp.mean(stepping_stone_log_evidence(temps, loglik)), {}


def _trapezoid(temps, loglik, z, expected, hp, axis_name) -> _Estimate:
    return trapezoid_log_evidence(temps, expected), {}


RULE_ESTIMATES: dict[str, Callable[..., _Estimate]] = {
    "kl_batch": _kl_batch,
    "kl_example": _kl_example,
    "variance": _variance,
    "stepping_stone": _stepping_stone,
    "trapezoid": _trapezoid,
}
if set(RULE_ESTIMATES) != set(rules.EVIDENCE_RULES):  # one function per registered rule, no other
    raise ImportError(
        f"RULE_ESTIMATES {sorted(RULE_ESTIMATES)} != model.rules {sorted(rules.EVIDENCE_RULES)}"
    )


def ti_estimate(
    rule: str, temps: Array, loglik: Array, z: Array, hp: Hyper, axis_name: str | None = None
) -> tuple[Array, dict[str, Array]]:
    """log p(x) from the chains by `rule` (one of model.rules.EVIDENCE_RULES), in nats per image, averaged
    over the local batch.

    loglik: (N_t, M, B) log p(x_b|z) per chain; z: (N_t, M, B, d). Returns (estimate, readings) with
    readings = {expected_loglik (N_t,), kl_forward, kl_backward, kl_identity (N_t - 1,)}; the KL readings
    are NaN for rules that fit no Gaussians. kl_identity is the residual of the KL identity per interval:
    of the batch's Gaussians (kl_batch), or the signed mean over x of the per-x residuals (kl_example);
    kl_identity_moments (5, N_t - 1) are `example_identity_moments` for kl_example, NaN otherwise.
    kl_weight (eta) scales the KL correction of both KL rules. Each rule needs its registry's minimum M
    (variance and stepping_stone 2: with M = 1 the variance is NaN and stepping-stone is the left Riemann
    sum), as the config does; M is static.

    Args:
      rule: the evidence rule, a name of model.rules.EVIDENCE_RULES (static).
      temps: the temperatures t_i, shape (N_t,).
      loglik: log p(x_b|z) of each chain, shape (N_t, M, B).
      z: the chains, shape (N_t, M, B, d).
      hp: the traced hyper-parameters (kl_weight eta, kl_ridge).
      axis_name: under pmap, the device axis (kl_batch fits its Gaussians over the whole batch).

    Returns:
      (estimate, readings): log p(x) in nats per image, averaged over the local batch, and the readings
      above.
    """
    if rule not in RULE_ESTIMATES:
        raise ValueError(rules.unknown("ti_rule", rule, rules.EVIDENCE_RULES))
    if (why := rules.too_few_chains(rule, loglik.shape[1])) is not None:
        raise ValueError(f"chains_per_example={loglik.shape[1]} {why}")
    expected = jnp.mean(loglik, axis=(1, 2))
    estimate, own = RULE_ESTIMATES[rule](temps, loglik, z, expected, hp, axis_name)
    nan = {
        n: jnp.full((*lead, temps.shape[0] - 1), jnp.nan, loglik.dtype) for n, lead in _RULE_READINGS.items()
    }
    readings = {"expected_loglik": expected, **nan, **own}
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
    nets: NetworkFns,
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
    Under `axis_name`, means are over the local batch and kl_batch's Gaussians over the whole batch.

    Args:
      params: {"ebm": alpha, "gen": beta}, the parameters differentiated.
      x: the local batch of images, shape (B, H, W, C).
      key: the step's key (the posterior chains; split for ebm_gradient=ml's prior chain).
      example_ids: each example's index in the whole batch, shape (B,).
      hp: the traced hyper-parameters (temp_power p, kl_weight eta, step sizes, sigmas, kl_ridge).
      nets: how to apply the networks (static, as are the rest).
      num_temps: N_t (Eq. 18).
      posterior_steps: K of every tempered chain (Eq. 17).
      z_dim: d.
      ti_rule: the evidence rule (model.rules.EVIDENCE_RULES).
      chains_per_example: M.
      ebm_gradient: alpha's gradient, chains, none or ml (model.rules.EBM_GRADIENTS).
      gen_gradient: beta's gradient, ti or ml (model.rules.GEN_GRADIENTS).
      prior_steps: K of ebm_gradient=ml's prior chain (Eq. 11).
      axis_name: under pmap, the device axis.
      unroll: unroll the chains' loops (same numbers).

    Returns:
      (loss, aux) with aux = {log_evidence, temps, weights (N_t,), and ti_estimate's readings}.
    """
    if ebm_gradient not in rules.EBM_GRADIENTS:
        raise ValueError(rules.unknown("ebm_gradient", ebm_gradient, rules.EBM_GRADIENTS))
    if gen_gradient not in rules.GEN_GRADIENTS:
        raise ValueError(rules.unknown("gen_gradient", gen_gradient, rules.GEN_GRADIENTS))
    ebm, gen = rules.EBM_GRADIENTS[ebm_gradient], rules.GEN_GRADIENTS[gen_gradient]
    through_chains = ebm.through_chains
    # The TI estimate carries a network's gradient only where that network's gradient is `chains`/`ti`.
    ti_params = {
        "ebm": params["ebm"] if through_chains else jax.lax.stop_gradient(params["ebm"]),
        "gen": params["gen"] if gen.from_estimate else jax.lax.stop_gradient(params["gen"]),
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
    if ebm.prior_chain:  # ebm_gradient=ml
        k_prior = jax.random.split(key)[1]  # the posterior chains keep `key` itself
        z_prior = jax.lax.stop_gradient(
            sample_prior(nets, params["ebm"], k_prior, example_ids, prior_steps, z_dim, hp, unroll)
        )
        loss = loss + _surrogate(
            jnp.mean(nets.energy(params["ebm"], z_prior)) - jnp.mean(nets.energy(params["ebm"], z_post))
        )
    if not gen.from_estimate:  # gen_gradient=ml
        loss = loss - _surrogate(
            jnp.mean(log_likelihood(x, nets.generate(params["gen"], z_post), hp.lkhood_sigma))
        )
    aux = {"log_evidence": log_evidence, "temps": temps, "weights": trapezoid_weights(temps), **readings}
    return loss, aux
