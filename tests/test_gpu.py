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
