"""Attention over a paged KV cache in pure JAX: the reference behind `moejax.kernels.paged_attention`.

Queries come in blocks whose queries all belong to one sequence: a decode token is a block of one, a prefill
chunk is cut into blocks of a few dozen tokens. Keys and values of every layer live in pools
[layers, pages, page_size, kv_heads, head_dim]; a block reads its sequence's pages through its row of the page
table. The context is walked in chunks of `chunk_pages` pages with an online softmax, only as many chunks as
the longest context in the call needs (and, with a sliding window, none before the earliest window), so the
compiled shape depends on the number of blocks alone, never on context lengths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NO_WINDOW = 1 << 30  # a window wider than any context: full attention
_FLOOR = -1e30  # initial running max: finite, so exp(-inf - _FLOOR) is an exact 0 for masked scores


def paged_attention(q_NQHD, q_pos_NQ, page_table_NP, k_pool, v_pool, layer, *, scale: float,
                    window=NO_WINDOW, sinks_H=None, value_dim: int | None = None, chunk_pages: int = 32):
    """Causal attention of each block's queries over its sequence's cached keys.

    q_NQHD: [blocks, queries per block, heads, head_dim]; q_pos_NQ: position of each query, -1 for padding
    (its output is 0). page_table_NP: [blocks, max_pages] page ids of each block's sequence; the key at position
    p lives in page page_table[p // page_size], slot p % page_size, and must already be written for every
    p <= the query's position. k_pool / v_pool: [layers, pages, page_size, kv_heads, dim]; v_pool None means
    the values are the first `value_dim` features of the keys (MLA's latent). layer: traced or static int.
    window: keys at positions > q - window are seen (traced ok). sinks_H: one extra logit per head (GPT-OSS).
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

    last = jnp.max(jnp.where(valid_NQ, q_pos_NQ, -1))
    first = jnp.min(jnp.where(valid_NQ, q_pos_NQ, NO_WINDOW))
    lo = jnp.maximum(first - window + 1, 0) // chunk
    hi = jnp.where(last >= 0, last // chunk + 1, 0)

    if sinks_H is None:
        m0 = jnp.full((n, kvh, g, qb), _FLOOR, jnp.float32)
        l0 = jnp.zeros((n, kvh, g, qb), jnp.float32)
    else:  # the sink joins the softmax as one more logit: start the running max and sum from it
        m0 = jnp.broadcast_to(sinks_H.astype(jnp.float32).reshape(1, kvh, g, 1), (n, kvh, g, qb))
        l0 = jnp.ones((n, kvh, g, qb), jnp.float32)
    acc0 = jnp.zeros((n, kvh, g, qb, dv), jnp.float32)

    def body(c, carry):
        m, l, acc = carry
        pages_NC = jax.lax.dynamic_slice_in_dim(page_table_NP, c * chunk_pages, chunk_pages, axis=1)
        # [blocks, chunk, kv_heads, dim]
        k = k_pool[layer, pages_NC].reshape(n, chunk, kvh, -1)
        v = k[..., :dv] if v_pool is None else v_pool[layer, pages_NC].reshape(n, chunk, kvh, dv)
        kv_pos = c * chunk + jnp.arange(chunk)
        s = jnp.einsum("nkgqd,nckd->nkgqc", q, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
        q_pos = q_pos_NQ[:, :, None]
        seen_NQC = (kv_pos[None, None, :] <= q_pos) & (kv_pos[None, None, :] > q_pos - window) & (q_pos >= 0)
        s = jnp.where(seen_NQC[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        correction = jnp.exp(m - m_new)
        l = l * correction + jnp.sum(p, axis=-1)
        pv = jnp.einsum("nkgqc,nckd->nkgqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l, acc * correction[..., None] + pv

    _, l, acc = jax.lax.fori_loop(lo, hi, body, (m0, l0, acc0))
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    out = jnp.where(valid_NQ[:, None, None, :, None], out, 0.0)
    # [blocks, queries, heads, dv]
    return out.transpose(0, 3, 1, 2, 4).reshape(n, qb, h, dv).astype(q_NQHD.dtype)
