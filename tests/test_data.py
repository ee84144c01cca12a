"""model.data and model.tfds_data: the embedded digits split, TFDS loading under TFDS's mock data, the
missing-data error and the prepare CLI. Never touches the network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model import tfds_data
from model.config import get_preset
from model.data import digits_split, load_dataset, load_digits_dataset, main

# --- digits -------------------------------------------------------------------------------------------


def test_digits_split_shapes_range_and_determinism() -> None:
    a, b = digits_split(16), digits_split(16)
    # 1797 images, round(0.2 * 1797) = 359 held out for validation
    assert a.train_images.shape == (1438, 16, 16, 1) and a.val_images.shape == (359, 16, 16, 1)
    assert a.train_images.dtype == np.float32
    assert a.train_images.min() == -1.0 and a.train_images.max() == 1.0
    assert a.val_labels.shape == (359,) and set(np.unique(a.train_labels)) == set(range(10))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_digits_split_is_a_partition_of_the_data() -> None:
    from sklearn.datasets import load_digits

    split = digits_split(8)  # 8x8: no upsampling, so rows compare with sklearn's directly
    full = load_digits().images.astype(np.float32) / 16.0 * 2.0 - 1.0
    ours = np.concatenate([split.train_images, split.val_images])[..., 0]
    key = lambda imgs: sorted(img.tobytes() for img in imgs)  # noqa: E731
    assert key(ours) == key(full)  # train + val hold every image exactly once: disjoint and complete


def test_load_digits_dataset_subsets_and_channels() -> None:
    cfg = get_preset("digits", num_train=100, num_val=40, batch_size=50, image_size=32)
    ds = load_dataset(cfg)
    assert ds.name == "digits" and ds.train.shape == (100, 32, 32, 1) and ds.val.shape == (40, 32, 32, 1)
    np.testing.assert_array_equal(ds.train, digits_split(32).train_images[:100])
    with pytest.raises(ValueError, match="channels=3"):
        load_digits_dataset(get_preset("digits", channels=3))


# --- TFDS under mock data -----------------------------------------------------------------------------

MOCK = [("cifar10", "cifar10", 32), ("celeba", "celeb_a", 64), ("svhn", "svhn_cropped", 32)]


def _mock(num_examples: int):  # noqa: ANN202
    import tensorflow_datasets as tfds

    # USE_CODE generates examples from the builder's feature spec: no metadata files, no TensorFlow.
    return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE)


@pytest.mark.parametrize(("preset", "name", "size"), MOCK)
def test_tfds_mock_load_shapes_range_subsets(preset: str, name: str, size: int, tmp_path: Path) -> None:
    cfg = get_preset(preset, num_train=9, num_val=5, batch_size=3, data_dir=str(tmp_path))
    with _mock(num_examples=12):
        ds = load_dataset(cfg)
        again = load_dataset(cfg)
    assert ds.name == name
    assert ds.train.shape == (9, size, size, 3) and ds.val.shape == (5, size, size, 3)
    for arr in (ds.train, ds.val):
        assert arr.dtype == np.float32 and arr.flags.c_contiguous
        assert arr.min() >= -1.0 and arr.max() <= 1.0 and arr.std() > 0.1  # real pixels, not a constant
    np.testing.assert_array_equal(ds.train, again.train)  # deterministic subset and decoding
    np.testing.assert_array_equal(ds.val, again.val)


def test_tfds_mock_resizes_to_image_size_and_refuses_oversized_subsets(tmp_path: Path) -> None:
    with _mock(num_examples=6):
        ds = load_dataset(get_preset("cifar10", num_train=4, num_val=2, batch_size=2, image_size=16))
        assert ds.train.shape == (4, 16, 16, 3)
        with pytest.raises(ValueError, match=r"num_train=7 .* holds 6 examples"):
            load_dataset(get_preset("cifar10", num_train=7, num_val=2, batch_size=2))
        with pytest.raises(ValueError, match="channels=1"):
            tfds_data.load_tfds_dataset(get_preset("svhn", num_train=4, num_val=2, batch_size=2, channels=1))


def test_celeb_a_centre_crop_and_pixel_scaling() -> None:
    face = np.zeros((218, 178, 3), np.uint8)
    face[39:179, 19:159] = 255  # exactly the centred 140x140 square
    crop = tfds_data.centre_crop(face, 140)
    assert crop.shape == (140, 140, 3) and crop.min() == 255
    out = tfds_data.to_model_image(face, 64, crop=140)
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0)  # the crop holds only the white square
    np.testing.assert_allclose(tfds_data.to_model_image(np.zeros((4, 4, 1), np.uint8), 4, None), -1.0)


# --- missing data, names, the prepare CLI -------------------------------------------------------------


@pytest.mark.parametrize("preset", ["cifar10", "celeba"])
def test_missing_dataset_error_says_how_to_get_it(preset: str, tmp_path: Path) -> None:
    cfg = get_preset(preset, num_train=4, num_val=2, batch_size=2, data_dir=str(tmp_path))
    name = cfg.dataset
    with pytest.raises(tfds_data.DatasetNotPreparedError) as info:
        load_dataset(cfg)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert repr(name) in msg and str(tmp_path) in msg
    assert f"python -m model.data prepare {name} --data-dir {tmp_path}" in msg
    assert "TFDS_DATA_DIR" in msg and "thermosweep[prepare]" in msg
    assert ("--manual-dir" in msg and "img_align_celeba.zip" in msg) == (name == "celeb_a")
    assert not (tmp_path / "downloads").exists()  # it looked, it did not try to download


def test_missing_dataset_error_uses_tfds_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_dataset(get_preset("svhn", num_train=4, num_val=2, batch_size=2))


def test_dataset_names_and_aliases() -> None:
    assert tfds_data.resolve_tfds_name("celeba") == "celeb_a"
    assert tfds_data.resolve_tfds_name("SVHN") == "svhn_cropped"
    assert tfds_data.resolve_tfds_name("cifar10") == "cifar10"
    with pytest.raises(ValueError, match=r"'mnist'.*cifar10, celeb_a, svhn_cropped"):
        tfds_data.resolve_tfds_name("mnist")


def test_prepare_cli_refuses_unknown_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prepare", "mnist", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'mnist'" in err and "celeb_a" in err and "svhn_cropped" in err
    assert list(tmp_path.iterdir()) == []


def test_prepare_cli_says_how_to_install_tensorflow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # tensorflow is not installed in the dev venv; pin the behaviour even where it is.
    monkeypatch.setattr(tfds_data, "_tensorflow_available", lambda: False)
    assert main(["prepare", "celeba", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "celeb_a" in err and "pip install 'thermosweep[prepare]'" in err
    assert list(tmp_path.iterdir()) == []


def test_prepare_cli_runs_as_a_module(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "model.data", "prepare", "imagenet", "--data-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown TFDS data set 'imagenet'" in proc.stderr


def test_tfds_subset_is_the_first_n_and_chunking_does_not_change_it(monkeypatch: pytest.MonkeyPatch) -> None:
    small = get_preset("cifar10", num_train=4, num_val=2, batch_size=2)
    large = get_preset("cifar10", num_train=9, num_val=5, batch_size=2)
    with _mock(num_examples=10):
        a = load_dataset(small)
        monkeypatch.setattr(tfds_data, "_CHUNK", 2)  # several chunks, the last one partial
        b = load_dataset(large)
    np.testing.assert_array_equal(a.train, b.train[:4])
    np.testing.assert_array_equal(a.val, b.val[:2])
