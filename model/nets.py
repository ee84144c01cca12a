"""The two networks of the LEBM (paper §2.1, Table 5).

EBM prior f_alpha: z -> ne_z -> ne_z -> 1, LeakyReLU(ebm_leak).
Generator g_beta: z as a 1x1xd image, one 4x4 stride-1 transposed conv to 4x4x(16 ng), then 4x4 stride-2
transposed convs that double the resolution while halving the channels, and a last stride-2 transposed
conv to the image channels with tanh. 32x32 gives channels 16ng, 8ng, 4ng (the shapes of the paper's
public code at ng = 8: 128, 64, 32); 64x64 adds 2ng; 16x16 (digits) uses 16ng, 8ng.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
from jax import Array

from model.config import ExperimentConfig


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

    @nn.compact
    def __call__(self, z: Array) -> Array:
        lead = z.shape[:-1]
        x = z.reshape((-1, 1, 1, z.shape[-1]))
        doublings = int(math.log2(self.image_size)) - 2  # 4x4 -> image_size
        ch = self.width * 16
        x = nn.leaky_relu(nn.ConvTranspose(ch, (4, 4), strides=(1, 1), padding="VALID")(x), self.leak)
        for _ in range(doublings - 1):
            ch //= 2
            x = nn.ConvTranspose(max(ch, 1), (4, 4), strides=(2, 2), padding="SAME")(x)
            x = nn.leaky_relu(x, self.leak)
        x = nn.ConvTranspose(self.channels, (4, 4), strides=(2, 2), padding="SAME")(x)
        x = jnp.tanh(x)
        return x.reshape(lead + x.shape[1:])


def make_networks(config: ExperimentConfig) -> tuple[EnergyPrior, Generator]:
    """The EBM prior and generator modules sized by `config`."""
    ebm = EnergyPrior(width=config.ebm_width, leak=config.ebm_leak)
    gen = Generator(image_size=config.image_size, channels=config.channels, width=config.gen_width,
                    leak=config.gen_leak)
    return ebm, gen


def log_likelihood(x: Array, x_hat: Array, lkhood_sigma: Array | float) -> Array:
    """log p_beta(x|z) = -||x - g(z)||^2 / (2 sigma_l^2) - D/2 log(2 pi sigma_l^2), summed over the
    image axes (the last three). The constant is kept so TI gives log-evidence in nats per image."""
    dim = x.shape[-1] * x.shape[-2] * x.shape[-3]
    sq = jnp.sum((x - x_hat) ** 2, axis=(-3, -2, -1))
    return -sq / (2.0 * lkhood_sigma**2) - 0.5 * dim * jnp.log(2.0 * jnp.pi * lkhood_sigma**2)
