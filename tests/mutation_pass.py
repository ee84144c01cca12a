"""A mutation pass by hand: small wrong formulas put one at a time into the estimator modules, each run
against the fast test files of its module. A mutant the tests fail on is killed; one they pass survives.
Run by hand from the repository root (pytest does not collect this file; it is no test_*.py):

    python tests/mutation_pass.py            # every mutant, a few minutes per module
    python tests/mutation_pass.py --list     # the mutants and their test files
    python tests/mutation_pass.py --only kl_mean_correction kid_jackknife_y

Each mutant replaces one exact snippet (which must occur exactly once) and the file is restored whatever
happens. The record of the last pass, and why each survivor may survive, is in docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent

THERMO = ("tests/test_thermo.py", "tests/test_estimators.py")
OBJECTIVES = ("tests/test_estimators.py", "tests/test_objectives.py")
AIS = ("tests/test_ais.py",)
GRADNOISE = ("tests/test_gradnoise.py",)
METRICS = ("tests/test_kid_stderr.py", "tests/test_metrics.py")


class Mutant(NamedTuple):
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = (
    # model/thermo.py
    Mutant(
        "schedule_power_ignored",
        "model/thermo.py",
        "jnp.power(jnp.where(frac > 0, frac, 1.0), power)",
        "jnp.where(frac > 0, frac, 1.0)",
        THERMO,
    ),
    Mutant("trapezium_left_riemann", "model/thermo.py", "(e[:-1] + e[1:]) / 2.0", "e[:-1]", THERMO),
    Mutant(
        "kl_difference_sign",
        "model/thermo.py",
        "0.5 * jnp.sum(kl_forward - kl_backward, axis=0)",
        "0.5 * jnp.sum(kl_backward - kl_forward, axis=0)",
        THERMO,
    ),
    Mutant(
        "kl_difference_no_half",
        "model/thermo.py",
        "0.5 * jnp.sum(kl_forward - kl_backward, axis=0)",
        "jnp.sum(kl_forward - kl_backward, axis=0)",
        THERMO,
    ),
    Mutant(
        "friel_divisor_6",
        "model/thermo.py",
        "** 2 / 12.0 * (v[1:] - v[:-1])",
        "** 2 / 6.0 * (v[1:] - v[:-1])",
        THERMO,
    ),
    Mutant(
        "stepping_stone_no_log_m",
        "model/thermo.py",
        "axis=1) - jnp.log(float(m)), axis=0)",
        "axis=1), axis=0)",
        THERMO,
    ),
    Mutant(
        "identity_residual_sign",
        "model/thermo.py",
        "return kl_forward + kl_backward - _dt(",
        "return kl_forward - kl_backward - _dt(",
        THERMO,
    ),
    Mutant(
        "gaussian_kl_no_minus_d",
        "model/thermo.py",
        "0.5 * (logdet + trace + maha - mean_p.shape[-1])",
        "0.5 * (logdet + trace + maha)",
        THERMO,
    ),
    Mutant("kl_mean_correction", "model/thermo.py", "(trace + d) / m", "2 * d / m", THERMO),
    Mutant(
        "kl_mean_correction_dropped",
        "model/thermo.py",
        "shrink * maha - (trace + d) / m",
        "shrink * maha",
        THERMO,
    ),
    Mutant("kl_full_shrink", "model/thermo.py", "shrink = (n - d - 1) / n", "shrink = 1.0", THERMO),
    Mutant("kl_diagonal_shrink", "model/thermo.py", "shrink = (n - 2) / n", "shrink = 1.0", THERMO),
    Mutant("kl_cov_divisor", "model/thermo.py", "centred, centred) / n", "centred, centred) / m", THERMO),
    Mutant(
        "split_product_as_sum",
        "model/thermo.py",
        "product = first * second",
        "product = first + second",
        THERMO,
    ),
    Mutant("identity_z_no_sqrt_n", "model/thermo.py", "jnp.sqrt(variance / n)", "jnp.sqrt(variance)", THERMO),
    Mutant(
        "bonferroni_one_sided",
        "model/thermo.py",
        "1.0 - alpha / (2.0 * (int(num_temps) - 1))",
        "1.0 - alpha / (int(num_temps) - 1)",
        THERMO,
    ),
    # model/objectives.py
    Mutant("fitted_cov_divisor_n", "model/objectives.py", "/ (n - 1.0)", "/ n", OBJECTIVES),
    Mutant(
        "kl_example_identity_abs",
        "model/objectives.py",
        '"kl_identity": jnp.mean(residual, axis=-1),',
        '"kl_identity": jnp.mean(jnp.abs(residual), axis=-1),',
        OBJECTIVES,
    ),
    Mutant(
        "variance_rule_ddof0",
        "model/objectives.py",
        "jnp.var(loglik, axis=1, ddof=1)",
        "jnp.var(loglik, axis=1)",
        OBJECTIVES,
    ),
    Mutant(
        "kl_weight_ignored",  # kl_batch's estimate (the line after its identity)
        "model/objectives.py",
        "kl_backward)\n    estimate = trapezoid_log_evidence("
        "temps, expected, kl_forward, kl_backward, hp.kl_weight)",
        "kl_backward)\n    estimate = trapezoid_log_evidence(temps, expected, kl_forward, kl_backward)",
        OBJECTIVES,
    ),
    Mutant(
        "kl_weight_ignored_example",  # kl_example's estimate (the line after its residual)
        "model/objectives.py",
        "per_example)\n    estimate = trapezoid_log_evidence("
        "temps, expected, kl_forward, kl_backward, hp.kl_weight)",
        "per_example)\n    estimate = trapezoid_log_evidence(temps, expected, kl_forward, kl_backward)",
        OBJECTIVES,
    ),
    Mutant(
        "vanilla_gen_sigma_once",
        "model/objectives.py",
        "gen_loss = jnp.mean(sq) / (2.0 * hp.lkhood_sigma**2)\n    return ebm_loss + gen_loss, {",
        "gen_loss = jnp.mean(sq) / (2.0 * hp.lkhood_sigma)\n    return ebm_loss + gen_loss, {",
        OBJECTIVES,
    ),
    Mutant(
        "ebm_loss_sign",
        "model/objectives.py",
        'ebm_loss = jnp.mean(nets.energy(params["ebm"], z_prior)) - jnp.mean(',
        'ebm_loss = -jnp.mean(nets.energy(params["ebm"], z_prior)) + jnp.mean(',
        OBJECTIVES,
    ),
    # model/ais.py
    Mutant(
        "log_normaliser_counts_pilots",
        "model/ais.py",
        "jax.nn.logsumexp(log_w, axis=-1) - jnp.log(log_w.shape[-1])",
        "jax.nn.logsumexp(log_w, axis=-1) - jnp.log(state.log_w.shape[-1])",
        AIS,
    ),
    Mutant(
        "log_normaliser_variance_no_1_over_c", "model/ais.py", "ratio - 1.0 / log_w.shape[-1]", "ratio", AIS
    ),
    Mutant("val_ll_stderr_no_prior_variance", "model/ais.py", "/ n + log_z_prior_var)", "/ n)", AIS),
    Mutant(
        "val_ll_drops_log_z_alpha",
        "model/ais.py",
        "return jnp.mean(log_z_x) - log_z_prior, stderr",
        "return jnp.mean(log_z_x), stderr",
        AIS,
    ),
    Mutant(
        "val_ll_stderr_ddof0", "model/ais.py", "jnp.var(log_z_x, ddof=1) / n", "jnp.var(log_z_x) / n", AIS
    ),
    # model/gradnoise.py
    Mutant(
        "gradnoise_cross_over_g",
        "model/gradnoise.py",
        'cross = (acc["s12"] - acc["s1"] * acc["s2"] / g) / (g - 1.0)',
        'cross = (acc["s12"] - acc["s1"] * acc["s2"] / g) / g',
        GRADNOISE,
    ),
    Mutant(
        "gradnoise_var_over_g",
        "model/gradnoise.py",
        'var = (acc["s11"] - acc["s1"] ** 2 / g) / (g - 1.0)',
        'var = (acc["s11"] - acc["s1"] ** 2 / g) / g',
        GRADNOISE,
    ),
    Mutant(
        "gradnoise_langevin_over_g",
        "model/gradnoise.py",
        'langevin = acc["dd"] / (2.0 * g)',
        'langevin = acc["dd"] / g',
        GRADNOISE,
    ),
    Mutant(
        "snr_signal_not_debiased",
        "model/gradnoise.py",
        "signal = jnp.sum(mean**2) - trace / g",
        "signal = jnp.sum(mean**2)",
        GRADNOISE,
    ),
    Mutant(
        "snr_debias_over_g_minus_1",
        "model/gradnoise.py",
        "signal = jnp.sum(mean**2) - trace / g",
        "signal = jnp.sum(mean**2) - trace / (g - 1.0)",
        GRADNOISE,
    ),
    # model/metrics/core.py
    Mutant("kid_jackknife_y_row_once", "model/metrics/core.py", "yy - 2.0 * ryy", "yy - ryy", METRICS),
    Mutant("kid_jackknife_x_row_once", "model/metrics/core.py", "xx - 2.0 * rxx", "xx - rxx", METRICS),
    Mutant("kid_jackknife_no_factor", "model/metrics/core.py", "var = (m - 1) / m * (", "var = (", METRICS),
    Mutant(
        "kid_cross_term_factor_1",
        "model/metrics/core.py",
        "return float(sums[0] / (m * (m - 1)) + sums[1] / (n * (n - 1)) - 2.0 * sums[2] / (m * n))",
        "return float(sums[0] / (m * (m - 1)) + sums[1] / (n * (n - 1)) - sums[2] / (m * n))",
        METRICS,
    ),
    Mutant(
        "kid_within_biased",
        "model/metrics/core.py",
        "return float(sums[0] / (m * (m - 1)) + sums[1] / (n * (n - 1)) - 2.0 * sums[2] / (m * n))",
        "return float(sums[0] / (m * m) + sums[1] / (n * (n - 1)) - 2.0 * sums[2] / (m * n))",
        METRICS,
    ),
    Mutant(
        "fid_trace_sqrt_factor",
        "model/metrics/core.py",
        "np.sqrt(np.clip(eig.real, 0.0, None)).sum()",
        "0.5 * np.sqrt(np.clip(eig.real, 0.0, None)).sum()",
        METRICS,
    ),
    Mutant("extrapolate_stderr_dof", "model/metrics/core.py", "rss / (len(x) - 2)", "rss / len(x)", METRICS),
)


def run(mutant: Mutant, timeout: int) -> tuple[str, float]:
    """'killed', 'survived', 'timeout' or 'error rc=N' for one mutant, and the seconds its tests took."""
    path = ROOT / mutant.path
    original = path.read_text(encoding="utf-8")
    if original.count(mutant.old) != 1:
        raise SystemExit(
            f"{mutant.name}: the snippet occurs {original.count(mutant.old)} times in {mutant.path}"
        )
    start = time.perf_counter()
    try:
        path.write_text(original.replace(mutant.old, mutant.new), encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutant.tests]
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - start
        # pytest exits 1 when tests failed; 2-5 (collection error, no tests, usage) say nothing of the mutant
        outcome = {0: "survived", 1: "killed"}.get(done.returncode, f"error rc={done.returncode}")
        return outcome, time.perf_counter() - start
    finally:
        path.write_text(original, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="run only these mutants (by name)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per mutant's test run")
    args = parser.parse_args(argv)
    # A SIGTERM must still run run()'s `finally`, which puts the mutated file back.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", *sorted({m.path for m in MUTANTS})],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    if dirty and not args.list:
        raise SystemExit(f"commit or restore the mutated modules first (a mutant may be in them):\n{dirty}")
    chosen = [m for m in MUTANTS if args.only is None or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants: {', '.join(sorted(unknown))}")
    for m in chosen:
        if args.list:
            print(f"{m.name:40s} {m.path:24s} {' '.join(m.tests)}")
            continue
        outcome, seconds = run(m, args.timeout)
        print(f"{m.name:40s} {m.path:24s} {outcome:9s} {seconds:6.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
