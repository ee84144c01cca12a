"""The vanilla (Eq. 7-9) and thermodynamic (Eq. 15-22) gradients against hand computations on linear
networks, finite differences, and the ebm_gradient switch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.objectives import (
    Hyper,
    NetworkFns,
    fitted_gaussians,
    sample_power_posteriors,
    sample_prior,
    thermo_loss,
    vanilla_loss,
)
from model.thermo import temperature_schedule

D_Z, B = 2, 6
LINEAR = NetworkFns(
    energy=lambda a, z: z @ a["w"],  # f_alpha(z) = a.z
    generate=lambda b, z: (z @ b["w"]).reshape(z.shape[:-1] + (2, 2, 1)),  # g(z) = z W as a 2x2 image
)


def _setup(dtype=jnp.float32, **hyper):
    rng = np.random.default_rng(0)
    params = {
        "ebm": {"w": jnp.asarray(rng.normal(size=D_Z) * 0.3, dtype)},
        "gen": {"w": jnp.asarray(rng.normal(size=(D_Z, 4)) * 0.5, dtype)},
    }
    x = jnp.asarray(rng.normal(size=(B, 2, 2, 1)), dtype)
    values = (
        dict(
            temp_power=1.5,
            kl_weight=0.0,
            prior_step_size=0.1,
            posterior_step_size=0.05,
            prior_sigma=1.0,
            lkhood_sigma=0.8,
            kl_ridge=1e-3,
        )
        | hyper
    )
    hp = Hyper(**{k: jnp.asarray(v, dtype) for k, v in values.items()})
    return params, x, hp


def test_vanilla_gradients_are_eq7_and_eq8():
    params, x, hp = _setup()
    key, ids = jax.random.key(4), jnp.arange(B)
    grads = jax.grad(
        lambda p: vanilla_loss(p, x, key, ids, hp, nets=LINEAR, prior_steps=7, posterior_steps=5, z_dim=D_Z)[
            0
        ]
    )(params)
    k_prior, k_post = jax.random.split(key)
    z_prior = np.asarray(sample_prior(LINEAR, params["ebm"], k_prior, ids, 7, D_Z, hp))
    z_post = np.asarray(sample_power_posteriors(LINEAR, params, x, jnp.ones(1), k_post, ids, 5, D_Z, hp)[0])
    # Eq. 7 (as a loss, the negative): d/da [mean f(z_prior) - mean f(z_post)] = mean z_prior - mean z_post
    np.testing.assert_allclose(grads["ebm"]["w"], z_prior.mean(0) - z_post.mean(0), rtol=1e-5, atol=1e-6)
    # Eq. 8-9: d/dW mean ||x - z W||^2 / (2 sl^2) = -(1/(B sl^2)) sum_b z_b^T (x_b - z_b W)
    W, xf = np.asarray(params["gen"]["w"]), np.asarray(x).reshape(B, 4)
    expected = -z_post.T @ (xf - z_post @ W) / (B * 0.8**2)
    np.testing.assert_allclose(grads["gen"]["w"], expected, rtol=1e-5, atol=1e-6)


def _trapezoid_weights(temps):
    dt = np.diff(temps)
    w = np.zeros(len(temps))
    w[:-1] += dt / 2
    w[1:] += dt / 2
    return w


def test_thermo_ebm_gradient_flows_through_the_chains_only():
    """With linear f and g the tempered chain is linear in z: z_{k+1} = z_k A_t + s(c + a) + noise with
    A_t = I - s(t W W^T / sl^2 + I / s0^2), so dz_K/da = s sum_{k<K} A_t^k. The loss has no explicit a,
    so its a-gradient (eta = 0) is -sum_i w_i mean_b (dz_K/da) grad_z log p(x_b|z_ib)."""
    params, x, hp = _setup(kl_weight=0.0)
    key, ids, nt, steps = jax.random.key(7), jnp.arange(B), 4, 6

    def loss(p, cg):
        return thermo_loss(
            p,
            x,
            key,
            ids,
            hp,
            nets=LINEAR,
            num_temps=nt,
            posterior_steps=steps,
            z_dim=D_Z,
            ebm_gradient="chains" if cg else "none",
        )[0]

    grads = jax.grad(lambda p: loss(p, True))(params)
    temps = np.asarray(temperature_schedule(nt, hp.temp_power))
    z = np.asarray(sample_power_posteriors(LINEAR, params, x, jnp.asarray(temps), key, ids, steps, D_Z, hp))
    W, xf, s, sl = np.asarray(params["gen"]["w"]), np.asarray(x).reshape(B, 4), 0.05, 0.8
    w = _trapezoid_weights(temps)
    expected = np.zeros(D_Z)
    for i, t in enumerate(temps):
        A = np.eye(D_Z) - s * (t * W @ W.T / sl**2 + np.eye(D_Z))
        J = s * sum(np.linalg.matrix_power(A, k) for k in range(steps))
        g = (xf - z[i] @ W) @ W.T / sl**2  # grad_z log p(x_b | z_ib), (B, d)
        expected -= w[i] * (J @ g.mean(0))
    np.testing.assert_allclose(grads["ebm"]["w"], expected, rtol=2e-4, atol=1e-6)
    assert np.abs(expected).max() > 1e-3

    frozen = jax.grad(lambda p: loss(p, False))(params)
    np.testing.assert_array_equal(np.asarray(frozen["ebm"]["w"]), 0.0)  # the published code's behaviour
    assert np.abs(np.asarray(frozen["gen"]["w"])).max() > 1e-3  # the generator still learns


@pytest.mark.parametrize("kl_weight", [1.0, 2.5])
def test_thermo_gradient_matches_finite_differences(kl_weight):
    """The whole TI loss, KL term included, differentiated through the chains (ebm_gradient=chains; with
    none the update is deliberately not the loss's derivative, see the test above)."""
    with jax.enable_x64(True):
        params, x, hp = _setup(jnp.float64, kl_weight=kl_weight)
        key, ids = jax.random.key(11), jnp.arange(B)

        def loss(p):
            return thermo_loss(
                p,
                x,
                key,
                ids,
                hp,
                nets=LINEAR,
                num_temps=5,
                posterior_steps=4,
                z_dim=D_Z,
                ebm_gradient="chains",
            )[0]

        grads = jax.grad(loss)(params)
        rng = np.random.default_rng(5)
        eps = 1e-6
        for _ in range(3):
            v = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
            plus = loss(jax.tree.map(lambda a, b: a + eps * b, params, v))
            minus = loss(jax.tree.map(lambda a, b: a - eps * b, params, v))
            numeric = (plus - minus) / (2 * eps)
            analytic = sum(
                jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(v), strict=True)
            )
            np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-6, atol=1e-8)


def test_thermo_loss_is_minus_ti_estimate_with_the_kl_difference():
    params, x, hp = _setup(kl_weight=2.0)
    key, ids = jax.random.key(1), jnp.arange(B)
    loss, aux = thermo_loss(params, x, key, ids, hp, nets=LINEAR, num_temps=4, posterior_steps=3, z_dim=D_Z)
    temps = np.asarray(temperature_schedule(4, hp.temp_power))
    e = np.asarray(aux["expected_loglik"])
    trap = np.sum(np.diff(temps) * (e[:-1] + e[1:]) / 2)
    kl = 0.5 * np.sum(np.asarray(aux["kl_forward"]) - np.asarray(aux["kl_backward"]))
    np.testing.assert_allclose(float(loss), -(trap + 2.0 * kl), rtol=1e-5)
    # E_i includes the Gaussian normalising constant: -D/2 log(2 pi sl^2) per image at most
    assert np.all(e < -0.5 * 4 * np.log(2 * np.pi * 0.8**2) + 1e-5)


def test_fitted_gaussians_are_the_batch_mean_and_unbiased_covariance_plus_ridge():
    z = jax.random.normal(jax.random.key(0), (3, 20, 4)) * jnp.arange(1, 5)
    mean, cov = fitted_gaussians(z, 0.01)
    for i in range(3):
        np.testing.assert_allclose(mean[i], np.asarray(z[i]).mean(0), rtol=1e-5, atol=1e-6)
        expected = np.cov(np.asarray(z[i]).T) + 0.01 * np.eye(4)
        np.testing.assert_allclose(cov[i], expected, rtol=1e-4, atol=1e-5)
