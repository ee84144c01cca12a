"""The generator's transposed convolutions as phase matmuls equal flax's nn.ConvTranspose."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.nets import Generator, UpConv


@pytest.mark.parametrize("features", [7, 12])  # 7: the joint 3x3 matmul (few outputs); 12: four matmuls
@pytest.mark.parametrize("strides,shape", [(1, (3, 1, 1, 5)), (2, (3, 4, 4, 6)), (2, (2, 8, 8, 3))])
def test_upconv_phases_equal_conv_transpose(strides, shape, features) -> None:
    """Same parameters (same names and shapes), same outputs, and the same gradients w.r.t. the input."""
    x = jax.random.normal(jax.random.key(0), shape)
    phases = UpConv(features, strides=strides, impl="phases")
    lax = UpConv(features, strides=strides, impl="lax")
    params = lax.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, phases.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, params)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
    out_p, out_l = phases.apply(params, x), lax.apply(params, x)
    assert (
        out_p.shape
        == out_l.shape
        == (shape[0], 4 if strides == 1 else 2 * shape[1], 4 if strides == 1 else 2 * shape[2], features)
    )
    np.testing.assert_allclose(out_p, out_l, rtol=1e-5, atol=1e-5)
    g_p = jax.grad(lambda v: jnp.sum(jnp.sin(phases.apply(params, v))))(x)
    g_l = jax.grad(lambda v: jnp.sum(jnp.sin(lax.apply(params, v))))(x)
    np.testing.assert_allclose(g_p, g_l, rtol=1e-4, atol=1e-5)


def test_generators_of_both_impls_are_interchangeable() -> None:
    """A generator's parameters from one implementation give the same images through the other."""
    z = jax.random.normal(jax.random.key(3), (4, 8))
    a = Generator(image_size=16, channels=1, width=2, conv_impl="phases")
    b = Generator(image_size=16, channels=1, width=2, conv_impl="lax")
    params = a.init(jax.random.key(4), z)
    np.testing.assert_allclose(a.apply(params, z), b.apply(params, z), rtol=1e-5, atol=1e-5)
