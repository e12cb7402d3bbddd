"""Prefill-chunk attention over KV pages as a Pallas (Triton) kernel: flash attention of a block of queries over
its sequence's cached pages and its chunk's own keys.

A prefill chunk reaches attention as blocks of `qb` queries of one sequence (attention_reference.py). One
program takes `block_m` rows of one block and one KV head, a row being (query, query head): the query heads that
share a KV head are computed together, so each key tile is loaded once for all of them. It walks two sources
with one online softmax:
  1. the cache: the positions before the chunk, gathered `block_tokens` at a time through the page table,
     starting at the earliest page the sliding window reaches;
  2. the chunk's own keys, this step's, contiguous in the step's flat key array: from the chunk's first token to
     the program's last query only (causal: later tiles are never read).
Each source runs as three loops: tiles cut by the window's edge, tiles every row of the program sees whole (no
mask built or applied), and the causal / cache-end tiles. The softmax runs in exp2 with log2(e) folded into the
scale. GPT-OSS's sink starts the running max and sum. Same contract as `attention_reference.paged_attention` for blocks
of more than one query.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax.kernels.attention_reference import _FLOOR, NO_WINDOW
from moejax.kernels.pallas_paged_attention import _pow2_parts

_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))


def _cdiv(a, b):
    return -((-a) // b)


@dataclasses.dataclass(frozen=True)
class PrefillTiles:
    # H200 sweep (Qwen3's 32/4 x 128, a 4k prompt and a 2k chunk after 2k cached): 64 rows, 64 keys, 4 warps
    # beat 128-row tiles at 4 or 8 warps by 1.2-1.9x
    block_m: int = 64  # rows (query, head) per program
    block_tokens: int = 64  # keys per inner step
    num_warps: int = 4
    num_stages: int = 2


def default_tiles(head_dim: int, itemsize: int = 2) -> PrefillTiles:
    override = os.environ.get("MOEJAX_PREFILL_TILES")  # "block_m,block_tokens,num_warps,num_stages" (tuning)
    if override:
        return PrefillTiles(*(int(x) for x in override.split(",")))
    if head_dim > 256:  # MLA's 576-wide latent and 512-wide values: smaller tiles keep the accumulator resident
        return PrefillTiles(block_m=32 if itemsize > 2 else 64, block_tokens=32, num_warps=8, num_stages=1)
    if itemsize > 2:  # float32 tiles take twice the registers and shared memory
        return PrefillTiles(block_m=64, block_tokens=32, num_warps=4, num_stages=1)
    return PrefillTiles()


def _block_m(rows: int, wanted: int) -> int:
    """The largest power of two <= wanted that divides rows (0 when it is below tl.dot's 16)."""
    m = 1 << (max(wanted, 1).bit_length() - 1)
    while m >= 16 and rows % m:
        m //= 2
    return m if m >= 16 else 0


def supported(q_block: int, group: int, head_dim: int, value_dim: int, page_size: int) -> bool:
    """Pow2 pieces of 16+ for the head dim, a pow2 value dim and page size, rows that tile by 16, key tiles of
    the chunk's own keys that fit its query blocks."""
    pow2 = lambda x: x >= 1 and x & (x - 1) == 0  # noqa: E731
    return all(size >= 16 for _, size in _pow2_parts(head_dim)) and value_dim >= 16 and pow2(value_dim) and \
        pow2(page_size) and page_size <= 128 and pow2(q_block) and q_block >= 16 and \
        _block_m(q_block * group, 128) > 0


def _prefill_kernel(window_ref, cached_ref, first_ref, rowpos_ref, keypos_ref, pages_ref, sinks_ref, q_ref, k_ref,
                    kn_ref, *refs, scale, qb, group, block_m, pages_per_block, own_tokens, k_parts, value_dim,
                    separate_v, has_sinks, precision):
    """refs: (v pool, v new) if separate_v, then the output [block_m, value_dim]."""
    if separate_v:
        v_ref, vn_ref, o_ref = refs
    else:
        v_ref, vn_ref, (o_ref,) = k_ref, kn_ref, refs
    n, kvh, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    page_size = k_ref.shape[1]
    cache_tokens = pages_per_block * page_size
    window = window_ref[0]
    rows = pl.ds(j * block_m, block_m)
    qpos = rowpos_ref[n, rows]  # [block_m] position of each row's query, -1: padding
    lowest = jnp.min(jnp.where(qpos >= 0, qpos, NO_WINDOW))
    cached = jnp.maximum(cached_ref[n], 0)  # the cache holds positions 0 .. cached-1
    qs = [q_ref[n, kvh, rows, pl.ds(d0, size)] for d0, size in k_parts]
    dims = (((1,), (1,)), ((), ()))

    # MLA's values are the latent's first value_dim features: the key tile's first piece, loaded once.
    v_in_k = not separate_v and k_parts[0] == (0, value_dim)

    def scores(keys):  # keys(d0, size) -> [tokens, size]; returns ([block_m, tokens] log2-unit scores, pieces)
        sc, pieces = None, []
        for q, (d0, size) in zip(qs, k_parts):
            pieces.append(keys(d0, size).astype(q.dtype))
            part = jax.lax.dot_general(q, pieces[-1], dims, precision=precision, preferred_element_type=jnp.float32)
            sc = part if sc is None else sc + part
        return sc * (scale * _LOG2E), pieces  # exp2 of log2-scaled scores: the multiply folded into the scale

    def update(carry, sc, seen, v):  # seen None: a tile every row sees whole, no mask to build or apply
        m, l, acc = carry
        if seen is not None:
            sc = jnp.where(seen, sc, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        p = jnp.exp2(sc - m_new[:, None])
        correction = jnp.exp2(m - m_new)
        v = v.astype(qs[0].dtype)  # FP8 pages are upcast; p never goes below the query's precision
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)
        return m_new, l * correction + jnp.sum(p, axis=1), acc * correction[:, None] + pv

    def three_loops(steps, lead, full_end, step, carry):
        """Tiles [0, lead) and [full_end, steps) masked, the ones between seen whole by every real row."""
        lead = jnp.clip(lead, 0, steps)
        full_end = jnp.clip(full_end, lead, steps)
        carry = jax.lax.fori_loop(0, lead, functools.partial(step, masked=True), carry)
        carry = jax.lax.fori_loop(lead, full_end, functools.partial(step, masked=False), carry)
        return jax.lax.fori_loop(full_end, steps, functools.partial(step, masked=True), carry)

    real = lowest < NO_WINDOW  # any real query in this program's rows (padding rows come last)
    highest = jnp.max(qpos)
    # 1. Cached pages, from the one holding the earliest key a window reaches to the end of the cache.
    first_page = jnp.maximum(lowest - window + 1, 0) // page_size
    end_page = (cached + page_size - 1) // page_size
    cache_steps = jnp.where(real, (jnp.maximum(end_page - first_page, 0) + pages_per_block - 1) // pages_per_block, 0)
    cache_first = first_page * page_size  # the first token of cache tile i is cache_first + i * cache_tokens

    def cache_step(i, carry, masked):
        p0 = first_page + i * pages_per_block
        ids = pages_ref[n, pl.ds(p0, pages_per_block)]
        sc, pieces = scores(lambda d0, size: k_ref[ids, :, kvh, pl.ds(d0, size)].reshape(cache_tokens, size))
        seen = None
        if masked:
            tok = p0 * page_size + jnp.arange(cache_tokens)
            seen = (tok[None, :] < cached) & (tok[None, :] > qpos[:, None] - window) & (qpos[:, None] >= 0)
        v = pieces[0] if v_in_k else v_ref[ids, :, kvh, pl.ds(0, value_dim)].reshape(cache_tokens, value_dim)
        return update(carry, sc, seen, v)

    if has_sinks:  # the sink is one more logit of the softmax: start the running max and sum from it
        m0 = sinks_ref[kvh, rows] * _LOG2E
        l0 = jnp.ones((block_m,), jnp.float32)
    else:
        m0 = jnp.full((block_m,), _FLOOR, jnp.float32)
        l0 = jnp.zeros((block_m,), jnp.float32)
    carry = (m0, l0, jnp.zeros((block_m, value_dim), jnp.float32))
    # A cache tile is whole when its first token is inside every row's window and its last one is cached.
    carry = three_loops(cache_steps, _cdiv(highest - window + 1 - cache_first, cache_tokens),
                        (cached - cache_first) // cache_tokens, cache_step, carry)

    # 2. The chunk's own keys: flat tokens from the earliest one the window reaches (the chunk's tokens are
    # consecutive positions from `cached` on) to this program's last query.
    start = first_ref[n] * qb + jnp.maximum(lowest - window + 1 - cached, 0)
    start_pos = cached + start - first_ref[n] * qb  # the position of flat token `start`
    last_query = ((j + 1) * block_m - 1) // group  # rows are (query, head): the query of the last row
    end = n * qb + last_query + 1
    own_steps = jnp.where(real, (end - start + own_tokens - 1) // own_tokens, 0)

    def own_step(i, carry, masked):
        t0 = start + i * own_tokens
        toks = pl.ds(t0, own_tokens)
        sc, pieces = scores(lambda d0, size: kn_ref[toks, kvh, pl.ds(d0, size)])
        seen = None
        if masked:
            kpos = jnp.where(t0 + jnp.arange(own_tokens) < end, keypos_ref[toks], -1)  # past end: another chunk's
            seen = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - window) & \
                (kpos[None, :] >= 0) & (qpos[:, None] >= 0)
        return update(carry, sc, seen, pieces[0] if v_in_k else vn_ref[toks, kvh, pl.ds(0, value_dim)])

    # An own tile is whole when its first key is inside every row's window and its last is at or before the
    # earliest query (causal for every row).
    carry = three_loops(own_steps, _cdiv(highest - window + 1 - start_pos, own_tokens),
                        (lowest + 1 - start_pos) // own_tokens, own_step, carry)
    _, l, acc = carry
    out = acc / jnp.maximum(l, 1e-30)[:, None]
    o_ref[...] = jnp.where((qpos >= 0)[:, None], out, 0.0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "value_dim", "tiles", "interpret"))
def paged_prefill(q_NQHD, q_pos_NQ, page_table_NP, k_pool, v_pool, layer, k_new_NQKD, v_new_NQKD, first_N, *,
                  scale: float, window=NO_WINDOW, sinks_H=None, value_dim: int | None = None,
                  tiles: PrefillTiles | None = None, interpret: bool = False):
    """Blocks of queries q [N, qb, heads, dim] at positions q_pos (-1: padding, output 0), each block's chunk
    being blocks first_N[n]..n, over the positions its chunk has cached (pools [layers, pages, page_size,
    kv_heads, dim] through the block's page-table row) and the chunk's own keys k_new / v_new [N, qb, kv_heads,
    dim] (v None: the first value_dim features of the keys, MLA's latent). Returns [N, qb, heads, value_dim]."""
    n, qb, h, d = q_NQHD.shape
    num_layers, num_pages, page_size, kvh, _ = k_pool.shape
    dv = value_dim if v_pool is None else v_pool.shape[-1]
    g = h // kvh
    rows = qb * g
    tiles = tiles or default_tiles(d, jnp.dtype(q_NQHD.dtype).itemsize)
    block_m = _block_m(rows, tiles.block_m)
    pages_per_block = max(1, tiles.block_tokens // page_size)
    own_tokens = max(16, tiles.block_tokens)

    # [N, kv_heads, rows = (query, head), dim]
    q = q_NQHD.reshape(n, qb, kvh, g, d).transpose(0, 2, 1, 3, 4).reshape(n, kvh, rows, d)
    rowpos = jnp.repeat(q_pos_NQ.astype(jnp.int32), g, axis=1)
    cached = q_pos_NQ[first_N, 0].astype(jnp.int32)
    # One tile of slack at the ends, so a program's last step never reads past the tables.
    pages = jnp.pad(page_table_NP.astype(jnp.int32), ((0, 0), (0, pages_per_block))) + \
        jnp.asarray(layer, jnp.int32) * num_pages
    keypos = jnp.pad(q_pos_NQ.reshape(n * qb).astype(jnp.int32), (0, own_tokens), constant_values=-1)

    def flat_new(x):  # [N, qb, kv_heads, dim] -> [N * qb + slack, kv_heads, dim]
        return jnp.pad(x.reshape(n * qb, kvh, x.shape[-1]), ((0, own_tokens), (0, 0), (0, 0)))

    k_flat = k_pool.reshape(num_layers * num_pages, page_size, kvh, k_pool.shape[-1])
    operands = [k_flat, flat_new(k_new_NQKD)]
    if v_pool is not None:
        operands += [v_pool.reshape(num_layers * num_pages, page_size, kvh, dv), flat_new(v_new_NQKD)]
    has_sinks = sinks_H is not None
    # [kv_heads, rows]: each row's sink logit (rows are (query, head))
    sinks = jnp.tile(sinks_H.astype(jnp.float32).reshape(kvh, g), (1, qb)) if has_sinks else \
        jnp.zeros((kvh, rows), jnp.float32)
    window_1 = jnp.reshape(jnp.asarray(window, jnp.int32), (1,))
    precision = jax.lax.Precision.HIGHEST if q_NQHD.dtype == jnp.float32 else None
    kernel = functools.partial(
        _prefill_kernel, scale=scale, qb=qb, group=g, block_m=block_m, pages_per_block=pages_per_block,
        own_tokens=own_tokens, k_parts=tuple(_pow2_parts(d)), value_dim=dv, separate_v=v_pool is not None,
        has_sinks=has_sinks, precision=precision)
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as plt

        extra["compiler_params"] = plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    k_flat, kn_flat, *v_flat = operands
    whole = pl.no_block_spec
    out = pl.pallas_call(
        kernel,
        grid=(n, kvh, rows // block_m),
        in_specs=[whole] * (10 + len(v_flat)),
        out_specs=pl.BlockSpec((None, None, block_m, dv), lambda i, k, j: (i, k, j, 0)),
        out_shape=jax.ShapeDtypeStruct((n, kvh, rows, dv), q_NQHD.dtype),
        interpret=interpret,
        **extra,
    )(window_1, cached, first_N.astype(jnp.int32), rowpos, keypos, pages, sinks, q, k_flat, kn_flat, *v_flat)
    # [N, kv_heads, qb, group, dv] -> [N, qb, heads, dv]
    return out.reshape(n, kvh, qb, g, dv).transpose(0, 2, 1, 3, 4).reshape(n, qb, h, dv)
