"""KV caches: one contiguous [batch, max_len, kv_heads, head_dim] buffer per layer for K and V.

`cache_meta` is implicit in positions: a sequence's key at position p lives at slot p of its row, and a query
at position q sees slots <= q. Padding and idle rows carry position -1: their writes are dropped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [batch, max_len, kv_heads, head_dim]
    v: tuple[jax.Array, ...]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in (*self.k, *self.v))


CACHE_AXES = ("batch", "seq", "kv_heads", "head_dim")


def cache_shape(config: ModelConfig, batch_size: int, max_len: int) -> tuple[int, ...]:
    """GQA: K (and V) [batch, max_len, kv_heads, head_dim]. MLA: the latent [batch, max_len, 1, kv_lora + rope]
    in `k`, and no `v`."""
    if config.is_mla:
        return (batch_size, max_len, 1, config.kv_lora_rank + config.qk_rope_head_dim)
    return (batch_size, max_len, config.num_kv_heads, config.head_dim)


def kv_bytes_per_token(config: ModelConfig, dtype) -> int:
    """Bytes one token occupies in the cache, summed over layers."""
    per_layer = (config.kv_lora_rank + config.qk_rope_head_dim) if config.is_mla else \
        2 * config.num_kv_heads * config.head_dim
    return config.num_layers * per_layer * jnp.dtype(dtype).itemsize


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype, sharding=None) -> KVCache:
    shape = cache_shape(config, batch_size, max_len)

    def zeros():
        return jnp.zeros(shape, dtype, device=sharding) if sharding is not None else jnp.zeros(shape, dtype)

    layers = range(config.num_layers)
    return KVCache(k=tuple(zeros() for _ in layers), v=() if config.is_mla else tuple(zeros() for _ in layers))


def write(buffer_BSKH: jax.Array, new_BTKH: jax.Array, positions_BT: jax.Array) -> jax.Array:
    """Scatter new keys or values into their slots; position -1 (padding) is dropped."""
    max_len = buffer_BSKH.shape[1]
    slots_BT = jnp.where(positions_BT >= 0, positions_BT, max_len)
    rows_BT = jnp.broadcast_to(jnp.arange(buffer_BSKH.shape[0])[:, None], slots_BT.shape)
    return buffer_BSKH.at[rows_BT, slots_BT].set(new_BTKH.astype(buffer_BSKH.dtype), mode="drop")
