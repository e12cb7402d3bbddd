"""Gated dense MLP: down(silu(gate(x)) * up(x)); dense layers and shared experts."""

from __future__ import annotations

import jax
from flax import nnx

from moejax.layers.linear import Linear


class MLP(nnx.Module):
    def __init__(self, features: int, width: int, *, dtype, rngs: nnx.Rngs | None = None):
        self.gate_proj = Linear(features, width, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.up_proj = Linear(features, width, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down_proj = Linear(width, features, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
