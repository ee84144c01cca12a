"""The digits feature extractor and the evaluator training calls (model/metrics)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from model.config import get_preset
from model.data import digits_split, load_dataset
from model.metrics import digits_net, kid, make_evaluator
from model.metrics.evaluator import digits_extractor

KEYS = {
    "fid_inf",
    "fid_slope",
    "fid_inf_stderr",
    "kid_rbf_inf",
    "kid_rbf_slope",
    "kid_rbf_inf_stderr",
    "kid_poly_inf",
    "kid_poly_slope",
    "kid_poly_inf_stderr",
    "kid_rbf_nmax",
    "kid_rbf_nmax_stderr",
    "kid_poly_nmax",
    "kid_poly_nmax_stderr",
    "feature_extractor",
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("thermosweep-cache")


@pytest.fixture(scope="module")
def extractor(cache_dir):
    return digits_extractor(16, cache_dir)


@pytest.fixture(scope="module")
def split():
    return digits_split(16)


def test_classifier_is_trained_cached_and_reused(extractor, split, cache_dir):
    files = list(cache_dir.glob("digits-mlp-v1-*.npz"))
    assert len(files) == 1 and digits_net.setup_hash(split.train_images, split.train_labels) in files[0].name
    net = digits_net.load_or_train(split.train_images, split.train_labels, cache_dir)  # read back
    assert digits_net.accuracy(net.params, split.val_images, split.val_labels) > 0.95
    np.testing.assert_array_equal(
        digits_net.make_feature_fn(net)(split.val_images[:5]), extractor(split.val_images[:5])
    )
    changed = dict(digits_net.SETUP, steps=1)
    assert digits_net.setup_hash(split.train_images, split.train_labels, changed) not in files[0].name


def test_kid_of_train_vs_validation_is_near_zero_and_noise_is_far(extractor, split):
    train, val = extractor(split.train_images), extractor(split.val_images)
    assert train.shape == (len(split.train_images), 64)
    noise = extractor(np.random.default_rng(0).uniform(-1, 1, split.val_images.shape).astype(np.float32))
    for kernel in ("rbf", "poly"):
        near, far = kid(train, val, kernel), kid(train, noise, kernel)
        assert far > 0.3, kernel
        assert abs(near) < 0.01 * far, (kernel, near, far)


def _preset(**overrides):
    return get_preset("digits", **overrides)


def test_evaluator_end_to_end(cache_dir, split):
    config = _preset(eval_num_min=100, eval_num_max=300, eval_num_points=5)
    evaluator = make_evaluator(config, load_dataset(config), cache_dir=cache_dir)
    assert evaluator.real_split == "val" and evaluator.sizes == (100, 150, 200, 250, 300)
    calls = []

    def like_data(key, num):  # a perfect generator: training images
        calls.append(num)
        idx = jax.random.choice(key, len(split.train_images), (num,), replace=False)
        return split.train_images[np.asarray(idx)]

    def noise(key, num):
        return np.asarray(jax.random.uniform(key, (num, 16, 16, 1), minval=-1, maxval=1))

    good = evaluator(like_data, jax.random.key(3))
    assert set(good) == KEYS and good["feature_extractor"] == "digits-mlp-v1"
    assert calls == [evaluator.extractor.batch_size]  # one full batch, 300 of it used
    assert good == evaluator(like_data, jax.random.key(3))  # seeded by the key
    assert good != evaluator(like_data, jax.random.key(4))
    bad = evaluator(noise, jax.random.key(3))
    assert bad["kid_rbf_inf"] > 0.3 and abs(good["kid_rbf_inf"]) < 0.01 * bad["kid_rbf_inf"]
    assert bad["kid_poly_inf"] > 0.3 and abs(good["kid_poly_inf"]) < 0.01 * bad["kid_poly_inf"]
    assert bad["fid_inf"] > 20 * abs(good["fid_inf"])
    with pytest.raises(ValueError, match=r"returned shape \(500, 8, 8, 1\); expected \(500, 16, 16, 1\)"):
        evaluator(lambda key, num: np.zeros((num, 8, 8, 1), np.float32), jax.random.key(0))


def test_evaluator_batches_generation_and_falls_back_to_train(cache_dir, split):
    config = _preset(eval_num_min=200, eval_num_max=1000, eval_num_points=3)
    evaluator = make_evaluator(config, load_dataset(config), cache_dir=cache_dir)
    assert len(split.val_images) < 1000  # so the training images are the real set
    assert evaluator.real_split == "train" and len(evaluator.real_features) == len(split.train_images)
    small = dataclasses.replace(evaluator.extractor, batch_size=300)
    evaluator = dataclasses.replace(evaluator, extractor=small)
    calls = []

    def gen(key, num):
        calls.append(num)
        return np.zeros((num, 16, 16, 1), np.float32)

    assert evaluator.generated_features(gen, jax.random.key(0)).shape == (1000, 64)
    assert calls == [300, 300, 300, 300]  # full batches: the generator compiles once


def test_evaluator_bad_settings(cache_dir, split):
    config = _preset(eval_num_max=2000, eval_num_min=100)
    n_val, n_train = len(split.val_images), len(split.train_images)
    with pytest.raises(
        ValueError,
        match=rf"eval_num_max=2000 exceeds the real images available \(val "
        rf"{n_val}, train {n_train}\); use --set eval_num_max={n_train}",
    ):
        make_evaluator(config, load_dataset(config), cache_dir=cache_dir)
    config = _preset(eval_num_points=1)
    with pytest.raises(ValueError, match="eval_num_points=1 must be >= 2"):
        make_evaluator(config, load_dataset(config), cache_dir=cache_dir)
