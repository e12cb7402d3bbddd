"""Routed experts as two Pallas kernels over expert-aligned row blocks (fused_moe's structure).

Assignments are sorted by expert and padded into blocks of `block_m` rows (`align_rows`), so each block belongs
to one expert. Kernel 1 computes silu(x @ W_gate) * (x @ W_up) for a block and a column tile (both matmuls share
the x tile; the activation never leaves registers); kernel 2 computes h @ W_down. Blocks past the used ones exit
at once. Weights are bf16/f32, int8 (per-channel scales applied after the K loop), int4 (two codes a byte along
K: the even and odd halves of x meet the low and high nibbles; zero point and group scale applied per K step
after the dot) or block-scaled fp8: W8A16 (the e4m3 tile widened to x's dtype; decode) or W8A8 (x quantized to
e4m3 per row and 128-channel block, e4m3 x e4m3 on the FP8 tensor cores; prefill), both scales applied per K
step. XLA gathers the rows before and gathers each token's k weighted results after (no scatter).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax.kernels.align import align_each, align_rows, groups_rows
from moejax.kernels.experts import Activation, ExpertWeights
from moejax.kernels.layer_weight import LayerWeight, unstacked
from moejax.kernels.quant import QuantizedWeight, dequantize, quantize_rows_fp8


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # > 1: programs also split K and write float32 partials that XLA sums (decode: more programs)


# Tuned on one H100 (jax 0.11.2, `moejax bench kernels --sweep`): (rows per expert up to, weight bits) -> tiles.
# Few rows per expert: 16-row blocks and narrow column tiles, so that enough programs stream weights at once;
# many rows: larger blocks, so that each weight tile is loaded fewer times.
TUNED: dict[tuple[float, int], Tiles] = {
    (1, 0): Tiles(16, 64, 128, 4, 3), (1, 8): Tiles(16, 64, 64, 4, 4), (1, 4): Tiles(16, 64, 128, 4, 3, 4),
    (8, 0): Tiles(16, 128, 64, 4, 3), (8, 8): Tiles(16, 256, 64, 4, 3), (8, 4): Tiles(16, 256, 64, 8, 3, 2),
    (32, 0): Tiles(32, 128, 128, 4, 3), (32, 8): Tiles(32, 128, 64, 4, 4), (32, 4): Tiles(16, 128, 64, 4, 3),
    (512, 0): Tiles(64, 256, 64, 8, 3), (float("inf"), 0): Tiles(128, 128, 64, 8, 3),
    # fp8 (not yet tuned; column tiles stop at the 128-wide scale block): W8A16 for few rows, W8A8 past 32
    (1, "fp8"): Tiles(16, 64, 128, 4, 3), (8, "fp8"): Tiles(16, 128, 128, 4, 3),
    (32, "fp8"): Tiles(32, 128, 128, 4, 3), (float("inf"), "fp8"): Tiles(128, 128, 128, 8, 3),
}
# Past this many rows per expert, quantized weights are dequantized once per layer and the bf16 kernel runs:
# the in-register dequantization is paid once per row block, and with many blocks per expert it costs more
# than writing and reading the bf16 copy (H100: Qwen3 prefill int4 1.9 ms in-kernel vs ~1.1 ms).
DEQUANTIZE_ABOVE = 32


def dequantizes_first(rows: int, num_experts: int) -> bool:
    """Whether `experts_pallas` dequantizes quantized experts before its kernels for this much routing."""
    return rows / max(num_experts, 1) > DEQUANTIZE_ABOVE


def choose_tiles(rows: int, num_experts: int, k: int, n: int, bits: int = 0) -> Tiles:
    """Tiles for `rows` assignments over `num_experts` experts of [k, n] weights of `bits` (0: unquantized),
    from the tuned table."""
    per_expert = rows / max(num_experts, 1)
    limit = min(lim for lim, b in TUNED if b == bits and per_expert <= lim)
    tiles = TUNED[(limit, bits)]
    return dataclasses.replace(tiles, block_k=_divisor(k, tiles.block_k), block_n=_divisor(n, tiles.block_n))


def _bf16_codes_plus_128(packed):
    """uint8 codes (two a byte) -> (128 + low nibble, 128 + high nibble) as bf16, exactly: the nibble goes
    straight into the mantissa of 128.0 (0x4300, whose last mantissa bit is worth 1): an OR and a bitcast,
    no conversion instructions."""
    wide = packed.astype(jnp.int16)
    return (jax.lax.bitcast_convert_type((wide & 0xF) | 0x4300, jnp.bfloat16),
            jax.lax.bitcast_convert_type(((wide >> 4) & 0xF) | 0x4300, jnp.bfloat16))


def _weight_step(refs, bits, e, k0, block_k, n0, block_n, xs, x_sum, group_size, scale_n=0):
    """Partial product of one K step for one weight (plain, int8, int4 or fp8); x_sum: `_int4_x_sum` of xs.
    fp8: the K step and column tile lie in one scale block (group_size x scale_n); xs is (x,) for W8A16 or
    (e4m3 x, its [rows, 1] scale) for W8A8."""
    if bits == "fp8":
        w = refs[0][e, pl.ds(k0, block_k), pl.ds(n0, block_n)]
        w_scale = refs[1][e, pl.ds(k0 // group_size, 1), pl.ds(n0 // scale_n, 1)].astype(jnp.float32)
        if len(xs) == 2:
            part = jnp.dot(xs[0], w, preferred_element_type=jnp.float32) * xs[1]
        else:
            part = jnp.dot(xs[0], w.astype(xs[0].dtype), preferred_element_type=jnp.float32)
        return part * w_scale
    if bits in (0, 8):  # int8 values are exact in bf16; their per-channel scale is applied after the K loop
        w = refs[0][e, pl.ds(k0, block_k), pl.ds(n0, block_n)]
        return jnp.dot(xs[0], w.astype(xs[0].dtype), preferred_element_type=jnp.float32)
    # int4: the K step lies in one quantization group; the even and odd halves of x meet the low and high
    # nibbles, then the group scale.
    packed = refs[0][e, pl.ds(k0 // 2, block_k // 2), pl.ds(n0, block_n)]
    g = k0 // group_size
    scale = refs[1][e, pl.ds(g, 1), pl.ds(n0, block_n)].astype(jnp.float32)
    zero = 8.0 if len(refs) < 3 else refs[2][e, pl.ds(g, 1), pl.ds(n0, block_n)].astype(jnp.float32)
    if x_sum is not None:  # bf16: exact products, so (128 + zero) * sum_k x comes off after the dot
        lo, hi = _bf16_codes_plus_128(packed)
        part = jnp.dot(xs[0], lo, preferred_element_type=jnp.float32)
        part += jnp.dot(xs[1], hi, preferred_element_type=jnp.float32)
        return (part - x_sum * (zero + 128.0)) * scale
    # Other activations (float32 may run its dots as TF32 on GPUs): subtract the zero point before the dot.
    wide = packed.astype(jnp.int32)
    lo = ((wide & 0xF).astype(jnp.float32) - zero).astype(xs[0].dtype)
    hi = ((wide >> 4).astype(jnp.float32) - zero).astype(xs[0].dtype)
    part = jnp.dot(xs[0], lo, preferred_element_type=jnp.float32)
    part += jnp.dot(xs[1], hi, preferred_element_type=jnp.float32)
    return part * scale


def _int4_x_sum(xs):
    """[rows, 1] sum of a K step of bf16 x, for the after-the-dot zero point (None for other dtypes).

    Taken from the very tiles the dot reads: a sum precomputed in XLA may skip the rounding to bf16 (excess
    precision), and the zero-point term amplifies any mismatch ~100x."""
    if xs[0].dtype != jnp.bfloat16:
        return None
    return jnp.sum(xs[0].astype(jnp.float32) + xs[1].astype(jnp.float32), axis=1)[:, None]


def _finish(acc, refs, bits, e, n0, block_n):
    if bits == 8:
        return acc * refs[1][e, pl.ds(0, 1), pl.ds(n0, block_n)].astype(jnp.float32)
    return acc


def _matmul_kernel(block_expert_ref, *refs, n_weights, bits, n_refs, tiles: Tiles, k_dim, group_size, fuse,
                   scale_n=0, fp8_x=False, widen_f16=False):
    """refs: x (or x_even, x_odd for int4; x_e4m3, x_scales for W8A8), weight refs..., outputs (one, or one
    float32 partial per weight when K is split)."""
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = block_expert_ref[i]
    n_x = 2 if bits == 4 or fp8_x else 1
    x_refs = refs[:n_x]
    weight_refs = [refs[n_x + w * n_refs : n_x + (w + 1) * n_refs] for w in range(n_weights)]
    out_refs = refs[n_x + n_weights * n_refs:]
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    n0 = j * bn
    rows = pl.ds(i * bm, bm)
    steps = k_dim // bk // tiles.split_k

    @pl.when(e >= 0)
    def _():
        def body(step, accs):
            k_step = s * steps + step
            k0 = k_step * bk
            if bits == 4:  # one x sum per K step, shared by every weight
                xs = (x_refs[0][rows, pl.ds(k0 // 2, bk // 2)], x_refs[1][rows, pl.ds(k0 // 2, bk // 2)])
                x_sum = _int4_x_sum(xs)
            elif fp8_x:  # e4m3 rows and their scale for this K step's block
                xs, x_sum = (x_refs[0][rows, pl.ds(k0, bk)], x_refs[1][rows, pl.ds(k0 // group_size, 1)]), None
            else:
                xs, x_sum = (x_refs[0][rows, pl.ds(k0, bk)],), None
                if widen_f16:  # W8A16 through f16: e4m3 widens to f16 natively (x's tile is converted once)
                    xs = (xs[0].astype(jnp.float16),)
            return tuple(acc + _weight_step(wr, bits, e, k0, bk, n0, bn, xs, x_sum, group_size, scale_n)
                         for acc, wr in zip(accs, weight_refs))

        init = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in range(n_weights))
        accs = jax.lax.fori_loop(0, steps, body, init)
        accs = [_finish(a, wr, bits, e, n0, bn) for a, wr in zip(accs, weight_refs)]
        if tiles.split_k > 1:
            for acc, out_ref in zip(accs, out_refs):
                out_ref[...] = acc
        else:
            out = jax.nn.silu(accs[0]) * accs[1] if fuse else accs[0]
            out_refs[0][...] = out.astype(out_refs[0].dtype)


def _kind_code(w):
    """0 (plain), 8 (int8), 4 (int4) or "fp8": the weight type the kernels and the tile table key on."""
    if isinstance(w, QuantizedWeight):
        return "fp8" if w.kind == "fp8" else w.bits
    return 0


def _bits(w):
    return _kind_code(unstacked_weight(w))


def _weight_refs(w) -> tuple[int, list]:
    if isinstance(w, QuantizedWeight):
        arrays = [w.values, w.scales] + ([w.zeros] if w.zeros is not None else [])
        return _kind_code(w), arrays
    return 0, [w]


def grouped_matmul(x_rows, block_expert, weights: list, tiles: Tiles, *, fuse: bool, out_dtype,
                   interpret: bool = False, fp8_x: bool = False):
    """Rows [M_pad, K] (each block of block_m rows owned by block_expert[b], -1: skipped) @ W[e] for each
    weight in `weights` ([E, K, N], plain or quantized alike); fuse: silu(first) * second. fp8_x (fp8
    weights): quantize the rows to e4m3 per row and K block and multiply on the FP8 tensor cores (W8A8)."""
    bits, _ = _weight_refs(weights[0])
    flat = []
    group_size = scale_n = 0
    for w in weights:
        b, arrays = _weight_refs(w)
        if b != bits:
            raise ValueError("grouped_matmul: all weights must share one quantization")
        flat += arrays
        if isinstance(w, QuantizedWeight):
            group_size, scale_n = w.group_size, w.block_n
    k_dim, n_dim = weights[0].shape[-2], weights[0].shape[-1]
    m_pad = x_rows.shape[0]
    fp8_x = fp8_x and bits == "fp8"
    if bits == 4:  # a K step may not straddle two quantization groups
        tiles = dataclasses.replace(tiles, block_k=min(tiles.block_k, group_size))
    if bits == "fp8":  # nor two scale blocks, nor may a column tile
        tiles = dataclasses.replace(tiles, block_k=min(tiles.block_k, group_size),
                                    block_n=min(tiles.block_n, scale_n))
    tiles = dataclasses.replace(tiles, block_k=_divisor(k_dim, tiles.block_k), block_n=_divisor(n_dim, tiles.block_n))
    split = tiles.split_k
    while (k_dim // tiles.block_k) % split:
        split //= 2
    tiles = dataclasses.replace(tiles, split_k=max(split, 1))
    if bits == 4:
        inputs = [x_rows[:, 0::2], x_rows[:, 1::2]]
    elif fp8_x:
        inputs = list(quantize_rows_fp8(x_rows, min(group_size, k_dim)))  # K under one block: one scale
    else:
        inputs = [x_rows]
    n_refs = len(flat) // len(weights)
    kernel = functools.partial(_matmul_kernel, n_weights=len(weights), bits=bits, n_refs=n_refs, tiles=tiles,
                               k_dim=k_dim, group_size=group_size, fuse=fuse, scale_n=scale_n, fp8_x=fp8_x,
                               widen_f16=bits == "fp8" and not fp8_x and FP8_WIDEN == "f16"
                               and x_rows.dtype == jnp.bfloat16)
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as plt

        extra["compiler_params"] = plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    whole = pl.no_block_spec  # whole arrays: the kernel indexes them with the block's expert id
    grid = (m_pad // tiles.block_m, n_dim // tiles.block_n, tiles.split_k)
    if tiles.split_k > 1:
        out_specs = [pl.BlockSpec((None, tiles.block_m, tiles.block_n), lambda i, j, s: (s, i, j))] * len(weights)
        out_shape = [jax.ShapeDtypeStruct((tiles.split_k, m_pad, n_dim), jnp.float32)] * len(weights)
    else:
        out_specs = [pl.BlockSpec((tiles.block_m, tiles.block_n), lambda i, j, s: (i, j))]
        out_shape = [jax.ShapeDtypeStruct((m_pad, n_dim), out_dtype)]
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[whole] * (1 + len(inputs) + len(flat)),
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        **extra,
    )(block_expert, *inputs, *flat)
    if tiles.split_k == 1:
        return outs[0]
    sums = [o.sum(0) for o in outs]
    return (jax.nn.silu(sums[0]) * sums[1] if fuse else sums[0]).astype(out_dtype)


def _divisor(dim: int, block: int) -> int:
    """The largest power-of-two fraction of `block` that divides `dim` (at least 16)."""
    while dim % block and block > 16:
        block //= 2
    return block


def supported(params: ExpertWeights, activation: Activation, d: int) -> bool:
    """The kernels cover silu experts without biases whose dims tile by 16."""
    if activation.kind != "silu" or params.b_gate is not None or params.b_down is not None:
        return False
    bits = {_bits(w) for w in (params.w_gate, params.w_up, params.w_down)}
    if len(bits) != 1:
        return False
    f = params.w_gate.shape[-1]
    if bits == {"fp8"} and not _fp8_blocks_tile(unstacked_weight(params.w_gate), d, f):
        return False
    return d % 16 == 0 and f % 16 == 0


def unstacked_weight(w):
    """The stored weight behind a LayerWeight (its stack), or w."""
    return w.stacked if isinstance(w, LayerWeight) else w


def _fp8_blocks_tile(w: QuantizedWeight, *dims: int) -> bool:
    """Square power-of-two fp8 blocks of at least 16 (the tile floor) that divide every dim: the tiles (powers
    of two, clipped to the block) then never straddle two blocks."""
    b = w.group_size
    return b >= 16 and b == w.block_n and not b & (b - 1) and all(d % b == 0 for d in dims)


# W8A16 widens e4m3 tiles to x's dtype ("bf16"), or, with MOEJAX_FP8_WIDEN=f16, bf16 activations and the tile
# to f16 (e4m3 -> f16 is one native conversion; f16 holds activations up to 65504). To be measured on the GPU.
FP8_WIDEN = os.environ.get("MOEJAX_FP8_WIDEN", "bf16")
if FP8_WIDEN not in ("bf16", "f16"):
    raise ValueError(f"MOEJAX_FP8_WIDEN must be 'bf16' or 'f16', got {FP8_WIDEN!r}")
# fp8 experts run W8A8 past this many rows per expert (MOEJAX_FP8_W8A8_ABOVE; -1: always, inf: never).
W8A8_ABOVE = float(os.environ.get("MOEJAX_FP8_W8A8_ABOVE", DEQUANTIZE_ABOVE))


def fp8_activations(rows: int, num_experts: int, dtype) -> bool:
    """Whether fp8 experts run W8A8 (activations quantized to e4m3: the FP8 tensor cores, twice bf16's rate,
    and no widening of the weights) for this much routing, rather than W8A16. float32 models keep their
    activations (W8A16)."""
    return rows / max(num_experts, 1) > W8A8_ABOVE and jnp.dtype(dtype) != jnp.float32


@functools.partial(jax.jit, static_argnames=("activation", "interpret", "tiles", "down_tiles", "fp8_x"))
def experts_pallas(x_TD, weights_TK, ids_TK, params: ExpertWeights, activation: Activation = Activation(), *,
                   interpret: bool = False, tiles: Tiles | None = None, down_tiles: Tiles | None = None,
                   fp8_x: bool | None = None):
    """Same contract as `experts_reference`. The weights may be `LayerWeight`s (one layer of experts stacked
    over layers): the kernels then read that layer's experts in place, as experts layer * E + e of the stack.
    fp8_x (fp8 weights): W8A8 (True) or W8A16 (False); None chooses by `fp8_activations`."""
    num_tokens, top_k = ids_TK.shape
    num_experts = params.w_gate.shape[0]
    d, f = x_TD.shape[-1], params.w_gate.shape[-1]
    weights = (params.w_gate, params.w_up, params.w_down)
    if fp8_x is None:
        fp8_x = fp8_activations(num_tokens * top_k, num_experts, x_TD.dtype)
    # int weights are widened first for prefill; fp8 never is (W8A8 covers the compute-bound case)
    if _bits(params.w_gate) in (8, 4) and dequantizes_first(num_tokens * top_k, num_experts):
        weights = tuple(dequantize(unstacked(w), x_TD.dtype) for w in weights)
    first_expert = None  # where this layer's experts start in a stack of layers
    if isinstance(weights[0], LayerWeight):
        (w_gate, first_expert), (w_up, _), (w_down, _) = (w.flat(num_experts) for w in weights)
        weights = (w_gate, w_up, w_down)
    params = ExpertWeights(*weights)
    bits = _weight_refs(params.w_gate)[0]
    tiles = tiles or choose_tiles(num_tokens * top_k, num_experts, d, f, bits)
    down_tiles = dataclasses.replace(down_tiles or choose_tiles(num_tokens * top_k, num_experts, f, d, bits),
                                     block_m=tiles.block_m)
    # Assignments of other expert-parallel ranks (ids outside [0, E)) take no row.
    align = align_rows if groups_rows(num_tokens * top_k, num_experts, num_tokens) else align_each
    sorted_ids, block_expert, _, row_of_assignment = align(ids_TK, num_experts, tiles.block_m)
    if first_expert is not None:
        block_expert = jnp.where(block_expert >= 0, block_expert + first_expert, -1)
    num_rows = sorted_ids.shape[0]
    # [rows, embed]: padding rows repeat the last token; they are computed and never read.
    x_RD = x_TD[jnp.minimum(sorted_ids // top_k, num_tokens - 1)]
    h_RF = grouped_matmul(x_RD, block_expert, [params.w_gate, params.w_up], tiles, fuse=True,
                          out_dtype=x_TD.dtype, interpret=interpret, fp8_x=fp8_x)
    y_RD = grouped_matmul(h_RF, block_expert, [params.w_down], down_tiles, fuse=False, out_dtype=jnp.float32,
                          interpret=interpret, fp8_x=fp8_x)
    # Gather each token's k rows back and weight them (rows of skipped assignments were never written).
    mine_TK = (ids_TK >= 0) & (ids_TK < num_experts)
    y_TKD = y_RD[jnp.minimum(row_of_assignment, num_rows - 1)].reshape(num_tokens, top_k, d)
    y_TKD = jnp.where(mine_TK[..., None], weights_TK[..., None].astype(jnp.float32) * y_TKD, 0.0)
    return jnp.sum(y_TKD, axis=1).astype(x_TD.dtype)


def dense_supported(w) -> bool:
    """Whether `linear_fp8` takes this weight: fp8 [K, N] in square power-of-two blocks that tile both dims."""
    if not isinstance(w, QuantizedWeight) or w.kind != "fp8" or w.values.ndim != 2:
        return False
    return _fp8_blocks_tile(w, *w.values.shape)


def linear_fp8(x, w: QuantizedWeight, *, interpret: bool = False, fp8_x: bool | None = None):
    """x [..., K] @ an fp8 weight [K, N] (`dense_supported`) with the grouped kernel, as one expert that owns
    every row block: W8A16 for few rows, W8A8 past `W8A8_ABOVE` (the `fp8_activations` rule)."""
    *lead, k = x.shape
    n = w.values.shape[-1]
    x_MK = x.reshape(-1, k)
    m = x_MK.shape[0]
    tiles = choose_tiles(m, 1, k, n, "fp8")
    m_pad = -(-m // tiles.block_m) * tiles.block_m
    x_MK = jnp.pad(x_MK, ((0, m_pad - m), (0, 0)))
    one = dataclasses.replace(w, values=w.values[None], scales=w.scales[None])
    blocks = jnp.zeros((m_pad // tiles.block_m,), jnp.int32)
    fp8_x = fp8_activations(m, 1, x.dtype) if fp8_x is None else fp8_x
    y = grouped_matmul(x_MK, blocks, [one], tiles, fuse=False, out_dtype=x.dtype, interpret=interpret, fp8_x=fp8_x)
    return y[:m].reshape(*lead, n)
