"""Benchmark of one KID_inf/FID_inf evaluation: `python -m model.bench.metrics [--num N] [--json]`.

Inception (random weights, 32x32x3 inputs resized to 299): the feature pass is timed on `--num` generated
images (images/s, compile time apart), the extrapolation over `--points` sizes up to `--n-max` on 2048-d
features of that size (real and generated), so the two costs are reported separately and a full
evaluation's time is their sum. Digits: the whole `Evaluator` call of the digits preset (generation by a
trivial random-image function, feature pass, extrapolation), and the same with `--n-max` rows.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import jax
import numpy as np

from model.metrics.core import _masked_kernel_sums, extrapolated_metrics, fid, sample_sizes
from model.metrics.evaluator import FeatureExtractor


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _random_images(key: jax.Array, num: int, shape: tuple[int, int, int]) -> np.ndarray:
    return np.asarray(jax.random.uniform(key, (num, *shape), minval=-1.0, maxval=1.0))


def extrapolation_cost(real: np.ndarray, gen: np.ndarray, sizes: tuple[int, ...]) -> dict[str, float]:
    """Seconds for the whole extrapolation, for its KID part (all sizes, both kernels) and for one FID_N at
    the largest N."""
    _, total = _timed(extrapolated_metrics, real, gen, sizes, 0)
    n = len(sizes)
    rng = np.random.default_rng(0)

    def masks(rows: int) -> np.ndarray:
        return np.stack([np.isin(np.arange(rows), rng.choice(rows, s, replace=False)) for s in sizes]) * 1.0

    _, kid_s = _timed(_masked_kernel_sums, real, gen, masks(len(real)), masks(len(gen)), ("rbf", "poly"))
    _, fid_one = _timed(fid, real[: max(sizes)], gen[: max(sizes)])
    return {"extrapolation_s": total, "kid_all_sizes_s": kid_s, "fid_largest_n_s": fid_one, "num_sizes": n}


def bench_inception(num: int, n_max: int, points: int, batch_size: int) -> dict[str, Any]:
    from model.metrics import inception

    variables, init_s = _timed(inception.random_variables, 0)
    extractor = FeatureExtractor(inception.NAME, inception.make_feature_fn(variables), batch_size)
    key = jax.random.key(0)
    warm = _random_images(key, batch_size, (32, 32, 3))
    _, compile_s = _timed(extractor, warm)  # first call: jit compile + one batch
    images = _random_images(jax.random.fold_in(key, 1), num, (32, 32, 3))
    feats, pass_s = _timed(extractor, images)
    # The extrapolation's cost depends on N and d only: N_max full-rank rows per side, |Gaussian| scaled to
    # the per-dimension mean of the features just computed (tiling them would give singular covariances).
    rng = np.random.default_rng(0)
    scale = np.maximum(feats.mean(0), 1e-3).astype(np.float32)
    pool = np.abs(rng.standard_normal((2 * n_max, feats.shape[1]), dtype=np.float32)) * scale
    real, gen = pool[:n_max], pool[n_max:]
    sizes = sample_sizes(max(2, n_max * 2 // 9), n_max, points)
    cost = extrapolation_cost(real, gen, sizes)
    per_s = num / pass_s
    return {
        "extractor": inception.NAME,
        "images": num,
        "batch_size": batch_size,
        "init_s": init_s,
        "compile_and_first_batch_s": compile_s,
        "feature_pass_s": pass_s,
        "images_per_s": per_s,
        "n_max": n_max,
        "sizes": list(sizes),
        **cost,
        "estimated_full_eval_s": n_max / per_s + cost["extrapolation_s"],
    }


def bench_digits(n_max: int, points: int) -> dict[str, Any]:
    from model.config import get_preset
    from model.data import load_dataset
    from model.metrics import make_evaluator

    config = get_preset("digits")
    with tempfile.TemporaryDirectory() as cache:
        evaluator, setup_s = _timed(make_evaluator, config, load_dataset(config), cache_dir=cache)
    shape = evaluator.image_shape
    gen = lambda key, num: _random_images(key, num, shape)  # noqa: E731
    evaluator(gen, jax.random.key(0))  # compile
    _, eval_s = _timed(evaluator, gen, jax.random.key(1))
    feats, feat_s = _timed(evaluator.generated_features, gen, jax.random.key(1))
    out = {
        "extractor": evaluator.extractor.name,
        "setup_s_incl_training": setup_s,
        "real_split": evaluator.real_split,
        "preset_sizes": list(evaluator.sizes),
        "preset_eval_s": eval_s,
        "preset_feature_pass_s": feat_s,
    }
    # the paper's sizes on digits features: generated images through the classifier, real from the same pool
    images = _random_images(jax.random.key(2), 2 * n_max, shape)
    big, big_feat_s = _timed(evaluator.extractor, images)
    sizes = sample_sizes(max(2, n_max * 2 // 9), n_max, points)
    cost = extrapolation_cost(big[:n_max], big[n_max:], sizes)
    out.update(
        {"n_max": n_max, "feature_pass_n_max_s": big_feat_s / 2, **{f"n_max_{k}": v for k, v in cost.items()}}
    )
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m model.bench.metrics`."""
    parser = argparse.ArgumentParser(prog="python -m model.bench.metrics", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--num", type=int, default=4500, help="generated images through Inception (default 4500)"
    )
    parser.add_argument("--n-max", type=int, default=4500, help="largest extrapolation size (default 4500)")
    parser.add_argument("--points", type=int, default=10, help="sizes in the extrapolation (default 10)")
    parser.add_argument("--batch-size", type=int, default=50, help="Inception batch size")
    parser.add_argument("--skip-inception", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }
    result["digits"] = bench_digits(args.n_max, args.points)
    if not args.skip_inception:
        result["inception"] = bench_inception(args.num, args.n_max, args.points, args.batch_size)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"backend {result['backend']}, {result['cpu_count']} CPUs, load {result['load_avg_1m']:.1f}")
    d = result["digits"]
    print(
        f"[digits] classifier setup (train + real features) {d['setup_s_incl_training']:.2f} s; preset "
        f"evaluation (sizes {d['preset_sizes']}, real={d['real_split']}) {d['preset_eval_s']:.3f} s, "
        f"of which feature pass {d['preset_feature_pass_s']:.3f} s"
    )
    print(
        f"[digits] N_max={d['n_max']}, {d['n_max_num_sizes']} sizes: feature pass "
        f"{d['feature_pass_n_max_s']:.3f} s, "
        f"extrapolation {d['n_max_extrapolation_s']:.2f} s (KID all sizes "
        f"{d['n_max_kid_all_sizes_s']:.2f} s, one FID_N {d['n_max_fid_largest_n_s']:.3f} s)"
    )
    if "inception" in result:
        r = result["inception"]
        print(
            f"[inception] {r['images']} images 32x32x3 -> 299, batch {r['batch_size']}: compile+1st batch "
            f"{r['compile_and_first_batch_s']:.1f} s, feature pass {r['feature_pass_s']:.1f} s = "
            f"{r['images_per_s']:.1f} images/s"
        )
        print(
            f"[inception] extrapolation N_max={r['n_max']}, {r['num_sizes']} sizes, d=2048: "
            f"{r['extrapolation_s']:.1f} s (KID all sizes {r['kid_all_sizes_s']:.1f} s, one FID_N "
            f"{r['fid_largest_n_s']:.1f} s); estimated full evaluation ({r['n_max']} images) "
            f"{r['estimated_full_eval_s']:.0f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
