"""The Pallas GPU kernels (paged attention, routing, grouped experts) lower to Triton for CUDA from this CPU machine (`lower(lowering_platforms=
("cuda",))` runs Pallas' Triton lowering, not Triton's compiler): every op a kernel uses has a Triton rule at the
shapes the engine runs on the GPU (default tiles), so a kernel edit that would not build there fails CI too.
The compiled kernels' numbers are checked on the GPU (tests/test_gpu.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels import ExpertWeights, RoutingConfig, grouped_topk
from moejax.kernels.pallas_experts import experts_pallas
from moejax.kernels.pallas_routing import route_pallas
from moejax.kernels.quant import quantize, quantize_fp8

from moejax.kernels.attention_reference import NO_WINDOW
from moejax.kernels.pallas_paged_attention import paged_decode
from moejax.kernels.pallas_paged_prefill import paged_prefill

# heads, kv heads, head dim, value dim (MLA: values are the latent's first features), window, sinks
SHAPES = {
    "qwen3": (32, 4, 128, None, NO_WINDOW, False),
    "gpt_oss": (64, 8, 64, None, 128, True),
    "mla": (128, 1, 576, 512, NO_WINDOW, False),
}
PAGE, PAGES, LAYERS, QB = 16, 64, 2, 64


def _arrays(shape, cache_dtype):
    h, kvh, d, dv, _, sinks = shape
    spec = jax.ShapeDtypeStruct
    pool = spec((LAYERS, 256, PAGE, kvh, d), cache_dtype)
    v_pool = None if dv else spec((LAYERS, 256, PAGE, kvh, d), cache_dtype)
    return pool, v_pool, (spec((h,), jnp.float32) if sinks else None)


def _lowers(fn, *args):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text or "triton" in text.lower()


def _lowers_attention(kernel, args, sinks, window, value_dim):
    """kernel(*args) with the sinks traced and the rest of its keywords fixed."""
    _lowers(lambda sinks, *a: kernel(*a, scale=0.1, window=window, sinks_H=sinks, value_dim=value_dim), sinks, *args)


@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, jnp.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_prefill_kernel_lowers_for_cuda(name, cache_dtype):
    h, kvh, d, dv, window, _ = SHAPES[name]
    pool, v_pool, sinks = _arrays(SHAPES[name], cache_dtype)
    n, spec = 8, jax.ShapeDtypeStruct
    args = (spec((n, QB, h, d), jnp.bfloat16), spec((n, QB), jnp.int32), spec((n, PAGES), jnp.int32), pool, v_pool,
            spec((), jnp.int32), spec((n, QB, kvh, d), cache_dtype),
            None if dv else spec((n, QB, kvh, d), cache_dtype), spec((n,), jnp.int32))

    _lowers_attention(paged_prefill, args, sinks, window, dv)


@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, jnp.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_decode_kernel_lowers_for_cuda(name, cache_dtype):
    h, kvh, d, dv, window, _ = SHAPES[name]
    pool, v_pool, sinks = _arrays(SHAPES[name], cache_dtype)
    n, spec = 16, jax.ShapeDtypeStruct
    args = (spec((n, h, d), jnp.bfloat16), spec((n,), jnp.int32), spec((n, PAGES), jnp.int32), pool, v_pool,
            spec((), jnp.int32), spec((n, kvh, d), cache_dtype), None if dv else spec((n, kvh, d), cache_dtype))

    _lowers_attention(paged_decode, args, sinks, window, dv)


@pytest.mark.parametrize("config, num_experts", [(RoutingConfig(8, "sigmoid", True, 8, 4, 2.5), 256),
                                                 (RoutingConfig(8, "softmax", True), 128)], ids=["deepseek", "qwen3"])
def test_routing_kernel_lowers_for_cuda(config, num_experts):
    logits = jax.ShapeDtypeStruct((512, num_experts), jnp.float32)
    bias = jax.ShapeDtypeStruct((num_experts,), jnp.float32) if config.scoring_func == "sigmoid" else None
    _lowers(lambda x, b: route_pallas(x, config, b), logits, bias)


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4", "fp8"])
@pytest.mark.parametrize("tokens", [4, 512])
def test_expert_kernels_lower_for_cuda(weights, tokens):
    """Decode-sized (one block per expert) and prefill-sized routing; fp8 runs W8A16 for the first and W8A8
    for the second, as the engine chooses."""
    rng = np.random.default_rng(0)
    d, f, e, k = 256, 128, 16, 4
    raw = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in [(e, d, f), (e, d, f), (e, f, d)]]
    make = {"bf16": lambda p: jnp.asarray(p, jnp.bfloat16), "int8": lambda p: quantize(p, 8, group_size=128),
            "int4": lambda p: quantize(p, 4, group_size=128, zero_point=True),
            "fp8": lambda p: quantize_fp8(p, (128, 128))}[weights]
    params = ExpertWeights(*[make(p) for p in raw])
    w, ids = grouped_topk(jnp.asarray(rng.standard_normal((tokens, e)), jnp.float32), k)
    x = jax.ShapeDtypeStruct((tokens, d), jnp.bfloat16)
    _lowers(lambda x, w, ids, params: experts_pallas(x, w, ids, params), x, w, ids, params)
