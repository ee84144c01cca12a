"""KID at N_max with its standard error (model.metrics.kid_with_stderr) against closed forms.

Features are Gaussian, x ~ N(mu_x, s_x^2 I), y ~ N(mu_y, s_y^2 I) in d dimensions, so the population
MMD^2 has a closed form for both kernels: for rbf exp(-||u - v||^2 / d) through E exp(-||w||^2 / d) of a
Gaussian w, for the cubic polynomial through the Gaussian moments up to order three.
"""

from __future__ import annotations

import numpy as np
import pytest

from model.metrics import extrapolated_metrics, kid, kid_with_stderr
from model.metrics.core import kid_stderrs

D = 6


def _rbf_mean(delta: np.ndarray, var: float) -> float:
    """E exp(-||w||^2 / d) for w ~ N(delta, var I)."""
    ell2 = D / 2.0
    return (1 + var / ell2) ** (-D / 2) * np.exp(-delta @ delta / (2 * (var + ell2)))


def _poly_mean(mu_u, s_u, mu_v, s_v) -> float:
    """E (u.v / d + 1)^3 for independent u ~ N(mu_u, s_u^2 I), v ~ N(mu_v, s_v^2 I)."""
    eye = np.eye(D)

    def moments(mu, s):
        second = s**2 * eye + np.outer(mu, mu)
        third = np.einsum("i,j,k->ijk", mu, mu, mu) + s**2 * (
            np.einsum("i,jk->ijk", mu, eye)
            + np.einsum("j,ik->ijk", mu, eye)
            + np.einsum("k,ij->ijk", mu, eye)
        )
        return second, third

    m2u, m3u = moments(mu_u, s_u)
    m2v, m3v = moments(mu_v, s_v)
    e1 = mu_u @ mu_v / D
    e2 = np.sum(m2u * m2v) / D**2
    e3 = np.sum(m3u * m3v) / D**3
    return 1 + 3 * e1 + 3 * e2 + e3


def _true_mmd2(kernel, mu_x, s_x, mu_y, s_y) -> float:
    if kernel == "rbf":
        return (
            _rbf_mean(np.zeros(D), 2 * s_x**2)
            + _rbf_mean(np.zeros(D), 2 * s_y**2)
            - 2 * _rbf_mean(mu_x - mu_y, s_x**2 + s_y**2)
        )
    return (
        _poly_mean(mu_x, s_x, mu_x, s_x)
        + _poly_mean(mu_y, s_y, mu_y, s_y)
        - 2 * _poly_mean(mu_x, s_x, mu_y, s_y)
    )


MU_X, S_X = np.zeros(D), 1.0
MU_Y, S_Y = np.full(D, 0.3), 1.2


def _sample(rng, n):
    return MU_X + S_X * rng.standard_normal((n, D)), MU_Y + S_Y * rng.standard_normal((n, D))


@pytest.mark.parametrize("kernel", ["rbf", "poly"])
def test_stderr_covers_the_population_mmd_at_the_nominal_rate(kernel):
    truth = _true_mmd2(kernel, MU_X, S_X, MU_Y, S_Y)
    assert truth > 0
    hits, values = [], []
    for seed in range(200):
        x, y = _sample(np.random.default_rng(seed), 150)
        value, err = kid_with_stderr(x, y, kernel)
        assert value == pytest.approx(kid(x, y, kernel), rel=1e-9, abs=1e-12)
        hits.append(abs(value - truth) <= 1.96 * err)
        values.append(value)
    assert np.mean(hits) >= 0.9
    assert abs(np.mean(values) - truth) < 3 * np.std(values) / np.sqrt(len(values))  # unbiased too


def test_unbiased_on_two_samples_of_one_distribution():
    values, errs = [], []
    for seed in range(300):
        rng = np.random.default_rng(1000 + seed)
        x, y = rng.standard_normal((60, D)), rng.standard_normal((80, D))
        value, err = kid_with_stderr(x, y, "rbf")
        values.append(value)
        errs.append(err)
    values = np.array(values)
    mean_err = values.std(ddof=1) / np.sqrt(len(values))
    assert abs(values.mean()) < 3 * mean_err
    assert np.mean(values < 0) > 0.3  # an unbiased MMD^2 of equal laws goes negative about half the time
    # the jackknife error is of the size of the draws' spread (conservative for equal laws, not 10x off)
    assert 0.8 < np.mean(errs) / values.std(ddof=1) < 3.0


def test_with_replacement_draws_carry_the_duplicate_bias_flat_in_n():
    rng = np.random.default_rng(5)
    pool = 120
    x, y = _sample(rng, pool)
    base = kid(x, y, "rbf")
    sq = lambda a: ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)  # noqa: E731
    kxx, kyy = np.exp(-sq(x) / D), np.exp(-sq(y) / D)
    off = lambda k: (k.sum() - np.trace(k)) / (pool * (pool - 1))  # noqa: E731
    bias = (1.0 - off(kxx)) / pool + (1.0 - off(kyy)) / pool  # k(x, x) = 1 for rbf
    for num in (40, 120, 480):
        draws = np.array([kid_with_stderr(x, y, "rbf", num=num, replace=True, seed=s)[0] for s in range(300)])
        err = draws.std(ddof=1) / np.sqrt(len(draws))
        assert abs(draws.mean() - base - bias) < 3.5 * err, num
        assert bias > 4 * err
    without = np.array([kid_with_stderr(x, y, "rbf", num=40, seed=s)[0] for s in range(300)])
    assert abs(without.mean() - base) < 3 * without.std(ddof=1) / np.sqrt(len(without))


def test_extrapolated_metrics_reports_kid_at_n_max_and_can_draw_with_replacement():
    rng = np.random.default_rng(9)
    x, y = _sample(rng, 200)
    out = extrapolated_metrics(x, y, (50, 100, 150), seed=0)
    assert out["kid_rbf_nmax_stderr"] > 0 and np.isfinite(out["kid_poly_nmax"])
    assert kid_stderrs(x, y)["poly"] == pytest.approx(kid_with_stderr(x, y, "poly"))
    full = extrapolated_metrics(x, y, (100, 150, 200), seed=0)
    assert full["kid_rbf_nmax"] == pytest.approx(kid(x, y, "rbf"), rel=1e-9)
    assert (full["kid_rbf_nmax"], full["kid_rbf_nmax_stderr"]) == pytest.approx(kid_with_stderr(x, y, "rbf"))
    replaced = extrapolated_metrics(x, y, (100, 150, 200), seed=0, replace=True)
    assert replaced["kid_rbf_inf"] != full["kid_rbf_inf"] and replaced["kid_rbf_nmax"] == full["kid_rbf_nmax"]


def test_refuses_a_bad_kernel_or_size():
    x, y = _sample(np.random.default_rng(0), 10)
    with pytest.raises(ValueError, match="kernel='cubic'"):
        kid_with_stderr(x, y, "cubic")
    with pytest.raises(ValueError, match="num=11"):
        kid_with_stderr(x, y, num=11)


def test_the_evaluator_draws_with_replacement_when_the_config_asks():
    from types import SimpleNamespace

    from model.metrics.evaluator import FeatureExtractor, make_evaluator

    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, (60, 4, 4, 1)).astype(np.float32)
    extractor = FeatureExtractor("flat", lambda x: np.asarray(x).reshape(len(x), -1), 20)
    dataset = SimpleNamespace(val=images, train=images)
    gen = extractor(rng.uniform(-1, 1, (60, 4, 4, 1)).astype(np.float32) * 0.8)
    readings = {}
    for replace in (False, True):
        config = SimpleNamespace(
            eval_num_min=20,
            eval_num_max=60,
            eval_num_points=3,
            dataset="digits",
            image_size=4,
            channels=1,
            eval_with_replacement=replace,
        )
        evaluator = make_evaluator(config, dataset, extractor=extractor)
        assert evaluator.replace is replace
        readings[replace] = evaluator.metrics_from_features(gen, np.uint32([0, 1]))
    assert readings[True]["kid_rbf_inf"] != readings[False]["kid_rbf_inf"]
    assert readings[True]["kid_rbf_nmax"] == readings[False]["kid_rbf_nmax"]  # N_max: never resampled


def test_jackknife_matches_an_explicit_leave_one_out_computation():
    """The O(1) leave-one-out values (a row's within-set sum leaves twice, its cross sums once) against
    KID recomputed with each row of each set left out, on unequal set sizes: exact to rounding."""
    rng = np.random.default_rng(5)
    a, b = _sample(rng, 13)[0], _sample(rng, 17)[1]
    for kernel in ("rbf", "poly"):
        drop_a = np.array([kid(np.delete(a, i, 0), b, kernel) for i in range(len(a))])
        drop_b = np.array([kid(a, np.delete(b, j, 0), kernel) for j in range(len(b))])
        m, n = len(a), len(b)
        var = (m - 1) / m * np.sum((drop_a - drop_a.mean()) ** 2) + (n - 1) / n * np.sum(
            (drop_b - drop_b.mean()) ** 2
        )
        value, stderr = kid_stderrs(a, b, (kernel,))[kernel]
        assert value == pytest.approx(kid(a, b, kernel), rel=1e-9)
        assert stderr == pytest.approx(np.sqrt(var), rel=1e-7), kernel
        assert kid_with_stderr(a, b, kernel)[1] == pytest.approx(np.sqrt(var), rel=1e-7)
