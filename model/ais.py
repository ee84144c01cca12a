"""A validation log-likelihood for every model by annealed importance sampling (AIS; Neal 2001).

The LEBM's marginal likelihood (Eq. 1-3) is

    log p(x) = log Z(x) - log Z_alpha,
    Z(x)    = integral exp(f_alpha(z)) N(z; 0, sigma_0^2 I) p_beta(x|z) dz,
    Z_alpha = integral exp(f_alpha(z)) N(z; 0, sigma_0^2 I) dz.

Both normalisers are estimated by AIS from the exactly samplable base N(0, sigma_0^2 I) (whose normaliser
is 1): one path per x turns on f and then the likelihood, gamma(z) = log N(z; 0, sigma_0^2 I) + b_f f(z)
+ b_l log p(x|z) with b_f: 0 -> 1 and then b_l: 0 -> 1; one path turns on f alone and is shared by every x.
(A start from Langevin samples of the prior would leave the weights invalid: its law is not known.)

Transitions are MALA steps (Metropolis-adjusted Langevin), each leaving its intermediate distribution
invariant. Their step size follows the acceptance rate of separate pilot chains that run alongside and
are left out of the estimate: given the pilot, every estimating chain's kernels are fixed, so each weight
is exactly unbiased for its normaliser.

What the numbers mean. Each AIS estimate log Z_hat = log mean_c w_c is a stochastic lower bound of its
log-normaliser (Jensen: E log Z_hat <= log Z), with a gap that shrinks with more temperatures and chains.
Their difference, val_ll, is consistent (it converges to log p(x)) but it is not a bound in either
direction: the gap of log Z_alpha enters with a minus sign.

Shapes: the number of temperatures, chains and the subset size are static; sigma_0, sigma_l and the
schedule power are traced.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from model.nets import log_likelihood
from model.objectives import NetworkFns

Potential = Callable[[Array], Array]  # z (..., d) -> per-chain value, shape z.shape[:-1]
_TARGET_ACCEPT = 0.6  # MALA's efficient acceptance rate is ~0.57 (Roberts & Rosenthal 1998)
_ADAPT_RATE = 0.5  # log step size moves by rate * (pilot acceptance - target) per temperature


class AisState(NamedTuple):
    """Chains (..., C + P, d) (the last P are pilots), their log-weights (..., C + P) and the per-target
    MALA step size (...)."""

    z: Array
    log_w: Array
    step: Array


class ValLL(NamedTuple):
    """The validation log-likelihood and what it is made of, in nats per image.

    val_ll: mean over the subset of log Z_hat(x) - log Z_hat_alpha; val_ll_stderr: its standard error
    (spread over the subset's examples and the Monte Carlo error of log Z_hat_alpha, `val_ll_and_stderr`);
    log_z_x (n,) and log_z_prior the two AIS estimates; accept_x, accept_prior the mean MALA acceptance
    rates of the two paths."""

    val_ll: Array
    val_ll_stderr: Array
    log_z_x: Array
    log_z_prior: Array
    accept_x: Array
    accept_prior: Array


def _check_pilots(num_pilots: int) -> None:
    """The pilots are the last `num_pilots` chains; with none, [..., :-0] would leave no estimating chain
    and [..., -0:] would adapt on every chain, breaking the estimate's unbiasedness."""
    if num_pilots < 1:
        raise ValueError(
            f"num_pilots={num_pilots} leaves no pilot chain to adapt the step size on (the "
            "estimating chains must not adapt it); use num_pilots=1 or more"
        )


def power_schedule(num_temps: int, power: Array | float) -> Array:
    """b_k = (k / K)^p for k = 0..K (K = num_temps): num_temps + 1 inverse temperatures from 0 to 1.

    Args:
      num_temps: K, the number of annealing steps.
      power: p (> 0); 1 spaces them linearly.

    Returns:
      b_0 = 0 < ... < b_K = 1, float32 of shape (K + 1,).
    """
    frac = jnp.arange(num_temps + 1, dtype=jnp.float32) / num_temps
    return jnp.where(frac > 0, jnp.power(jnp.where(frac > 0, frac, 1.0), power), 0.0)


def _value_and_grad(fn: Potential, z: Array) -> tuple[Array, Array]:
    """Per-chain values and their gradients with respect to each chain's own z."""
    value, vjp = jax.vjp(fn, z)
    return value, vjp(jnp.ones_like(value))[0]


def anneal(
    fixed: Potential,
    annealed: Potential,
    betas: Array,
    state: AisState,
    key: Array,
    prior_sigma: Array,
    num_pilots: int,
) -> tuple[AisState, Array]:
    """AIS over gamma_k(z) = -||z||^2 / (2 sigma_0^2) + fixed(z) + betas[k] annealed(z), k = 1..K.

    At each k the log-weight gains (betas[k] - betas[k-1]) annealed(z), then one MALA step targets
    gamma_k. The step size of each target (the leading axes) moves toward a 0.6 acceptance rate of its
    pilot chains (the last `num_pilots` along the chain axis).

    Args:
      fixed: the part of log gamma_k present at every k, z (..., C + P, d) -> (..., C + P).
      annealed: the part turned on, weighted by betas[k], same signature.
      betas: the inverse temperatures b_0 = 0 .. b_K = 1 (`power_schedule`), shape (K + 1,).
      state: the chains, log-weights and step sizes at b_0 (`initial_state`, or a previous stage's end).
      key: the MALA proposals' and acceptances' key.
      prior_sigma: sigma_0 of the Gaussian reference.
      num_pilots: P >= 1, the chains that adapt the step size and are left out of the estimate.

    Returns:
      (state at b_K, the mean MALA acceptance rate of the estimating chains).
    """
    _check_pilots(num_pilots)

    def evaluate(z: Array) -> tuple[Array, Array, Array, Array]:
        h, gh = _value_and_grad(fixed, z)
        u, gu = _value_and_grad(annealed, z)
        return h, gh, u, gu

    def log_gamma(z: Array, h: Array, u: Array, beta: Array) -> Array:
        return -jnp.sum(z**2, axis=-1) / (2.0 * prior_sigma**2) + h + beta * u

    def grad_gamma(z: Array, gh: Array, gu: Array, beta: Array) -> Array:
        return -z / prior_sigma**2 + gh + beta * gu

    def transition(carry: tuple, inputs: tuple) -> tuple[tuple, Array]:
        z, log_w, step, h, gh, u, gu = carry
        beta_prev, beta, k = inputs
        log_w = log_w + (beta - beta_prev) * u
        k_noise, k_accept = jax.random.split(k)
        s = step[..., None, None]
        g = grad_gamma(z, gh, gu, beta)
        mean_fwd = z + s * g
        z_new = mean_fwd + jnp.sqrt(2.0 * s) * jax.random.normal(k_noise, z.shape)
        h_new, gh_new, u_new, gu_new = evaluate(z_new)
        mean_bwd = z_new + s * grad_gamma(z_new, gh_new, gu_new, beta)
        log_q_fwd = -jnp.sum((z_new - mean_fwd) ** 2, axis=-1) / (4.0 * s[..., 0])
        log_q_bwd = -jnp.sum((z - mean_bwd) ** 2, axis=-1) / (4.0 * s[..., 0])
        log_ratio = log_gamma(z_new, h_new, u_new, beta) - log_gamma(z, h, u, beta) + log_q_bwd - log_q_fwd
        log_ratio = jnp.where(jnp.isfinite(log_ratio), log_ratio, -jnp.inf)  # a non-finite proposal: reject
        accept_prob = jnp.exp(jnp.minimum(log_ratio, 0.0))
        accept = jax.random.uniform(k_accept, accept_prob.shape) < accept_prob

        def pick(new: Array, old: Array) -> Array:
            return jnp.where(accept.reshape(accept.shape + (1,) * (new.ndim - accept.ndim)), new, old)

        z, h, gh, u, gu = (
            pick(a, b) for a, b in ((z_new, z), (h_new, h), (gh_new, gh), (u_new, u), (gu_new, gu))
        )
        pilot_rate = jnp.mean(accept_prob[..., -num_pilots:], axis=-1)
        step = step * jnp.exp(_ADAPT_RATE * (pilot_rate - _TARGET_ACCEPT))
        rate = jnp.mean(accept[..., :-num_pilots].astype(jnp.float32))
        return (z, log_w, step, h, gh, u, gu), rate

    h, gh, u, gu = evaluate(state.z)
    keys = jax.random.split(key, betas.shape[0] - 1)
    carry = (state.z, state.log_w, state.step, h, gh, u, gu)
    carry, rates = jax.lax.scan(transition, carry, (betas[:-1], betas[1:], keys))
    return AisState(carry[0], carry[1], carry[2]), jnp.mean(rates)


def initial_state(
    key: Array,
    lead: tuple[int, ...],
    chains: int,
    num_pilots: int,
    z_dim: int,
    prior_sigma: Array,
    step_size: Array | float,
) -> AisState:
    """z ~ N(0, sigma_0^2 I) exactly, shaped lead + (chains + pilots, d); zero log-weights.

    Args:
      key: the draws' key.
      lead: the targets' leading axes, e.g. () for log Z_alpha or (n,) for n examples' log Z(x).
      chains: C, the estimating chains per target.
      num_pilots: P >= 1, the step-size pilots per target.
      z_dim: d.
      prior_sigma: sigma_0.
      step_size: the initial MALA step size in units of sigma_0^2.

    Returns:
      The AisState: z (lead + (C + P, d)), log_w zeros (lead + (C + P,)), step (lead).
    """
    _check_pilots(num_pilots)
    z = prior_sigma * jax.random.normal(key, lead + (chains + num_pilots, z_dim))
    return AisState(z, jnp.zeros(z.shape[:-1]), jnp.full(lead, step_size, jnp.float32) * prior_sigma**2)


def log_normaliser(state: AisState, num_pilots: int) -> Array:
    """log Z_hat = log mean_c exp(log w_c) over the estimating chains (pilots left out).

    Args:
      state: the chains at the end of annealing.
      num_pilots: P, the pilot chains (the last P) left out.

    Returns:
      log Z_hat per target, shape lead (a stochastic lower bound of log Z by Jensen).
    """
    _check_pilots(num_pilots)
    log_w = state.log_w[..., :-num_pilots]
    return jax.nn.logsumexp(log_w, axis=-1) - jnp.log(log_w.shape[-1])


def log_normaliser_variance(state: AisState, num_pilots: int) -> Array:
    """The delta-method variance of log Z_hat from its own weights: Var(w) / (C mean(w)^2) =
    sum w^2 / (sum w)^2 - 1/C over the C estimating chains.

    Args:
      state: the chains at the end of annealing.
      num_pilots: P, the pilot chains (the last P) left out.

    Returns:
      The variance of log Z_hat per target, shape lead, >= 0.
    """
    _check_pilots(num_pilots)
    log_w = state.log_w[..., :-num_pilots]
    ratio = jnp.exp(jax.nn.logsumexp(2.0 * log_w, axis=-1) - 2.0 * jax.nn.logsumexp(log_w, axis=-1))
    return jnp.maximum(ratio - 1.0 / log_w.shape[-1], 0.0)


def val_ll_and_stderr(log_z_x: Array, log_z_prior: Array, log_z_prior_var: Array) -> tuple[Array, Array]:
    """val_ll = mean_x log Z_hat(x) - log Z_hat_alpha, and its standard error: the spread of log Z_hat(x)
    over the n >= 2 examples, plus the Monte Carlo variance of the one log Z_hat_alpha every x shares
    (which the spread over examples cannot show).

    Args:
      log_z_x: log Z_hat(x) of each validation example, shape (n,), n >= 2.
      log_z_prior: log Z_hat_alpha, a scalar.
      log_z_prior_var: its variance (`log_normaliser_variance`), a scalar.

    Returns:
      (val_ll, its standard error), in nats per image.
    """
    n = log_z_x.shape[0]
    stderr = jnp.sqrt(jnp.var(log_z_x, ddof=1) / n + log_z_prior_var)
    return jnp.mean(log_z_x) - log_z_prior, stderr


def log_z_prior(
    nets: NetworkFns,
    ebm_params: Any,
    key: Array,
    *,
    prior_sigma: Array,
    z_dim: int,
    num_temps: int,
    chains: int,
    num_pilots: int = 4,
    step_size: float = 0.5,
) -> tuple[Array, Array, Array]:
    """AIS estimate of log Z_alpha (the EBM prior's normaliser over N(0, sigma_0^2 I)) with `chains` chains
    and `num_temps` linearly spaced temperatures.

    Args:
      nets: how to apply the networks (only `energy`, f_alpha, is used).
      ebm_params: alpha.
      key: the chains' key.
      prior_sigma: sigma_0.
      z_dim: d (static, as are the rest).
      num_temps: K, the annealing steps turning f_alpha on.
      chains: C, the estimating chains.
      num_pilots: P, the step-size pilots.
      step_size: the initial MALA step size in units of sigma_0^2.

    Returns:
      (log Z_hat_alpha, the mean acceptance rate, the delta-method variance of log Z_hat_alpha).
    """
    state, rate = _turn_on_energy(
        nets,
        ebm_params,
        key,
        (),
        prior_sigma=prior_sigma,
        z_dim=z_dim,
        num_temps=num_temps,
        chains=chains,
        num_pilots=num_pilots,
        step_size=step_size,
    )
    return log_normaliser(state, num_pilots), rate, log_normaliser_variance(state, num_pilots)


def _turn_on_energy(
    nets: NetworkFns,
    ebm_params: Any,
    key: Array,
    lead: tuple[int, ...],
    *,
    prior_sigma: Array,
    z_dim: int,
    num_temps: int,
    chains: int,
    num_pilots: int,
    step_size: float,
) -> tuple[AisState, Array]:
    """The first AIS stage of both paths: chains shaped lead + (chains + pilots, d) drawn exactly from
    N(0, sigma_0^2 I), then f turned on over `num_temps` linear temperatures. Returns the state and the
    acceptance rate."""
    state = initial_state(jax.random.fold_in(key, 0), lead, chains, num_pilots, z_dim, prior_sigma, step_size)
    energy = functools.partial(nets.energy, ebm_params)

    def zero(z: Array) -> Array:
        return jnp.zeros(z.shape[:-1], z.dtype)

    return anneal(
        zero,
        energy,
        power_schedule(num_temps, 1.0),
        state,
        jax.random.fold_in(key, 1),
        prior_sigma,
        num_pilots,
    )


def log_z_data(
    nets: NetworkFns,
    params: Any,
    x: Array,
    key: Array,
    *,
    prior_sigma: Array,
    lkhood_sigma: Array,
    z_dim: int,
    num_temps: int,
    chains: int,
    lkhood_power: Array | float = 4.0,
    num_pilots: int = 1,
    step_size: float = 0.5,
) -> tuple[Array, Array]:
    """AIS estimates of log Z(x) for each x (n, H, W, C): `num_temps` linear temperatures turning on f,
    then `num_temps` temperatures b_l = (k/K)^lkhood_power turning on log p(x|z), `chains` chains per x.
    Z(x) is the unnormalised evidence of x under f_alpha's unnormalised prior: log p(x) = log Z(x) -
    log Z_alpha.

    Args:
      nets: how to apply the networks.
      params: {"ebm": alpha, "gen": beta}.
      x: the validation images, shape (n, H, W, C).
      key: the chains' key.
      prior_sigma: sigma_0.
      lkhood_sigma: sigma_l of p_beta(x|z).
      z_dim: d (static, as are the rest).
      num_temps: K of each of the two stages.
      chains: C, the estimating chains per x.
      lkhood_power: the power of the likelihood stage's schedule (> 1 crowds it near 0).
      num_pilots: P, the step-size pilots per x.
      step_size: the initial MALA step size in units of sigma_0^2.

    Returns:
      (log Z_hat(x), shape (n,), the mean acceptance rate of the likelihood stage).
    """
    state, _ = _turn_on_energy(
        nets,
        params["ebm"],
        key,
        (x.shape[0],),
        prior_sigma=prior_sigma,
        z_dim=z_dim,
        num_temps=num_temps,
        chains=chains,
        num_pilots=num_pilots,
        step_size=step_size,
    )
    energy = functools.partial(nets.energy, params["ebm"])

    def loglik(z: Array) -> Array:
        return log_likelihood(x[:, None], nets.generate(params["gen"], z), lkhood_sigma)

    state, rate = anneal(
        energy,
        loglik,
        power_schedule(num_temps, lkhood_power),
        state,
        jax.random.fold_in(key, 2),
        prior_sigma,
        num_pilots,
    )
    return log_normaliser(state, num_pilots), rate


def validation_log_likelihood(
    nets: NetworkFns,
    params: Any,
    x: Array,
    key: Array,
    *,
    prior_sigma: Array,
    lkhood_sigma: Array,
    z_dim: int,
    num_temps: int = 100,
    chains: int = 4,
    prior_chains: int = 256,
    lkhood_power: Array | float = 4.0,
) -> ValLL:
    """val_ll = mean_x [log Z_hat(x)] - log Z_hat_alpha in nats per image, with its standard error over
    the examples of x (n >= 2) and the Monte Carlo error of the shared log Z_hat_alpha. Each of the two AIS
    estimates is a stochastic lower bound of its log-normaliser; val_ll is consistent but not a bound (see
    the module docstring). Pure and jittable with nets, z_dim, num_temps, chains and prior_chains static.

    Args:
      nets: how to apply the networks.
      params: {"ebm": alpha, "gen": beta}.
      x: the validation subset, shape (n, H, W, C), n >= 2.
      key: the reading's key (split between the two paths).
      prior_sigma: sigma_0.
      lkhood_sigma: sigma_l.
      z_dim: d.
      num_temps: K of each AIS stage (`val_ll_temps`).
      chains: C per validation example (`val_ll_chains`).
      prior_chains: C of the shared log Z_alpha path (`val_ll_prior_chains`).
      lkhood_power: the power of the likelihood stage's schedule.

    Returns:
      ValLL: val_ll and val_ll_stderr in nats per image, both log-normaliser estimates and both
      acceptance rates.
    """
    k_prior, k_data = jax.random.split(key)
    lz_prior, acc_prior, lz_prior_var = log_z_prior(
        nets,
        params["ebm"],
        k_prior,
        prior_sigma=prior_sigma,
        z_dim=z_dim,
        num_temps=num_temps,
        chains=prior_chains,
    )
    lz_x, acc_x = log_z_data(
        nets,
        params,
        x,
        k_data,
        prior_sigma=prior_sigma,
        lkhood_sigma=lkhood_sigma,
        z_dim=z_dim,
        num_temps=num_temps,
        chains=chains,
        lkhood_power=lkhood_power,
    )
    val_ll, stderr = val_ll_and_stderr(lz_x, lz_prior, lz_prior_var)
    return ValLL(val_ll, stderr, lz_x, lz_prior, acc_x, acc_prior)
