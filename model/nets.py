"""The two networks of the LEBM (paper §2.1, Table 5).

EBM prior f_alpha: z -> ne_z -> ne_z -> 1, LeakyReLU(ebm_leak).
Generator g_beta: z as a 1x1xd image, one 4x4 stride-1 transposed conv to 4x4x(16 ng), then 4x4 stride-2
transposed convs that double the resolution while halving the channels, and a last stride-2 transposed
conv to the image channels with tanh. 32x32 gives channels 16ng, 8ng, 4ng (the shapes of the paper's
public code at ng = 8: 128, 64, 32); 64x64 adds 2ng; 16x16 (digits) uses 16ng, 8ng.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import Array

_KERNEL_INIT = nn.initializers.lecun_normal()
C = TypeVar("C", bound=Any)

# conv_impl="auto": the implementation `python -m model.bench --compare-conv` measured fastest per JAX
# backend (docs/gpu.md has the runs). A backend without a measurement gets "lax" (the library's own
# transposed convolution) until its first run settles it.
MEASURED_FASTEST_CONV = {"cpu": "phases"}
UNMEASURED_CONV = "lax"


def resolve_conv_impl(conv_impl: str, backend: str | None = None) -> str:
    """The generator's transposed-convolution implementation: `conv_impl` itself, or for "auto" the
    one measured fastest on `backend` (default: JAX's default backend)."""
    if conv_impl != "auto":
        return conv_impl
    return MEASURED_FASTEST_CONV.get(backend or jax.default_backend(), UNMEASURED_CONV)


def resolve_config(config: C, backend: str | None = None) -> C:
    """`config` (an ExperimentConfig) with conv_impl "auto" resolved for `backend` (default: JAX's
    default backend); `config` itself when it is concrete already.

    A run resolves once, where its step runs: `python -m model.train` for its local devices, a sweep's
    trial at its start for the devices it was given (sweep.trainable; the driver, possibly a CPU-only
    head, resolves nothing for its workers). The concrete config is then what the state, the step and the
    memory check take, and what the trial records in `trials.parquet`'s `conv_impl` column."""
    from model.config import RankDeficientKLWarning

    concrete = resolve_conv_impl(config.conv_impl, backend)
    if concrete == config.conv_impl:
        return config
    with warnings.catch_warnings():  # validated already, when `config` was made: warned then if at all
        warnings.simplefilter("ignore", RankDeficientKLWarning)
        return dataclasses.replace(config, conv_impl=concrete)


class UpConv(nn.Module):
    """A 4x4 transposed convolution, numerically the same as flax's `nn.ConvTranspose` (same parameter
    names and shapes, `kernel` (4, 4, in, out) and `bias`), computed without dilated convolutions.

    stride 2, SAME: each output phase (row parity py, column parity px) is a 2x2 correlation of the
    input padded by one: out[2i+py, 2j+px] = sum over r in {py, py+1}, c in {px, px+1} of
    x_pad[i+r, j+c] @ kernel[2r-py, 2c-px], i.e. four plain matmuls. stride 1, VALID on a 1x1 input:
    out[y, x] = z @ kernel[3-y, 3-x]. XLA's CPU backend runs dilated (transposed) convolutions and their
    second derivatives, which the thermodynamic objective needs, on a slow path; matmuls are fast on
    every backend. impl="lax" uses nn.ConvTranspose itself (e.g. to compare on a GPU).
    """

    features: int
    strides: int = 2
    impl: str = "phases"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        padding = "SAME" if self.strides == 2 else "VALID"
        if self.impl == "lax":
            return nn.ConvTranspose(
                self.features, (4, 4), strides=(self.strides,) * 2, padding=padding, name="ConvTranspose_0"
            )(x)
        if self.impl != "phases":
            raise ValueError(f"conv_impl={self.impl!r} is unknown; use 'phases' or 'lax'")
        # Parameters live under the same path as with impl="lax", so checkpoints are interchangeable.
        kernel, bias = _ConvTransposeParams(self.features, name="ConvTranspose_0")(x.shape[-1])
        if self.strides == 1:
            if x.shape[1:3] != (1, 1):
                raise ValueError(f"the first generator layer expects a 1x1 input, got {x.shape[1:3]}")
            out = jnp.einsum("nc,yxco->nyxo", x[:, 0, 0, :], kernel[::-1, ::-1])
            return out + bias
        n, h, w, c = x.shape
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        if self.features <= JOINT_PHASES_MAX_FEATURES:
            return _joint_phases(xp, kernel, h, w) + bias
        rows = []
        for py in (0, 1):
            cols = []
            for px in (0, 1):
                taps = [xp[:, r : r + h, q : q + w, :] for r in (py, py + 1) for q in (px, px + 1)]
                weights = [kernel[2 * r - py, 2 * q - px] for r in (py, py + 1) for q in (px, px + 1)]
                patches = jnp.concatenate(taps, axis=-1)  # (n, h, w, 4c)
                cols.append(patches @ jnp.concatenate(weights, axis=0))  # (n, h, w, out)
            rows.append(jnp.stack(cols, axis=3))  # (n, h, w, 2, out)
        out = jnp.stack(rows, axis=2)  # (n, h, 2, w, 2, out): index (i, py, j, px) -> (2i+py, 2j+px)
        return out.reshape(n, 2 * h, 2 * w, self.features) + bias


# A layer with this few output channels (the image layer) computes its four phases as one matmul over
# the 3x3 neighbourhood: 2.25x the multiply-adds of four separate 2x2 matmuls, but one read of one patch
# matrix (9c wide, not 4 x 4c) and one matmul 4x as wide; such a layer is bound by memory, not FLOPs.
JOINT_PHASES_MAX_FEATURES = 8


def _joint_phases(xp: Array, kernel: Array, h: int, w: int) -> Array:
    """The stride-2 transposed conv of the padded input xp (n, h+2, w+2, c) as one matmul:
    out[2i+py, 2j+px] = sum over the 3x3 window (r, q) of xp[i+r, j+q] @ K[r, q, py, px], where
    K[r, q, py, px] = kernel[2r-py, 2q-px] when r - py and q - px are 0 or 1, else 0."""
    n, c, out = xp.shape[0], xp.shape[-1], kernel.shape[-1]
    patches = jnp.concatenate([xp[:, r : r + h, q : q + w, :] for r in range(3) for q in range(3)], axis=-1)
    zero = jnp.zeros((c, out), kernel.dtype)
    blocks = [
        jnp.concatenate(
            [
                kernel[2 * r - py, 2 * q - px] if 0 <= r - py <= 1 and 0 <= q - px <= 1 else zero
                for py in (0, 1)
                for px in (0, 1)
            ],
            axis=-1,
        )
        for r in range(3)
        for q in range(3)
    ]  # each (c, 4 out), phases ordered (py, px)
    y = patches @ jnp.concatenate(blocks, axis=0)  # (n, h, w, 4 out)
    y = y.reshape(n, h, w, 2, 2, out).transpose(0, 1, 3, 2, 4, 5)  # (n, h, py, w, px, out)
    return y.reshape(n, 2 * h, 2 * w, out)


class _ConvTransposeParams(nn.Module):
    """Holds `kernel` and `bias` exactly as nn.ConvTranspose names and initialises them."""

    features: int

    @nn.compact
    def __call__(self, in_features: int) -> tuple[Array, Array]:
        kernel = self.param("kernel", _KERNEL_INIT, (4, 4, in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return kernel, bias


class EnergyPrior(nn.Module):
    """f_alpha(z): the exponential tilt of the Gaussian base prior (Eq. 1). Returns shape z.shape[:-1]."""

    width: int
    leak: float = 0.1

    @nn.compact
    def __call__(self, z: Array) -> Array:
        h = nn.leaky_relu(nn.Dense(self.width)(z), self.leak)
        h = nn.leaky_relu(nn.Dense(self.width)(h), self.leak)
        return nn.Dense(1)(h)[..., 0]


class Generator(nn.Module):
    """g_beta(z): latent (..., d) to images (..., H, W, C) in [-1, 1] (Eq. 2 without the noise)."""

    image_size: int
    channels: int
    width: int
    leak: float = 0.2
    conv_impl: str = "phases"

    @nn.compact
    def __call__(self, z: Array) -> Array:
        lead = z.shape[:-1]
        x = z.reshape((-1, 1, 1, z.shape[-1]))
        doublings = int(math.log2(self.image_size)) - 2  # 4x4 -> image_size
        ch = self.width * 16
        x = nn.leaky_relu(UpConv(ch, strides=1, impl=self.conv_impl)(x), self.leak)
        for _ in range(doublings - 1):
            ch //= 2
            x = nn.leaky_relu(UpConv(max(ch, 1), impl=self.conv_impl)(x), self.leak)
        x = UpConv(self.channels, impl=self.conv_impl)(x)
        x = jnp.tanh(x)
        return x.reshape(lead + x.shape[1:])


def network_modules(sizes: Any) -> tuple[EnergyPrior, Generator]:
    """The Flax modules of the EBM prior f_alpha and the generator g_beta (Table 5), sized by `sizes`: a
    `model.step.StepSpec` or a config (its ebm_width, ebm_leak, image_size, channels, gen_width, gen_leak
    and a concrete conv_impl, "phases" or "lax": resolve "auto" first, `resolve_config`)."""
    if sizes.conv_impl not in ("phases", "lax"):
        raise ValueError(f"conv_impl={sizes.conv_impl!r} is not concrete; resolve it first (resolve_config)")
    ebm = EnergyPrior(width=sizes.ebm_width, leak=sizes.ebm_leak)
    gen = Generator(
        image_size=sizes.image_size,
        channels=sizes.channels,
        width=sizes.gen_width,
        leak=sizes.gen_leak,
        conv_impl=sizes.conv_impl,
    )
    return ebm, gen


def log_likelihood(x: Array, x_hat: Array, lkhood_sigma: Array | float) -> Array:
    """log p_beta(x|z) = -||x - g(z)||^2 / (2 sigma_l^2) - D/2 log(2 pi sigma_l^2), summed over the
    image axes (the last three). The constant is kept so TI gives log-evidence in nats per image."""
    dim = x.shape[-1] * x.shape[-2] * x.shape[-3]
    sq = jnp.sum((x - x_hat) ** 2, axis=(-3, -2, -1))
    return -sq / (2.0 * lkhood_sigma**2) - 0.5 * dim * jnp.log(2.0 * jnp.pi * lkhood_sigma**2)
