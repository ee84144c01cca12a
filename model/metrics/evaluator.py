"""The evaluator training and the sweep call every `eval_every` epochs.

`make_evaluator(config, dataset)` picks the feature extractor for the data set, computes the real images'
features once, and returns an `Evaluator`. `evaluator(generate, key)` asks the caller's `generate(key, num)`
for N_max images in full batches of the extractor's batch size (the surplus is dropped), extracts their
features batch by batch (only features are kept, so memory is bounded by one image batch plus N_max feature
rows) and returns `extrapolated_metrics`' dict.

Real images: the validation split when it holds at least N_max images, else the training split (the digits
preset and the paper presets have val = N_max, so val is what they use); `Evaluator.real_split` says which.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from model.metrics.core import extrapolated_metrics, sample_sizes
from model.metrics.features import FeatureExtractor

INCEPTION_DATASETS = ("cifar10", "celeb_a", "svhn_cropped")


def numpy_seed(key: jax.Array) -> np.ndarray:
    """Key -> uint32 words for `np.random.default_rng`: a typed `jax.random.key` or a raw uint32 key."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key, dtype=np.uint32).ravel()


@dataclass(frozen=True)
class Evaluator:
    """Holds the extractor and the real features; call it with `(generate, key)` for the metrics dict."""

    extractor: FeatureExtractor
    real_features: np.ndarray
    sizes: tuple[int, ...]
    image_shape: tuple[int, int, int]
    real_split: str = field(default="val")
    replace: bool = False  # each N drawn with replacement from the N_max pools, as the paper's code did

    @property
    def num_generated(self) -> int:
        return max(self.sizes)

    def generated_features(
        self, generate: Callable[[jax.Array, int], np.ndarray], key: jax.Array
    ) -> np.ndarray:
        """Features of N_max images: `generate(fold_in(key, b), batch_size)` for b = 0, 1, ..., always full
        batches (a jitted generator compiles once; the surplus of the last batch is dropped)."""
        feats, size = [], self.extractor.batch_size
        for b, start in enumerate(range(0, self.num_generated, size)):
            images = np.asarray(generate(jax.random.fold_in(key, b), size))
            if images.shape != (size, *self.image_shape):
                raise ValueError(
                    f"generate(key, {size}) returned shape {images.shape}; expected "
                    f"{(size, *self.image_shape)}"
                )
            feats.append(self.extractor(images[: self.num_generated - start]))
        return np.concatenate(feats)

    def __call__(self, generate: Callable[[jax.Array, int], np.ndarray], key: jax.Array) -> dict[str, Any]:
        """{fid_inf, fid_slope, fid_inf_stderr, kid_rbf_inf, ..., kid_poly_inf_stderr, kid_rbf_nmax,
        kid_rbf_nmax_stderr, kid_poly_nmax, kid_poly_nmax_stderr, feature_extractor}
        for N_max generated images against the real features; the same key gives the same numbers."""
        gen_key, draw_key = jax.random.split(key)
        gen = self.generated_features(generate, gen_key)
        return self.metrics_from_features(gen, draw_key)

    def metrics_from_features(self, generated_features: np.ndarray, key: jax.Array) -> dict[str, Any]:
        """The metrics dict for already extracted generated features; the draws are seeded by `key`."""
        return extrapolated_metrics(
            self.real_features,
            generated_features,
            self.sizes,
            numpy_seed(key),
            feature_extractor=self.extractor.name,
            replace=self.replace,
        )


def digits_extractor(
    image_size: int, cache_dir: str | os.PathLike | None, batch_size: int = 500
) -> FeatureExtractor:
    """The digits classifier (trained on the digits training split at `image_size`, cached in `cache_dir`)."""
    from model.data import digits_split
    from model.metrics import digits_net

    split = digits_split(image_size)
    net = digits_net.load_or_train(split.train_images, split.train_labels, cache_dir)
    return FeatureExtractor(digits_net.NAME, digits_net.make_feature_fn(net), batch_size)


def inception_extractor(
    cache_dir: str | os.PathLike | None, batch_size: int = 50, variables: Any = None
) -> FeatureExtractor:
    """InceptionV3-FID with weights from `<cache_dir>/inception-v3-fid.npz` (or the given `variables`)."""
    from model.metrics import inception

    if variables is None:
        path = inception.default_cache_dir() if cache_dir is None else os.fspath(cache_dir)
        variables = inception.load_variables(os.path.join(path, inception.NPZ_NAME))
    return FeatureExtractor(inception.NAME, inception.make_feature_fn(variables), batch_size)


def make_evaluator(
    config: Any,
    dataset: Any,
    *,
    cache_dir: str | os.PathLike | None = None,
    extractor: FeatureExtractor | None = None,
) -> Evaluator:
    """An `Evaluator` for `config` (dataset, image size, eval_num_min/max/points, eval_with_replacement)
    and `dataset` (`model.data.Dataset`). The extractor follows the data set (digits -> digits MLP, else
    InceptionV3-FID) unless one is given; cache_dir defaults to $THERMOSWEEP_CACHE or
    ~/.cache/thermosweep. Real features are computed here, once."""
    from model.metrics.inception import default_cache_dir

    sizes = sample_sizes(config.eval_num_min, config.eval_num_max, config.eval_num_points)
    n_max = max(sizes)
    if len(dataset.val) >= n_max:
        real, split = dataset.val, "val"
    elif len(dataset.train) >= n_max:
        real, split = dataset.train, "train"
    else:
        raise ValueError(
            f"eval_num_max={n_max} exceeds the real images available (val {len(dataset.val)}, train "
            f"{len(dataset.train)}); use --set eval_num_max={max(len(dataset.val), len(dataset.train))} "
            "or fewer"
        )
    cache = default_cache_dir() if cache_dir is None else cache_dir
    if extractor is None:
        if config.dataset == "digits":
            extractor = digits_extractor(config.image_size, cache)
        elif config.dataset in INCEPTION_DATASETS:
            extractor = inception_extractor(cache)
        else:
            raise ValueError(f"no feature extractor for dataset={config.dataset!r}")
    image_shape = (config.image_size, config.image_size, config.channels)
    if tuple(real.shape[1:]) != image_shape:
        raise ValueError(f"real images have shape {real.shape[1:]}, config says {image_shape}")
    return Evaluator(
        extractor,
        extractor(real),
        sizes,
        image_shape,
        split,
        replace=bool(getattr(config, "eval_with_replacement", False)),
    )
