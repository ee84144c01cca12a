"""AIS log-likelihood (model/ais.py) against the closed forms of a linear-Gaussian LEBM.

With a quadratic f(z) = b.z - c||z||^2/2 and a linear generator g(z) = Wz + mu, the prior is Gaussian
N(b/lam, I/lam), lam = 1/sigma_0^2 + c, and p(x) = N(x; W b/lam + mu, W W^T/lam + sigma_l^2 I): every
normaliser has a closed form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.ais import log_z_data, log_z_prior, validation_log_likelihood
from model.objectives import NetworkFns

D_Z, SHAPE, PIXELS = 4, (4, 4, 1), 16
PRIOR_SIGMA, LKHOOD_SIGMA, CURVATURE = 1.0, 0.3, 0.5


def _energy(p, z):
    return z @ p["b"] - 0.5 * p["c"] * jnp.sum(z**2, axis=-1)


def _generate(p, z):
    return (z @ p["W"].T + p["mu"]).reshape(z.shape[:-1] + SHAPE)


NETS = NetworkFns(_energy, _generate)


class LinearGaussian:
    """Parameters, a data sample, and the closed-form log Z_alpha and log p(x)."""

    def __init__(self, seed: int = 0, n: int = 64, b_scale: float = 0.8):
        rng = np.random.default_rng(seed)
        b = rng.normal(size=D_Z) * b_scale
        w = rng.normal(size=(PIXELS, D_Z)) * 0.5
        mu = rng.normal(size=PIXELS) * 0.1
        self.params = {
            "ebm": {"b": jnp.asarray(b, jnp.float32), "c": jnp.float32(CURVATURE)},
            "gen": {"W": jnp.asarray(w, jnp.float32), "mu": jnp.asarray(mu, jnp.float32)},
        }
        lam = 1.0 / PRIOR_SIGMA**2 + CURVATURE
        self.log_z_alpha = -D_Z / 2 * np.log(PRIOR_SIGMA**2 * lam) + b @ b / (2 * lam)
        z = b / lam + rng.normal(size=(n, D_Z)) / np.sqrt(lam)
        x = z @ w.T + mu + LKHOOD_SIGMA * rng.normal(size=(n, PIXELS))
        cov = w @ w.T / lam + LKHOOD_SIGMA**2 * np.eye(PIXELS)
        resid = x - (w @ (b / lam) + mu)
        _, logdet = np.linalg.slogdet(2 * np.pi * cov)
        self.log_px = -0.5 * (logdet + np.einsum("ni,ij,nj->n", resid, np.linalg.inv(cov), resid))
        self.x = jnp.asarray(x.reshape((n,) + SHAPE), jnp.float32)


@pytest.fixture(scope="module")
def model():
    return LinearGaussian()


def _val_ll(model, num_temps, key=1, chains=4):
    fn = jax.jit(
        lambda k: validation_log_likelihood(
            NETS,
            model.params,
            model.x,
            k,
            prior_sigma=PRIOR_SIGMA,
            lkhood_sigma=LKHOOD_SIGMA,
            z_dim=D_Z,
            num_temps=num_temps,
            chains=chains,
        )
    )
    return jax.device_get(fn(jax.random.key(key)))


def test_val_ll_matches_closed_form_and_the_gap_shrinks_with_temperatures(model):
    gaps, errors = {}, {}
    for temps in (10, 30, 100, 300):
        r = _val_ll(model, temps)
        per_x = r.log_z_x - (model.log_px + model.log_z_alpha)
        gaps[temps] = per_x.mean()
        errors[temps] = per_x.std(ddof=1) / np.sqrt(len(per_x))
        if temps >= 100:  # the default and above: val_ll within 3 of its standard errors
            assert abs(r.val_ll - model.log_px.mean()) < 3 * r.val_ll_stderr
            assert 0.4 < r.accept_x < 0.8 and 0.4 < r.accept_prior < 0.8  # the step size has adapted
    # AIS's gap (a negative bias) shrinks with more temperatures ...
    assert gaps[10] < gaps[30] < gaps[100] - errors[100] < 0
    assert gaps[10] < -5 * errors[10]
    # ... and at 300 temperatures it is below the Monte Carlo error of the paired differences.
    assert abs(gaps[300]) < 3 * errors[300]


def test_each_ais_estimate_is_below_its_closed_form_on_average():
    model = LinearGaussian(seed=3, n=16, b_scale=2.0)
    keys = jax.random.split(jax.random.key(7), 64)
    prior = jax.jit(
        jax.vmap(
            lambda k: log_z_prior(
                NETS, model.params["ebm"], k, prior_sigma=PRIOR_SIGMA, z_dim=D_Z, num_temps=3, chains=4
            )[0]
        )
    )
    gap = np.asarray(prior(keys)) - model.log_z_alpha
    assert gap.mean() < -3 * gap.std(ddof=1) / np.sqrt(len(gap))
    data = jax.jit(
        lambda k: log_z_data(
            NETS,
            model.params,
            model.x,
            k,
            prior_sigma=PRIOR_SIGMA,
            lkhood_sigma=LKHOOD_SIGMA,
            z_dim=D_Z,
            num_temps=20,
            chains=4,
        )[0]
    )
    gap_x = np.asarray(data(jax.random.key(8))) - (model.log_px + model.log_z_alpha)
    assert gap_x.mean() < -3 * gap_x.std(ddof=1) / np.sqrt(len(gap_x))


def test_log_z_alpha_is_right_two_sided_and_its_reported_variance_is_honest():
    """log Z_hat_alpha against the closed form from both sides, on a prior far from N(0, I) (|log Z_alpha|
    >> 1, so leaving the prior path out of val_ll could not pass as noise), and the delta-method variance
    it reports against its spread over independent keys."""
    model = LinearGaussian(seed=3, n=16, b_scale=2.0)
    assert abs(model.log_z_alpha) > 5
    keys = jax.random.split(jax.random.key(11), 20)
    lz, _, var = jax.device_get(
        jax.jit(
            jax.vmap(
                lambda k: log_z_prior(
                    NETS,
                    model.params["ebm"],
                    k,
                    prior_sigma=PRIOR_SIGMA,
                    z_dim=D_Z,
                    num_temps=100,
                    chains=256,
                )
            )
        )(keys)
    )
    err = np.asarray(lz, np.float64) - model.log_z_alpha
    assert abs(err.mean()) < 3 * err.std(ddof=1) / np.sqrt(len(err)) + 0.01
    assert 0.4 < np.mean(var) / err.var(ddof=1) < 2.5
    r = _val_ll(model, 100)
    assert abs(r.val_ll - model.log_px.mean()) < 3 * r.val_ll_stderr


def test_val_ll_is_deterministic_for_a_key_and_finite_for_a_nonsense_model(model):
    a, b = _val_ll(model, 10, key=5), _val_ll(model, 10, key=5)
    np.testing.assert_array_equal(a.log_z_x, b.log_z_x)
    bad = LinearGaussian(seed=1, n=4)
    bad.params["gen"]["W"] = bad.params["gen"]["W"] * 1e3  # a very sharp posterior: proposals rejected
    r = _val_ll(bad, 10)
    assert np.isfinite(r.val_ll) and np.isfinite(r.log_z_x).all()


@pytest.mark.parametrize("num_pilots", [0, -1])
def test_fewer_than_one_pilot_is_refused(model, num_pilots):
    """With num_pilots=0 the slices [..., :-0] (no estimating chain) and [..., -0:] (every chain as a pilot)
    would silently break the estimate and its unbiasedness."""
    from model.ais import initial_state, log_normaliser, log_normaliser_variance

    match = f"num_pilots={num_pilots} .*num_pilots=1 or more"
    with pytest.raises(ValueError, match=match):
        log_z_prior(
            NETS,
            model.params["ebm"],
            jax.random.key(0),
            prior_sigma=PRIOR_SIGMA,
            z_dim=D_Z,
            num_temps=3,
            chains=4,
            num_pilots=num_pilots,
        )
    with pytest.raises(ValueError, match=match):
        log_z_data(
            NETS,
            model.params,
            model.x[:2],
            jax.random.key(0),
            prior_sigma=PRIOR_SIGMA,
            lkhood_sigma=LKHOOD_SIGMA,
            z_dim=D_Z,
            num_temps=3,
            chains=4,
            num_pilots=num_pilots,
        )
    state = initial_state(jax.random.key(0), (), 4, 1, D_Z, PRIOR_SIGMA, 0.5)
    for fn in (log_normaliser, log_normaliser_variance):
        with pytest.raises(ValueError, match=match):
            fn(state, num_pilots)


def test_val_ll_stderr_adds_the_variance_of_log_z_alpha():
    """val_ll_stderr^2 = Var_x(log Z_hat(x)) / n + Var(log Z_hat_alpha): every x shares one log Z_hat_alpha,
    so the spread over examples cannot show its error (exact, on given numbers)."""
    from model.ais import val_ll_and_stderr

    log_z_x = jnp.asarray([-10.0, -12.0, -11.0, -9.0])
    val_ll, stderr = val_ll_and_stderr(log_z_x, jnp.asarray(0.5), jnp.asarray(0.25))
    assert float(val_ll) == pytest.approx(-11.0)
    assert float(stderr) == pytest.approx(np.sqrt(np.var([-10, -12, -11, -9], ddof=1) / 4 + 0.25), rel=1e-6)


def test_log_normaliser_variance_is_the_delta_method_formula_exactly():
    """Var(w) / (C mean(w)^2), variance with divisor C, over the C estimating chains (pilots left out):
    0 for equal weights, and on unequal ones the explicit formula to rounding."""
    from model.ais import AisState, log_normaliser_variance

    pilots = 2
    log_w = jnp.asarray([[0.0, 0.0, 0.0, 0.0, 5.0, -3.0], [0.3, -1.2, 2.0, 0.7, 9.0, 9.0]])
    state = AisState(*(jnp.zeros_like(log_w) for _ in AisState._fields))._replace(log_w=log_w)
    got = np.asarray(log_normaliser_variance(state, pilots), np.float64)
    w = np.exp(np.asarray(log_w, np.float64)[:, :-pilots])
    c = w.shape[-1]
    np.testing.assert_allclose(got, w.var(axis=-1) / (c * w.mean(axis=-1) ** 2), rtol=1e-5, atol=1e-7)
    assert got[0] == 0.0 and got[1] > 0.05


def test_val_ll_is_within_its_paired_monte_carlo_error_of_the_closed_form(model):
    """At 300 temperatures (the AIS gap below the Monte Carlo error) val_ll against the closed form,
    judged by the paired error: the spread over x of log Z_hat(x) - log Z(x) (~0.1 nats, the images' own
    spread cancels) with log Z_hat_alpha's variance, not the between-image error (~0.35)."""
    r = _val_ll(model, 300)
    per_x = r.log_z_x - (model.log_px + model.log_z_alpha)
    n = len(per_x)
    prior_var = float(r.val_ll_stderr) ** 2 - np.var(r.log_z_x, ddof=1) / n  # what val_ll_stderr adds
    paired = np.sqrt(per_x.var(ddof=1) / n + max(prior_var, 0.0))
    assert paired < 0.5 * float(r.val_ll_stderr)  # the paired error is the tighter judge
    assert abs(float(r.val_ll) - model.log_px.mean()) < 3 * paired
