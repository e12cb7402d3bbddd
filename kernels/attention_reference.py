"""Attention over a paged KV cache in pure JAX: the reference behind `moejax.kernels.paged_attention`.

Queries come in blocks whose queries all belong to one sequence: a decode token is a block of one, a prefill
chunk is cut into blocks of a few dozen tokens. Each block sees two sources of keys:
- the cache: keys written by earlier steps, in pools [layers, pages, page_size, kv_heads, head_dim] read
  through the block's page-table row, every position before the start of the block's chunk;
- this step: the keys of the block's own chunk (its own tokens and the earlier blocks of the same chunk), which
  the caller writes into the pool only after the whole step, so the pool stays read-only while layers run.
One online softmax walks both: the cache in chunks of `chunk_pages` pages (only as many as the longest cached
context needs, none before the earliest sliding window), then the chunk's blocks one by one, so the compiled
shape depends on the number of blocks alone, never on context lengths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NO_WINDOW = 1 << 30  # a window wider than any context: full attention
_FLOOR = -1e30  # initial running max: finite, so exp(-inf - _FLOOR) is an exact 0 for masked scores


def paged_attention(q_NQHD, q_pos_NQ, page_table_NP, k_pool, v_pool, layer, k_new_NQKD, v_new_NQKD, first_N, *,
                    scale: float, window=NO_WINDOW, sinks_H=None, value_dim: int | None = None,
                    chunk_pages: int = 32, max_back: int | None = None, static_bounds: bool = False):
    """Causal attention of each block's queries over its sequence's cached keys and its chunk's new keys.

    q_NQHD: [blocks, queries per block, heads, head_dim]; q_pos_NQ: position of each query, -1 for padding
    (its output is 0). k_new_NQKD / v_new_NQKD: this step's key and value of every query token (v None: the
    values are the first `value_dim` features of the keys, MLA's latent). first_N: the first block of each
    block's chunk (a block's chunk is blocks first..block, consecutive). The cache holds, for each block, the
    positions before its chunk's first query: the key at position p lives in page page_table[p // page_size],
    slot p % page_size of k_pool / v_pool [layers, pages, page_size, kv_heads, dim]. layer: traced or static int.
    window: keys at positions > q - window are seen (traced ok). sinks_H: one extra logit per head (GPT-OSS).
    max_back: a static bound on how many blocks back a chunk reaches (0 for decodes), None: blocks - 1.
    static_bounds: walk every chunk of the page table and `max_back` blocks, masked, instead of only the ones the
    contexts need: loops with a trip count known at compile time, which a GPU runs without reading a loop
    condition back to the host every iteration.
    Returns [blocks, queries, heads, value_dim] in q's dtype.
    """
    n, qb, h, d = q_NQHD.shape
    page_size, kvh = k_pool.shape[2], k_pool.shape[3]
    dv = value_dim if v_pool is None else v_pool.shape[-1]
    g = h // kvh
    max_pages = page_table_NP.shape[1]
    chunk_pages = min(chunk_pages, max_pages)
    pad = -max_pages % chunk_pages
    if pad:
        page_table_NP = jnp.pad(page_table_NP, ((0, 0), (0, pad)))
    chunk = chunk_pages * page_size
    # [blocks, kv_heads, group, queries, dim]
    q = q_NQHD.reshape(n, qb, kvh, g, d).transpose(0, 2, 3, 1, 4)
    valid_NQ = q_pos_NQ >= 0
    window = jnp.asarray(window, jnp.int32)
    q_pos = q_pos_NQ[:, :, None]
    # Cached context of each block: the positions before its chunk's first token (-1: a padding block).
    cached_N = q_pos_NQ[first_N, 0]

    if sinks_H is None:
        m0 = jnp.full((n, kvh, g, qb), _FLOOR, jnp.float32)
        l0 = jnp.zeros((n, kvh, g, qb), jnp.float32)
    else:  # the sink joins the softmax as one more logit: start the running max and sum from it
        m0 = jnp.broadcast_to(sinks_H.astype(jnp.float32).reshape(1, kvh, g, 1), (n, kvh, g, qb))
        l0 = jnp.ones((n, kvh, g, qb), jnp.float32)
    acc0 = jnp.zeros((n, kvh, g, qb, dv), jnp.float32)

    def accumulate(carry, k_NCKD, v_NCKD, seen_NQC):
        m, l, acc = carry
        s = jnp.einsum("nkgqd,nckd->nkgqc", q, k_NCKD.astype(q.dtype), preferred_element_type=jnp.float32) * scale
        s = jnp.where(seen_NQC[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        correction = jnp.exp(m - m_new)
        l = l * correction + jnp.sum(p, axis=-1)
        v_NCKD = v_NCKD.astype(q.dtype)  # FP8 pages are upcast; p never goes below the query's precision
        pv = jnp.einsum("nkgqc,nckd->nkgqd", p.astype(q.dtype), v_NCKD, preferred_element_type=jnp.float32)
        return m_new, l, acc * correction[..., None] + pv

    def in_window(kv_pos):
        return (kv_pos <= q_pos) & (kv_pos > q_pos - window) & (q_pos >= 0)

    def cached_chunk(c, carry):
        pages_NC = jax.lax.dynamic_slice_in_dim(page_table_NP, c * chunk_pages, chunk_pages, axis=1)
        # [blocks, chunk, kv_heads, dim]
        k = k_pool[layer, pages_NC].reshape(n, chunk, kvh, -1)
        v = k[..., :dv] if v_pool is None else v_pool[layer, pages_NC].reshape(n, chunk, kvh, dv)
        kv_pos = (c * chunk + jnp.arange(chunk))[None, None, :]
        return accumulate(carry, k, v, in_window(kv_pos) & (kv_pos < cached_N[:, None, None]))

    max_back = n - 1 if max_back is None else max_back
    group = max(1, min(max_back, chunk // qb))  # earlier blocks of the chunk taken per iteration

    def own_block(carry):
        kv_pos = q_pos_NQ[:, None, :]
        v = k_new_NQKD[..., :dv] if v_new_NQKD is None else v_new_NQKD
        return accumulate(carry, k_new_NQKD, v, in_window(kv_pos) & (kv_pos >= 0))

    def earlier_blocks(i, carry):
        src_NG = jnp.arange(n)[:, None] - 1 - i * group - jnp.arange(group)[None, :]  # same chunk only
        same_chunk_NG = src_NG >= first_N[:, None]
        src_NG = jnp.maximum(src_NG, 0)
        k = k_new_NQKD[src_NG].reshape(n, group * qb, kvh, -1)
        v = k[..., :dv] if v_new_NQKD is None else v_new_NQKD[src_NG].reshape(n, group * qb, kvh, dv)
        kv_pos = jnp.where(same_chunk_NG[:, :, None], q_pos_NQ[src_NG], -1).reshape(n, 1, group * qb)
        return accumulate(carry, k, v, in_window(kv_pos) & (kv_pos >= 0))

    if static_bounds:
        lo, hi = 0, page_table_NP.shape[1] // chunk_pages
    else:  # from the chunk of the earliest key any window reaches to the chunk of the longest cached context
        first = jnp.min(jnp.where(valid_NQ, q_pos_NQ, NO_WINDOW))
        lo = jnp.maximum(first - window + 1, 0) // chunk
        hi = jnp.maximum((jnp.max(cached_N) + chunk - 1) // chunk, lo)
    if static_bounds or max_back == 0:  # decodes: only their own key, no loop
        back = max_back
    else:
        has_queries = jnp.any(valid_NQ, axis=1)
        back = jnp.minimum(jnp.max(jnp.where(has_queries, jnp.arange(n) - first_N, 0)), max_back) if n else 0
    carry = jax.lax.fori_loop(lo, hi, cached_chunk, (m0, l0, acc0))
    carry = own_block(carry)
    if max_back > 0:
        carry = jax.lax.fori_loop(0, (back + group - 1) // group, earlier_blocks, carry)
    _, l, acc = carry
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    out = jnp.where(valid_NQ[:, None, None, :, None], out, 0.0)
    # [blocks, queries, heads, dv]
    return out.transpose(0, 3, 1, 2, 4).reshape(n, qb, h, dv).astype(q_NQHD.dtype)
