"""FID, KID and their extrapolation to an infinite sample (paper §4, appendix 7.6; Chong & Forsyth 2020).

Everything here is float64 numpy on the host and works on feature arrays (N, d); the feature extractors
live in `inception.py` and `digits_net.py`. `extrapolated_metrics` is the whole reading the training loop
records: FID_N and KID_N at several N, each fitted against 1/N, the intercept being the _inf value.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

KERNELS = ("rbf", "poly")
_CHUNK_ROWS = 512  # rows of a kernel matrix held at once: bounds memory at ~chunk * N_max * 8 bytes


def _check_pair(features_a: np.ndarray, features_b: np.ndarray, *, min_rows: int) -> tuple[np.ndarray, ...]:
    a, b = np.asarray(features_a), np.asarray(features_b)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"features must be 2-D (N, d); got shapes {a.shape} and {b.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}; both sets must come from the same "
            "feature extractor"
        )
    if len(a) < min_rows or len(b) < min_rows:
        raise ValueError(f"need at least {min_rows} rows in each feature set; got {len(a)} and {len(b)}")
    return a, b


def trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """Tr sqrt(Sigma_a Sigma_b) from the eigenvalues of the product: sum of sqrt(max(Re lambda, 0)).

    The product of two PSD matrices has real non-negative eigenvalues in exact arithmetic; rounding gives
    tiny negative or complex ones, which the clip and the real part discard (no scipy sqrtm).

    Args:
      sigma_a: a covariance, shape (d, d), positive semi-definite.
      sigma_b: another, shape (d, d).

    Returns:
      Tr sqrt(Sigma_a Sigma_b) as a Python float.
    """
    eig = np.linalg.eigvals(sigma_a @ sigma_b)
    return float(np.sqrt(np.clip(eig.real, 0.0, None)).sum())


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (paper Eq. 23), float64 on the host.

    Args:
      features_a: one feature set (e.g. the real images'), shape (N_a, d), N_a >= 2.
      features_b: the other (e.g. the generated images'), shape (N_b, d), N_b >= 2, same extractor.

    Returns:
      ||mu_a - mu_b||^2 + Tr(Sigma_a + Sigma_b) - 2 Tr sqrt(Sigma_a Sigma_b) as a Python float;
      covariances are unbiased (N - 1).
    """
    a, b = _check_pair(features_a, features_b, min_rows=2)
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a = np.cov(a, rowvar=False).reshape(a.shape[1], a.shape[1])
    sigma_b = np.cov(b, rowvar=False).reshape(b.shape[1], b.shape[1])
    diff = mu_a - mu_b
    tr_sqrt = trace_sqrt_product(sigma_a, sigma_b)
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_sqrt)


def _kernel_from_gram(gram: np.ndarray, sq_rows: np.ndarray, sq_cols: np.ndarray, dim: int, kernel: str):
    """k(x_i, y_j) for a block, float64, from the Gram block x_i.y_j and the squared norms (in place)."""
    out = gram.astype(np.float64)  # always a fresh array: `gram` serves both kernels
    if kernel == "rbf":
        out *= -2.0
        out += sq_rows[:, None]
        out += sq_cols[None, :]
        np.maximum(out, 0.0, out=out)
        out *= -1.0 / dim
        return np.exp(out, out=out)
    out *= 1.0 / dim
    out += 1.0
    cube = np.multiply(out, out)
    cube *= out
    return cube


def _masked_kernel_sums(
    x: np.ndarray, y: np.ndarray, mask_x: np.ndarray, mask_y: np.ndarray, kernels: Sequence[str]
) -> dict[str, np.ndarray]:
    """For each selection p (rows of the 0/1 masks) and kernel: [sum_{i!=j} k(x_i,x_j), sum_{i!=j}
    k(y_i,y_j), sum_{i,j} k(x_i,y_j)] over the selected rows, shape (P, 3), float64.

    Each kernel matrix is built once, in row chunks, and reduced against all selections by a matrix
    product: many sample sizes cost one pass over the kernel matrices, never one per size."""
    dim = x.shape[1]
    dtype = np.result_type(x.dtype, y.dtype, np.float32)  # Gram in the features' precision (>= float32)
    x, y = x.astype(dtype, copy=False), y.astype(dtype, copy=False)
    sq_x = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    sq_y = np.einsum("ij,ij->i", y, y, dtype=np.float64)
    out = {k: np.zeros((len(mask_x), 3)) for k in kernels}
    for rows, cols, sq_r, sq_c, m_r, m_c, slot, same in (
        (x, x, sq_x, sq_x, mask_x, mask_x, 0, True),
        (y, y, sq_y, sq_y, mask_y, mask_y, 1, True),
        (x, y, sq_x, sq_y, mask_x, mask_y, 2, False),
    ):
        for start in range(0, len(rows), _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, len(rows))
            gram = rows[start:stop] @ cols.T
            m_chunk = m_r[:, start:stop]  # (P, c)
            for k in kernels:
                block = _kernel_from_gram(gram, sq_r[start:stop], sq_c, dim, k)
                total = np.einsum("pc,cp->p", m_chunk, block @ m_c.T)
                if same:  # the unbiased estimator leaves out i == j
                    diag = block[np.arange(stop - start), np.arange(start, stop)]
                    total -= m_chunk @ diag
                out[k][:, slot] += total
    return out


def _mmd2_from_sums(sums: np.ndarray, n: np.ndarray) -> np.ndarray:
    xx, yy, xy = sums[:, 0], sums[:, 1], sums[:, 2]
    return xx / (n * (n - 1)) + yy / (n * (n - 1)) - 2.0 * xy / (n * n)


def kid(features_a: np.ndarray, features_b: np.ndarray, kernel: str = "rbf") -> float:
    """Kernel Inception Distance: the unbiased MMD^2 between two feature sets, as a Python float.

    kernel="rbf": exp(-||x - y||^2 / d), d the feature dimension (what produced the paper's readings);
    kernel="poly": (x.y / d + 1)^3 (Binkowski et al.; torch-fidelity, clean-fid). The sets may differ in
    size (m, n >= 2): 1/(m(m-1)) sum_{i!=j} k(x_i,x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i,y_j)
    - 2/(mn) sum_{i,j} k(x_i,y_j).

    Args:
      features_a: one feature set x, shape (m, d), m >= 2.
      features_b: the other y, shape (n, d), n >= 2, same extractor.
      kernel: "rbf" or "poly" (KERNELS).

    Returns:
      The unbiased MMD^2 as a Python float (may be slightly negative for close sets).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is unknown; use one of {', '.join(KERNELS)}")
    a, b = _check_pair(features_a, features_b, min_rows=2)
    m, n = len(a), len(b)
    sums = _masked_kernel_sums(a, b, np.ones((1, m)), np.ones((1, n)), (kernel,))[kernel][0]
    return float(sums[0] / (m * (m - 1)) + sums[1] / (n * (n - 1)) - 2.0 * sums[2] / (m * n))


def _kernel_row_sums(
    a: np.ndarray, b: np.ndarray, kernels: Sequence[str]
) -> dict[str, tuple[np.ndarray, ...]]:
    """Per kernel, float64 row sums: (sum_{j!=i} k(a_i,a_j), sum_{j!=i} k(b_i,b_j), sum_j k(a_i,b_j),
    sum_i k(a_i,b_j)), built in row chunks so memory stays at ~chunk * N rows."""
    dim = a.shape[1]
    dtype = np.result_type(a.dtype, b.dtype, np.float32)
    a, b = a.astype(dtype, copy=False), b.astype(dtype, copy=False)
    sq_a = np.einsum("ij,ij->i", a, a, dtype=np.float64)
    sq_b = np.einsum("ij,ij->i", b, b, dtype=np.float64)
    out = {k: (np.zeros(len(a)), np.zeros(len(b)), np.zeros(len(a)), np.zeros(len(b))) for k in kernels}
    for rows, cols, sq_r, sq_c, same, slot in (
        (a, a, sq_a, sq_a, True, 0),
        (b, b, sq_b, sq_b, True, 1),
        (a, b, sq_a, sq_b, False, 2),
    ):
        for start in range(0, len(rows), _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, len(rows))
            gram = rows[start:stop] @ cols.T
            for k in kernels:
                block = _kernel_from_gram(gram, sq_r[start:stop], sq_c, dim, k)
                row = block.sum(1)
                if same:
                    row -= block[np.arange(stop - start), np.arange(start, stop)]
                out[k][slot][start:stop] = row
                if not same:
                    out[k][3][:] += block.sum(0)
    return out


def _kid_and_jackknife(
    rxx: np.ndarray, ryy: np.ndarray, cxy: np.ndarray, cyx: np.ndarray
) -> tuple[float, float]:
    """The unbiased KID from row sums and its two-sample jackknife standard error: leaving out row i of
    one set changes its within-set sum by 2 r_i and the cross sum by c_i, so each leave-one-out value
    costs O(1). Var = (m-1)/m sum_i (theta_-i - mean)^2 + the same over the other set (Arvesen 1969)."""
    m, n = len(rxx), len(ryy)
    xx, yy, xy = rxx.sum(), ryy.sum(), cxy.sum()

    def value(sxx, syy, sxy, mm, nn):
        return sxx / (mm * (mm - 1)) + syy / (nn * (nn - 1)) - 2.0 * sxy / (mm * nn)

    drop_x = value(xx - 2.0 * rxx, yy, xy - cxy, m - 1, n)
    drop_y = value(xx, yy - 2.0 * ryy, xy - cyx, m, n - 1)
    var = (m - 1) / m * ((drop_x - drop_x.mean()) ** 2).sum() + (n - 1) / n * (
        (drop_y - drop_y.mean()) ** 2
    ).sum()
    return float(value(xx, yy, xy, m, n)), float(np.sqrt(var))


def kid_stderrs(
    features_a: np.ndarray, features_b: np.ndarray, kernels: Sequence[str] = KERNELS
) -> dict[str, tuple[float, float]]:
    """{kernel: (KID, standard error)} for the whole of both sets, the kernel matrices built once.

    Args:
      features_a: one feature set, shape (m, d), m >= 3.
      features_b: the other, shape (n, d), n >= 3, same extractor.
      kernels: the kernels to read (KERNELS).

    Returns:
      {kernel: (the unbiased KID, its two-sample jackknife standard error)}, Python floats.
    """
    a, b = _check_pair(features_a, features_b, min_rows=3)
    sums = _kernel_row_sums(a, b, kernels)
    return {k: _kid_and_jackknife(*sums[k]) for k in kernels}


def kid_with_stderr(
    features_a: np.ndarray,
    features_b: np.ndarray,
    kernel: str = "rbf",
    *,
    num: int | None = None,
    replace: bool = False,
    seed: int | np.random.Generator | None = 0,
) -> tuple[float, float]:
    """KID between two feature sets with a standard error that accounts for the shared pool.

    By default all rows of both sets are used (KID at N_max): the unbiased MMD^2 of `kid`, and the
    jackknife standard error of that U-statistic over the rows of both sets, i.e. the error of KID as an
    estimate of the population MMD^2 (every pair of rows shares the pool, so readings at several N drawn
    from it are not independent). `num` draws that many rows of each set first (seeded by `seed`);
    `replace=True` draws them with replacement, as the paper's code did: a row drawn twice then pairs
    with itself, which adds about (k(x,x) - E k) / P per pool of P rows, a bias that does not shrink
    with `num`; the standard error is then about that biased value.

    Args:
      features_a: one feature set, shape (m, d), m >= 3.
      features_b: the other, shape (n, d), n >= 3, same extractor.
      kernel: "rbf" or "poly".
      num: rows of each set to draw first (>= 3); None uses all rows.
      replace: draw the `num` rows with replacement (the paper's code).
      seed: the draw's seed or generator.

    Returns:
      (kid, stderr) as Python floats.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is unknown; use one of {', '.join(KERNELS)}")
    a, b = _check_pair(features_a, features_b, min_rows=3)
    if num is not None:
        if num < 3 or (not replace and num > min(len(a), len(b))):
            raise ValueError(
                f"num={num} must be >= 3 and, without replacement, at most the smaller set "
                f"({min(len(a), len(b))} rows); lower num or pass replace=True"
            )
        rng = np.random.default_rng(seed)
        a = a[rng.choice(len(a), num, replace=replace)]
        b = b[rng.choice(len(b), num, replace=replace)]
    return kid_stderrs(a, b, (kernel,))[kernel]


def extrapolate(sample_sizes: Sequence[int], values: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares line `value = intercept + slope / N`; returns (intercept, slope, intercept_stderr).

    The intercept is the metric at an infinite sample. Its standard error is the ordinary-least-squares
    one, sqrt(s^2 sum x^2 / (n sum (x - xbar)^2)) with s^2 = RSS / (n - 2); nan with exactly 2 points.

    Args:
      sample_sizes: the N of each reading, >= 2 distinct positive values.
      values: the metric read at each N (FID_N or KID_N), same length.

    Returns:
      (intercept, the metric at N = infinity; slope; the intercept's standard error) as Python floats.
    """
    n_arr = np.asarray(sample_sizes, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if n_arr.ndim != 1 or y.shape != n_arr.shape:
        raise ValueError(f"sample_sizes and values must be 1-D of equal length; got {n_arr.shape}, {y.shape}")
    if len(n_arr) < 2:
        raise ValueError(f"extrapolation needs at least 2 sample sizes; got {len(n_arr)}")
    if np.any(n_arr <= 0):
        raise ValueError(f"sample sizes must be positive; got {n_arr.tolist()}")
    x = 1.0 / n_arr
    sxx = float(((x - x.mean()) ** 2).sum())
    if sxx == 0.0:
        raise ValueError(f"sample sizes must not all be equal; got {n_arr.tolist()}")
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / sxx)
    intercept = float(y.mean() - slope * x.mean())
    if len(x) > 2:
        rss = float(((y - intercept - slope * x) ** 2).sum())
        stderr = float(np.sqrt(rss / (len(x) - 2) * (x**2).sum() / (len(x) * sxx)))
    else:
        stderr = float("nan")
    return intercept, slope, stderr


def sample_sizes(num_min: int, num_max: int, num_points: int) -> tuple[int, ...]:
    """The extrapolation's sample sizes: linspace(num_min, num_max, num_points) rounded to integers
    (1000, 4500, 10 -> the paper's 1000, 1389, ..., 4500). Raises if they are not distinct sizes >= 2.

    Args:
      num_min: the smallest N (`eval_num_min`).
      num_max: the largest N (`eval_num_max`).
      num_points: how many sizes (`eval_num_points`, >= 2).

    Returns:
      The sizes, ascending.
    """
    if num_points < 2:
        raise ValueError(f"eval_num_points={num_points} must be >= 2 to fit a line against 1/N")
    if num_min < 2:
        raise ValueError(f"eval_num_min={num_min} must be >= 2 (unbiased KID needs 2 samples)")
    if num_max < num_min:
        raise ValueError(f"eval_num_max={num_max} is below eval_num_min={num_min}")
    sizes = tuple(int(v) for v in np.rint(np.linspace(num_min, num_max, num_points)))
    if len(set(sizes)) != len(sizes):
        raise ValueError(
            f"sample sizes {sizes} repeat; widen eval_num_min..eval_num_max or lower eval_num_points"
        )
    return sizes


def metric_readings(
    real: np.ndarray,
    gen: np.ndarray,
    real_idx: Sequence[np.ndarray],
    gen_idx: Sequence[np.ndarray],
    *,
    replace: bool = False,
) -> dict[str, np.ndarray]:
    """FID_N, KID_N(rbf), KID_N(poly) for each pair of row selections (equal sizes N_p; no repeats
    unless `replace`, where a repeated row counts as a distinct sample, as in the paper's code).

    Args:
      real: the real images' features, shape (N_real, d).
      gen: the generated images' features, shape (N_gen, d).
      real_idx: P row selections of `real`, the p-th of size N_p.
      gen_idx: P row selections of `gen`, the p-th of size N_p as well.
      replace: allow repeated rows (selections drawn with replacement).

    Returns:
      {"fid": (P,), "kid_rbf": (P,), "kid_poly": (P,)}: what `fid` and `kid` give on
      (real[real_idx[p]], gen[gen_idx[p]]), with the kernel matrices built once for all selections.
    """
    n = np.array([len(i) for i in real_idx], dtype=np.float64)
    if [len(i) for i in gen_idx] != n.astype(int).tolist():
        raise ValueError("each real selection must be as large as its generated one")
    mask_r = np.zeros((len(n), len(real)))
    mask_g = np.zeros((len(n), len(gen)))
    for p, (ri, gi) in enumerate(zip(real_idx, gen_idx, strict=True)):
        np.add.at(mask_r[p], ri, 1.0)  # counts: the masked sums then leave out only each position's self-pair
        np.add.at(mask_g[p], gi, 1.0)
    if not replace and (mask_r.max() > 1 or mask_g.max() > 1):
        raise ValueError("row selections must not repeat rows (draw without replacement)")
    sums = _masked_kernel_sums(real, gen, mask_r, mask_g, KERNELS)
    readings = {f"kid_{k}": _mmd2_from_sums(sums[k], n) for k in KERNELS}
    # FID_N costs an O(d^3) eigen-decomposition per size (LAPACK's geev, mostly serial, releases the GIL):
    # the sizes run in threads, one per core.
    workers = max(1, min(len(n), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        fids = pool.map(lambda pair: fid(real[pair[0]], gen[pair[1]]), zip(real_idx, gen_idx, strict=True))
        readings["fid"] = np.array(list(fids))
    return readings


def extrapolated_metrics(
    real_features: np.ndarray,
    generated_features: np.ndarray,
    sizes: Sequence[int],
    seed: int | np.random.Generator,
    *,
    feature_extractor: str = "unknown",
    replace: bool = False,
) -> dict[str, float | str]:
    """FID_inf, KID_inf (rbf and poly) from one real and one generated feature set, and KID at N_max.

    Pools of N_max rows are drawn from each set; for each N in `sizes`, N rows of each pool are drawn
    without replacement (`replace=True`: with replacement, as the paper's code did), FID_N and both KID_N
    are computed, and each metric is fitted against 1/N with `extrapolate`. KID at N_max is the unbiased
    KID of the two whole pools with its jackknife standard error (`kid_stderrs`), whatever `replace`.
    Returns {fid_inf, fid_slope, fid_inf_stderr, kid_rbf_inf, kid_rbf_slope, kid_rbf_inf_stderr,
    kid_poly_inf, kid_poly_slope, kid_poly_inf_stderr, kid_rbf_nmax, kid_rbf_nmax_stderr, kid_poly_nmax,
    kid_poly_nmax_stderr, feature_extractor}. Non-finite generated features (a diverged model) give nan
    readings rather than an exception.

    Args:
      real_features: the real images' features, shape (N_real, d), N_real >= max(sizes).
      generated_features: the generated images' features, shape (N_gen, d), N_gen >= max(sizes).
      sizes: the sample sizes N of the extrapolation (`sample_sizes`), at least 2.
      seed: the seed or generator of every draw.
      feature_extractor: the extractor's name, recorded with the readings.
      replace: draw each N's rows from the pools with replacement (the paper's code).

    Returns:
      The readings above: the _inf intercepts with their slopes and standard errors, KID at N_max with
      its standard error (floats), and the extractor's name.
    """
    real, gen = _check_pair(real_features, generated_features, min_rows=2)
    sizes = [int(n) for n in sizes]
    if len(sizes) < 2:
        raise ValueError(f"need at least 2 sample sizes to extrapolate; got {sizes}")
    largest = max(sizes)
    if largest > len(real) or largest > len(gen):
        raise ValueError(
            f"largest sample size N_max={largest} exceeds the features available (real {len(real)}, "
            f"generated {len(gen)}); use --set eval_num_max={min(len(real), len(gen))} or fewer"
        )
    result: dict[str, float | str] = {}
    if not (np.isfinite(gen).all() and np.isfinite(real).all()):
        for name in ("fid", "kid_rbf", "kid_poly"):
            result.update({f"{name}_inf": np.nan, f"{name}_slope": np.nan, f"{name}_inf_stderr": np.nan})
        for k in KERNELS:
            result.update({f"kid_{k}_nmax": np.nan, f"kid_{k}_nmax_stderr": np.nan})
        result["feature_extractor"] = feature_extractor
        return result
    rng = np.random.default_rng(seed)
    # Pools of N_max rows bound the kernel matrices at N_max^2 however many real features exist; a uniform
    # N-subset of a uniform N_max-subset is a uniform N-subset, so each reading keeps its distribution.
    real = real[np.sort(rng.choice(len(real), largest, replace=False))] if len(real) > largest else real
    gen = gen[np.sort(rng.choice(len(gen), largest, replace=False))] if len(gen) > largest else gen
    real_idx = [rng.choice(largest, n, replace=replace) for n in sizes]
    gen_idx = [rng.choice(largest, n, replace=replace) for n in sizes]
    readings = metric_readings(real, gen, real_idx, gen_idx, replace=replace)
    for name in ("fid", "kid_rbf", "kid_poly"):
        intercept, slope, stderr = extrapolate(sizes, readings[name])
        result.update({f"{name}_inf": intercept, f"{name}_slope": slope, f"{name}_inf_stderr": stderr})
    for k, (value, err) in kid_stderrs(real, gen).items():
        result.update({f"kid_{k}_nmax": value, f"kid_{k}_nmax_stderr": err})
    result["feature_extractor"] = feature_extractor
    return result
