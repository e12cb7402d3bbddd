"""Decode attention over KV pages as a Pallas (Triton) kernel: flash-decoding over each sequence's own pages.

One program per (sequence, KV head, block of its query heads, split). The query heads sharing a KV head are
computed together (GQA: each K/V page is read once for all of them). A sequence's cached pages are cut into
`splits` contiguous ranges of its own length (flash-decoding: one long context still fills the GPU, and a short
one costs only the programs it needs), and each program walks its range `pages_per_block` pages at a time,
gathering them through the page table, with an online softmax. XLA then merges the splits' partial results with
the token's own key (this step's, written to the pool only after the step), GPT-OSS's sink logit, and
normalizes: a few small fused ops per layer.

Same contract as `attention_reference.paged_attention` for decode blocks (one query per block, max_back=0).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax.kernels.attention_reference import _FLOOR, NO_WINDOW

NUM_SMS = 132  # H100 / H200; enough programs for a few waves of them


@dataclasses.dataclass(frozen=True)
class DecodeTiles:
    block_tokens: int = 64  # keys per inner step (pages_per_block = block_tokens // page_size)
    block_h: int = 16  # query heads per program (tl.dot needs 16 rows; fewer heads are padded)
    splits: int | None = None  # None: enough to give every SM a few programs
    num_warps: int = 4
    num_stages: int = 1  # H200 sweep: software pipelining of the gathered page loads only slowed them


def _pow2_parts(dim: int) -> list[tuple[int, int]]:
    """dim as (offset, size) pieces of powers of two, largest first (576 -> 512 + 64): Triton tiles are pow2."""
    parts, start = [], 0
    while dim - start:
        size = 1 << ((dim - start).bit_length() - 1)
        parts.append((start, size))
        start += size
    return parts


def supported(head_dim: int, value_dim: int, page_size: int) -> bool:
    """The kernel tiles head dims into pow2 pieces of 16+ and needs a pow2 value dim and page size."""
    pow2 = lambda x: x >= 16 and x & (x - 1) == 0  # noqa: E731
    return all(size >= 16 for _, size in _pow2_parts(head_dim)) and pow2(value_dim) and \
        page_size & (page_size - 1) == 0 and page_size <= 128


def default_tiles(head_dim: int, itemsize: int = 2) -> DecodeTiles:
    override = os.environ.get("MOEJAX_DECODE_TILES")  # "block_tokens,block_h,num_warps,num_stages" (tuning)
    if override:
        bt, bh, nw, ns = (int(x) for x in override.split(","))
        return DecodeTiles(block_tokens=bt, block_h=bh, num_warps=nw, num_stages=ns)
    if head_dim > 256 and itemsize > 2:  # float32 MLA: one stage of 32 keys fits the 227 KB of shared memory
        return DecodeTiles(block_tokens=32, block_h=32, num_warps=8, num_stages=1)
    if head_dim > 256:  # MLA's 576-wide latent: smaller key blocks keep the tiles in registers
        return DecodeTiles(block_tokens=64, block_h=32, num_warps=8)
    return DecodeTiles()


def _decode_kernel(window_ref, pos_ref, pages_ref, q_ref, k_ref, *refs, scale, splits, head_blocks, block_h,
                   pages_per_block, k_parts, value_dim, separate_v, precision):
    """refs: (v,) if separate_v, then the outputs o [block_h, value_dim], m, l [block_h]."""
    v_ref = refs[0] if separate_v else k_ref
    o_ref, m_ref, l_ref = refs[1:] if separate_v else refs
    n, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kvh, h0 = j // head_blocks, (j % head_blocks) * block_h
    page_size = k_ref.shape[1]
    tokens = pages_per_block * page_size
    pos = pos_ref[n]  # the cache holds positions 0 .. pos-1 (pos < 0: a padding token)
    first_tok = jnp.maximum(pos - window_ref[0] + 1, 0)
    first_page = first_tok // page_size
    end_page = jnp.maximum(pos + page_size - 1, 0) // page_size
    num_pages = jnp.maximum(end_page - first_page, 0)
    per_split = (num_pages + splits - 1) // splits
    per_split = (per_split + pages_per_block - 1) // pages_per_block * pages_per_block
    lo = first_page + s * per_split
    hi = jnp.minimum(lo + per_split, end_page)
    steps = (jnp.maximum(hi - lo, 0) + pages_per_block - 1) // pages_per_block
    heads = pl.ds(h0, block_h)
    qs = [q_ref[n, kvh, heads, pl.ds(d0, size)] for d0, size in k_parts]
    dims = (((1,), (1,)), ((), ()))
    v_in_k = not separate_v and k_parts[0] == (0, value_dim)

    def body(i, carry):
        m, l, acc = carry
        p0 = lo + i * pages_per_block
        ids = pages_ref[n, pl.ds(p0, pages_per_block)]
        # [block_h, tokens] scores, summed over the pow2 pieces of the head dim
        sc, pieces = None, []
        for q, (d0, size) in zip(qs, k_parts):
            pieces.append(k_ref[ids, :, kvh, pl.ds(d0, size)].reshape(tokens, size).astype(q.dtype))
            part = jax.lax.dot_general(q, pieces[-1], dims, precision=precision, preferred_element_type=jnp.float32)
            sc = part if sc is None else sc + part
        tok = p0 * page_size + jnp.arange(tokens)
        seen = (tok < pos) & (tok >= first_tok) & (tok < hi * page_size)
        sc = jnp.where(seen[None, :], sc * scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        p = jnp.exp(sc - m_new[:, None])
        correction = jnp.exp(m - m_new)
        if v_in_k:  # MLA: the values are the latent's first value_dim features, the key tile's first piece
            v = pieces[0]
        else:
            v = v_ref[ids, :, kvh, pl.ds(0, value_dim)].reshape(tokens, value_dim).astype(qs[0].dtype)
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)
        return m_new, l * correction + jnp.sum(p, axis=1), acc * correction[:, None] + pv

    init = (jnp.full((block_h,), _FLOOR, jnp.float32), jnp.zeros((block_h,), jnp.float32),
            jnp.zeros((block_h, value_dim), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, steps, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _splits(programs: int, max_steps: int, tiles: DecodeTiles) -> int:
    if tiles.splits is not None:
        return max(1, min(tiles.splits, max_steps))
    return max(1, min(-(-4 * NUM_SMS // programs), max_steps))


@functools.partial(jax.jit, static_argnames=("scale", "value_dim", "tiles", "interpret"))
def paged_decode(q_NHD, pos_N, page_table_NP, k_pool, v_pool, layer, k_new_NKD, v_new_NKD, *, scale: float,
                 window=NO_WINDOW, sinks_H=None, value_dim: int | None = None, tiles: DecodeTiles | None = None,
                 interpret: bool = False):
    """One decode token per sequence: q [N, heads, dim] at positions pos_N (-1: padding, output 0) over the
    sequence's cached positions 0..pos-1 (pools [layers, pages, page_size, kv_heads, dim], rows of page_table)
    and its own key/value k_new / v_new [N, kv_heads, dim] (v None: the first value_dim features of the keys,
    MLA's latent). Returns [N, heads, value_dim] in q's dtype."""
    n, h, d = q_NHD.shape
    num_layers, num_pages, page_size, kvh, _ = k_pool.shape
    dv = value_dim if v_pool is None else v_pool.shape[-1]
    g = h // kvh
    tiles = tiles or default_tiles(d, jnp.dtype(k_pool.dtype).itemsize)
    pages_per_block = max(1, tiles.block_tokens // page_size)
    block_h = max(16, min(tiles.block_h, 1 << (g - 1).bit_length()))
    head_blocks = -(-g // block_h)
    gp = head_blocks * block_h
    max_pages = page_table_NP.shape[1]
    splits = _splits(n * kvh * head_blocks, -(-max_pages // pages_per_block), tiles)

    # [N, kv_heads, padded group, dim]
    q = q_NHD.reshape(n, kvh, g, d)
    q_pad = jnp.pad(q, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    # Pages of this layer in the pools seen flat as [layers * pages, ...]; one block of slack at the end so a
    # program's last step never reads past the table.
    pages = jnp.pad(page_table_NP.astype(jnp.int32), ((0, 0), (0, pages_per_block))) + \
        jnp.asarray(layer, jnp.int32) * num_pages
    k_flat = k_pool.reshape(num_layers * num_pages, page_size, kvh, k_pool.shape[-1])
    flat = [k_flat] if v_pool is None else [k_flat, v_pool.reshape(num_layers * num_pages, page_size, kvh, dv)]
    window_1 = jnp.reshape(jnp.asarray(window, jnp.int32), (1,))
    precision = jax.lax.Precision.HIGHEST if q_NHD.dtype == jnp.float32 else None
    kernel = functools.partial(
        _decode_kernel, scale=scale, splits=splits, head_blocks=head_blocks, block_h=block_h,
        pages_per_block=pages_per_block, k_parts=tuple(_pow2_parts(d)), value_dim=dv,
        separate_v=v_pool is not None, precision=precision)
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as plt

        extra["compiler_params"] = plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    whole = pl.no_block_spec
    o, m, l = pl.pallas_call(
        kernel,
        grid=(n, kvh * head_blocks, splits),
        in_specs=[whole] * (4 + len(flat)),
        out_specs=[
            pl.BlockSpec((None, None, None, block_h, dv), lambda i, j, s: (i, j // head_blocks, s, j % head_blocks, 0)),
            pl.BlockSpec((None, None, None, block_h), lambda i, j, s: (i, j // head_blocks, s, j % head_blocks)),
            pl.BlockSpec((None, None, None, block_h), lambda i, j, s: (i, j // head_blocks, s, j % head_blocks)),
        ],
        out_shape=[jax.ShapeDtypeStruct((n, kvh, splits, gp, dv), jnp.float32),
                   jax.ShapeDtypeStruct((n, kvh, splits, gp), jnp.float32),
                   jax.ShapeDtypeStruct((n, kvh, splits, gp), jnp.float32)],
        interpret=interpret,
        **extra,
    )(window_1, pos_N.astype(jnp.int32), pages, q_pad, *flat)
    o, m, l = o[:, :, :, :g], m[:, :, :, :g], l[:, :, :, :g]

    # Merge the splits with the token's own key and the sink: [N, kv_heads, group] logits.
    k_self = k_new_NKD.astype(q.dtype)
    v_self = (k_new_NKD[..., :dv] if v_new_NKD is None else v_new_NKD).astype(jnp.float32)
    s_self = jnp.einsum("nkgd,nkd->nkg", q, k_self, precision=precision,
                        preferred_element_type=jnp.float32) * scale
    m_all = jnp.maximum(jnp.max(m, axis=2), s_self)
    if sinks_H is not None:
        sink = sinks_H.astype(jnp.float32).reshape(1, kvh, g)
        m_all = jnp.maximum(m_all, sink)
    w_split = jnp.exp(m - m_all[:, :, None])
    w_self = jnp.exp(s_self - m_all)
    total = jnp.sum(w_split * l, axis=2) + w_self
    if sinks_H is not None:
        total = total + jnp.exp(sink - m_all)
    out = (jnp.sum(w_split[..., None] * o, axis=2) + w_self[..., None] * v_self[:, :, None]) / total[..., None]
    out = jnp.where((pos_N >= 0)[:, None, None, None], out, 0.0)
    return out.reshape(n, h, dv).astype(q_NHD.dtype)
