"""The `digits` feature extractor: a small MLP classifier trained on the digits training split.

Training is deterministic (fixed seed, full-batch Adam, CPU-sized: about a second) and cached on disk as
`<cache dir>/digits-mlp-v1-<hash>.npz`, the hash covering the training setup and the training images, so a
changed setup trains a new net instead of reusing a stale one. Features are the penultimate layer (64-d,
after the nonlinearity), as pool3 is for Inception, scaled by one constant so that the training images'
features have mean ||x||^2 / d = 1: the KID kernels, whose width is d, then see distances of order one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

NAME = "digits-mlp-v1"
SETUP = {
    "name": NAME,
    "hidden": (128, 64),
    "steps": 300,
    "learning_rate": 3e-3,
    "weight_decay": 1e-3,
    "seed": 0,
}


def _init(key: jax.Array, in_dim: int, widths: tuple[int, ...]) -> list[dict[str, jax.Array]]:
    params = []
    for width in widths:
        key, sub = jax.random.split(key)
        params.append(
            {"w": jax.random.normal(sub, (in_dim, width)) * jnp.sqrt(2.0 / in_dim), "b": jnp.zeros((width,))}
        )
        in_dim = width
    return params


def _features(params: list[dict[str, jax.Array]], images: jax.Array) -> jax.Array:
    x = images.reshape(images.shape[0], -1)
    for layer in params[:-1]:
        x = jax.nn.gelu(x @ layer["w"] + layer["b"])
    return x


def _logits(params: list[dict[str, jax.Array]], images: jax.Array) -> jax.Array:
    return _features(params, images) @ params[-1]["w"] + params[-1]["b"]


def feature_scale(params: list[dict], images: np.ndarray) -> float:
    """1 / sqrt(mean ||x||^2 / d) over `images`' penultimate features x."""
    x = np.asarray(_features(jax.tree.map(jnp.asarray, params), jnp.asarray(images, jnp.float32)), np.float64)
    return float(1.0 / np.sqrt((x**2).sum(1).mean() / x.shape[1]))


def train_classifier(images: np.ndarray, labels: np.ndarray, setup: dict[str, Any] = SETUP) -> list[dict]:
    """Full-batch AdamW on cross-entropy, `setup['steps']` steps from a fixed key; returns the MLP params."""
    widths = (*setup["hidden"], int(labels.max()) + 1)
    params = _init(jax.random.key(setup["seed"]), int(np.prod(images.shape[1:])), widths)
    opt = optax.adamw(setup["learning_rate"], weight_decay=setup["weight_decay"])
    x, y = jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(_logits(p, x), y).mean()

    def step(carry, _):
        p, s = carry
        grads = jax.grad(loss)(p)
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), length=setup["steps"]))(params)
    return jax.device_get(params)


def setup_hash(images: np.ndarray, labels: np.ndarray, setup: dict[str, Any] = SETUP) -> str:
    """12 hex digits identifying the training setup and data (the cache key)."""
    h = hashlib.sha256(json.dumps(setup, sort_keys=True).encode())
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int32).tobytes())
    return h.hexdigest()[:12]


class DigitsNet(NamedTuple):
    """MLP params (list of {'w', 'b'}) and the constant the penultimate features are multiplied by."""

    params: list[dict]
    scale: float


def load_or_train(
    images: np.ndarray, labels: np.ndarray, cache_dir: str | os.PathLike | None, setup: dict[str, Any] = SETUP
) -> DigitsNet:
    """The trained classifier: read from `<cache_dir>/digits-mlp-v1-<hash>.npz` if present, else trained on
    (images, labels) and written there atomically. `cache_dir=None` trains without caching."""
    path = Path(cache_dir) / f"{NAME}-{setup_hash(images, labels, setup)}.npz" if cache_dir else None
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as data:
            n = (len(data.files) - 1) // 2
            params = [{"w": data[f"w{i}"], "b": data[f"b{i}"]} for i in range(n)]
            return DigitsNet(params, float(data["scale"]))
    params = train_classifier(images, labels, setup)
    net = DigitsNet(params, feature_scale(params, images))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"{k}{i}": np.asarray(layer[k]) for i, layer in enumerate(params) for k in ("w", "b")}
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
            np.savez(tmp, scale=np.array(net.scale), **arrays)
        os.replace(tmp.name, path)
    return net


def make_feature_fn(net: DigitsNet) -> Callable[[jax.Array], jax.Array]:
    """A jitted function: images (N, H, W, 1) in [-1, 1] -> scaled penultimate features (N, 64) float32."""
    params = jax.tree.map(jnp.asarray, net.params)
    return jax.jit(lambda images: _features(params, images.astype(jnp.float32)) * net.scale)


def accuracy(params: list[dict], images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of `images` classified as `labels`."""
    return float(
        (
            np.asarray(_logits(jax.tree.map(jnp.asarray, params), jnp.asarray(images))).argmax(-1) == labels
        ).mean()
    )
