"""Data sets as float32 arrays (N, H, W, C) in [-1, 1].

`digits` is embedded (scikit-learn's bundled handwritten digits, upsampled to 16x16x1), so the default
study runs offline. The TFDS data sets (cifar10, celeb_a, svhn_cropped) are read from prepared ArrayRecord
files with `tfds.data_source`, which needs no TensorFlow.
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

import numpy as np

from model.config import ExperimentConfig

DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # the train/validation split is fixed: it is part of the data set, not the run


class Dataset(NamedTuple):
    """Train and validation images in [-1, 1], shape (N, H, W, C), float32."""

    name: str
    train: np.ndarray
    val: np.ndarray


class DigitsSplit(NamedTuple):
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray


def digits_split(image_size: int = 16) -> DigitsSplit:
    """scikit-learn's 1797 digits (8x8, values 0..16), upsampled to image_size by pixel repetition,
    scaled to [-1, 1], split 80/20 into train and validation with a fixed permutation (stratified by
    nothing: the permutation is seeded by DIGITS_SPLIT_SEED)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # (1797, 8, 8) in [-1, 1]
    if image_size % 8:
        raise ValueError(f"image_size={image_size} must be a multiple of 8 for digits (e.g. 16)")
    rep = image_size // 8
    images = np.repeat(np.repeat(images, rep, axis=1), rep, axis=2)[..., None]
    labels = bunch.target.astype(np.int32)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
    num_val = int(round(len(images) * DIGITS_VAL_FRACTION))
    val_idx, train_idx = order[:num_val], order[num_val:]
    return DigitsSplit(images[train_idx], labels[train_idx], images[val_idx], labels[val_idx])


def load_digits_dataset(config: ExperimentConfig) -> Dataset:
    split = digits_split(config.image_size)
    if config.channels != 1:
        raise ValueError(f"channels={config.channels} but digits are greyscale; use --set channels=1")
    train = split.train_images[: config.num_train]
    val = split.val_images[: config.num_val]
    return Dataset("digits", np.ascontiguousarray(train), np.ascontiguousarray(val))


class DataNotReadyError(ValueError):
    """A config's data set cannot be read where it points: the message is one line with the fix."""


def check_data_ready(config: ExperimentConfig) -> None:
    """Raise DataNotReadyError (one line naming the directory and the prepare command) when
    `config.dataset` is not prepared where training would read it; digits (embedded) always is."""
    if config.dataset == "digits":
        return
    from model import tfds_data

    name = tfds_data.resolve_tfds_name(config.dataset)
    problem = tfds_data.not_prepared(name, tfds_data.resolve_data_dir(config.data_dir))
    if problem:
        raise DataNotReadyError(problem)


def load_dataset(config: ExperimentConfig) -> Dataset:
    """The data set named by `config.dataset`, as `Dataset(train, val)` in [-1, 1]."""
    if config.dataset == "digits":
        return load_digits_dataset(config)
    from model import tfds_data  # imported lazily: tensorflow-datasets is slow to import

    return Dataset(*tfds_data.load_tfds_dataset(config))


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m model.data`."""
    parser = argparse.ArgumentParser(prog="python -m model.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser(
        "prepare",
        help="download and prepare a TFDS data set as ArrayRecord (needs 'thermosweep[prepare]')",
    )
    prep.add_argument("name", help="cifar10, celeb_a or svhn_cropped (or the preset names celeba, svhn)")
    prep.add_argument(
        "--data-dir",
        default=None,
        help="where to write it (default: $TFDS_DATA_DIR, else "
        "~/tensorflow_datasets); training reads it with --set data_dir=DIR or TFDS_DATA_DIR",
    )
    prep.add_argument(
        "--manual-dir",
        default=None,
        help="directory holding files downloaded by hand (celeb_a: when Google Drive refuses the download)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m model.data prepare NAME [--data-dir DIR] [--manual-dir M]`: download and prepare a TFDS
    data set as ArrayRecord files (needs the `prepare` extra). Returns the exit status (0 ok, 1 failed,
    2 bad arguments)."""
    import sys

    args = build_parser().parse_args(argv)

    from model import tfds_data

    try:
        name = tfds_data.resolve_tfds_name(args.name)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        target = tfds_data.prepare_tfds_dataset(name, args.data_dir, args.manual_dir)
    except (tfds_data.TensorFlowMissingError, tfds_data.DownloadFailedError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"prepared {name} in {target}; train with TFDS_DATA_DIR={target} or --set data_dir={target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
