"""Thermodynamic integration (paper §3): the temperature schedule, the trapezoid estimate of
log p(x) with its KL correction (Eq. 19/22), and the Gaussian KL of Eq. 20.

Eq. 19 prints `KL(p_{i-1}||p_i) + KL(p_i||p_{i-1})`; the identity it rests on is a difference:
    log Z_i - log Z_{i-1} = dt_i E_{i-1} + KL(p_{i-1}||p_i) = dt_i E_i - KL(p_i||p_{i-1}),
whose mean is exact for any schedule. We implement the difference (docs/model.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array


def temperature_schedule(num_temps: int, power: float | Array) -> Array:
    """t_i = (i / (N_t - 1))^p for i = 0..N_t-1: N_t temperatures from t_0 = 0 (the prior) to 1.

    `num_temps` fixes the shape (static); `power` may be traced, so schedules of equal length
    share one compiled step.
    """
    if int(num_temps) < 2:
        raise ValueError(f"num_temps={num_temps} must be >= 2 (the schedule includes t=0 and t=1)")
    if isinstance(power, int | float) and not power > 0:
        raise ValueError(f"temp_power={power} must be > 0 (t_i = (i/(N_t-1))^p)")
    frac = jnp.arange(num_temps, dtype=jnp.float32) / (num_temps - 1)
    # t_0 = 0 for every p > 0; the inner where keeps d t / d p finite at i = 0 (no log 0).
    return jnp.where(frac > 0, jnp.power(jnp.where(frac > 0, frac, 1.0), power), 0.0)


def trapezoid_log_evidence(
    temps: Array,
    expected_loglik: Array,
    kl_forward: Array | None = None,
    kl_backward: Array | None = None,
    kl_weight: float | Array = 1.0,
) -> Array:
    """The TI estimate of log p(x) (Eq. 22, with the KL terms as a difference):

        sum_i dt_i (E_{i-1} + E_i) / 2  +  kl_weight * 1/2 * sum_i (KL(p_{i-1}||p_i) - KL(p_i||p_{i-1}))

    temps: (N_t,) schedule. expected_loglik: (N_t, ...) E_i = E_{p(z|x,t_i)}[log p(x|z)].
    kl_forward / kl_backward: (N_t - 1, ...) KL(p_{i-1}||p_i) and KL(p_i||p_{i-1}) for i = 1..N_t-1;
    both None gives the plain trapezium rule. Returns nats, shape expected_loglik.shape[1:].
    """
    e = expected_loglik
    dt = (temps[1:] - temps[:-1]).reshape((-1,) + (1,) * (e.ndim - 1))
    trapezium = jnp.sum(dt * (e[:-1] + e[1:]) / 2.0, axis=0)
    if kl_forward is None and kl_backward is None:
        return trapezium
    if kl_forward is None or kl_backward is None:
        raise ValueError("pass both kl_forward and kl_backward, or neither")
    return trapezium + kl_weight * 0.5 * jnp.sum(kl_forward - kl_backward, axis=0)


def gaussian_kl(mean_p: Array, cov_p: Array, mean_q: Array, cov_q: Array) -> Array:
    """KL(N(mean_p, cov_p) || N(mean_q, cov_q)) in nats (Eq. 20), batched over leading axes.

    Computed with Cholesky factors: log-determinants from their diagonals, the trace and the
    Mahalanobis term from triangular solves, never an explicit inverse.
    """
    d = mean_p.shape[-1]
    chol_p = jnp.linalg.cholesky(cov_p)
    chol_q = jnp.linalg.cholesky(cov_q)
    logdet_p = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol_p, axis1=-2, axis2=-1)), axis=-1)
    logdet_q = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol_q, axis1=-2, axis2=-1)), axis=-1)
    # tr(cov_q^{-1} cov_p) = ||L_q^{-1} L_p||_F^2
    solved = jax.scipy.linalg.solve_triangular(chol_q, chol_p, lower=True)
    trace = jnp.sum(solved**2, axis=(-2, -1))
    diff = (mean_q - mean_p)[..., None]
    maha = jnp.sum(jax.scipy.linalg.solve_triangular(chol_q, diff, lower=True) ** 2, axis=(-2, -1))
    return 0.5 * (logdet_q - logdet_p + trace + maha - d)


def adjacent_gaussian_kls(means: Array, covs: Array) -> tuple[Array, Array]:
    """KL(p_{i-1}||p_i) and KL(p_i||p_{i-1}) for i = 1..N_t-1 between Gaussians fitted at each
    temperature. means: (N_t, d), covs: (N_t, d, d). Returns two (N_t - 1,) arrays."""
    forward = gaussian_kl(means[:-1], covs[:-1], means[1:], covs[1:])
    backward = gaussian_kl(means[1:], covs[1:], means[:-1], covs[:-1])
    return forward, backward
