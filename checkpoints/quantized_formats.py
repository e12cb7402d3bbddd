"""Checkpoint-side quantized formats, dequantized exactly on load: FP8 block scales and GPT-OSS MXFP4."""

from __future__ import annotations

import numpy as np

# e2m1 code -> value (sign in the high bit of the nibble).
MXFP4_VALUES = np.asarray([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                          np.float32)


def dequantize_fp8_block(q: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """W[i, j] = q[i, j] * scale_inv[i // b0, j // b1] in float32; the scale grid is rounded up, so edge blocks
    are partial (DeepSeek's kv_a_proj_with_mqa [576, 7168] has scales [5, 56])."""
    rows, cols = q.shape[-2:]
    b0, b1 = block
    expected = (-(-rows // b0), -(-cols // b1))
    if tuple(scale_inv.shape[-2:]) != expected:
        raise ValueError(f"fp8 scale grid {list(scale_inv.shape)} does not match weight {list(q.shape)} "
                         f"with blocks {list(block)} (expected {list(expected)})")
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), b0, axis=-2), b1, axis=-1)[..., :rows, :cols]
    return q.astype(np.float32) * scale


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks uint8 [..., out, in / 32, 16] (two codes a byte, low nibble first) and scales uint8 [..., out, in / 32]
    (exponents with bias 127) -> float32 [..., out, in]."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"mxfp4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match")
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], blocks.shape[-1] * 2)
    values = np.ldexp(MXFP4_VALUES[codes], (scales.astype(np.int32) - 127)[..., None])
    return values.reshape(*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1] * 2).astype(np.float32)
