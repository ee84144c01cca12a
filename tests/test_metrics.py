"""FID, KID and the infinity extrapolation against closed forms and direct computations (metrics/core)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.metrics import extrapolate, extrapolated_metrics, fid, kid, sample_sizes
from model.metrics.core import metric_readings

PAPER_SIZES = (1000, 1389, 1778, 2167, 2556, 2944, 3333, 3722, 4111, 4500)  # appendix 7.6
KEYS = {
    "fid_inf",
    "fid_slope",
    "fid_inf_stderr",
    "kid_rbf_inf",
    "kid_rbf_slope",
    "kid_rbf_inf_stderr",
    "kid_rbf_nmax",
    "kid_rbf_nmax_stderr",
    "kid_poly_nmax",
    "kid_poly_nmax_stderr",
    "kid_poly_inf",
    "kid_poly_slope",
    "kid_poly_inf_stderr",
    "feature_extractor",
}


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _closed_form_fid(mu1, s1, mu2, s2) -> float:
    """Frechet distance of two Gaussians via the symmetric form Tr sqrt(S1^1/2 S2 S1^1/2) (eigh only)."""
    r = _psd_sqrt(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(_psd_sqrt(r @ s2 @ r)))


def _gaussian_params(rng, d):
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    return rng.standard_normal(d), a @ a.T / d + 0.1 * np.eye(d), rng.standard_normal(d), b @ b.T / d


def _with_exact_moments(rng, n, mu, cov):
    """n samples whose sample mean and (n-1)-covariance are exactly mu and cov."""
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return z @ np.linalg.cholesky(cov).T + mu


def test_fid_equals_closed_form_for_samples_with_exact_moments():
    rng = np.random.default_rng(0)
    mu1, s1, mu2, s2 = _gaussian_params(rng, 6)  # non-commuting covariances
    x, y = _with_exact_moments(rng, 50, mu1, s1), _with_exact_moments(rng, 70, mu2, s2)
    assert fid(x, y) == pytest.approx(_closed_form_fid(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)


def test_fid_of_large_gaussian_samples_approaches_closed_form():
    rng = np.random.default_rng(1)
    mu1, s1, mu2, s2 = _gaussian_params(rng, 5)
    x = rng.multivariate_normal(mu1, s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    expected = _closed_form_fid(mu1, s1, mu2, s2)
    assert expected > 1.0
    assert fid(x, y) == pytest.approx(expected, rel=0.01)
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)
    assert fid(x, y) == pytest.approx(fid(y, x), rel=1e-9)


def _direct_kid(x, y, kernel):
    d = len(x[0])

    def k(a, b):
        if kernel == "rbf":
            return math.exp(-sum((ai - bi) ** 2 for ai, bi in zip(a, b, strict=True)) / d)
        return (sum(ai * bi for ai, bi in zip(a, b, strict=True)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("kernel", ["rbf", "poly"])
def test_kid_matches_direct_double_loop(kernel):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 3)).tolist()
    y = (rng.standard_normal((9, 3)) * 1.5 + 0.3).tolist()
    expected = _direct_kid(x, y, kernel)
    assert abs(expected) > 1e-3
    assert kid(np.array(x), np.array(y), kernel) == pytest.approx(expected, rel=1e-10, abs=1e-13)


@pytest.mark.parametrize("kernel", ["rbf", "poly"])
def test_kid_is_unbiased_zero_for_one_distribution_and_positive_for_shifted(kernel):
    rng = np.random.default_rng(3)
    same = np.array(
        [kid(rng.standard_normal((40, 8)), rng.standard_normal((40, 8)), kernel) for _ in range(300)]
    )
    shifted = np.array(
        [kid(rng.standard_normal((40, 8)), rng.standard_normal((40, 8)) + 0.7, kernel) for _ in range(30)]
    )
    stderr = same.std(ddof=1) / np.sqrt(len(same))
    assert abs(same.mean()) < 3.5 * stderr  # unbiased: zero mean, though single readings go negative
    assert (same < 0).any()
    assert shifted.mean() > 20 * stderr and (shifted > 0).all()


def test_kid_rejects_unknown_kernel_and_bad_shapes():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="kernel='linear'"):
        kid(x, x, "linear")
    with pytest.raises(ValueError, match="feature dimensions differ: 3 vs 4"):
        kid(x, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="feature dimensions differ: 3 vs 4"):
        fid(x, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        kid(x, x[:1])


def test_extrapolation_recovers_planted_intercept():
    rng = np.random.default_rng(4)
    n = np.array(PAPER_SIZES)
    a, b = 0.0123, 7.5
    exact = extrapolate(n, a + b / n)
    assert exact[0] == pytest.approx(a, abs=1e-12) and exact[1] == pytest.approx(b, rel=1e-9)
    assert exact[2] == pytest.approx(0.0, abs=1e-10)
    hits = 0
    for _ in range(200):
        intercept, slope, stderr = extrapolate(n, a + b / n + rng.normal(0, 2e-4, len(n)))
        assert abs(intercept - a) < 6 * stderr and abs(slope - b) < 2.0
        hits += abs(intercept - a) < 1.96 * stderr
    assert 0.88 < hits / 200 < 0.99  # the standard error is calibrated (t with 8 dof: ~91% inside 1.96)


def test_extrapolation_errors_and_two_point_fit():
    with pytest.raises(ValueError, match="at least 2 sample sizes"):
        extrapolate([1000], [0.1])
    with pytest.raises(ValueError, match="equal length"):
        extrapolate([1000, 2000], [0.1])
    with pytest.raises(ValueError, match="not all be equal"):
        extrapolate([1000, 1000], [0.1, 0.2])
    intercept, slope, stderr = extrapolate([1000, 2000], [3.0, 2.0])
    assert (intercept, slope) == pytest.approx((1.0, 2000.0)) and math.isnan(stderr)


def test_sample_sizes_are_the_papers_and_bad_settings_fail():
    assert sample_sizes(1000, 4500, 10) == PAPER_SIZES
    with pytest.raises(ValueError, match="eval_num_points=1 must be >= 2"):
        sample_sizes(1000, 4500, 1)
    with pytest.raises(ValueError, match="eval_num_max=500 is below eval_num_min=1000"):
        sample_sizes(1000, 500, 10)
    with pytest.raises(ValueError, match="repeat"):
        sample_sizes(10, 12, 10)


def test_readings_at_every_size_equal_direct_fid_and_kid_on_the_same_draws():
    rng = np.random.default_rng(5)
    real, gen = rng.standard_normal((60, 5)), rng.standard_normal((60, 5)) * 1.2 + 0.2
    real_idx = [rng.choice(60, n, replace=False) for n in (20, 40, 60)]
    gen_idx = [rng.choice(60, n, replace=False) for n in (20, 40, 60)]
    got = metric_readings(real, gen, real_idx, gen_idx)
    for p, (ri, gi) in enumerate(zip(real_idx, gen_idx, strict=True)):
        assert got["fid"][p] == pytest.approx(fid(real[ri], gen[gi]), rel=1e-12)
        for k in ("rbf", "poly"):
            assert got[f"kid_{k}"][p] == pytest.approx(
                _direct_kid(real[ri].tolist(), gen[gi].tolist(), k), rel=1e-9
            )


def test_extrapolated_metrics_is_seeded_and_finds_the_shift():
    rng = np.random.default_rng(6)
    real = rng.standard_normal((5000, 6)).astype(np.float32)
    gen = (rng.standard_normal((4000, 6)) + 0.5).astype(np.float32)
    sizes = sample_sizes(1000, 4000, 5)
    first = extrapolated_metrics(real, gen, sizes, seed=11, feature_extractor="test")
    assert set(first) == KEYS and first["feature_extractor"] == "test"
    small = (real[:300], gen[:300], sample_sizes(100, 300, 3))
    assert extrapolated_metrics(*small, seed=11) == extrapolated_metrics(*small, seed=11)
    assert extrapolated_metrics(*small, seed=11) != extrapolated_metrics(*small, seed=12)
    assert first["fid_inf"] == pytest.approx(1.5, abs=0.1)  # shift 0.5 in 6 dims: FID = 6 * 0.25
    assert first["kid_rbf_inf"] > 0.03 and first["kid_poly_inf"] > 0.5


def test_extrapolation_removes_the_fid_bias_of_one_distribution():
    rng = np.random.default_rng(8)
    real = rng.standard_normal((3000, 32)).astype(np.float32)
    gen = rng.standard_normal((3000, 32)).astype(np.float32)
    out = extrapolated_metrics(real, gen, sample_sizes(500, 3000, 6), seed=0)
    # FID_N of two samples of N(0, I_32) is biased by ~(d^2/2 + 2d)/N = 576/N (> 1 at N=500); KID is not
    assert fid(real[:500], gen[:500]) > 0.9
    assert 450 < out["fid_slope"] < 750
    assert abs(out["fid_inf"]) < 0.06 and out["fid_inf_stderr"] < 0.03
    assert abs(out["kid_rbf_inf"]) < 5e-4 and abs(out["kid_poly_inf"]) < 5e-3


def test_extrapolated_metrics_bad_input():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((300, 4))
    with pytest.raises(
        ValueError,
        match=r"N_max=400 exceeds the features available "
        r"\(real 300, generated 300\).*--set eval_num_max=300",
    ):
        extrapolated_metrics(x, x, [100, 400], seed=0)
    with pytest.raises(ValueError, match="at least 2 sample sizes"):
        extrapolated_metrics(x, x, [100], seed=0)
    with pytest.raises(ValueError, match="feature dimensions differ: 4 vs 5"):
        extrapolated_metrics(x, rng.standard_normal((300, 5)), [100, 200], seed=0)
    bad = x.copy()
    bad[3, 1] = np.nan
    out = extrapolated_metrics(x, bad, [100, 200], seed=0, feature_extractor="t")
    assert math.isnan(out["kid_rbf_inf"]) and math.isnan(out["fid_inf"]) and out["feature_extractor"] == "t"


def test_extrapolation_stderr_is_the_ols_intercept_error_exactly():
    """The intercept's standard error against the textbook OLS one, s^2 (X^T X)^-1 [0, 0] with
    s^2 = RSS / (n - 2) (the calibration test above cannot tell n - 2 from n at 10 points)."""
    rng = np.random.default_rng(8)
    n = np.array(PAPER_SIZES, dtype=np.float64)
    y = 0.01 + 5.0 / n + rng.normal(0, 1e-3, len(n))
    design = np.stack([np.ones_like(n), 1.0 / n], axis=1)
    coef, rss, _, _ = np.linalg.lstsq(design, y, rcond=None)
    expected = np.sqrt(rss[0] / (len(n) - 2) * np.linalg.inv(design.T @ design)[0, 0])
    intercept, slope, stderr = extrapolate(n, y)
    assert (intercept, slope) == pytest.approx(tuple(coef), rel=1e-9)
    assert stderr == pytest.approx(expected, rel=1e-9)
