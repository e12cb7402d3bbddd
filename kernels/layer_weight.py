"""One layer of a weight that is stored stacked over layers, left in the stack.

Under `lax.scan` over layers, each layer's weights are a dynamic slice of the stacked arrays, and on GPUs XLA
materializes a slice that feeds a kernel as a copy: for the routed experts that is a copy of the whole layer's
experts every step (about 1.2 GB a layer for Qwen3-30B-A3B, three times the bytes a decode step must read). A
`LayerWeight` keeps the stack and the layer index instead; kernels that can address the stack read the layer in
place (the Pallas expert kernels index experts as layer * E + e), everything else takes the slice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerWeight:
    stacked: Any  # a jax.Array or QuantizedWeight with a leading layer axis [L, ...]
    layer: jax.Array  # int32 scalar

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.stacked.shape[1:])

    @property
    def dtype(self):
        return self.stacked.dtype

    @property
    def sharding_shape(self) -> tuple[int, ...]:
        inner = getattr(self.stacked, "sharding_shape", None) or self.stacked.shape
        return tuple(inner[1:])

    def take(self):
        """The layer's weight as its own array (a slice: a copy on GPUs)."""
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, self.layer, 0, keepdims=False), self.stacked)

    def flat(self, num_experts: int):
        """Stacked experts [L, E, ...] viewed as [L * E, ...] (a free reshape) and the index of this layer's
        expert 0 in it."""
        merged = jax.tree.map(lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:]), self.stacked)
        return merged, self.layer * num_experts


def unstacked(w):
    """w itself, or the layer's slice of a LayerWeight."""
    return w.take() if isinstance(w, LayerWeight) else w
