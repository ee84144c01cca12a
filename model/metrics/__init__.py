"""Image fidelity: FID, KID (rbf and poly), their extrapolation to an infinite sample, and the evaluator
training calls (InceptionV3-FID for the TFDS data sets, a small classifier for `digits`)."""

from model.metrics.core import extrapolate, extrapolated_metrics, fid, kid, kid_with_stderr, sample_sizes
from model.metrics.evaluator import Evaluator, FeatureExtractor, make_evaluator

__all__ = [
    "Evaluator",
    "FeatureExtractor",
    "extrapolate",
    "extrapolated_metrics",
    "fid",
    "kid",
    "kid_with_stderr",
    "make_evaluator",
    "sample_sizes",
]
