"""Routed experts as two Pallas kernels over expert-aligned row blocks (fused_moe's structure).

Assignments are sorted by expert and padded into blocks of `block_m` rows (`moe_align_block_size`), so each
block belongs to one expert. Kernel 1 computes silu(x @ W_gate) * (x @ W_up) for a block and a column tile
(both matmuls share the x tile, the activation never leaves registers); kernel 2 computes h @ W_down times
each row's routing weight. Blocks past the used ones exit at once. Weights are bf16/f32, int8 (per-channel
scales applied after the K loop) or int4 (two codes a byte along K, dequantized in registers per 128-group:
the even and odd halves of x meet the low and high nibbles). Rows are gathered and the weighted results summed
back per token in XLA, which fuses both.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax.kernels.align import moe_align_block_size
from moejax.kernels.experts import Activation, ExpertWeights
from moejax.kernels.quant import QuantizedWeight


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def choose_tiles(rows: int, num_experts: int, k: int, n: int) -> Tiles:
    """A small tuned table: few rows per expert -> 16-row blocks and narrow tiles for more parallelism."""
    per_expert = rows / max(num_experts, 1)
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64
    block_n = 64 if per_expert <= 64 else 128
    # Shared memory per pipeline stage: x tile plus two weight tiles (gate and up), bf16. Large tiles take a
    # shorter K step so that 3 stages stay within Hopper's 227 KB.
    block_k = 128 if block_m <= 32 else 64
    while k % block_k:
        block_k //= 2
    while n % block_n:
        block_n //= 2
    return Tiles(block_m, block_n, max(block_k, 16), num_warps=4 if block_m <= 32 else 8, num_stages=3)


def _load_weight_tile(refs, bits, e, k0, block_k, n0, block_n, x_tile_even, x_tile_odd, x_tile, group_size):
    """Partial product of one K step for one weight (plain, int8 or int4)."""
    if bits in (0, 8):  # int8 values are exact in bf16; their per-channel scale is applied after the K loop
        w = refs[0][e, pl.ds(k0, block_k), pl.ds(n0, block_n)]
        return jnp.dot(x_tile, w.astype(x_tile.dtype), preferred_element_type=jnp.float32)
    packed = refs[0][e, pl.ds(k0 // 2, block_k // 2), pl.ds(n0, block_n)].astype(jnp.int32)
    scale = refs[1][e, pl.ds(k0 // group_size, 1), pl.ds(n0, block_n)].astype(jnp.float32)
    zero = 8.0 if len(refs) < 3 else refs[2][e, pl.ds(k0 // group_size, 1), pl.ds(n0, block_n)].astype(jnp.float32)
    lo = ((packed & 0xF).astype(jnp.float32) - zero).astype(x_tile_even.dtype)
    hi = ((packed >> 4).astype(jnp.float32) - zero).astype(x_tile_even.dtype)
    part = jnp.dot(x_tile_even, lo, preferred_element_type=jnp.float32)
    part += jnp.dot(x_tile_odd, hi, preferred_element_type=jnp.float32)
    return part * scale


def _finish(acc, refs, bits, e, n0, block_n):
    if bits == 8:
        return acc * refs[1][e, pl.ds(0, 1), pl.ds(n0, block_n)].astype(jnp.float32)
    return acc


def _matmul_kernel(block_expert_ref, *refs, n_weights, bits, n_refs, tiles: Tiles, k_dim, group_size, fuse,
                   row_weights):
    """refs: x (or x_even, x_odd for int4), [row weights], weight refs..., out."""
    i, j = pl.program_id(0), pl.program_id(1)
    e = block_expert_ref[i]
    out_ref = refs[-1]
    pos = 0
    if bits == 4:
        x_even_ref, x_odd_ref = refs[0], refs[1]
        pos = 2
    else:
        x_ref = refs[0]
        pos = 1
    rw_ref = None
    if row_weights:
        rw_ref = refs[pos]
        pos += 1
    weight_refs = [refs[pos + w * n_refs : pos + (w + 1) * n_refs] for w in range(n_weights)]
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    n0 = j * bn
    rows = pl.ds(i * bm, bm)

    @pl.when(e >= 0)
    def _():
        def body(step, accs):
            k0 = step * bk
            if bits == 4:
                xe = x_even_ref[rows, pl.ds(k0 // 2, bk // 2)]
                xo = x_odd_ref[rows, pl.ds(k0 // 2, bk // 2)]
                xt = None
            else:
                xt = x_ref[rows, pl.ds(k0, bk)]
                xe = xo = None
            return tuple(acc + _load_weight_tile(wr, bits, e, k0, bk, n0, bn, xe, xo, xt, group_size)
                         for acc, wr in zip(accs, weight_refs))

        init = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in range(n_weights))
        accs = jax.lax.fori_loop(0, k_dim // bk, body, init)
        accs = [_finish(a, wr, bits, e, n0, bn) for a, wr in zip(accs, weight_refs)]
        if fuse:
            out = jax.nn.silu(accs[0]) * accs[1]
        else:
            out = accs[0]
        if rw_ref is not None:
            out = out * rw_ref[rows][:, None]
        out_ref[...] = out.astype(out_ref.dtype)


def _weight_refs(w) -> tuple[int, list]:
    if isinstance(w, QuantizedWeight):
        arrays = [w.values, w.scales] + ([w.zeros] if w.zeros is not None else [])
        return w.bits, arrays
    return 0, [w]


def grouped_matmul(x_rows, block_expert, weights: list, tiles: Tiles, *, fuse: bool, row_weights=None,
                   out_dtype, interpret: bool = False):
    """Rows [M_pad, K] (each block of block_m rows owned by block_expert[b]) @ W[e] for each weight in
    `weights` ([E, K, N], plain or quantized); fuse: silu(first) * second."""
    bits, _ = _weight_refs(weights[0])
    flat = []
    group_size = 0
    for w in weights:
        b, arrays = _weight_refs(w)
        assert b == bits
        flat += arrays
        if isinstance(w, QuantizedWeight):
            group_size = w.group_size
    k_dim, n_dim = weights[0].shape[-2], weights[0].shape[-1]
    m_pad = x_rows.shape[0]
    tiles_k = tiles.block_k if bits != 4 else min(tiles.block_k, group_size)
    tiles = dataclasses.replace(tiles, block_k=tiles_k)
    if bits == 4:
        inputs = [x_rows[:, 0::2], x_rows[:, 1::2]]
    else:
        inputs = [x_rows]
    if row_weights is not None:
        inputs.append(row_weights.astype(jnp.float32))
    n_refs = len(flat) // len(weights)
    kernel = functools.partial(_matmul_kernel, n_weights=len(weights), bits=bits, n_refs=n_refs, tiles=tiles,
                               k_dim=k_dim, group_size=group_size, fuse=fuse, row_weights=row_weights is not None)
    any_spec = pl.no_block_spec  # whole arrays: kernels index them with dynamic expert ids
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as plt

        extra["compiler_params"] = plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    full = [any_spec] * (1 + len(inputs) + len(flat))
    return pl.pallas_call(
        kernel,
        grid=(m_pad // tiles.block_m, n_dim // tiles.block_n),
        in_specs=full,
        out_specs=pl.BlockSpec((tiles.block_m, tiles.block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_dim), out_dtype),
        interpret=interpret,
        **extra,
    )(block_expert, *inputs, *flat)


def supported(params: ExpertWeights, activation: Activation, d: int) -> bool:
    """The kernels cover silu experts without biases whose dims tile by 16."""
    if activation.kind != "silu" or params.b_gate is not None or params.b_down is not None:
        return False
    bits = {_weight_refs(w)[0] for w in (params.w_gate, params.w_up, params.w_down)}
    if len(bits) != 1:
        return False
    f = params.w_gate.shape[-1]
    return d % 16 == 0 and f % 16 == 0


@functools.partial(jax.jit, static_argnames=("activation", "interpret", "tiles"))
def experts_pallas(x_TD, weights_TK, ids_TK, params: ExpertWeights, activation: Activation = Activation(), *,
                   interpret: bool = False, tiles: Tiles | None = None):
    """Same contract as `experts_reference`."""
    num_tokens, top_k = ids_TK.shape
    num_experts = params.w_gate.shape[0]
    d, f = x_TD.shape[-1], params.w_gate.shape[-1]
    tiles = tiles or choose_tiles(num_tokens * top_k, num_experts, d, f)
    # Ids outside [0, E) (another expert-parallel rank's) are dropped: they go to a phantom expert past the end.
    ids_TK = jnp.where((ids_TK >= 0) & (ids_TK < num_experts), ids_TK, num_experts)
    sorted_ids, block_expert, _ = moe_align_block_size(ids_TK, num_experts + 1, tiles.block_m)
    block_expert = jnp.where(block_expert == num_experts, -1, block_expert)
    sentinel = num_tokens * top_k
    token_of_row = jnp.minimum(sorted_ids // top_k, num_tokens - 1)
    x_rows = x_TD[token_of_row]
    flat_weights = jnp.where(ids_TK < num_experts, weights_TK, 0).reshape(-1)
    row_weights = jnp.where(sorted_ids < sentinel, flat_weights[jnp.minimum(sorted_ids, sentinel - 1)], 0.0)
    h_rows = grouped_matmul(x_rows, block_expert, [params.w_gate, params.w_up], tiles, fuse=True,
                            out_dtype=x_TD.dtype, interpret=interpret)
    down_tiles = choose_tiles(num_tokens * top_k, num_experts, f, d)
    down_tiles = dataclasses.replace(down_tiles, block_m=tiles.block_m)
    y_rows = grouped_matmul(h_rows, block_expert, [params.w_down], down_tiles, fuse=False,
                            row_weights=row_weights, out_dtype=jnp.float32, interpret=interpret)
    # Rows of unused blocks were never written: give them no token.
    valid = (sorted_ids < sentinel) & (block_expert[jnp.arange(sorted_ids.shape[0]) // tiles.block_m] >= 0)
    target = jnp.where(valid, sorted_ids // top_k, num_tokens)
    y_TD = jnp.zeros((num_tokens, d), jnp.float32).at[target].add(jnp.where(valid[:, None], y_rows, 0.0),
                                                                  mode="drop")
    return y_TD.astype(x_TD.dtype)
