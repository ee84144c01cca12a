"""The paper's image data sets (cifar10, celeb_a, svhn_cropped) read through tensorflow-datasets.

Training reads data that was prepared once as ArrayRecord files, with `tfds.data_source`, which needs no
TensorFlow. Preparing (`python -m model.data prepare NAME --data-dir DIR`) downloads and converts the data
and needs TensorFlow: `pip install 'thermosweep[prepare]'`.

Choices (docs/data.md explains them):
- Subsets are the first `num_train` examples of the train split and the first `num_val` examples of the
  validation split (the test split for cifar10 and svhn_cropped, which have no validation split; celeb_a's
  own validation split). "First" is TFDS's prepared order, the same examples as
  `tfds.load(name, split="train[:N]")`; TFDS fixes that order when it prepares the data (it shuffles by a
  hash of each example's key), so the subset is deterministic and not in the source's file order.
- celeb_a: the 178x218 aligned faces are centre-cropped to 140x140 (face, little background) and resized
  to `image_size` (64) with PIL's bicubic filter (antialiased when shrinking). cifar10 and svhn_cropped stay
  32x32 unless `image_size` differs, in which case they are resized the same way.
- Pixels become float32 in [-1, 1] as `x / 127.5 - 1`.

tensorflow_datasets is imported inside the functions that need it: it is slow to import.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from model.config import ExperimentConfig


class TfdsSpec(NamedTuple):
    """How one TFDS data set is read."""

    train_split: str
    val_split: str
    crop: int | None  # side of the centred square crop, None for no crop


TFDS_DATASETS: dict[str, TfdsSpec] = {
    "cifar10": TfdsSpec("train", "test", None),
    "celeb_a": TfdsSpec("train", "validation", 140),
    "svhn_cropped": TfdsSpec("train", "test", None),
}
# The preset names (model.config.PRESETS) that differ from the TFDS names.
TFDS_ALIASES: dict[str, str] = {"celeba": "celeb_a", "svhn": "svhn_cropped"}

# The files TFDS's celeb_a builder downloads from Google Drive; with --manual-dir it takes them from there.
CELEB_A_MANUAL_FILES = (
    "img_align_celeba.zip",
    "list_eval_partition.txt",
    "list_attr_celeba.txt",
    "list_landmarks_align_celeba.txt",
    "identity_CelebA.txt",
)
CELEB_A_HOMEPAGE = "http://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"

_CHUNK = 256  # examples decoded between writes into the output array (bounds the memory beside it)


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS data set is not prepared (as ArrayRecord) in the data directory that was searched."""


class TensorFlowMissingError(ImportError):
    """Preparing a TFDS data set needs TensorFlow, which is not installed."""


class DownloadFailedError(RuntimeError):
    """TFDS could not download or prepare a data set."""


def resolve_tfds_name(name: str) -> str:
    """The TFDS name for `name` (a TFDS name or a preset name such as `celeba`, `svhn`).

    Raises ValueError, listing the known names, for anything else."""
    key = name.strip().lower()
    key = TFDS_ALIASES.get(key, key)
    if key not in TFDS_DATASETS:
        known = ", ".join([*TFDS_DATASETS, *(f"{a} (= {t})" for a, t in TFDS_ALIASES.items())])
        raise ValueError(f"unknown TFDS data set {name!r}; known: {known}")
    return key


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """The directory TFDS data is read from / prepared in: `data_dir`, else $TFDS_DATA_DIR, else
    ~/tensorflow_datasets (TFDS's own default). Read when called, never at import."""
    chosen = data_dir or os.environ.get("TFDS_DATA_DIR") or Path("~") / "tensorflow_datasets"
    return Path(chosen).expanduser()


def how_to_get(name: str, data_dir: Path) -> str:
    """Instructions, for error messages, on preparing data set `name` into `data_dir`."""
    lines = [
        "Prepare it once on a machine with internet (needs TensorFlow: pip install 'thermosweep[prepare]'):",
        f"    python -m model.data prepare {name} --data-dir {data_dir}",
        f"then point training at it: export TFDS_DATA_DIR={data_dir}, or --set data_dir={data_dir} "
        "(the prepared directory can be copied to machines without internet).",
    ]
    if name == "celeb_a":
        files = ", ".join(CELEB_A_MANUAL_FILES)
        lines += [
            "celeb_a downloads from Google Drive, which often refuses (quota). If it does, download by hand "
            f"from {CELEB_A_HOMEPAGE} (the Google Drive / Baidu links there) these files: {files}; put them "
            "in one directory M and run",
            f"    python -m model.data prepare celeb_a --data-dir {data_dir} --manual-dir M",
        ]
    return "\n".join(lines)


def not_prepared(name: str, data_dir: Path) -> str | None:
    """Why data set `name` cannot be read from `data_dir` (not prepared, or not as ArrayRecord), as one
    line with the prepare command; None when it is ready. Reads only TFDS's metadata, never the data."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=str(data_dir))
    fix = (
        f"prepare it with: python -m model.data prepare {name} --data-dir {data_dir} (or point "
        "--set data_dir / $TFDS_DATA_DIR at a prepared copy)"
    )
    if not builder.is_prepared():
        return f"TFDS data set {name!r} is not prepared in {data_dir} (looked for {builder.data_dir}); {fix}"
    file_format = getattr(builder.info, "file_format", None)
    if file_format is not None and "array_record" not in str(file_format).lower():
        return (
            f"TFDS data set {name!r} in {builder.data_dir} was prepared as {file_format}, not ArrayRecord; "
            f"{fix.replace(str(data_dir), 'NEW_DIR')}"
        )
    return None


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _open_source(name: str, split: str, data_dir: Path) -> Any:
    """`tfds.data_source` for one split, never downloading; a missing data set raises
    DatasetNotPreparedError with instructions."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
    except Exception as err:  # TFDS reports a missing data set in several ways; diagnose it ourselves
        builder = tfds.builder(name, data_dir=str(data_dir))
        if not builder.is_prepared():
            raise DatasetNotPreparedError(
                f"TFDS data set {name!r} is not prepared in {data_dir} (looked for {builder.data_dir}).\n"
                + how_to_get(name, data_dir)
            ) from err
        file_format = getattr(builder.info, "file_format", None)
        if file_format is not None and "array_record" not in str(file_format).lower():
            raise DatasetNotPreparedError(
                f"TFDS data set {name!r} in {builder.data_dir} was prepared as {file_format}, which "
                "tfds.data_source cannot read; prepare it as ArrayRecord into another directory:\n"
                + how_to_get(name, data_dir)
            ) from err
        raise


def centre_crop(image: np.ndarray, side: int) -> np.ndarray:
    """The centred `side` x `side` square of an (H, W, C) image (H, W >= side)."""
    h, w = image.shape[:2]
    if h < side or w < side:
        raise ValueError(f"image of shape {image.shape} is smaller than the {side}x{side} crop")
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


def to_model_image(image: np.ndarray, size: int, crop: int | None) -> np.ndarray:
    """A uint8 (H, W, C) image cropped (if `crop`), resized to `size` x `size` with PIL bicubic if its
    shape differs, returned as float32 (size, size, C) in [-1, 1]."""
    if crop is not None:
        image = centre_crop(image, crop)
    if image.shape[:2] != (size, size):
        from PIL import Image

        squeeze = image.ndim == 3 and image.shape[2] == 1
        pil = Image.fromarray(image[..., 0] if squeeze else image)
        image = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
        if squeeze:
            image = image[..., None]
    return image.astype(np.float32) / 127.5 - 1.0


def read_images(source: Any, count: int, size: int, channels: int, crop: int | None) -> np.ndarray:
    """The first `count` images of a TFDS data source as float32 (count, size, size, channels) in [-1, 1].

    Reads `_CHUNK` examples at a time into a preallocated array: memory is the output plus one chunk."""
    out = np.empty((count, size, size, channels), dtype=np.float32)
    for start in range(0, count, _CHUNK):
        stop = min(start + _CHUNK, count)
        # One record at a time: TFDS's mock data source (used by the tests) breaks __getitems__.
        chunk = [np.asarray(source[i]["image"]) for i in range(start, stop)]
        for offset, image in enumerate(chunk):
            if image.ndim != 3 or image.shape[2] != channels:
                raise ValueError(
                    f"image {start + offset} has shape {image.shape}, not (H, W, {channels}); "
                    f"set channels to the data set's channel count (--set channels={image.shape[-1]})"
                )
            out[start + offset] = to_model_image(image, size, crop)
    return out


def _take(name: str, split: str, count: int, field: str, data_dir: Path) -> Any:
    source = _open_source(name, split, data_dir)
    if count > len(source):
        raise ValueError(
            f"{field}={count} but {name}'s {split!r} split holds {len(source)} examples; "
            f"use --set {field}={len(source)} or fewer"
        )
    return source


def load_tfds_dataset(config: ExperimentConfig) -> tuple[str, np.ndarray, np.ndarray]:
    """`config.dataset` (cifar10, celeb_a or svhn_cropped) from prepared ArrayRecord data, as
    (name, train, val), the fields of `model.data.Dataset`: train is the first `config.num_train` images of
    the train split, val the first `config.num_val` of the validation split (test for cifar10/svhn_cropped),
    each float32 (N, image_size, image_size, channels) in [-1, 1].

    Reads from `config.data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets. Raises
    DatasetNotPreparedError (a FileNotFoundError) if the data set is not prepared there, ValueError for an
    unknown name, a subset larger than its split, or a channel count the images do not have."""
    name = resolve_tfds_name(config.dataset)
    spec = TFDS_DATASETS[name]
    if config.channels != 3:
        raise ValueError(f"channels={config.channels} but {name} images are RGB; use --set channels=3")
    data_dir = resolve_data_dir(config.data_dir)
    train_src = _take(name, spec.train_split, config.num_train, "num_train", data_dir)
    val_src = _take(name, spec.val_split, config.num_val, "num_val", data_dir)
    size, channels = config.image_size, config.channels
    train = read_images(train_src, config.num_train, size, channels, spec.crop)
    val = read_images(val_src, config.num_val, size, channels, spec.crop)
    return name, train, val


def prepare_tfds_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    manual_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Download and prepare data set `name` (TFDS or preset name) as ArrayRecord files in `data_dir`
    (else $TFDS_DATA_DIR, else ~/tensorflow_datasets), taking downloads from `manual_dir` when given.

    Returns the data directory used. Needs TensorFlow (raises TensorFlowMissingError) and, without
    `manual_dir`, internet (raises DownloadFailedError, with the manual route for celeb_a)."""
    tfds_name = resolve_tfds_name(name)
    target = resolve_data_dir(data_dir)
    if not _tensorflow_available():
        raise TensorFlowMissingError(
            f"preparing {tfds_name} needs TensorFlow, which is not installed; install it with\n"
            "    pip install 'thermosweep[prepare]'\n"
            "(tensorflow-cpu; only this step needs it: training reads the prepared data without it)"
        )
    manual = None
    if manual_dir is not None:
        manual = Path(manual_dir).expanduser()
        if not manual.is_dir():
            raise FileNotFoundError(
                f"--manual-dir {manual} is not a directory; create it and put the downloaded files in it"
            )
    import tensorflow_datasets as tfds

    builder = tfds.builder(tfds_name, data_dir=str(target))
    download_config = tfds.download.DownloadConfig(manual_dir=str(manual)) if manual else None
    try:
        builder.download_and_prepare(file_format="array_record", download_config=download_config)
    except Exception as err:
        hint = (
            how_to_get(tfds_name, target)
            if tfds_name == "celeb_a"
            else "Check the internet connection and retry (TFDS resumes finished downloads)."
        )
        raise DownloadFailedError(f"preparing {tfds_name} in {target} failed: {err}\n{hint}") from err
    return target
