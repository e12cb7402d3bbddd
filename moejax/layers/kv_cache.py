"""The paged KV cache: page pools of every layer, where a step's tokens are written, and attention over them.

Pools are [layers, pages, page_size, kv_heads, head_dim] for K and V (MLA: the latent and the rotary key in
`k`, no `v`), in the model's dtype or FP8 e4m3 (`kv_cache_dtype="fp8"`: unit scale, saturating; attention
upcasts what it reads). A step's tokens are flat: the first `num_decode` are decode tokens, one per sequence;
the rest are
prefill chunks cut into blocks of `prefill_block` tokens, each block holding tokens of one sequence only. Every
token has a slot (page, offset) its key is written to (page = num_pages drops the write: padding). Each decode
token and each prefill block has its sequence's page table row. Page 0 is never handed out, so padded page
table entries point at a harmless page. The engine fills these arrays; layers only read them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.sharding import attention_parallel
from moejax.config import ModelConfig

POOL_AXES = ("layers", None, None, "kv_heads", "head_dim")  # [layers, pages, page_size, kv_heads, head_dim]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVPool:
    k: jax.Array  # [layers, pages, page_size, kv_heads, head_dim]
    v: jax.Array | None

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in (self.k, self.v) if a is not None)


def cached_kv_heads(config: ModelConfig, tensor: int = 1) -> int:
    """KV heads the pools hold. With fewer KV heads than tensor ranks (dividing them), each head is stored
    once per rank whose query heads use it (vLLM's replication): `tensor` heads split one a rank, so a rank
    keeps one head instead of all of them. MLA's one latent stays whole."""
    kvh = config.num_kv_heads
    if config.is_mla or kvh >= tensor or tensor % kvh:
        return 1 if config.is_mla else kvh
    return tensor


def pool_shape(config: ModelConfig, num_pages: int, page_size: int, tensor: int = 1,
               layers: int | None = None) -> tuple[int, ...]:
    """layers: the pools' layer slots (pipeline stages: pp * slots per stage); the model's layers by default."""
    layers = config.num_layers if layers is None else layers
    if config.is_mla:
        return (layers, num_pages, page_size, 1, config.kv_lora_rank + config.qk_rope_head_dim)
    return (layers, num_pages, page_size, cached_kv_heads(config, tensor), config.head_dim)


def init_pool(config: ModelConfig, num_pages: int, page_size: int, dtype, sharding=None, tensor: int = 1,
              layers: int | None = None) -> KVPool:
    shape = pool_shape(config, num_pages, page_size, tensor, layers)

    def zeros():
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()

    return KVPool(k=zeros(), v=None if config.is_mla else zeros())


def kv_bytes_per_token(config: ModelConfig, dtype) -> int:
    """Bytes one token occupies in the cache, summed over layers (unsharded)."""
    per_layer = (config.kv_lora_rank + config.qk_rope_head_dim) if config.is_mla else \
        2 * config.num_kv_heads * config.head_dim
    return config.num_layers * per_layer * jnp.dtype(dtype).itemsize


def to_cache_dtype(x, dtype):
    """x in the pools' dtype; into FP8 saturating at its largest finite value (a plain cast of an out-of-range
    value gives NaN in e4m3fn, which has no infinity)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 1:
        top = float(jnp.finfo(dtype).max)
        x = jnp.clip(x.astype(jnp.float32), -top, top)
    return x.astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedBatch:
    """Where one step's T flat tokens live in the pages (the step's `cache_meta`)."""

    slot_page_T: jax.Array  # int32 [T]: page each token's key goes to; num_pages for padding
    slot_offset_T: jax.Array  # int32 [T]: offset inside that page
    decode_pages_DP: jax.Array  # int32 [num_decode, max_pages]: page table of each decode token's sequence
    prefill_pages_BP: jax.Array  # int32 [(T - num_decode) / prefill_block, max_pages]: one row per block
    prefill_first_B: jax.Array  # int32 [(T - num_decode) / prefill_block]: first block of each block's chunk
    num_decode: int = dataclasses.field(metadata=dict(static=True), default=0)
    prefill_block: int = dataclasses.field(metadata=dict(static=True), default=1)


@dataclasses.dataclass(frozen=True)
class LayerKV:
    """One layer's view of the pools for one step: the pools as earlier steps left them (read-only while
    layers run) and, once the layer has computed them, this step's keys and values (`write`), which attention
    sees beside the cached ones and `commit` scatters into the pools after the step's last layer. Keeping the
    pools out of the layer loop's carry is what lets XLA update them in place: one scatter per step."""

    pool: KVPool
    batch: PagedBatch
    layer: jax.Array | int
    k_TKD: jax.Array | None = None
    v_TKD: jax.Array | None = None

    def write(self, k_TKD, v_TKD=None) -> "LayerKV":
        dtype = self.pool.k.dtype
        return dataclasses.replace(self, k_TKD=to_cache_dtype(k_TKD, dtype),
                                   v_TKD=None if v_TKD is None else to_cache_dtype(v_TKD, dtype))

    def attend(self, q_THD, positions_T, *, scale, window, sinks_H=None, value_dim=None):
        """[T, heads, dim] queries -> [T, heads, value dim], decode tokens and prefill blocks alike."""
        b = self.batch
        t, h, d = q_THD.shape
        nd, qb = b.num_decode, b.prefill_block
        common = dict(scale=scale, window=window, sinks_H=sinks_H, value_dim=value_dim)
        k, v = self.k_TKD, self.v_TKD

        def blocks(x, lo, size):
            return None if x is None else x[lo:].reshape(-1, size, *x.shape[1:])

        parts = []
        if nd:
            dec = slice(0, nd)
            parts.append(attention_parallel.paged_attention(
                q_THD[dec, None], positions_T[dec, None], b.decode_pages_DP, self.pool.k, self.pool.v,
                self.layer, k[dec, None], None if v is None else v[dec, None], jnp.arange(nd), max_back=0,
                **common)[:, 0])
        if t > nd:
            out = attention_parallel.paged_attention(
                blocks(q_THD, nd, qb), blocks(positions_T, nd, qb), b.prefill_pages_BP, self.pool.k, self.pool.v,
                self.layer, blocks(k, nd, qb), blocks(v, nd, qb), b.prefill_first_B, **common)
            parts.append(out.reshape(t - nd, h, -1))
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)

    def commit(self) -> KVPool:
        """The pools with this layer's step keys written (the unscanned, layer-by-layer path)."""
        v = None if self.v_TKD is None else self.v_TKD[None]
        return commit(self.pool, self.batch, jnp.asarray(self.layer)[None], self.k_TKD[None], v)


def commit(pool: KVPool, batch: PagedBatch, layers_L, k_LTKD, v_LTKD=None) -> KVPool:
    """Write the step's keys and values of layers `layers_L` into their slots (padding slots drop)."""
    idx = (layers_L[:, None], batch.slot_page_T[None, :], batch.slot_offset_T[None, :])
    # The keys come from LayerKV.write, already in the pools' dtype (saturated there for FP8).
    k = pool.k.at[idx].set(k_LTKD.astype(pool.k.dtype), mode="drop")
    v = pool.v
    if v is not None:
        v = v.at[idx].set(v_LTKD.astype(v.dtype), mode="drop")
    return KVPool(k, v)
