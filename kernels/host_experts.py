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

With a device cache (`ExpertCache`, `LLM(offload_cache_experts=S)`, active while `layer_cache` is), the C experts
are gathered from the cache where they have a slot and only the misses are copied, in such a loop: one trip per
miss. Each trip costs a predicate read by the host, so steps of fewer than CACHE_MIN_TOKENS tokens copy their
routed experts as without a cache (measured on the H200, DeepSeek-V3 int4, 64 of 256 cached: the loop took
batch-1 decode from 22.8 to 14.3 tok/s and batch-16 decode from 28.4 to 37.7). Prefill-sized steps still copy the
whole layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

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


def _host_row(a, layer, expert):
    """Expert `expert` of a host array, stacked over layers ([L, E, ...], layer given) or not ([E, ...],
    layer None), copied to the device: [1, ...]."""
    if layer is None:
        row = jax.lax.dynamic_index_in_dim(a, expert, 0, keepdims=True)
    else:
        row = jax.lax.dynamic_slice(a, (layer, expert) + (0,) * (a.ndim - 2), (1, 1, *a.shape[2:]))[0]
    return _to_device(row)


def _rows(w, experts, layer=None):
    """[len(experts), ...] on the device for each array of weight w (a LayerWeight brings its own layer)."""
    if isinstance(w, LayerWeight):
        w, layer = w.stacked, w.layer
    return jax.tree.map(lambda a: jnp.concatenate([_host_row(a, layer, e) for e in experts], axis=0), w)


def _gather(w, experts_C):
    """Experts experts_C [C] of one weight, each copied from the host: [C, ...] on the device."""
    return _rows(w, [experts_C[c] for c in range(experts_C.shape[0])])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertCache:
    """Device copies of some offloaded experts of a run of layers: `weights` holds S slots per layer ([L, S, ...]
    leaves, the host experts' stored form) and `slot_of` [L, E] int32 the slot of each expert, -1 where it is
    only in host memory. Filled between steps (`fill`); read inside the step by `fetch_routed`."""

    weights: ExpertWeights
    slot_of: jax.Array


_ACTIVE_CACHE: contextvars.ContextVar = contextvars.ContextVar("moejax_expert_cache", default=None)


@contextlib.contextmanager
def layer_cache(cache: ExpertCache | None, layer):
    """While tracing one layer: the run's expert cache and the (traced) layer index that fetch_routed uses."""
    token = _ACTIVE_CACHE.set(None if cache is None else (cache, layer))
    try:
        yield
    finally:
        _ACTIVE_CACHE.reset(token)


def _fetch_with_cache(fields: dict, fetch_C, cache: ExpertCache, layer) -> dict:
    """The C experts fetch_C: each from the device cache where it has a slot, else copied from the host. The
    misses are copied in a loop whose trip count is the number of misses, so a hit moves no PCIe bytes."""
    slot_C = cache.slot_of[layer][fetch_C]
    hit_C = slot_C >= 0
    # a gather of C rows of [L, S, ...] (not a slice of the layer first: that would copy its S slots)
    cached = {n: None if w is None else jax.tree.map(
        lambda a: a[layer, jnp.maximum(slot_C, 0)], getattr(cache.weights, n)) for n, w in fields.items()}
    misses = jnp.sum(~hit_C)
    order_C = jnp.argsort(hit_C, stable=True)  # misses first

    def copy_miss(i, local):
        c = order_C[i]
        return {n: None if w is None else jax.tree.map(
            lambda buf, row: jax.lax.dynamic_update_index_in_dim(buf, row, c, 0), local[n],
            _rows(w, [fetch_C[c]], layer)) for n, w in fields.items()}

    return jax.lax.fori_loop(0, misses, copy_miss, cached)


CACHE_MIN_TOKENS = 4  # fewest tokens of a step that reads the cache (see the module docstring)


def reads_cache(tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether a step of `tokens` token slots reads the device cache in fetch_routed: it has at least
    CACHE_MIN_TOKENS tokens, and fewer assignments than experts (else the whole layer is copied)."""
    return tokens >= CACHE_MIN_TOKENS and tokens * top_k < num_experts


def fetch_routed(ids_TK: jax.Array, params: ExpertWeights, num_experts: int):
    """-> (the experts ids_TK routes to, on the device, as ExpertWeights of C experts; ids_TK renumbered into
    them, -1 where an id was outside [0, E)). Inside `layer_cache` the cached experts come from the device."""
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
    active = _ACTIVE_CACHE.get()
    if active is not None and reads_cache(*ids_TK.shape, num_experts):
        local = _fetch_with_cache(fields, fetch_C, *active)
    else:
        local = {n: None if w is None else _gather(w, fetch_C) for n, w in fields.items()}
    return ExpertWeights(**local), local_ids


def empty_cache(host: ExpertWeights, slots: int) -> ExpertCache:
    """A cache of `slots` experts per layer for the host stack `host` ([L, E, ...] leaves), every slot empty
    (slot_of all -1), in device memory."""
    def zeros(a):
        return jnp.zeros((a.shape[0], slots, *a.shape[2:]), a.dtype, device=a.sharding.with_memory_kind("device"))

    leaves = {f.name: None if getattr(host, f.name) is None else jax.tree.map(zeros, getattr(host, f.name))
              for f in dataclasses.fields(host)}
    first = jax.tree.leaves(host)[0]
    s = first.sharding
    table = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(), memory_kind="device") \
        if isinstance(s, jax.sharding.NamedSharding) else s.with_memory_kind("device")
    slot_of = jnp.full((first.shape[0], first.shape[1]), -1, jnp.int32, device=table)
    return ExpertCache(ExpertWeights(**leaves), slot_of)


@functools.partial(jax.jit, donate_argnums=(0,))
def _fill(weights: ExpertWeights, host: ExpertWeights, count, layers_U, slots_U, experts_U) -> ExpertWeights:
    """weights (the cache's [L, S, ...] slots) with host[layers_U[u], experts_U[u]] copied into slot slots_U[u]
    for u < count: a loop of `count` trips (a traced count), so one program serves every fill size."""
    def put(buf, stacked, u):
        row = _host_row(stacked, layers_U[u], experts_U[u])[None]
        return jax.lax.dynamic_update_slice(buf, row, (layers_U[u], slots_U[u]) + (0,) * (buf.ndim - 2))

    return jax.lax.fori_loop(0, count, lambda u, w: jax.tree.map(lambda b, h: put(b, h, u), w, host), weights)


FILL_CHUNK = 256  # updates one fill call takes (a first fill of every slot makes several calls)


def fill(cache: ExpertCache, host: ExpertWeights, updates, slot_of_LE) -> ExpertCache:
    """cache with experts copied in from the host stack: updates is a list of (layer, slot, expert); slot_of_LE
    the new [L, E] table (numpy). Updates go FILL_CHUNK at a time through one compiled program (the table
    padded to FILL_CHUNK rows, the count telling the loop where to stop), so a refresh never compiles."""
    import numpy as np

    weights = cache.weights
    shardings = jax.tree.map(lambda a: a.sharding, weights)
    updates = list(updates)
    for start in range(0, len(updates), FILL_CHUNK):
        chunk = updates[start:start + FILL_CHUNK]
        rows = np.zeros((FILL_CHUNK, 3), np.int32)
        rows[:len(chunk)] = chunk
        # the step's compiled executables take the cache in its own shardings
        weights = jax.device_put(_fill(weights, host, np.int32(len(chunk)), rows[:, 0], rows[:, 1], rows[:, 2]),
                                 shardings)
    table = jax.device_put(np.asarray(slot_of_LE, np.int32), cache.slot_of.sharding)
    return ExpertCache(weights, table)


__all__ = ["ExpertCache", "empty_cache", "fetch_routed", "fill", "layer_cache", "on_host", "reads_cache"]
