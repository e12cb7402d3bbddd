"""int8 / int4 weight formats, and LLM(quantization=...) end to end."""

import ml_dtypes
import numpy as np
import pytest

from moejax import LLM
from moejax.kernels import ExpertWeights, experts, grouped_topk, matmul
from moejax.kernels.quant import dequantize, quantize, quantized_nbytes, unpack_int4


@pytest.mark.parametrize("bits, zero_point, k", [(8, False, 256), (4, False, 256), (4, True, 256), (4, False, 96)])
def test_round_trip_error_bounded_by_half_a_step(bits, zero_point, k):
    w = np.random.RandomState(0).randn(3, k, 40).astype(np.float32)
    q = quantize(w, bits, zero_point=zero_point)
    err = np.abs(np.asarray(dequantize(q)) - w)
    if bits == 8:
        step = np.asarray(q.scales)
    else:
        step = np.repeat(np.asarray(q.scales), q.group_size, axis=-2)
    assert (err <= step / 2 + 1e-6).all()
    assert q.nbytes == quantized_nbytes(w.shape, bits, np.float32, zero_point=zero_point)


def test_int4_packing_order_low_nibble_is_even_k():
    w = np.zeros((4, 2), np.float32)
    w[0, 0], w[1, 0] = 7.0, -7.0  # with scale 1: codes 15 (even row) and 1 (odd row)
    q = quantize(w, 4)
    assert int(q.values[0, 0]) == 15 | (1 << 4)
    assert np.asarray(unpack_int4(q.values))[:2, 0].tolist() == [15, 1]


@pytest.mark.parametrize("bits", [8, 4])
def test_matmul_and_experts_accept_quantized_weights(bits):
    rng = np.random.RandomState(1)
    x = rng.randn(5, 128).astype(np.float32)
    w = rng.randn(128, 24).astype(np.float32)
    q = quantize(w, bits)
    np.testing.assert_allclose(matmul(x, q), x @ np.asarray(dequantize(q)), rtol=1e-3, atol=1e-3)
    e = 4
    params = [rng.randn(e, 128, 16).astype(np.float32), rng.randn(e, 128, 16).astype(np.float32),
              rng.randn(e, 16, 128).astype(np.float32)]
    weights, ids = grouped_topk(rng.randn(5, e).astype(np.float32), 2)
    got = experts(x, weights, ids, ExpertWeights(*[quantize(p, bits, group_size=16) for p in params]))
    ref = experts(x, weights, ids, ExpertWeights(*[np.asarray(dequantize(quantize(p, bits, group_size=16)))
                                                  for p in params]))
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_bf16_scales_keep_model_dtype():
    w = np.random.RandomState(2).randn(128, 8).astype(ml_dtypes.bfloat16)
    assert quantize(w, 4).scales.dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("quantization, tol", [("int8", 0.05), ("int4", 0.5)])
def test_llm_quantization_close_to_float_and_sharded_equal(hf_model_dir, quantization, tol):
    path = hf_model_dir("qwen3_moe")
    ids = list(range(3, 40))
    ref = LLM(path).logits(ids)
    q = LLM(path, quantization=quantization)
    got = q.logits(ids)
    assert np.abs(got - ref).max() / np.abs(ref).max() < tol
    sharded = LLM(path, quantization=quantization, tensor_parallel_size=2, expert_parallel_size=4).logits(ids)
    assert np.abs(sharded - got).max() / np.abs(got).max() < 1e-5
