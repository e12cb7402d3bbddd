"""Routed experts held in host memory (`LLM(offload_experts=True)`): each MoE layer brings to the device only
the experts its tokens route to.

The expert arrays live in pinned host memory (memory kind "pinned_host"), stacked over layers like the
device-resident ones (`LayerWeight`). Inside the jitted step a layer's routing gives at most C = min(E, T * k)
distinct experts; each is a dynamic slice of the host stack copied to the device (XLA turns the slice of a host
array into a host-to-device DMA of just those bytes), and the kernels run on the C fetched experts with the
token's ids renumbered into them. When C = E (prefill-sized steps) the whole layer is copied at once. A lone
decode token thus moves k experts' bytes over PCIe per layer, quantized ones in their packed form (the kernels
dequantize in registers). C is static, so a step copies C experts even when its tokens share some (a
data-dependent copy count would need a loop whose trip count the GPU reads back each layer).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.kernels.experts import ExpertWeights
from moejax.kernels.layer_weight import LayerWeight


def _leaves(w) -> list:
    return jax.tree.leaves(w.stacked if isinstance(w, LayerWeight) else w)


def on_host(params: ExpertWeights) -> bool:
    """Whether the routed expert weights are in host memory (seen from their abstract values, so it is known
    at trace time)."""
    host = getattr(getattr(jax, "memory", None), "Space", None)
    leaves = _leaves(params.w_gate)
    return host is not None and bool(leaves) and all(
        getattr(jax.typeof(a), "memory_space", None) == host.Host for a in leaves)


def _to_device(a):
    return jax.device_put(a, jax.memory.Space.Device)


def _layer(w):
    """The whole layer's weight on the device."""
    if isinstance(w, LayerWeight):
        return jax.tree.map(lambda a: _to_device(jax.lax.dynamic_index_in_dim(a, w.layer, 0, keepdims=False)),
                            w.stacked)
    return jax.tree.map(_to_device, w)


def _gather(w, experts_C):
    """Experts experts_C [C] of one weight, each copied from the host: [C, ...] on the device."""
    def take(a, layer):
        rows = []
        for c in range(experts_C.shape[0]):
            if layer is None:
                row = jax.lax.dynamic_index_in_dim(a, experts_C[c], 0, keepdims=True)
            else:
                start = (layer, experts_C[c]) + (0,) * (a.ndim - 2)
                row = jax.lax.dynamic_slice(a, start, (1, 1, *a.shape[2:]))[0]
            rows.append(_to_device(row))
        return jnp.concatenate(rows, axis=0)

    if isinstance(w, LayerWeight):
        return jax.tree.map(lambda a: take(a, w.layer), w.stacked)
    return jax.tree.map(lambda a: take(a, None), w)


def fetch_routed(ids_TK: jax.Array, params: ExpertWeights, num_experts: int):
    """-> (the experts ids_TK routes to, on the device, as ExpertWeights of C experts; ids_TK renumbered into
    them, -1 where an id was outside [0, E))."""
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    capacity = min(num_experts, ids_TK.size)
    if capacity == num_experts:
        local = {n: None if w is None else _layer(w) for n, w in fields.items()}
        return ExpertWeights(**local), ids_TK
    valid = (ids_TK >= 0) & (ids_TK < num_experts)
    # [C] distinct routed experts in ascending order. The C copies are fixed by the step's shape: when fewer
    # experts are routed (tokens sharing experts), the spare slots (id E) copy expert E - 1; no id maps to them.
    distinct_C = jnp.unique(jnp.where(valid, ids_TK, num_experts), size=capacity, fill_value=num_experts)
    fetch_C = jnp.minimum(distinct_C, num_experts - 1)
    local_ids = jnp.searchsorted(distinct_C, ids_TK).astype(jnp.int32)
    local_ids = jnp.where(valid, local_ids, -1)
    local = {n: None if w is None else _gather(w, fetch_C) for n, w in fields.items()}
    return ExpertWeights(**local), local_ids


__all__ = ["fetch_routed", "on_host"]
