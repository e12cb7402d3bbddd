"""host_experts: the experts a step routes to, brought from host memory, from the device cache where it holds
them; either way the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels import host_experts as hx
from moejax.kernels.experts import ExpertWeights
from moejax.kernels.layer_weight import LayerWeight
from moejax.kernels.quant import quantize


def _host_stack(rng, layers, experts, d, f, bits):
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")

    def weight(shape):
        w = rng.standard_normal((layers, experts, *shape)).astype(np.float32)
        stored = w if bits is None else quantize(w, bits)
        return jax.device_put(stored, host)

    return ExpertWeights(weight((d, f)), weight((d, f)), weight((f, d)))


@pytest.mark.parametrize("bits", [None, 4])
def test_cached_and_host_experts_are_the_same_weights(bits, monkeypatch):
    monkeypatch.setattr(hx, "CACHE_MIN_TOKENS", 1)  # the steps below have 2 tokens
    rng = np.random.default_rng(0)
    layers, experts, slots = 3, 8, 3
    host = _host_stack(rng, layers, experts, 16, 8, bits)
    cache = hx.empty_cache(host, slots)
    # layer 1 caches experts 5, 2 and 7 in slots 0-2; layer 2 caches expert 0 in slot 1
    slot_of = -np.ones((layers, experts), np.int32)
    slot_of[1, [5, 2, 7]] = [0, 1, 2]
    slot_of[2, 0] = 1
    cache = hx.fill(cache, host, [(1, 0, 5), (1, 1, 2), (1, 2, 7), (2, 1, 0)], slot_of)
    assert np.array_equal(np.asarray(cache.slot_of), slot_of)

    @jax.jit
    def fetch(ids_TK, layer, cache):
        params = ExpertWeights(*(LayerWeight(w, layer) for w in (host.w_gate, host.w_up, host.w_down)))
        plain = hx.fetch_routed(ids_TK, params, experts)
        with hx.layer_cache(cache, layer):
            cached = hx.fetch_routed(ids_TK, params, experts)
        return plain, cached

    for layer in range(layers):
        ids_TK = jnp.asarray(rng.choice(experts, (2, 2), replace=False).astype(np.int32))
        (plain, plain_ids), (cached, cached_ids) = fetch(ids_TK, jnp.int32(layer), cache)
        assert np.array_equal(plain_ids, cached_ids)
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(cached)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # the weights fetched are those of the routed experts, in ascending id order
        want = np.asarray(jax.tree.leaves(host.w_down)[0])[layer][np.unique(np.asarray(ids_TK))]
        np.testing.assert_array_equal(np.asarray(jax.tree.leaves(cached.w_down)[0]), want)


@pytest.mark.parametrize("tokens", [1, hx.CACHE_MIN_TOKENS])
def test_steps_of_few_tokens_copy_every_routed_expert(tokens):
    # a slot that claims expert 3 holds expert 4's weights: only a step that reads the cache sees them
    rng = np.random.default_rng(2)
    layers, experts = 1, 16  # more than the step's 2 * tokens assignments: not the whole-layer copy
    host = _host_stack(rng, layers, experts, 4, 4, None)
    slot_of = -np.ones((layers, experts), np.int32)
    slot_of[0, 3] = 0
    cache = hx.fill(hx.empty_cache(host, 1), host, [(0, 0, 4)], slot_of)
    ids_TK = jnp.full((tokens, 2), 3, jnp.int32).at[:, 1].set(5)

    @jax.jit
    def fetch(cache):
        params = ExpertWeights(*(LayerWeight(w, jnp.int32(0)) for w in (host.w_gate, host.w_up, host.w_down)))
        with hx.layer_cache(cache, jnp.int32(0)):
            return hx.fetch_routed(ids_TK, params, experts)

    local, ids = fetch(cache)
    first = np.asarray(local.w_up)[int(np.asarray(ids)[0, 0])]
    want = 4 if tokens >= hx.CACHE_MIN_TOKENS else 3
    np.testing.assert_array_equal(first, np.asarray(host.w_up[0, want]))


def test_a_fill_larger_than_a_chunk_copies_every_expert_with_one_program(monkeypatch):
    monkeypatch.setattr(hx, "FILL_CHUNK", 4)
    rng = np.random.default_rng(1)
    layers, experts, slots = 2, 8, 5
    host = _host_stack(rng, layers, experts, 4, 4, None)
    updates = [(l, s, (3 * s + l) % experts) for l in range(layers) for s in range(slots)]  # 10 > 4
    slot_of = -np.ones((layers, experts), np.int32)
    for l, s, e in updates:
        slot_of[l, e] = s
    cache = hx.fill(hx.empty_cache(host, slots), host, updates, slot_of)
    for l, s, e in updates:
        np.testing.assert_array_equal(np.asarray(cache.weights.w_up[l, s]), np.asarray(host.w_up[l, e]))
    assert np.array_equal(np.asarray(cache.slot_of), slot_of)
    # every fill size runs the one program: a refresh between steps never compiles
    compiled = hx._fill._cache_size()
    cache = hx.fill(cache, host, updates[:1], slot_of)
    cache = hx.fill(cache, host, updates[:3], slot_of)
    assert hx._fill._cache_size() == compiled
