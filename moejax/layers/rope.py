"""Rotary position embeddings: default, linear and YaRN frequencies; rotate-half or interleaved pairs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import RopeConfig, yarn_mscale


def inverse_frequencies(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    """(inv_freq [dim // 2] float32, attention factor that scales cos and sin)."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.kind != "yarn":
        return inv_freq, 1.0
    original = rope.original_max_position or 4096

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp
    inv_freq = (inv_freq / rope.factor) * (1 - extrapolation) + inv_freq * extrapolation
    if rope.mscale and rope.mscale_all_dim:
        factor = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    else:
        factor = yarn_mscale(rope.factor)
    return inv_freq.astype(np.float32), float(factor)


def apply_rope(x: jax.Array, positions: jax.Array, rope: RopeConfig) -> jax.Array:
    """Rotate x [batch, seq, heads, dim] by positions [batch, seq]."""
    dim = x.shape[-1]
    inv_freq, attention_factor = inverse_frequencies(rope, dim)
    # [batch, seq, dim // 2]
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    cos = (jnp.cos(angles) * attention_factor).astype(x.dtype)[:, :, None, :]
    sin = (jnp.sin(angles) * attention_factor).astype(x.dtype)[:, :, None, :]
    if rope.interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return out.reshape(x.shape)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
