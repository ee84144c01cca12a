"""The thermodynamic objective's gradient estimators on a linear-Gaussian model with a quadratic EBM:
f_alpha(z) = a.z - 1/2 sum_j q_j z_j^2, g_beta(z) = z W, so the prior, every tempered posterior and
log p(x) are Gaussian in closed form. Also: the ml/ml choice is vanilla's gradient, eta only matters
through the chains, and one and two devices agree for every rule and gradient choice."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.objectives import Hyper, NetworkFns, sample_power_posteriors, sample_prior, thermo_loss
from model.thermo import temperature_schedule, trapezoid_weights

D_Z, D_X = 2, 4
SIGMA = 0.8
QUADRATIC = NetworkFns(
    energy=lambda a, z: z @ a["a"] - 0.5 * jnp.sum(a["q"] * z**2, axis=-1),
    generate=lambda b, z: (z @ b["w"]).reshape(z.shape[:-1] + (2, 2, 1)),
)


def _problem(batch, step_size=0.1, seed=0, **hyper):
    rng = np.random.default_rng(seed)
    params = {
        "ebm": {"a": jnp.asarray([0.4, -0.3]), "q": jnp.asarray([0.5, 0.2])},
        "gen": {"w": jnp.asarray(rng.normal(size=(D_Z, D_X)) * 0.6)},
    }
    x = jnp.asarray(1.5 + 2.0 * rng.normal(size=(batch, 2, 2, 1)))  # far from the model: large gradients
    values = (
        dict(
            temp_power=1.5,
            kl_weight=1.0,
            prior_step_size=step_size,
            posterior_step_size=step_size,
            prior_sigma=1.0,
            lkhood_sigma=SIGMA,
            kl_ridge=1e-3,
        )
        | hyper
    )
    return params, x, Hyper(**{k: jnp.asarray(v, jnp.float32) for k, v in values.items()})


def _prior_gaussian(ebm, s0=1.0):
    """p_alpha(z) = N(mu0, diag(1 / prec0)): exp(a.z - q z^2 / 2) N(0, s0^2) is Gaussian."""
    prec0 = 1.0 / s0**2 + ebm["q"]
    return ebm["a"] / prec0, prec0


def _closed_form_log_evidence(params, x):
    """mean_b log p(x_b): x ~ N(W^T mu0, W^T diag(1/prec0) W + sigma^2 I)."""
    mu0, prec0 = _prior_gaussian(params["ebm"])
    w = params["gen"]["w"]
    cov = w.T @ (w / prec0[:, None]) + SIGMA**2 * jnp.eye(D_X)
    r = x.reshape(-1, D_X) - mu0 @ w
    _, logdet = jnp.linalg.slogdet(cov)
    quad = jnp.sum(r * jnp.linalg.solve(cov, r.T).T, axis=-1)
    return jnp.mean(-0.5 * (D_X * jnp.log(2 * jnp.pi) + logdet + quad))


def _tempered_posterior(params, x, t):
    """Means (B, d) and covariance (d, d) of p(z|x, t) ∝ p(x|z)^t p_alpha(z)."""
    mu0, prec0 = _prior_gaussian(params["ebm"])
    w = params["gen"]["w"]
    cov = jnp.linalg.inv(jnp.diag(prec0) + t * w @ w.T / SIGMA**2)
    return (prec0 * mu0 + t * x.reshape(-1, D_X) @ w.T / SIGMA**2) @ cov, cov


def _estimates(params, x, hp, keys, **kw):
    """The loss gradient for each key: (R,) + leaf shapes per leaf."""
    ids = jnp.arange(x.shape[0])
    grad = jax.jit(jax.grad(lambda p, k: thermo_loss(p, x, k, ids, hp, nets=QUADRATIC, z_dim=D_Z, **kw)[0]))
    return jax.tree.map(lambda *g: np.stack(g), *[grad(params, k) for k in keys])


def _within(estimates, expected, n_se=5.0):
    for est, exp in zip(jax.tree.leaves(estimates), jax.tree.leaves(expected), strict=True):
        mean, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(est.shape[0])
        assert np.all(np.abs(mean - np.asarray(exp)) < n_se * se + 1e-4), (mean, np.asarray(exp), se)
        assert np.abs(np.asarray(exp)).max() > 10 * se.max()  # the comparison resolves the gradient


def test_ml_gradients_are_the_gradient_of_log_px():
    """ebm_gradient=ml and gen_gradient=ml: E_post[grad f] - E_prior[grad f] and E_post[grad_W log p(x|z)]
    equal grad log p(x) in closed form (for a and q, so means and second moments are both tested)."""
    params, x, hp = _problem(256, step_size=0.01)
    keys = [jax.random.key(i) for i in range(8)]
    got = _estimates(
        params,
        x,
        hp,
        keys,
        num_temps=2,
        posterior_steps=800,
        prior_steps=800,
        ebm_gradient="ml",
        gen_gradient="ml",
        ti_rule="trapezoid",
    )
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), params)
        exact = jax.grad(lambda p: -_closed_form_log_evidence(p, jnp.asarray(x, jnp.float64)))(p64)
    _within(got, exact)


@pytest.mark.parametrize("rule", ["trapezoid", "kl_batch"])
def test_ti_gradient_with_frozen_chains_is_the_trapezoid_mixture_of_tempered_gradients(rule):
    """Finding 3: with stop-gradient chains the generator's TI gradient is
    sum_i w_i E_{t_i}[grad_W log p(x|z)], not grad log p(x) = E_{t=1}[...]. The KL term of kl_batch has
    no generator gradient then."""
    params, x, hp = _problem(256, step_size=0.01)
    num_temps = 4
    keys = [jax.random.key(10 + i) for i in range(8)]
    got = _estimates(
        params,
        x,
        hp,
        keys,
        num_temps=num_temps,
        posterior_steps=800,
        ebm_gradient="none",
        gen_gradient="ti",
        ti_rule=rule,
    )
    np.testing.assert_array_equal(got["ebm"]["a"], 0.0)
    temps = temperature_schedule(num_temps, hp.temp_power)
    w = np.asarray(trapezoid_weights(temps))
    expected = np.zeros((D_Z, D_X))
    xf, wm = np.asarray(x).reshape(-1, D_X), np.asarray(params["gen"]["w"])
    for wi, t in zip(w, np.asarray(temps), strict=True):
        mean, cov = (np.asarray(v) for v in _tempered_posterior(params, x, float(t)))
        # E[z (x - zW)^T] / sigma^2 averaged over the batch, for z ~ N(mean_b, cov)
        second = cov + np.einsum("bi,bj->ij", mean, mean) / len(mean)
        expected -= wi * (mean.T @ xf / len(mean) - second @ wm) / SIGMA**2
    _within({"w": got["gen"]["w"]}, {"w": expected})
    exact_ml = np.asarray(
        jax.grad(lambda w_: -_closed_form_log_evidence({"ebm": params["ebm"], "gen": {"w": w_}}, x))(
            params["gen"]["w"]
        )
    )
    assert np.abs(expected - exact_ml).max() > 0.1 * np.abs(exact_ml).max()  # TI is not the ML gradient


def test_thermo_ml_ml_is_the_vanilla_gradient_on_the_same_samples(monkeypatch):
    """ebm_gradient=ml, gen_gradient=ml: the gradient of `vanilla_loss` itself, fed thermo's t = 1 chains
    and prior chain in place of its own draws (its samplers are replaced by ones returning them)."""
    from model import objectives

    params, x, hp = _problem(6)
    key, ids, num_temps = jax.random.key(3), jnp.arange(6), 3
    grads = jax.grad(
        lambda p: thermo_loss(
            p,
            x,
            key,
            ids,
            hp,
            nets=QUADRATIC,
            num_temps=num_temps,
            posterior_steps=5,
            prior_steps=7,
            z_dim=D_Z,
            ebm_gradient="ml",
            gen_gradient="ml",
        )[0]
    )(params)
    temps = temperature_schedule(num_temps, hp.temp_power)
    z_post = sample_power_posteriors(QUADRATIC, params, x, temps, key, ids, 5, D_Z, hp)[-1]
    z_prior = sample_prior(QUADRATIC, params["ebm"], jax.random.split(key)[1], ids, 7, D_Z, hp)
    monkeypatch.setattr(objectives, "sample_prior", lambda *a, **k: z_prior)
    monkeypatch.setattr(objectives, "sample_power_posteriors", lambda *a, **k: z_post[None])
    expected = jax.grad(
        lambda p: objectives.vanilla_loss(
            p, x, key, ids, hp, nets=QUADRATIC, prior_steps=7, posterior_steps=5, z_dim=D_Z
        )[0]
    )(params)
    for got, exp in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-6, atol=1e-7)
        assert np.abs(np.asarray(exp)).max() > 1e-3  # not vacuous


def test_gen_ml_with_chain_gradients_does_not_flow_through_the_chains():
    """ebm_gradient=chains, gen_gradient=ml: alpha's gradient is backpropagated through the chains, the
    generator's is only -E_{t=1}[grad_W log p(x|z)] on the t = 1 chains held fixed."""
    from model.nets import log_likelihood

    params, x, hp = _problem(6)
    key, ids, num_temps = jax.random.key(4), jnp.arange(6), 3
    loss = functools.partial(
        thermo_loss,
        nets=QUADRATIC,
        num_temps=num_temps,
        posterior_steps=5,
        z_dim=D_Z,
        ebm_gradient="chains",
        ti_rule="trapezoid",
    )
    grads = jax.grad(lambda p: loss(p, x, key, ids, hp, gen_gradient="ml")[0])(params)
    temps = temperature_schedule(num_temps, hp.temp_power)
    z_post = sample_power_posteriors(QUADRATIC, params, x, temps, key, ids, 5, D_Z, hp)[-1]
    expected = jax.grad(
        lambda g: -jnp.mean(log_likelihood(x, QUADRATIC.generate(g, z_post), hp.lkhood_sigma))
    )(params["gen"])
    np.testing.assert_allclose(grads["gen"]["w"], expected["w"], rtol=1e-5, atol=1e-6)
    ti = jax.grad(lambda p: loss(p, x, key, ids, hp, gen_gradient="ti")[0])(params)
    for a, b in zip(jax.tree.leaves(grads["ebm"]), jax.tree.leaves(ti["ebm"]), strict=True):
        np.testing.assert_array_equal(a, b)  # alpha's gradient through the chains, whatever gen_gradient
    assert np.abs(np.asarray(grads["ebm"]["a"])).max() > 1e-3


@pytest.mark.parametrize("ebm_gradient", ["none", "ml", "chains"])
def test_eta_changes_training_only_through_the_chains(ebm_gradient):
    """Finding 2: with stop-gradient chains the KL term is a constant, so eta cannot change a gradient."""
    params, x, hp = _problem(6, kl_weight=1.0)
    key, ids = jax.random.key(5), jnp.arange(6)

    def grads(kl_weight):
        h = hp._replace(kl_weight=jnp.asarray(kl_weight, jnp.float32))
        loss = functools.partial(
            thermo_loss,
            nets=QUADRATIC,
            num_temps=4,
            posterior_steps=3,
            prior_steps=3,
            z_dim=D_Z,
            ebm_gradient=ebm_gradient,
        )
        return jax.grad(lambda p: loss(p, x, key, ids, h)[0])(params)

    one, four = (jax.tree.leaves(grads(k)) for k in (1.0, 4.0))
    same = all(np.array_equal(a, b) for a, b in zip(one, four, strict=True))
    assert same == (ebm_gradient != "chains")


@pytest.mark.parametrize("ebm_gradient", ["none", "ml", "chains"])
def test_kl_rules_train_like_trapezoid_when_the_chains_are_stop_gradient(ebm_gradient):
    """With stop-gradient chains (and gen_gradient=ti) the KL terms of kl_batch and kl_example are
    constants, so at equal M the three rules give bit-identical gradients (what sweep.grid names as
    identical cells); through the chains they differ."""
    params, x, hp = _problem(6)
    key, ids = jax.random.key(7), jnp.arange(6)

    def grads(rule):
        loss = functools.partial(
            thermo_loss,
            nets=QUADRATIC,
            num_temps=4,
            posterior_steps=3,
            prior_steps=3,
            z_dim=D_Z,
            ti_rule=rule,
            chains_per_example=6,
            ebm_gradient=ebm_gradient,
        )
        return jax.tree.leaves(jax.grad(lambda p: loss(p, x, key, ids, hp)[0])(params))

    trap, batch, example = (grads(r) for r in ("trapezoid", "kl_batch", "kl_example"))
    for other in (batch, example):
        same = all(np.array_equal(a, b) for a, b in zip(trap, other, strict=True))
        assert same == (ebm_gradient != "chains")


CASES = [
    (rule, 6, "chains", "ti")
    for rule in ("kl_batch", "kl_example", "variance", "stepping_stone", "trapezoid")
]
CASES += [
    ("kl_batch", 1, "chains", "ti"),
    ("kl_example", 6, "none", "ti"),
    ("variance", 2, "ml", "ml"),
    ("stepping_stone", 2, "ml", "ti"),
    ("kl_batch", 2, "chains", "ml"),
]


@pytest.mark.parametrize("rule,chains,ebm_gradient,gen_gradient", CASES)
def test_one_and_two_devices_agree(rule, chains, ebm_gradient, gen_gradient):
    """pmean of per-device gradients (kl_batch fits its Gaussians on the psum'd batch) equals the gradient
    on the whole batch, for every rule and gradient choice."""
    devices = jax.local_devices()[:2]
    assert len(devices) == 2, "tests/conftest.py forces two host devices"
    params, x, hp = _problem(4)
    key = jax.random.key(9)
    kw = dict(
        nets=QUADRATIC,
        num_temps=3,
        posterior_steps=3,
        prior_steps=3,
        z_dim=D_Z,
        ti_rule=rule,
        chains_per_example=chains,
        ebm_gradient=ebm_gradient,
        gen_gradient=gen_gradient,
    )

    def value_and_grad(p, xb, ids, axis_name=None):
        loss = functools.partial(thermo_loss, **kw, axis_name=axis_name)
        (value, aux), g = jax.value_and_grad(loss, has_aux=True)(p, xb, key, ids, hp)
        if axis_name:
            sums = aux.pop("kl_identity_moments")  # sums over examples: psum, as the train step does
            value, aux, g = jax.lax.pmean((value, aux, g), axis_name)
            aux["kl_identity_moments"] = jax.lax.psum(sums, axis_name)
        return value, aux, g

    one = value_and_grad(params, x, jnp.arange(4))

    def per_device(xb):
        ids = jax.lax.axis_index("batch") * 2 + jnp.arange(2)
        return value_and_grad(params, xb, ids, "batch")

    two = jax.pmap(per_device, axis_name="batch", devices=devices)(x.reshape(2, 2, 2, 2, 1))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True):
        np.testing.assert_allclose(np.asarray(b)[0], np.asarray(a), rtol=2e-4, atol=2e-5)
    assert np.abs(np.asarray(one[2]["gen"]["w"])).max() > 1e-3
