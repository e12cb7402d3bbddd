"""Linear and embedding layers whose parameters carry logical axis names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kernels


def param(shape, dtype, axes, rngs: nnx.Rngs | None = None, init: str = "normal") -> nnx.Param:
    """A parameter with logical axes; initialized only when the model is built for training or tests."""
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros" or rngs is None:
        value = jnp.zeros(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel is input-major [in, out] and may be a quantized weight."""

    def __init__(self, in_features: int, out_features: int, axes: tuple, *, bias: bool = False,
                 dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.kernel = param((in_features, out_features), dtype, axes, rngs)
        self.bias = param((out_features,), dtype, axes[1:], init="zeros") if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = kernels.matmul(x, self.kernel.get_value())
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table [vocab, embed]; `attend` reuses it as a tied lm_head."""

    def __init__(self, vocab_size: int, features: int, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.embedding = param((vocab_size, features), dtype, ("vocab", "embed"), rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", x, self.embedding[...], preferred_element_type=jnp.float32)
