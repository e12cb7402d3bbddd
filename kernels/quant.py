"""Quantized input-major weights [..., K, N] (linear [K, N], experts [E, K, N]): int8, int4 and block-scaled FP8.

int8: symmetric per output channel, w = q * scale[N].
int4: two codes per byte packed along K (low nibble = even k, vLLM's moe_wna16 order), group-wise scales over
K (group 128 by default; one group when K is not a multiple), w = (q - zero) * scale, zero = 8 unless zero
points are stored (then uint8, one per group and column).
fp8: e4m3 values with one float32 scale per block of block_k x block_n (DeepSeek-V3's 128 x 128 recipe, the
checkpoints' `weight_scale_inv` transposed to input-major), w[k, n] = q[k, n] * scale[k // block_k, n // block_n];
the scale grid is rounded up, so edge blocks may be partial.
int scales are kept in the model's compute dtype, fp8 scales in float32 (`compute_dtype` names the model's).
A `QuantizedWeight` is a pytree accepted wherever a weight array is (`kernels.matmul`, `kernels.experts`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_GROUP = 128
FP8_BLOCK = (128, 128)  # (block_k, block_n) of `quantization="fp8"`
FP8_MAX = 448.0  # the largest finite e4m3 value
FP8 = jnp.float8_e4m3fn


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    values: jax.Array  # int8 [..., K, N], uint8 [..., K // 2, N] (int4) or float8_e4m3fn [..., K, N]
    scales: jax.Array  # [..., 1, N] (int8), [..., K // group, N] (int4), [..., ceil(K / bk), ceil(N / bn)] (fp8)
    zeros: jax.Array | None = None  # uint8 [..., K // group, N] (int4 with zero points)
    bits: int = dataclasses.field(default=8, metadata=dict(static=True))
    group_size: int = dataclasses.field(default=0, metadata=dict(static=True))  # int4: group; fp8: block_k
    block_n: int = dataclasses.field(default=0, metadata=dict(static=True))  # fp8 only
    compute_dtype: str | None = dataclasses.field(default=None, metadata=dict(static=True))  # fp8 only

    @property
    def kind(self) -> str:
        """"int8", "int4" or "fp8"."""
        return "fp8" if self.block_n else f"int{self.bits}"

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, k, n = self.values.shape
        return (*lead, k * 2 if self.bits == 4 else k, n)

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype) if self.compute_dtype else self.scales.dtype

    @property
    def sharding_shape(self) -> tuple[int, ...]:
        if self.kind == "fp8":
            return fp8_sharding_shape(self.values.shape, (self.group_size, self.block_n))
        return sharding_shape([a.shape for a in (self.values, self.scales, self.zeros) if a is not None])

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in (self.values, self.scales, self.zeros) if a is not None)


def sharding_shape(shapes) -> tuple[int, ...]:
    """The per-axis gcd of the stored arrays' shapes: a mesh axis may split an axis only if it divides every
    stored array (values, scales, zero points) along it, so that all of them are split alike."""
    import math

    shapes = [tuple(s) for s in shapes]
    return tuple(math.gcd(*dims) for dims in zip(*shapes))


def fp8_sharding_shape(shape, block: tuple[int, int]) -> tuple[int, ...]:
    """What a mesh axis must divide to split an fp8 weight [..., K, N] and its scale grid alike: the leading
    axes as they are, K and N counted in whole blocks (dim // block), and an axis whose last block is partial
    not at all (1): a device's slice of the values must start where its slice of the scales does."""
    *lead, k, n = shape
    return (*lead, *(d // b if d % b == 0 else 1 for d, b in zip((k, n), block)))


def group_size_for(k: int, group_size: int = DEFAULT_GROUP) -> int:
    return group_size if k % group_size == 0 else k


def quantize(w, bits: int, group_size: int = DEFAULT_GROUP, zero_point: bool = False) -> QuantizedWeight:
    """Quantize [..., K, N] (numpy or jax) in float32; scales take w's dtype."""
    xp = np if isinstance(w, np.ndarray) else jnp
    dtype = w.dtype
    w32 = w.astype(np.float32)
    if bits == 8:
        scale = xp.max(xp.abs(w32), axis=-2, keepdims=True) / 127.0
        scale = xp.where(scale == 0, 1.0, scale)
        q = xp.clip(xp.round(w32 / scale), -127, 127).astype(np.int8)
        return QuantizedWeight(q, scale.astype(dtype), None, bits=8, group_size=0)
    if bits != 4:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    *lead, k, n = w.shape
    if k % 2:
        raise ValueError(f"int4 needs an even input dimension, got K={k}")
    g = group_size_for(k, group_size)
    grouped = w32.reshape(*lead, k // g, g, n)
    if zero_point:
        lo, hi = grouped.min(axis=-2), grouped.max(axis=-2)
        scale = (hi - lo) / 15.0
        scale = xp.where(scale == 0, 1.0, scale)
        zero = xp.clip(xp.round(-lo / scale), 0, 15)
    else:
        scale = xp.max(xp.abs(grouped), axis=-2) / 7.0
        scale = xp.where(scale == 0, 1.0, scale)
        zero = xp.full(scale.shape, 8.0, np.float32)
    scale = scale.astype(dtype).astype(np.float32)  # quantize against the scale that will be stored
    q = xp.clip(xp.round(grouped / scale[..., :, None, :]) + zero[..., :, None, :], 0, 15)
    q = q.reshape(*lead, k, n).astype(np.uint8)
    packed = (q[..., 0::2, :] | (q[..., 1::2, :] << 4)).astype(np.uint8)
    return QuantizedWeight(packed, scale.astype(dtype), zero.astype(np.uint8) if zero_point else None,
                           bits=4, group_size=g)


def quantize_fp8(w, block: tuple[int, int] = FP8_BLOCK, compute_dtype=None) -> QuantizedWeight:
    """Block-scaled e4m3 of [..., K, N] (numpy or jax): each block's scale maps its largest magnitude to 448.
    compute_dtype: the model's dtype (default: w's)."""
    xp = np if isinstance(w, np.ndarray) else jnp
    *lead, k, n = w.shape
    bk, bn = block
    gk, gn = -(-k // bk), -(-n // bn)
    w32 = w.astype(np.float32)
    padded = xp.pad(w32, [(0, 0)] * len(lead) + [(0, gk * bk - k), (0, gn * bn - n)])
    blocks = padded.reshape(*lead, gk, bk, gn, bn)
    scale = xp.max(xp.abs(blocks), axis=(-3, -1)) / FP8_MAX
    scale = xp.where(scale == 0, 1.0, scale).astype(np.float32)
    q = xp.clip(blocks / scale[..., :, None, :, None], -FP8_MAX, FP8_MAX).reshape(*lead, gk * bk, gn * bn)
    q = q[..., :k, :n].astype(FP8)
    return fp8_weight(q, scale, block, compute_dtype or w.dtype)


def fp8_weight(values, scales, block: tuple[int, int], compute_dtype) -> QuantizedWeight:
    """Wrap stored e4m3 values [..., K, N] and float32 block scales, checking the scale grid."""
    *_, k, n = values.shape
    expected = (-(-k // block[0]), -(-n // block[1]))
    if tuple(scales.shape[-2:]) != expected or tuple(scales.shape[:-2]) != tuple(values.shape[:-2]):
        raise ValueError(f"fp8 scales {list(scales.shape)} do not match values {list(values.shape)} with blocks "
                         f"{list(block)} (expected {[*values.shape[:-2], *expected]})")
    return QuantizedWeight(values, scales, None, bits=8, group_size=int(block[0]), block_n=int(block[1]),
                           compute_dtype=jnp.dtype(compute_dtype).name)


def quantize_rows_fp8(x, block_k: int):
    """Activations [M, K] -> (e4m3 [M, K], float32 scales [M, K // block_k]): one scale per row and K block
    (DeepSeek-V3's per-token, per-128-channel recipe), each mapping its block's largest magnitude to 448."""
    m, k = x.shape
    blocks = x.astype(jnp.float32).reshape(m, k // block_k, block_k)
    scale = jnp.max(jnp.abs(blocks), axis=-1) / FP8_MAX
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(blocks / scale[..., None], -FP8_MAX, FP8_MAX).astype(FP8).reshape(m, k)
    return q, scale


def fp8_block(config) -> tuple[int, int]:
    """(block_k, block_n) of a model's fp8 weights in moejax's input-major layout: the checkpoint's
    weight_block_size is (out, in)."""
    out_block, in_block = config.fp8_block_size
    return int(in_block), int(out_block)


def fp8_scales_full(w: QuantizedWeight) -> jax.Array:
    """An fp8 weight's block scales repeated to every element, [..., K, N] float32."""
    *_, k, n = w.values.shape
    s = jnp.repeat(jnp.repeat(w.scales.astype(jnp.float32), w.group_size, axis=-2), w.block_n, axis=-1)
    return s[..., :k, :n]


def unpack_int4(values: jax.Array) -> jax.Array:
    """uint8 [..., K // 2, N] -> codes [..., K, N] (int32), even k from the low nibble."""
    lo = (values & 0xF).astype(jnp.int32)
    hi = (values >> 4).astype(jnp.int32)
    *lead, half, n = values.shape
    return jnp.stack([lo, hi], axis=-2).reshape(*lead, half * 2, n)


def dequantize(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    if w.kind == "fp8":
        return (w.values.astype(jnp.float32) * fp8_scales_full(w)).astype(dtype)
    if w.bits == 8:
        return (w.values.astype(jnp.float32) * w.scales.astype(jnp.float32)).astype(dtype)
    codes = unpack_int4(w.values).astype(jnp.float32)
    *lead, k, n = codes.shape
    g = w.group_size
    zero = 8.0 if w.zeros is None else jnp.repeat(w.zeros.astype(jnp.float32), g, axis=-2)
    scale = jnp.repeat(w.scales.astype(jnp.float32), g, axis=-2)
    return ((codes - zero) * scale).astype(dtype)


def as_array(w, dtype=None):
    """A plain array for any weight (taking a LayerWeight's slice, dequantizing a QuantizedWeight)."""
    from moejax.kernels.layer_weight import unstacked

    w = unstacked(w)
    if isinstance(w, QuantizedWeight):
        return dequantize(w, dtype or w.dtype)
    return w


def quantized_nbytes(shape, bits, dtype, group_size: int = DEFAULT_GROUP, zero_point: bool = False) -> int:
    """Bytes moejax stores for a [..., K, N] weight quantized this way (bits: 8, 4 or "fp8")."""
    *lead, k, n = shape
    lead_n = int(np.prod(lead, dtype=np.int64)) if lead else 1
    elem = np.dtype(dtype).itemsize
    if bits == "fp8":
        bk, bn = FP8_BLOCK
        return lead_n * (k * n + (-(-k // bk)) * (-(-n // bn)) * 4)
    if bits == 8:
        return lead_n * (k * n + n * elem)
    g = group_size_for(k, group_size)
    return lead_n * (k // 2 * n + (k // g) * n * elem + ((k // g) * n if zero_point else 0))


# Parameters that weight-only quantization leaves alone: embeddings, lm_head, norms, routers, the shared-expert
# gate, biases.
_QUANTIZED_LEAVES = {"kernel", "w_gate", "w_up", "w_down"}
_SKIPPED_MODULES = {"embed", "lm_head", "router", "shared_gate"}


def should_quantize(path: tuple) -> bool:
    return path[-1] in _QUANTIZED_LEAVES and not (_SKIPPED_MODULES & set(map(str, path)))


def model_transform(quantization: str, dtype, fp8_block: tuple[int, int] = FP8_BLOCK):
    """The loader hook of `LLM(quantization=...)`: (path, host array) -> array or QuantizedWeight."""
    if quantization == "fp8":
        def transform(path, host):
            if not should_quantize(path):
                return host
            return quantize_fp8(host if isinstance(host, jax.Array) else np.asarray(host), fp8_block,
                                compute_dtype=dtype)

        return transform
    bits = {"int8": 8, "int4": 4}[quantization]

    def transform(path, host):
        """host: a numpy array (checkpoint loading) or a jax one (dummy weights, quantized on the device)."""
        if not should_quantize(path) or (bits == 4 and host.shape[-2] % 2):
            return host
        return quantize(host if isinstance(host, jax.Array) else np.asarray(host), bits)

    return transform
