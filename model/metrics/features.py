"""A feature network applied in fixed-size batches: what the evaluator and the Inception check share.

Kept apart from `model.metrics.evaluator` so the Inception port's verification
(`model.metrics.reference.verify`) runs the network as the evaluator does without importing the evaluator
(which imports the Inception port).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

FeatureFn = Callable[[Any], Any]


@dataclass(frozen=True)
class FeatureExtractor:
    """A named batch function images (n, H, W, C) in [-1, 1] -> features (n, d), and its batch size."""

    name: str
    fn: FeatureFn
    batch_size: int

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Features of `images` as float32 numpy (len(images), d), computed `batch_size` images at a time.
        The last batch is padded to full size so the jitted function compiles once."""
        images = np.asarray(images, dtype=np.float32)
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            n = len(batch)
            if n < self.batch_size:
                pad = np.zeros((self.batch_size - n, *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, pad])
            out.append(np.asarray(self.fn(batch), dtype=np.float32)[:n])
        return np.concatenate(out)
