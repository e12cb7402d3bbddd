"""Weight-only int8 / int4 quantization of input-major weights [..., K, N] (linear [K, N], experts [E, K, N]).

int8: symmetric per output channel, w = q * scale[N].
int4: two codes per byte packed along K (low nibble = even k, vLLM's moe_wna16 order), group-wise scales over
K (group 128 by default; one group when K is not a multiple), w = (q - zero) * scale, zero = 8 unless zero
points are stored (then uint8, one per group and column).
Scales are kept in the model's compute dtype. A `QuantizedWeight` is a pytree accepted wherever a weight array
is (`kernels.matmul`, `kernels.experts`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_GROUP = 128


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    values: jax.Array  # int8 [..., K, N] or uint8 [..., K // 2, N]
    scales: jax.Array  # [..., 1, N] (int8) or [..., K // group, N] (int4)
    zeros: jax.Array | None = None  # uint8 [..., K // group, N] (int4 with zero points)
    bits: int = dataclasses.field(default=8, metadata=dict(static=True))
    group_size: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, k, n = self.values.shape
        return (*lead, k * 2 if self.bits == 4 else k, n)

    @property
    def dtype(self):
        return self.scales.dtype

    @property
    def sharding_shape(self) -> tuple[int, ...]:
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


def unpack_int4(values: jax.Array) -> jax.Array:
    """uint8 [..., K // 2, N] -> codes [..., K, N] (int32), even k from the low nibble."""
    lo = (values & 0xF).astype(jnp.int32)
    hi = (values >> 4).astype(jnp.int32)
    *lead, half, n = values.shape
    return jnp.stack([lo, hi], axis=-2).reshape(*lead, half * 2, n)


def dequantize(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
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


def quantized_nbytes(shape, bits: int, dtype, group_size: int = DEFAULT_GROUP, zero_point: bool = False) -> int:
    """Bytes moejax stores for a [..., K, N] weight quantized this way."""
    *lead, k, n = shape
    lead_n = int(np.prod(lead, dtype=np.int64)) if lead else 1
    elem = np.dtype(dtype).itemsize
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


def model_transform(quantization: str, dtype):
    """The loader hook of `LLM(quantization=...)`: (path, host array) -> array or QuantizedWeight."""
    bits = {"int8": 8, "int4": 4}[quantization]

    def transform(path, host):
        """host: a numpy array (checkpoint loading) or a jax one (dummy weights, quantized on the device)."""
        if not should_quantize(path) or (bits == 4 and host.shape[-2] % 2):
            return host
        return quantize(host if isinstance(host, jax.Array) else np.asarray(host), bits)

    return transform
