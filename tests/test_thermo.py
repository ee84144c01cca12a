"""model.thermo against closed forms: the schedule, Eq. 20's KL, and TI on a linear-Gaussian model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.thermo import (
    adjacent_gaussian_kls,
    gaussian_kl,
    temperature_schedule,
    trapezoid_log_evidence,
    trapezoid_weights,
)


def test_temperature_schedule_is_the_power_law_with_both_ends():
    for n, p in [(10, 1.0), (5, 0.3), (30, 6.0), (2, 10.0)]:
        t = np.asarray(temperature_schedule(n, p))
        expected = (np.arange(n) / (n - 1)) ** p
        np.testing.assert_allclose(t, expected, rtol=1e-6, atol=0)
        assert t[0] == 0.0 and t[-1] == 1.0
        assert np.all(np.diff(t) > 0)


def test_temperature_schedule_traced_power_has_finite_gradient():
    g = jax.grad(lambda p: jnp.sum(temperature_schedule(5, p)))(2.0)
    i = np.arange(5) / 4
    expected = np.sum(np.where(i > 0, i**2 * np.log(np.where(i > 0, i, 1)), 0))
    np.testing.assert_allclose(float(g), expected, rtol=1e-5)


@pytest.mark.parametrize("n,p", [(1, 1.0), (0, 1.0), (5, 0.0), (5, -1.0)])
def test_temperature_schedule_refuses_bad_values(n, p):
    with pytest.raises(ValueError, match="num_temps" if n < 2 else "temp_power"):
        temperature_schedule(n, p)


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + d * np.eye(d) * 0.1


def _kl_direct(m0, s0, m1, s1):
    d = len(m0)
    inv1 = np.linalg.inv(s1)
    return 0.5 * (
        np.log(np.linalg.det(s1) / np.linalg.det(s0)) + np.trace(inv1 @ s0) + (m1 - m0) @ inv1 @ (m1 - m0) - d
    )


def test_gaussian_kl_matches_eq20_and_is_zero_for_equal_gaussians():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        for d in (1, 3, 8):
            m0, m1 = rng.normal(size=d), rng.normal(size=d)
            s0, s1 = _random_spd(rng, d), _random_spd(rng, d)
            got = float(gaussian_kl(jnp.asarray(m0), jnp.asarray(s0), jnp.asarray(m1), jnp.asarray(s1)))
            np.testing.assert_allclose(got, _kl_direct(m0, s0, m1, s1), rtol=1e-10)
            assert abs(float(gaussian_kl(m0, s0, m0, s0))) < 1e-10
        # batched over a leading axis
        ms, ss = rng.normal(size=(4, 3)), np.stack([_random_spd(rng, 3) for _ in range(4)])
        fwd, bwd = adjacent_gaussian_kls(jnp.asarray(ms), jnp.asarray(ss))
        for i in range(1, 4):
            expect_fwd = _kl_direct(ms[i - 1], ss[i - 1], ms[i], ss[i])
            expect_bwd = _kl_direct(ms[i], ss[i], ms[i - 1], ss[i - 1])
            np.testing.assert_allclose(float(fwd[i - 1]), expect_fwd, rtol=1e-9)
            np.testing.assert_allclose(float(bwd[i - 1]), expect_bwd, rtol=1e-9)


class LinearGaussian:
    """z ~ N(0, s0^2 I_d), x | z ~ N(W z, sl^2 I_D): every power posterior is Gaussian in closed form."""

    def __init__(self, d=3, D=5, s0=1.3, sl=0.7, seed=0):
        rng = np.random.default_rng(seed)
        self.W = rng.normal(size=(D, d))
        self.s0, self.sl, self.d, self.D = s0, sl, d, D
        self.x = self.W @ rng.normal(size=d) * s0 + sl * rng.normal(size=D)

    def power_posterior(self, t):
        prec = np.eye(self.d) / self.s0**2 + t * self.W.T @ self.W / self.sl**2
        cov = np.linalg.inv(prec)
        return cov @ (t * self.W.T @ self.x / self.sl**2), cov

    def expected_loglik(self, t):
        m, c = self.power_posterior(t)
        r = self.x - self.W @ m
        return -0.5 * self.D * np.log(2 * np.pi * self.sl**2) - (r @ r + np.trace(self.W @ c @ self.W.T)) / (
            2 * self.sl**2
        )

    def log_evidence(self):
        cov = self.s0**2 * self.W @ self.W.T + self.sl**2 * np.eye(self.D)
        _, logdet = np.linalg.slogdet(cov)
        return -0.5 * (self.D * np.log(2 * np.pi) + logdet + self.x @ np.linalg.solve(cov, self.x))

    def ti_inputs(self, temps):
        e = np.array([self.expected_loglik(t) for t in temps])
        ms, cs = zip(*(self.power_posterior(t) for t in temps), strict=True)
        fwd, bwd = adjacent_gaussian_kls(jnp.asarray(np.stack(ms)), jnp.asarray(np.stack(cs)))
        return jnp.asarray(e), fwd, bwd


@pytest.mark.parametrize("num_temps,power", [(2, 1.0), (3, 0.3), (5, 1.0), (10, 6.0), (30, 0.1)])
def test_kl_corrected_ti_is_exact_on_linear_gaussian_for_every_schedule(num_temps, power):
    model = LinearGaussian()
    with jax.enable_x64(True):
        temps = jnp.asarray((np.arange(num_temps) / (num_temps - 1)) ** power)
        e, fwd, bwd = model.ti_inputs(np.asarray(temps))
        estimate = float(trapezoid_log_evidence(temps, e, fwd, bwd, kl_weight=1.0))
    np.testing.assert_allclose(estimate, model.log_evidence(), rtol=1e-9, atol=1e-9)


def test_plain_trapezium_error_shrinks_with_more_temperatures():
    model = LinearGaussian()
    with jax.enable_x64(True):
        errors = []
        for n in (3, 5, 10, 20, 40):
            temps = jnp.linspace(0.0, 1.0, n)
            e, _, _ = model.ti_inputs(np.asarray(temps))
            errors.append(abs(float(trapezoid_log_evidence(temps, e)) - model.log_evidence()))
    assert errors[0] > 1e-3  # the uncorrected rule is visibly biased with few temperatures...
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False))  # ...and improves monotonically
    assert errors[-1] < errors[0] / 50  # second-order convergence: 40 vs 3 points


def test_kl_weight_scales_only_the_correction():
    model = LinearGaussian()
    with jax.enable_x64(True):
        temps = jnp.asarray(np.linspace(0, 1, 4) ** 2)
        e, fwd, bwd = model.ti_inputs(np.asarray(temps))
        base = float(trapezoid_log_evidence(temps, e))
        one = float(trapezoid_log_evidence(temps, e, fwd, bwd, 1.0))
        three = float(trapezoid_log_evidence(temps, e, fwd, bwd, 3.0))
    np.testing.assert_allclose(three - base, 3 * (one - base), rtol=1e-9)
    assert abs(one - base) > 1e-3
    with pytest.raises(ValueError, match="both"):
        trapezoid_log_evidence(temps, e, fwd, None)


@pytest.mark.parametrize("num_temps,power", [(2, 1.0), (5, 0.3), (10, 3.0)])
def test_trapezoid_weights_give_the_trapezium(num_temps, power):
    temps = temperature_schedule(num_temps, power)
    e = jnp.asarray(np.random.default_rng(0).normal(size=num_temps))
    w = trapezoid_weights(temps)
    np.testing.assert_allclose(float(jnp.sum(w * e)), float(trapezoid_log_evidence(temps, e)), rtol=1e-5)
    np.testing.assert_allclose(float(jnp.sum(w)), 1.0, rtol=1e-6)


def test_trapezoid_weight_on_the_prior_is_large_for_small_p():
    """Finding 3: w_0, the weight of samples that ignore x in the TI generator gradient, at N_t = 10."""
    w0 = [float(trapezoid_weights(temperature_schedule(10, p))[0]) for p in (0.1, 0.3, 1.0, 3.0)]
    np.testing.assert_allclose(w0, [0.4014, 0.2586, 1 / 18, 6.859e-4], rtol=1e-3)
