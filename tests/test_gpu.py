"""On a GPU: the compiled (not interpreted) Pallas kernels and the engine's step through them, against the
pure-JAX references. Skipped elsewhere (`python -m pytest -m gpu tests` on the GPU machine)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import LLM, SamplingParams, kernels
from moejax.kernels import ExpertWeights, RoutingConfig, experts_reference
from moejax.kernels.routing import route_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]


def test_compiled_routing_and_experts_equal_reference():
    rng = np.random.default_rng()
    t, e, d, f, k = 64, 32, 256, 128, 4
    logits = jnp.asarray(rng.standard_normal((t, e)), jnp.float32)
    config = RoutingConfig(k, "softmax", True)
    w, i = kernels.route(logits, config)
    w_ref, i_ref = route_reference(logits, config)
    np.testing.assert_array_equal(np.asarray(i), np.asarray(i_ref))
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.bfloat16)
    params = ExpertWeights(*(jnp.asarray(rng.standard_normal(s) * 0.05, jnp.bfloat16)
                             for s in ((e, d, f), (e, d, f), (e, f, d))))
    y = kernels.experts(x, w, i, params)
    ref = experts_reference(x.astype(jnp.float32), w_ref, i_ref, jax.tree.map(lambda a: a.astype(jnp.float32),
                                                                               params))
    err = float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    assert err < 2e-2


def test_engine_on_gpu_matches_cache_free_forward():
    llm = LLM(dtype="float32", max_model_len=256, max_num_batched_tokens=128)
    rng = np.random.default_rng()
    prompts = [rng.integers(3, 2000, int(n)).tolist() for n in rng.integers(1, 150, 6)]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = list(prompt)
        for _ in range(8):
            ids.append(int(np.argmax(llm.logits(ids)[-1])))
        assert out.outputs[0].token_ids == ids[len(prompt):]
    assert llm.llm_engine.kv_cache_usage() == 0.0


def test_step_updates_kv_pool_in_place_on_gpu():
    """XLA's GPU pipeline must not copy the donated pool: a copy would double the KV cache's memory."""
    llm = LLM(dtype="bfloat16", max_model_len=1024, max_num_seqs=32, max_num_batched_tokens=512,
              kv_cache_tokens=256 * 1024)
    runner = llm.runner
    for shape in (runner.buckets.shape(32, 0), runner.buckets.shape(5, 300)):
        assert runner.step_temp_bytes(shape) < runner.pool.nbytes / 4, shape


@pytest.mark.parametrize("shape", [
    dict(heads=32, kv_heads=4, head_dim=128),  # Qwen3-30B-A3B
    dict(heads=64, kv_heads=8, head_dim=64, sinks=True, window=128),  # GPT-OSS sliding layers
    dict(heads=16, kv_heads=1, head_dim=576, value_dim=512),  # DeepSeek-V3 MLA, 16 heads of a TP rank
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "fp8"])
def test_compiled_decode_attention_equals_reference(shape, dtype):
    """The compiled flash-decoding kernel against the pure-JAX reference on shuffled pages: a first token, a
    partial last page, a full table, a padding row (float32: 1e-5; bf16, and FP8 pages under bf16 queries: 2e-2,
    bf16 rounding)."""
    from moejax.kernels.attention_reference import NO_WINDOW
    from moejax.kernels.pallas_paged_attention import paged_decode
    from tests.kernels.test_paged_attention import decode_case, decode_reference

    shape = dict(shape)
    window = shape.pop("window", NO_WINDOW)
    rng = np.random.default_rng()
    max_pages, ps = 256, 16
    contexts = [0, 5, 1000, 4095, max_pages * ps - 1, int(rng.integers(1, 4096)), -1]
    pool = jnp.float8_e4m3fn if dtype == "fp8" else None  # e4m3 pages under bf16 queries
    dtype = "bfloat16" if dtype == "fp8" else dtype
    case = decode_case(rng, page_size=ps, max_pages=max_pages, contexts=contexts, dtype=jnp.dtype(dtype),
                       pool_dtype=pool, **shape)
    args = {k: v for k, v in case.items() if k != "value_dim"}
    scale = 1 / np.sqrt(shape["head_dim"])
    out = paged_decode(**args, scale=float(scale), window=window, value_dim=case["value_dim"])
    with jax.default_matmul_precision("highest"):  # XLA's default runs float32 dots as TF32 on the GPU
        ref = decode_reference(case, float(scale), window)
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [
    dict(heads=32, kv_heads=4, head_dim=128),  # Qwen3-30B-A3B
    dict(heads=64, kv_heads=8, head_dim=64, sinks=True, window=128),  # GPT-OSS sliding layers
    dict(heads=16, kv_heads=1, head_dim=576, value_dim=512),  # DeepSeek-V3 MLA, 16 heads of a TP rank
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "fp8"])
def test_compiled_prefill_attention_equals_reference(shape, dtype):
    """The compiled prefill-chunk kernel against the pure-JAX reference: blocks of 64 queries of chunks after
    cached prefixes of up to 1,500 tokens on shuffled pages, a one-token chunk, a padding block (float32: 1e-5;
    bf16 and FP8 pages under bf16 queries: 2e-2)."""
    from moejax.kernels.attention_reference import NO_WINDOW, paged_attention as reference
    from moejax.kernels.pallas_paged_prefill import paged_prefill
    from moejax.layers.kv_cache import to_cache_dtype

    shape = dict(shape)
    window = shape.pop("window", NO_WINDOW)
    h, kvh, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    dv = shape.get("value_dim", d)
    mla = "value_dim" in shape
    rng = np.random.default_rng()
    qb, ps, max_pages, layers = 64, 16, 128, 2
    chunks = [(0, 300), (1500, 200), (37, 1), (int(rng.integers(0, 1500)), int(rng.integers(1, 400)))]
    num_pages = len(chunks) * max_pages + 1
    order = rng.permutation(np.arange(1, num_pages))
    tables, pos, first = [], [], []
    for i, (cached, new) in enumerate(chunks):
        table = order[i * max_pages:(i + 1) * max_pages]
        f = len(pos)
        for b in range(-(-new // qb)):
            p = np.full(qb, -1, np.int32)
            lo, hi = cached + b * qb, min(cached + (b + 1) * qb, cached + new)
            p[: hi - lo] = np.arange(lo, hi)
            tables.append(table), pos.append(p), first.append(f)
    tables.append(np.zeros(max_pages, np.int32)), pos.append(np.full(qb, -1, np.int32)), first.append(len(first))
    n = len(pos)
    pool = jnp.float8_e4m3fn if dtype == "fp8" else None
    dt = jnp.bfloat16 if dtype == "fp8" else jnp.dtype(dtype)

    def arr(*s, cache=False):
        x = jnp.asarray(rng.standard_normal(s), dt)
        return to_cache_dtype(x, pool) if cache and pool is not None else x

    args = dict(q_NQHD=arr(n, qb, h, d), q_pos_NQ=jnp.asarray(np.stack(pos)),
                page_table_NP=jnp.asarray(np.stack(tables)), k_pool=arr(layers, num_pages, ps, kvh, d, cache=True),
                v_pool=None if mla else arr(layers, num_pages, ps, kvh, d, cache=True), layer=jnp.int32(1),
                k_new_NQKD=arr(n, qb, kvh, d, cache=True),
                v_new_NQKD=None if mla else arr(n, qb, kvh, d, cache=True), first_N=jnp.asarray(first, jnp.int32),
                scale=float(1 / np.sqrt(d)), window=window, sinks_H=arr(h) if shape.get("sinks") else None,
                value_dim=dv if mla else None)
    out = paged_prefill(**args)
    with jax.default_matmul_precision("highest"):
        ref = reference(**args)
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
    assert np.all(np.asarray(out[-1], np.float32) == 0)


def _assert_same_greedy_tokens(llm, ref, max_tokens: int) -> None:
    """Fresh random prompts of 1, 40 and 100 tokens, alone and batched: llm's greedy tokens are ref's."""
    rng = np.random.default_rng()
    prompts = [rng.integers(3, 2000, int(n)).tolist() for n in (1, 40, 100)]
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for batch in (prompts[:1], prompts):
        got = llm.generate(prompt_token_ids=batch, sampling_params=greedy, use_tqdm=False)
        want = ref.generate(prompt_token_ids=batch, sampling_params=greedy, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_offloaded_experts_on_gpu_decode_the_same(quantization):
    """offload_experts=True on the GPU: the experts in pinned host memory, copied in per layer as routed,
    through the compiled kernels, give the device-resident model's tokens."""
    kw = dict(dtype="float32", quantization=quantization, max_model_len=256, max_num_seqs=4)
    ref, off = LLM(**kw), LLM(offload_experts=True, **kw)
    assert any(leaf.sharding.memory_kind == "pinned_host" for leaf in jax.tree.leaves(off.runner.params))
    _assert_same_greedy_tokens(off, ref, max_tokens=8)


def test_expert_cache_on_gpu_decodes_the_same(monkeypatch):
    """offload_cache_experts on the GPU: hits gathered from the device cache, misses copied from pinned host
    memory in a loop inside the layer scan, the cache refilled between steps; the device-resident tokens."""
    from moejax.kernels import host_experts

    monkeypatch.setattr(host_experts, "CACHE_MIN_TOKENS", 1)  # small decode steps read the cache too
    kw = dict(dtype="float32", max_model_len=256, max_num_seqs=4)
    ref, off = LLM(**kw), LLM(offload_experts=True, offload_cache_experts=3, **kw)
    policy = off.llm_engine.expert_cache
    policy.refresh_steps = 2
    _assert_same_greedy_tokens(off, ref, max_tokens=12)
    assert 0 < policy.hits < policy.routed


@pytest.mark.parametrize("tokens", [4, 512])
def test_compiled_fp8_experts_equal_reference(tokens):
    """Block-scaled e4m3 experts compiled for real: W8A16 at 4 tokens (bf16's error), W8A8 at 512 tokens of
    top-4 over 16 experts (128 rows an expert; e4m3 activations: a few percent of the largest output)."""
    from moejax.kernels.pallas_experts import experts_pallas, fp8_activations
    from moejax.kernels.quant import quantize_fp8

    rng = np.random.default_rng()
    e, d, f, k = 16, 256, 256, 4
    x = jnp.asarray(rng.standard_normal((tokens, d)), jnp.bfloat16)
    w, i = route_reference(jnp.asarray(rng.standard_normal((tokens, e)), jnp.float32), RoutingConfig(k))
    params = ExpertWeights(*(quantize_fp8(jnp.asarray(rng.standard_normal(s) * 0.05, jnp.float32))
                             for s in ((e, d, f), (e, d, f), (e, f, d))))
    y = np.asarray(experts_pallas(x, w, i, params), np.float32)
    ref = np.asarray(experts_reference(x.astype(jnp.float32), w, i, params))
    err = np.abs(y - ref) / np.abs(ref).max()
    w8a8 = fp8_activations(tokens * k, e, jnp.bfloat16)
    assert w8a8 == (tokens == 512)
    assert err.max() < (8e-2 if w8a8 else 2e-2) and err.mean() < (2e-2 if w8a8 else 5e-3)


def test_fp8_model_on_gpu_through_kernels_equals_reference_path():
    """quantization="fp8" on the embedded model (128-wide experts: whole 128 x 128 blocks): the step through
    the compiled fp8 expert kernels gives the pure-JAX path's logits on the same e4m3 weights."""
    llm = LLM(quantization="fp8", dtype="bfloat16", max_model_len=256, max_num_seqs=4)
    ids = np.random.default_rng().integers(3, 2000, 64).tolist()
    got = llm.logits(ids)
    kernels.set_backend("reference")
    try:
        want = LLM(quantization="fp8", dtype="bfloat16", max_model_len=256, max_num_seqs=4).logits(ids)
    finally:
        kernels.set_backend("auto")
    assert np.abs(got - want).max() / np.abs(want).max() < 3e-2


@pytest.mark.parametrize("tokens", [1, 256])
def test_compiled_fp8_dense_linear_equals_dequantized(monkeypatch, tokens):
    """MOEJAX_FP8_DENSE=pallas compiled for real: W8A16 for one row, W8A8 for 256 rows, against the float32
    product with the dequantized weight."""
    from moejax.kernels import pallas_experts
    from moejax.kernels.quant import dequantize, quantize_fp8

    rng = np.random.default_rng()
    w = quantize_fp8(jnp.asarray(rng.standard_normal((512, 384)) * 0.05, jnp.float32))
    x = jnp.asarray(rng.standard_normal((tokens, 512)), jnp.bfloat16)
    monkeypatch.setattr(kernels, "FP8_DENSE", "pallas")
    assert pallas_experts.dense_supported(w)
    got = np.asarray(jax.jit(kernels.matmul)(x, w), np.float32)
    ref = np.asarray(x.astype(jnp.float32) @ dequantize(w))
    err = np.abs(got - ref) / np.abs(ref).max()
    assert err.max() < (8e-2 if tokens == 256 else 2e-2)
