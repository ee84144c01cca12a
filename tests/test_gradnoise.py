"""Gradient noise (model/gradnoise.py) on a model whose per-example gradients are known.

Example i has gradient a_i (a row of the data); a minibatch's gradient is the batch mean of a_i + tau e_i
with e_i standard normal from the chain key (the Langevin part). So, per entry, the data part is
S^2 (1/B)(1 - B/N) (S^2 the entry's variance over the N examples, divisor N - 1: a minibatch drawn without
replacement) and the Langevin part tau^2 / B.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.gradnoise import gradient_noise, minibatches

N, P_EBM, P_GEN = 100, 300, 500


def _grad_fn(tau: float):
    @jax.jit
    def grad(params, x, key):
        g = jnp.mean(x + tau * jax.random.normal(key, x.shape), axis=0) * params
        return {"ebm": {"w": g[:P_EBM]}, "gen": {"k": g[P_EBM:].reshape(-1, 5), "b": g[:3] * 0 + g[-3:]}}

    return grad


def _data(seed: int = 0, mean: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.linspace(0.5, 2.0, P_EBM + P_GEN)
    return (mean + rng.normal(size=(N, P_EBM + P_GEN)) * scale).astype(np.float32)


def _expected_data_part(data: np.ndarray, batch: int, net: str) -> float:
    s2 = data.var(axis=0, ddof=1)
    cols = np.r_[0:P_EBM] if net == "ebm" else np.r_[P_EBM : P_EBM + P_GEN, P_EBM + P_GEN - 3 : P_EBM + P_GEN]
    return float(s2[cols].mean() / batch * (1 - batch / N))


def test_data_part_follows_the_finite_population_correction():
    data = _data()
    for batch in (5, 20, 60):
        r = gradient_noise(_grad_fn(0.0), 1.0, data, jax.random.key(batch), batch_size=batch, draws=256)
        for net in ("ebm", "gen"):
            expected = _expected_data_part(data, batch, net)
            assert r[f"grad_noise_data_{net}"] == pytest.approx(expected, rel=0.1)
            assert r[f"grad_noise_{net}"] == pytest.approx(expected, rel=0.1)
            assert abs(r[f"grad_noise_langevin_{net}"]) < 1e-6 * expected  # no chain noise
    whole = gradient_noise(_grad_fn(1.0), 1.0, data, jax.random.key(0), batch_size=N, draws=64)
    assert abs(whole["grad_noise_data_gen"]) < 0.05 * whole["grad_noise_langevin_gen"]  # B = N: no data part


def test_data_and_langevin_parts_add_up_to_the_total():
    data, tau, batch = _data(1), 1.5, 10
    diffs, langevin = [], []
    for seed in range(12):
        r = gradient_noise(_grad_fn(tau), 1.0, data, jax.random.key(100 + seed), batch_size=batch, draws=32)
        diffs.append(r["grad_noise_data_ebm"] + r["grad_noise_langevin_ebm"] - r["grad_noise_ebm"])
        langevin.append(r["grad_noise_langevin_ebm"])
    diffs = np.array(diffs)
    assert abs(diffs.mean()) < 3 * diffs.std(ddof=1) / np.sqrt(len(diffs))
    assert np.mean(langevin) == pytest.approx(tau**2 / batch, rel=0.02)
    assert r["grad_noise_data_ebm"] == pytest.approx(_expected_data_part(data, batch, "ebm"), rel=0.35)


def test_pure_noise_reads_snr_near_zero_and_a_noiseless_gradient_reads_inf():
    zeros = np.zeros((N, P_EBM + P_GEN), np.float32)
    snrs = [
        gradient_noise(_grad_fn(1.0), 1.0, zeros, jax.random.key(s), batch_size=10, draws=8)["grad_snr_gen"]
        for s in range(10)
    ]
    assert abs(np.mean(snrs)) < 0.02  # the naive ||g_bar||^2 / trace(Cov) would read 1/G = 0.125
    # ... and within Monte Carlo error of 0 (~0.003 here): a signal debiased by trace/(G - 1) reads -0.018
    assert abs(np.mean(snrs)) < 4 * np.std(snrs, ddof=1) / np.sqrt(len(snrs))
    signal = _data(2, mean=3.0)
    r = gradient_noise(
        lambda p, x, k: {"ebm": {"w": jnp.ones(4)}, "gen": {"k": jnp.full(3, 2.0)}},
        None,
        signal,
        jax.random.key(0),
        batch_size=10,
        draws=4,
    )
    assert r["grad_snr_ebm"] == np.inf and r["grad_snr_gen"] == np.inf
    assert r["grad_noise_gen"] == 0.0
    strong = gradient_noise(_grad_fn(0.1), 1.0, signal, jax.random.key(1), batch_size=20, draws=8)
    assert 10 < strong["grad_snr_gen"] < np.inf


def test_an_exactly_zero_gradient_reads_snr_zero_not_nan():
    """The EBM's gradient under stop-gradient chains is exactly 0: no signal, no noise, SNR 0 (not NaN)."""
    r = gradient_noise(
        lambda p, x, k: {"ebm": {"w": jnp.zeros(4)}, "gen": {"k": jnp.ones(3)}},
        None,
        _data(3),
        jax.random.key(0),
        batch_size=10,
        draws=4,
    )
    assert r["grad_snr_ebm"] == 0.0 and r["grad_noise_ebm"] == 0.0


def test_minibatches_are_without_replacement_and_refuse_a_batch_larger_than_the_data():
    batches = minibatches(20, 20, 3, 0)
    assert all(len(set(b.tolist())) == 20 for b in batches)
    with pytest.raises(ValueError, match="batch_size=21"):
        minibatches(20, 21, 3, 0)
    with pytest.raises(ValueError, match="grad_noise_draws=1"):
        gradient_noise(_grad_fn(1.0), 1.0, _data(), jax.random.key(0), batch_size=5, draws=1)


def _snr_readings(noise, seeds, draws=8):
    """grad_snr_gen over `seeds` calls at G = draws for a gradient mu + noise(key): ||mu||^2 = 1 and
    trace(Cov) = 1, so the true SNR is 1."""
    mu = jnp.zeros(P_GEN).at[0].set(1.0)

    @jax.jit
    def grad(params, x, key):
        g = mu + noise(key)
        return {"ebm": {"w": g[:4]}, "gen": {"k": g}}

    data = np.zeros((N, 1), np.float32)
    return np.array(
        [
            gradient_noise(grad, None, data, jax.random.key(s), batch_size=1, draws=draws)["grad_snr_gen"]
            for s in seeds
        ]
    )


def test_snr_reads_high_by_the_inverse_trace_bias_for_low_rank_noise_at_the_default_g():
    """The SNR's signal is unbiased but its denominator is an estimate: for rank-1 noise (trace(Cov) read
    from G - 1 degrees of freedom) E[signal / trace] = (1 + 1/G)(G - 1)/(G - 3) - 1/G = 1.45 at G = 8 where
    the truth is 1; noise spread over many entries (trace read from ~P (G - 1) degrees of freedom) reads
    ~1.00. The bias is documented, not removed (docs/readings.md)."""
    import dataclasses

    from model.config import ExperimentConfig
    from model.gradnoise import DEFAULT_DRAWS

    g = DEFAULT_DRAWS
    assert (
        [f.default for f in dataclasses.fields(ExperimentConfig) if f.name == "grad_noise_draws"]
        == [g]
        == [8]
    )
    direction = jnp.zeros(P_GEN).at[1].set(1.0)
    rank_one = _snr_readings(lambda k: jax.random.normal(k) * direction, range(600), g)
    isotropic = _snr_readings(lambda k: jax.random.normal(k, (P_GEN,)) / np.sqrt(P_GEN), range(60), g)
    theory = (1 + 1 / g) * (g - 1) / (g - 3) - 1 / g
    assert theory == pytest.approx(1.45)
    standard_error = rank_one.std(ddof=1) / np.sqrt(rank_one.size)
    assert abs(rank_one.mean() - theory) < 4 * standard_error, (rank_one.mean(), standard_error)
    assert rank_one.mean() > 1.25  # the bias is resolved: well above the true SNR of 1
    assert isotropic.mean() == pytest.approx(1.0, abs=0.05)


def test_data_part_is_unbiased_at_the_default_g():
    """At G = 8 the sample covariance's divisor G - 1 matters: G would read 12.5% low. Averaged over
    50 calls and 800 entries the reading's relative error is ~0.5%."""
    data, batch = _data(4), 10
    readings = [
        gradient_noise(_grad_fn(0.0), 1.0, data, jax.random.key(200 + s), batch_size=batch)[
            "grad_noise_data_gen"
        ]
        for s in range(50)
    ]
    assert np.mean(readings) == pytest.approx(_expected_data_part(data, batch, "gen"), rel=0.04)
