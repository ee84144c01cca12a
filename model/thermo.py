"""Thermodynamic integration (paper §3): the temperature schedule, the trapezoid estimate of
log p(x) and the corrections of its discretisation error, and the Gaussian KL of Eq. 20.

Eq. 19 prints `KL(p_{i-1}||p_i) + KL(p_i||p_{i-1})`; the identity it rests on is a difference:
    log Z_i - log Z_{i-1} = dt_i E_{i-1} + KL(p_{i-1}||p_i) = dt_i E_i - KL(p_i||p_{i-1}),
whose mean is exact for any schedule; their difference gives KL(p_{i-1}||p_i) + KL(p_i||p_{i-1}) =
dt_i (E_i - E_{i-1}), a free check of any fitted KL (`kl_identity_residual`). We implement the difference
(docs/model.md).

The rules here take per-chain arrays shaped (N_t, M, ...): N_t temperatures, M chains per example, then
any example axes. They are pure functions of their inputs; nothing is static except array shapes.
"""

from __future__ import annotations

from statistics import NormalDist

import jax
import jax.numpy as jnp
from jax import Array

from model.rules import MIN_CHAINS_DIAGONAL


def temperature_schedule(num_temps: int, power: float | Array) -> Array:
    """t_i = (i / (N_t - 1))^p for i = 0..N_t-1: N_t temperatures from t_0 = 0 (the prior) to 1 (Eq. 21).

    `num_temps` fixes the shape (static); `power` may be traced, so schedules of equal length
    share one compiled step.

    Args:
      num_temps: N_t, the number of temperatures, both ends included (>= 2; static).
      power: p of Eq. 21 (> 0); p > 1 crowds the temperatures near t = 0, p < 1 near t = 1.

    Returns:
      The schedule t_0 = 0 < t_1 < ... < t_{N_t-1} = 1, float32 of shape (N_t,).
    """
    if int(num_temps) < 2:
        raise ValueError(f"num_temps={num_temps} must be >= 2 (the schedule includes t=0 and t=1)")
    if isinstance(power, int | float) and not power > 0:
        raise ValueError(f"temp_power={power} must be > 0 (t_i = (i/(N_t-1))^p)")
    frac = jnp.arange(num_temps, dtype=jnp.float32) / (num_temps - 1)
    # t_0 = 0 for every p > 0; the inner where keeps d t / d p finite at i = 0 (no log 0).
    return jnp.where(frac > 0, jnp.power(jnp.where(frac > 0, frac, 1.0), power), 0.0)


def _dt(temps: Array, ndim: int) -> Array:
    """dt_i = t_i - t_{i-1} for i = 1..N_t-1, shaped to broadcast against (N_t - 1,) + ndim-1 axes."""
    return (temps[1:] - temps[:-1]).reshape((-1,) + (1,) * (ndim - 1))


def trapezoid_weights(temps: Array) -> Array:
    """The w_i with sum_i w_i E_i equal to the trapezium sum_i dt_i (E_{i-1} + E_i) / 2:
    w_0 = dt_1 / 2, w_i = (dt_i + dt_{i+1}) / 2, w_{N_t-1} = dt_{N_t-1} / 2. Shape (N_t,); they sum to
    t_{N_t-1} - t_0 = 1.

    With frozen chains these are also the weights of the TI generator gradient,
    sum_i w_i E_{t_i}[grad_beta log p(x|z)]: w_0 is the weight on samples that ignore x.

    Args:
      temps: the schedule t_i, shape (N_t,).

    Returns:
      The weights w_i, shape (N_t,).
    """
    half = (temps[1:] - temps[:-1]) / 2.0
    zero = jnp.zeros((1,), temps.dtype)
    return jnp.concatenate([half, zero]) + jnp.concatenate([zero, half])


def trapezoid_log_evidence(
    temps: Array,
    expected_loglik: Array,
    kl_forward: Array | None = None,
    kl_backward: Array | None = None,
    kl_weight: float | Array = 1.0,
) -> Array:
    """The TI estimate of log p(x) (Eq. 22, with the KL terms as a difference):

        sum_i dt_i (E_{i-1} + E_i) / 2  +  kl_weight * 1/2 * sum_i (KL(p_{i-1}||p_i) - KL(p_i||p_{i-1}))

    Args:
      temps: the schedule t_i, shape (N_t,).
      expected_loglik: E_i = E_{p(z|x,t_i)}[log p(x|z)], shape (N_t, ...).
      kl_forward: KL(p_{i-1}||p_i) for i = 1..N_t-1, shape (N_t - 1, ...), or None.
      kl_backward: KL(p_i||p_{i-1}) for i = 1..N_t-1, shape (N_t - 1, ...), or None; both None gives the
        plain trapezium rule (Eq. 18-19 without the KL term).
      kl_weight: eta of Eq. 22, the weight of the KL correction (1 makes it the exact identity).

    Returns:
      The estimate of log p(x) in nats, shape expected_loglik.shape[1:].
    """
    e = expected_loglik
    trapezium = jnp.sum(_dt(temps, e.ndim) * (e[:-1] + e[1:]) / 2.0, axis=0)
    if kl_forward is None and kl_backward is None:
        return trapezium
    if kl_forward is None or kl_backward is None:
        raise ValueError("pass both kl_forward and kl_backward, or neither")
    return trapezium + kl_weight * 0.5 * jnp.sum(kl_forward - kl_backward, axis=0)


def variance_corrected_log_evidence(temps: Array, expected_loglik: Array, loglik_variance: Array) -> Array:
    """The corrected trapezium of Friel, Hurn & Wyse (2014):

        sum_i dt_i (E_{i-1} + E_i) / 2  -  sum_i dt_i^2 / 12 (V_i - V_{i-1}),

    V_i = Var_{p(z|x,t_i)}[log p(x|z)] = dE/dt at t_i, so the correction is the trapezium's leading error
    term with the second derivative from a difference of first derivatives. It needs a schedule that
    resolves the curvature of E_t near t = 0; with few, evenly spaced temperatures it overcorrects.

    Args:
      temps: the schedule t_i, shape (N_t,).
      expected_loglik: E_i, shape (N_t, ...).
      loglik_variance: V_i, the variance of log p(x|z) under p(z|x,t_i), shape (N_t, ...).

    Returns:
      The estimate of log p(x) in nats, shape expected_loglik.shape[1:].
    """
    v = loglik_variance
    correction = jnp.sum(_dt(temps, v.ndim) ** 2 / 12.0 * (v[1:] - v[:-1]), axis=0)
    return trapezoid_log_evidence(temps, expected_loglik) - correction


def stepping_stone_log_evidence(temps: Array, loglik: Array) -> Array:
    """The stepping-stone estimate of log p(x) (Xie et al. 2011):

        sum_i log (1/M sum_m p(x|z_{i-1,m})^dt_i),   z_{i-1,m} ~ p(z|x, t_{i-1}),

    each ratio Z_i / Z_{i-1} = E_{p_{i-1}}[p(x|z)^dt_i] by a log-mean-exp over the M chains at t_{i-1}.
    Biased low by Jensen's inequality, less as M grows; with M = 1 it is the left Riemann sum
    sum_i dt_i log p(x|z_{i-1}).

    Args:
      temps: the schedule t_i, shape (N_t,).
      loglik: log p(x|z) of each of the M chains at each temperature, shape (N_t, M, ...).

    Returns:
      The estimate of log p(x) in nats, shape loglik.shape[2:].
    """
    m = loglik.shape[1]
    scaled = _dt(temps, loglik.ndim) * loglik[:-1]
    return jnp.sum(jax.nn.logsumexp(scaled, axis=1) - jnp.log(float(m)), axis=0)


def kl_identity_residual(
    temps: Array, expected_loglik: Array, kl_forward: Array, kl_backward: Array
) -> Array:
    """KL(p_{i-1}||p_i) + KL(p_i||p_{i-1}) - dt_i (E_i - E_{i-1}) for i = 1..N_t-1: zero for the exact
    tempered posteriors, so its size measures how far fitted Gaussians are from them.

    Args:
      temps: the schedule t_i, shape (N_t,).
      expected_loglik: E_i, shape (N_t, ...).
      kl_forward: KL(p_{i-1}||p_i), shape (N_t - 1, ...).
      kl_backward: KL(p_i||p_{i-1}), shape (N_t - 1, ...).

    Returns:
      The residual per interval in nats, shape (N_t - 1, ...).
    """
    e = expected_loglik
    return kl_forward + kl_backward - _dt(temps, e.ndim) * (e[1:] - e[:-1])


def _kl_terms(mean_p: Array, cov_p: Array, mean_q: Array, cov_q: Array) -> tuple[Array, Array, Array]:
    """log|cov_q| - log|cov_p|, tr(cov_q^{-1} cov_p) and the Mahalanobis term (mean_q - mean_p)^T
    cov_q^{-1} (mean_q - mean_p), from Cholesky factors (no explicit inverse), batched over leading axes."""
    chol_p = jnp.linalg.cholesky(cov_p)
    chol_q = jnp.linalg.cholesky(cov_q)
    logdet_p = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol_p, axis1=-2, axis2=-1)), axis=-1)
    logdet_q = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol_q, axis1=-2, axis2=-1)), axis=-1)
    # tr(cov_q^{-1} cov_p) = ||L_q^{-1} L_p||_F^2
    solved = jax.scipy.linalg.solve_triangular(chol_q, chol_p, lower=True)
    trace = jnp.sum(solved**2, axis=(-2, -1))
    diff = (mean_q - mean_p)[..., None]
    maha = jnp.sum(jax.scipy.linalg.solve_triangular(chol_q, diff, lower=True) ** 2, axis=(-2, -1))
    return logdet_q - logdet_p, trace, maha


def gaussian_kl(mean_p: Array, cov_p: Array, mean_q: Array, cov_q: Array) -> Array:
    """KL(N(mean_p, cov_p) || N(mean_q, cov_q)) in nats (Eq. 20), batched over leading axes.

    Args:
      mean_p: the first Gaussian's mean, shape (..., d).
      cov_p: its covariance, shape (..., d, d), positive definite.
      mean_q: the second Gaussian's mean, shape (..., d).
      cov_q: its covariance, shape (..., d, d), positive definite.

    Returns:
      The KL divergence in nats, shape (...).
    """
    logdet, trace, maha = _kl_terms(mean_p, cov_p, mean_q, cov_q)
    return 0.5 * (logdet + trace + maha - mean_p.shape[-1])


def adjacent_gaussian_kls(means: Array, covs: Array) -> tuple[Array, Array]:
    """KL(p_{i-1}||p_i) and KL(p_i||p_{i-1}) for i = 1..N_t-1 between Gaussians fitted at each
    temperature (Eq. 19-20).

    Args:
      means: the fitted mean at each temperature, shape (N_t, ..., d).
      covs: the fitted covariance at each temperature, shape (N_t, ..., d, d).

    Returns:
      (kl_forward, kl_backward), each of shape (N_t - 1, ...), in nats.
    """
    forward = gaussian_kl(means[:-1], covs[:-1], means[1:], covs[1:])
    backward = gaussian_kl(means[1:], covs[1:], means[:-1], covs[:-1])
    return forward, backward


def full_covariance_chains(z_dim: int) -> int:
    """The fewest chains per example for which `example_gaussian_kls` fits full covariances: with
    n = M - 1 degrees of freedom the inverse Wishart has a finite variance iff n > d + 3.

    Args:
      z_dim: d, the latent dimension.

    Returns:
      d + 5, the fewest chains per example M for a full-covariance fit.
    """
    return z_dim + 5


def example_gaussian_kls(z: Array) -> tuple[Array, Array]:
    """KL(p_{i-1}||p_i) and KL(p_i||p_{i-1}) between Gaussians fitted per example from its M chains at
    each temperature (Eq. 20 on the distributions Eq. 19 compares).

    z: (N_t, M, ..., d). Full covariances when M >= d + 5, else diagonal ones (a diagonal fit needs M >= 6);
    the choice is static, from z's shape. The plug-in KL is biased (E[S^-1] = Sigma^-1 n / (n - k - 1), and
    the fitted means add their own scatter); the estimate here removes both, so for Gaussian tempered
    posteriors and independent chains at each temperature each KL is unbiased.

    Args:
      z: the M chains of each example at each temperature, shape (N_t, M, ..., d); M >= 6
        (model.rules.MIN_CHAINS_DIAGONAL).

    Returns:
      (kl_forward, kl_backward): KL(p_{i-1}||p_i) and KL(p_i||p_{i-1}) per example, each of shape
      (N_t - 1, ...), in nats.
    """
    m, d = z.shape[1], z.shape[-1]
    full = m >= full_covariance_chains(d)
    if not full and m < MIN_CHAINS_DIAGONAL:
        raise ValueError(
            f"chains_per_example={m} is too few for per-example Gaussian KLs: the trace "
            f"term has no finite variance; use chains_per_example >= {MIN_CHAINS_DIAGONAL}"
        )
    n = m - 1
    mean = jnp.mean(z, axis=1)
    centred = z - mean[:, None]
    if full:
        cov = jnp.einsum("tm...i,tm...j->t...ij", centred, centred) / n
        shrink = (n - d - 1) / n
    else:
        var = jnp.sum(centred**2, axis=1) / n
        shrink = (n - 2) / n

    def kl(p: slice, q: slice) -> Array:
        if full:
            logdet, trace, maha = _kl_terms(mean[p], cov[p], mean[q], cov[q])
        else:
            logdet = jnp.sum(jnp.log(var[q]) - jnp.log(var[p]), axis=-1)
            trace = jnp.sum(var[p] / var[q], axis=-1)
            maha = jnp.sum((mean[q] - mean[p]) ** 2 / var[q], axis=-1)
        trace = shrink * trace
        maha = shrink * maha - (trace + d) / m  # E[(m_q - m_p)(m_q - m_p)^T] adds (cov_p + cov_q) / M
        return 0.5 * (logdet + trace + maha - d)

    before, after = slice(None, -1), slice(1, None)
    return kl(before, after), kl(after, before)


SPLIT_MIN_CHAINS = 2 * MIN_CHAINS_DIAGONAL  # each half of an example's chains needs its own per-example fit


def example_identity_residuals(temps: Array, loglik: Array, z: Array) -> Array:
    """The KL identity's residual per example and interval from kl_example's per-example fits:
    KL_f + KL_b - dt_i (E_i - E_{i-1}) with E_i each example's mean over its M chains.
    loglik: (N_t, M, B), z: (N_t, M, B, d). Returns (N_t - 1, B)."""
    return kl_identity_residual(temps, jnp.mean(loglik, axis=1), *example_gaussian_kls(z))


def example_identity_moments(temps: Array, loglik: Array, z: Array, residual: Array | None = None) -> Array:
    """Sums over the examples that the identity's z readings (`identity_z`) need, shaped (5, N_t - 1):
    rows n, sum_x r_x, sum_x r_x^2, sum_x q_x, sum_x q_x^2, where r_x is example x's residual
    (`example_identity_residuals`) and q_x = r_x^A r_x^B the product of the residuals refitted on the two
    halves of x's M chains (rows 3-4 NaN when M < SPLIT_MIN_CHAINS). Sums, so a psum over devices and a sum
    over steps pool them exactly. `residual`: the r_x of the whole fit when the caller has them already
    (kl_example's estimate fits the same Gaussians), else they are computed here.

    Under pure Monte Carlo noise (exact tempered posteriors) E[r_x] = 0 and, the halves being independent,
    E[q_x] = E[r^A] E[r^B] = 0; a residual b_x that is systematic per example gives E[q_x] = b_x^2 > 0
    even when the b_x cancel across examples, which the mean of r alone cannot see. The halves are fitted
    from M/2 chains, so by `example_gaussian_kls`' rule they are diagonal when M/2 < d + 5: q then also
    reads the diagonal fit's own residual."""
    if residual is None:
        residual = example_identity_residuals(temps, loglik, z)
    n = jnp.full(residual.shape[:1], residual.shape[-1], residual.dtype)
    rows = [n, jnp.sum(residual, axis=-1), jnp.sum(residual**2, axis=-1)]
    m = z.shape[1]
    if m >= SPLIT_MIN_CHAINS:
        h = m // 2
        first = example_identity_residuals(temps, loglik[:, :h], z[:, :h])
        second = example_identity_residuals(temps, loglik[:, h : 2 * h], z[:, h : 2 * h])
        product = first * second
        rows += [jnp.sum(product, axis=-1), jnp.sum(product**2, axis=-1)]
    else:
        rows += [jnp.full_like(n, jnp.nan)] * 2
    return jnp.stack(rows)


def _max_abs_z(n: Array, total: Array, squares: Array) -> Array:
    mean = total / n
    variance = (squares - n * mean**2) / (n - 1.0)
    return jnp.max(jnp.abs(mean) / jnp.sqrt(variance / n))


def identity_z(moments: Array) -> tuple[Array, Array]:
    """(kl_identity_z, kl_identity_split_z) from `example_identity_moments` (5, N_t - 1), summed over any
    devices and steps: max over the intervals of |mean| / standard error over the examples, of the
    per-example residual r_x and of the split-half product q_x. Compare both with
    `identity_threshold(N_t)`; split_z is NaN when M < SPLIT_MIN_CHAINS."""
    n = moments[0]
    return _max_abs_z(n, moments[1], moments[2]), _max_abs_z(n, moments[3], moments[4])


def identity_threshold(num_temps: int, alpha: float = 0.05) -> float:
    """The two-sided Bonferroni threshold for N_t - 1 intervals tested at once: the standard normal
    quantile 1 - alpha / (2 (N_t - 1)) (2.77 at N_t = 10, alpha = 0.05). A z reading above it rejects
    "every interval's residual has mean 0" at level alpha or less."""
    return NormalDist().inv_cdf(1.0 - alpha / (2.0 * (int(num_temps) - 1)))
