"""RMSNorm as the HF families compute it: statistics in float32, weight applied in the input dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers.linear import param


class RMSNorm(nnx.Module):
    def __init__(self, features: int, axes: tuple = ("embed",), *, eps: float = 1e-6, dtype=jnp.float32):
        self.weight = param((features,), dtype, axes, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)
