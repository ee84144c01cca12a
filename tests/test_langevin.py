"""Langevin chains (Eq. 10-12, 17) on Gaussian targets whose ULA stationary moments are known exactly."""

import jax
import jax.numpy as jnp
import numpy as np

from model.langevin import (
    langevin_chain,
    power_posterior_grad,
    power_posterior_log_density,
    prior_log_density,
)


def _ula_stationary_cov(precision, s):
    """Unadjusted Langevin on N(mu, P^-1) with step s is a linear AR(1) chain; its stationary covariance
    solves S = (I - sP) S (I - sP) + 2s I, i.e. S = (P - s P^2 / 2)^-1 (the step size's known bias)."""
    return np.linalg.inv(precision - 0.5 * s * precision @ precision)


def test_prior_chain_reproduces_gaussian_moments_within_monte_carlo_error():
    # f_alpha(z) = a.z tilts N(0, s0^2 I) into N(s0^2 a, s0^2 I): mean and variance known.
    d, n, s, steps, s0 = 3, 4000, 0.05, 300, 1.2
    a = jnp.array([0.5, -1.0, 0.0])
    key0, key1 = jax.random.split(jax.random.key(0))
    z0 = s0 * jax.random.normal(key0, (n, d))
    noise = jax.random.normal(key1, (steps, n, d))
    z = np.asarray(langevin_chain(prior_log_density(lambda z: z @ a, s0), z0, noise, s))
    precision = np.eye(d) / s0**2
    var = np.diag(_ula_stationary_cov(precision, s))
    mean = s0**2 * np.asarray(a)
    assert np.all(np.abs(z.mean(0) - mean) < 5 * np.sqrt(var / n))
    assert np.all(np.abs(z.var(0) - var) < 5 * var * np.sqrt(2 / n))
    # and the ULA bias is small at this step size: within 2% of the exact target variance
    np.testing.assert_allclose(var, s0**2, rtol=0.02)


def test_power_posterior_chains_match_closed_form_at_each_temperature():
    rng = np.random.default_rng(1)
    d, D, s0, sl = 2, 4, 1.0, 0.8
    W = rng.normal(size=(D, d))
    x = rng.normal(size=D)
    temps = np.array([0.0, 0.3, 1.0])
    n, s, steps = 3000, 0.02, 600

    def log_lik(z):  # (..., d) -> (...)
        r = x - z @ W.T
        return -jnp.sum(r**2, -1) / (2 * sl**2)

    density = power_posterior_log_density(
        lambda z: jnp.zeros(z.shape[:-1]), log_lik, jnp.asarray(temps)[:, None], s0
    )
    k0, k1 = jax.random.split(jax.random.key(3))
    z0 = s0 * jax.random.normal(k0, (len(temps), n, d))
    z = np.asarray(langevin_chain(density, z0, jax.random.normal(k1, (steps, len(temps), n, d)), s))
    for i, t in enumerate(temps):
        precision = np.eye(d) / s0**2 + t * W.T @ W / sl**2
        mean = np.linalg.solve(precision, t * W.T @ x / sl**2)
        cov = _ula_stationary_cov(precision, s)
        se = np.sqrt(np.diag(cov) / n)
        assert np.all(np.abs(z[i].mean(0) - mean) < 5 * se), (t, z[i].mean(0), mean)
        np.testing.assert_allclose(np.cov(z[i].T), cov, atol=6 * np.max(np.diag(cov)) * np.sqrt(2 / n))


def test_zero_temperature_samples_the_prior_exactly():
    """t = 0 removes the likelihood from Eq. 17: with the same noise the chain is the prior chain."""
    w1 = jax.random.normal(jax.random.key(0), (3, 8))
    energy = lambda z: jnp.sum(jnp.tanh(z @ w1), -1)  # noqa: E731 - a tiny nonlinear f_alpha
    log_lik = lambda z: -jnp.sum((z - 2.0) ** 2, -1) * 10.0  # noqa: E731 - strongly informative
    z0 = jax.random.normal(jax.random.key(1), (5, 3))
    noise = jax.random.normal(jax.random.key(2), (20, 5, 3))
    prior = langevin_chain(prior_log_density(energy, 1.0), z0, noise, 0.1)
    tempered0 = langevin_chain(power_posterior_log_density(energy, log_lik, 0.0, 1.0), z0, noise, 0.1)
    tempered1 = langevin_chain(power_posterior_log_density(energy, log_lik, 1.0, 1.0), z0, noise, 0.1)
    np.testing.assert_array_equal(np.asarray(prior), np.asarray(tempered0))
    assert np.max(np.abs(np.asarray(tempered1 - prior))) > 0.1


def test_power_posterior_grad_is_eq17():
    w = jnp.array([0.3, -0.2])
    energy = lambda z: z @ w  # noqa: E731
    x = jnp.array([1.0, 2.0])
    log_lik = lambda z: -jnp.sum((x - 2 * z) ** 2, -1) / (2 * 0.5**2)  # noqa: E731
    z = jnp.array([[0.1, -0.4], [1.0, 0.5]])
    t, s0 = 0.7, 1.5
    got = power_posterior_grad(energy, log_lik, t, s0, z)
    expected = t * 2 * (x - 2 * z) / 0.5**2 + w - z / s0**2
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6)
