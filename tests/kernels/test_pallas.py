"""Pallas kernels (interpret mode on the CPU) equal their pure-JAX references on fresh random inputs."""

import collections
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest

from moejax import LLM, SamplingParams, kernels
from moejax.kernels import ExpertWeights, RoutingConfig, experts_reference, grouped_topk, moe_align_block_size
from moejax.kernels.pallas_experts import Tiles, experts_pallas
from moejax.kernels.pallas_routing import route_pallas
from moejax.kernels.quant import dequantize, quantize, quantize_fp8, quantize_rows_fp8
from moejax.kernels.routing import route_reference

ROUTINGS = [
    (RoutingConfig(8, "sigmoid", True, 8, 4, 2.5), 256, True),  # DeepSeek-V3
    (RoutingConfig(4, "sigmoid", True, 4, 2, 1.0), 32, False),
    (RoutingConfig(2, "softmax", True), 8, False),  # Mixtral
    (RoutingConfig(4, "softmax", False), 60, False),  # Qwen1.5-MoE: 60 experts, no renormalization
    (RoutingConfig(8, "softmax", True), 128, False),  # Qwen3
    (RoutingConfig(6, "softmax", False, 8, 3, 16.0), 160, False),  # DeepSeek-V2: 20 experts a group
    (RoutingConfig(2, "sigmoid", True, 3, 2), 24, True),  # a group count that is not a power of two
]


@pytest.mark.parametrize("config, num_experts, bias", ROUTINGS)
def test_routing_kernel_equals_reference(config, num_experts, bias):
    rng = np.random.default_rng()
    logits = jnp.asarray(rng.standard_normal((50, num_experts)), jnp.float32)
    correction = jnp.asarray(rng.standard_normal(num_experts) * 0.1, jnp.float32) if bias else None
    w_ref, i_ref = route_reference(logits, config, correction)
    w, i = route_pallas(logits, config, correction, interpret=True)
    np.testing.assert_array_equal(np.asarray(i), np.asarray(i_ref))
    np.testing.assert_allclose(np.asarray(w), np.asarray(w_ref), rtol=1e-6, atol=1e-7)


def test_routing_ties_go_to_lower_ids():
    logits = jnp.asarray(np.round(np.random.default_rng().standard_normal((40, 16)), 0), jnp.float32)  # many ties
    for config in (RoutingConfig(4, "softmax", True), RoutingConfig(4, "sigmoid", True, 4, 2)):
        np.testing.assert_array_equal(np.asarray(route_pallas(logits, config, interpret=True)[1]),
                                      np.asarray(route_reference(logits, config)[1]))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_engine_decodes_the_same_through_kernels(hf_model_dir, tmp_path, family):
    """Greedy generation with prefill and decode attention in the Pallas kernels (GQA; GPT-OSS's sliding windows and sinks;
    DeepSeek's MLA latent) and the experts in theirs, equal to the pure-JAX path token for token."""
    from tests.hf_models import make_deepseek, make_gpt_oss

    if family == "gpt_oss":  # windows of 8 tokens: the longer prompts outgrow them
        path = make_gpt_oss(str(tmp_path))
    elif family == "deepseek_v3":  # a 32 + 16 latent, which the kernel tiles (pieces of 16 or more)
        path = make_deepseek(str(tmp_path), kv_lora_rank=32, qk_rope_head_dim=16)
    else:  # heads of 32, which the attention kernels tile (the family's default 24 they leave to the reference)
        path = hf_model_dir(family, head_dim=32)
    rng = np.random.default_rng()
    prompts = [rng.integers(3, 90, int(n)).tolist() for n in (1, 9, 23)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def run():
        llm = LLM(path, dtype="float32", max_model_len=64)
        return [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params,
                                                             use_tqdm=False)]

    ref = run()
    from moejax.kernels import pallas_paged_attention as decode, pallas_paged_prefill as prefill

    traced = collections.Counter()

    def counted(module, name):
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            traced[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    kernels.set_backend("pallas")
    try:
        with mock.patch.object(decode, "paged_decode", counted(decode, "paged_decode")), \
                mock.patch.object(prefill, "paged_prefill", counted(prefill, "paged_prefill")):
            got = run()
    finally:
        kernels.set_backend("auto")
    assert traced["paged_decode"] and traced["paged_prefill"], traced  # both attention kernels ran
    assert got == ref


@pytest.mark.parametrize("tokens, top_k, num_experts, block", [(1, 8, 128, 16), (37, 2, 8, 4), (64, 4, 60, 32)])
def test_align_block_size_invariants(tokens, top_k, num_experts, block):
    rng = np.random.default_rng()
    ids = np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(tokens)]).astype(np.int32)
    sorted_ids, expert_ids, total = (np.asarray(a) for a in moe_align_block_size(jnp.asarray(ids), num_experts, block))
    n = tokens * top_k
    assert sorted_ids.shape == (n + num_experts * (block - 1),)
    assert expert_ids.shape == (sorted_ids.shape[0] // block,)
    real = sorted_ids[sorted_ids < n]
    assert sorted(real.tolist()) == list(range(n))  # every assignment exactly once
    assert total % block == 0 and (sorted_ids[total:] == n).all()
    flat = ids.reshape(-1)
    counts = np.bincount(flat, minlength=num_experts)
    assert total == sum(-(-c // block) * block for c in counts)
    used = expert_ids[: total // block]
    assert (np.diff(used) >= 0).all() and (expert_ids[total // block:] == -1).all()
    assert set(used.tolist()) == set(np.nonzero(counts)[0].tolist())  # empty experts take no block
    for b, e in enumerate(used):
        rows = sorted_ids[b * block : (b + 1) * block]
        assert (flat[rows[rows < n]] == e).all()
        assert (np.diff(rows[rows < n]) > 0).all()  # stable within an expert


def _problem(tokens, d, f, e, k, dtype):
    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal((tokens, d)), dtype)
    w, ids = grouped_topk(jnp.asarray(rng.standard_normal((tokens, e)), jnp.float32), k)
    params = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in [(e, d, f), (e, d, f), (e, f, d)]]
    return x, w, ids, params


@pytest.mark.parametrize("tokens", [1, 24])
def test_bf16_experts_within_1e2(tokens):
    x, w, ids, params = _problem(tokens, 128, 64, 16, 4, jnp.float32)
    ref = np.asarray(experts_reference(x, w, ids, ExpertWeights(*[jnp.asarray(p) for p in params])))
    got = experts_pallas(x.astype(jnp.bfloat16), w, ids,
                         ExpertWeights(*[jnp.asarray(p, jnp.bfloat16) for p in params]), interpret=True)
    assert np.abs(np.asarray(got, np.float32) - ref).max() / np.abs(ref).max() < 1e-2


@pytest.mark.parametrize("bits, zero_point, split_k", [(8, False, 1), (4, False, 1), (4, True, 1), (8, False, 2),
                                                     (4, True, 4)])
def test_quantized_experts_equal_dequantized_matmul(bits, zero_point, split_k):
    x, w, ids, params = _problem(20, 256, 64, 8, 2, jnp.float32)
    quantized = ExpertWeights(*[quantize(p, bits, group_size=128, zero_point=zero_point) for p in params])
    ref = np.asarray(experts_reference(x, w, ids, quantized))  # dequantize, then float32 matmuls
    got = np.asarray(experts_pallas(x, w, ids, quantized, interpret=True,
                                    tiles=Tiles(block_m=16, block_n=32, block_k=64, split_k=split_k)))
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-3


@pytest.mark.parametrize("bits", [8, 4])
def test_many_rows_per_expert_dequantize_first(bits):
    """Prefill-sized routing (> DEQUANTIZE_ABOVE rows per expert) takes the dequantize-then-bf16-kernel path."""
    from moejax.kernels.pallas_experts import DEQUANTIZE_ABOVE

    x, w, ids, params = _problem(96, 256, 64, 4, 2, jnp.float32)
    assert 96 * 2 / 4 > DEQUANTIZE_ABOVE
    quantized = ExpertWeights(*[quantize(p, bits, group_size=128) for p in params])
    ref = np.asarray(experts_reference(x, w, ids, quantized))
    got = np.asarray(experts_pallas(x, w, ids, quantized, interpret=True))
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-3


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_bf16_activations_with_split_k(bits):
    """bf16 activations take the bit-level int4 decoding; split K sums float32 partials outside the kernel."""
    x, w, ids, params = _problem(6, 256, 64, 8, 2, jnp.float32)
    if bits:
        params = [quantize(jnp.asarray(p, jnp.bfloat16), bits, group_size=128, zero_point=bits == 4) for p in params]
    else:
        params = [jnp.asarray(p, jnp.bfloat16) for p in params]
    weights = ExpertWeights(*params)
    ref = np.asarray(experts_reference(x, w, ids, weights))  # float32 activations, same weights
    for split_k in (1, 2):
        got = experts_pallas(x.astype(jnp.bfloat16), w, ids, weights, interpret=True,
                             tiles=Tiles(block_m=16, block_n=32, block_k=64, split_k=split_k),
                             down_tiles=Tiles(block_m=16, block_n=64, block_k=32, split_k=split_k))
        assert np.abs(np.asarray(got, np.float32) - ref).max() / np.abs(ref).max() < 1e-2


@pytest.mark.parametrize("tokens", [1, 20])
def test_fp8_experts_w8a16_equal_dequantized_matmul(tokens):
    """e4m3 weights widened in the kernel, both block scales per K step: float32 activations give the
    dequantized model's result."""
    x, w, ids, params = _problem(tokens, 128, 64, 8, 2, jnp.float32)
    fp8 = ExpertWeights(*[quantize_fp8(p, (32, 32)) for p in params])
    ref = np.asarray(experts_reference(x, w, ids, fp8))  # dequantize, then float32 matmuls
    got = np.asarray(experts_pallas(x, w, ids, fp8, interpret=True, fp8_x=False,
                                    tiles=Tiles(block_m=16, block_n=64, block_k=64)))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_fp8_w8a16_through_f16(monkeypatch):
    """MOEJAX_FP8_WIDEN=f16: bf16 activations and e4m3 tiles meet in f16 (3 more mantissa bits than bf16),
    within bf16's error of the dequantized float32 model."""
    from moejax.kernels import pallas_experts

    x, w, ids, params = _problem(6, 128, 64, 8, 2, jnp.float32)
    fp8 = ExpertWeights(*[quantize_fp8(p, (32, 32)) for p in params])
    ref = np.asarray(experts_reference(x, w, ids, fp8))
    monkeypatch.setattr(pallas_experts, "FP8_WIDEN", "f16")
    got = np.asarray(experts_pallas(x.astype(jnp.bfloat16), w, ids, fp8, interpret=True, fp8_x=False), np.float32)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-2


def test_fp8_grouped_matmul_w8a8_is_exact_on_quantized_rows():
    """W8A8: each row is quantized per 32-channel block, e4m3 x e4m3 products accumulate exactly in float32, and
    the two scales come after; equal to the float32 product of the dequantized rows and weights."""
    from moejax.kernels.pallas_experts import grouped_matmul

    rng = np.random.default_rng()
    e, k, n, bm = 3, 128, 64, 16
    weight = quantize_fp8(rng.standard_normal((e, k, n)).astype(np.float32), (32, 32))
    block_expert = jnp.asarray([2, 0, -1, 1], jnp.int32)
    x = jnp.asarray(rng.standard_normal((4 * bm, k)), jnp.bfloat16)
    got = np.asarray(grouped_matmul(x, block_expert, [weight], Tiles(bm, 32, 64), fuse=False,
                                    out_dtype=jnp.float32, interpret=True, fp8_x=True))
    q, scale = quantize_rows_fp8(x, 32)
    rows = np.asarray(q.astype(jnp.float32)) * np.repeat(np.asarray(scale), 32, axis=1)
    dense = np.asarray(dequantize(weight))
    for b, ex in enumerate(np.asarray(block_expert)):
        if ex < 0:
            continue
        want = rows[b * bm:(b + 1) * bm] @ dense[ex]
        np.testing.assert_allclose(got[b * bm:(b + 1) * bm], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_fp8_experts_w8a8_within_fp8_error():
    """Prefill-sized routing with bf16 activations runs W8A8 by default. e4m3 keeps 3 mantissa bits, so each
    quantized activation is within 2^-4 of itself; over a 128-long dot those errors average out to about
    2^-4 / sqrt(3) of a typical term. Bound: 6% of the largest output at worst, 2% on average."""
    from moejax.kernels.pallas_experts import fp8_activations

    x, w, ids, params = _problem(96, 128, 64, 4, 2, jnp.float32)
    assert fp8_activations(96 * 2, 4, jnp.bfloat16) and not fp8_activations(96 * 2, 4, jnp.float32)
    fp8 = ExpertWeights(*[quantize_fp8(p, (32, 32)) for p in params])
    ref = np.asarray(experts_reference(x, w, ids, fp8))
    got = np.asarray(experts_pallas(x.astype(jnp.bfloat16), w, ids, fp8, interpret=True), np.float32)
    err = np.abs(got - ref) / np.abs(ref).max()
    assert err.max() < 0.06 and err.mean() < 0.02, (err.max(), err.mean())
    w8a16 = np.asarray(experts_pallas(x.astype(jnp.bfloat16), w, ids, fp8, interpret=True, fp8_x=False),
                       np.float32)
    assert np.abs(w8a16 - ref).max() / np.abs(ref).max() < 1e-2  # widened weights: bf16's error only


@pytest.mark.parametrize("tokens, dtype", [(3, jnp.float32), (40, jnp.bfloat16)])
def test_fp8_dense_linear_through_the_grouped_kernel(monkeypatch, tokens, dtype):
    """MOEJAX_FP8_DENSE=pallas: kernels.matmul on an fp8 weight runs the grouped kernel as one expert (W8A16 for
    3 rows, W8A8 for 40), equal to the dequantized matmul (float32: 1e-5; W8A8: e4m3's error, as above)."""
    from moejax.kernels import pallas_experts

    rng = np.random.default_rng()
    w = quantize_fp8(rng.standard_normal((128, 96)).astype(np.float32) * 0.1, (32, 32))
    x = jnp.asarray(rng.standard_normal((2, tokens, 128)), dtype)
    assert pallas_experts.dense_supported(w) and not pallas_experts.dense_supported(quantize_fp8(np.ones((96, 80)),
                                                                                                  (32, 32)))
    ref = np.asarray(x.astype(jnp.float32) @ dequantize(w))
    monkeypatch.setattr(kernels, "FP8_DENSE", "pallas")
    kernels.set_backend("pallas")
    calls = []
    real = pallas_experts.linear_fp8
    monkeypatch.setattr(pallas_experts, "linear_fp8", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        got = np.asarray(kernels.matmul(x, w), np.float32)
    finally:
        kernels.set_backend("auto")
    assert calls and got.shape == (2, tokens, 96)
    err = np.abs(got - ref) / np.abs(ref).max()
    assert err.max() < (1e-5 if dtype == jnp.float32 else 6e-2), err.max()


def test_other_ranks_ids_are_skipped():
    x, w, ids, params = _problem(10, 64, 32, 8, 2, jnp.float32)
    p = ExpertWeights(*[jnp.asarray(a) for a in params])
    shifted = ids - 4  # a rank holding experts 4..7 sees them as 0..3, the rest out of range
    local = ExpertWeights(*[a[4:] for a in (p.w_gate, p.w_up, p.w_down)])
    np.testing.assert_allclose(np.asarray(experts_pallas(x, w, shifted, local, interpret=True)),
                               np.asarray(experts_reference(x, w, shifted, local)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_models_give_same_logits_through_kernels(hf_model_dir, family):
    path = hf_model_dir(family)
    ids = list(range(3, 30))
    ref = LLM(path).logits(ids)
    kernels.set_backend("pallas")
    try:
        got = LLM(path).logits(ids)
    finally:
        kernels.set_backend("auto")
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5


@pytest.mark.parametrize("tokens, top_k, num_experts, block", [(1, 8, 128, 16), (64, 8, 128, 16), (37, 2, 8, 4)])
def test_align_rows_tight_and_invertible(tokens, top_k, num_experts, block):
    from moejax.kernels.align import align_rows, tight_rows

    rng = np.random.default_rng()
    ids = np.stack([rng.choice(num_experts + 4, top_k, replace=False) for _ in range(tokens)]).astype(np.int32)
    ids[ids >= num_experts] = -1 - ids[ids >= num_experts]  # other ranks' experts, on both sides of [0, E)
    ids[0] = np.arange(top_k) * (num_experts // top_k)  # token 0 routes inside the range
    sorted_ids, block_expert, total, row_of = (np.asarray(a) for a in align_rows(jnp.asarray(ids), num_experts, block))
    n = tokens * top_k
    assert sorted_ids.shape == (tight_rows(n, num_experts, block),) and len(block_expert) * block == len(sorted_ids)
    flat = ids.reshape(-1)
    mine = (flat >= 0) & (flat < num_experts)
    assert (row_of[~mine] == len(sorted_ids)).all()  # skipped assignments take no row
    assert (sorted_ids[row_of[mine]] == np.nonzero(mine)[0]).all()  # row_of inverts sorted_ids
    assert (block_expert[row_of[mine] // block] == flat[mine]).all()
    assert total == sum(-(-c // block) * block for c in np.bincount(flat[mine], minlength=num_experts))
    # The bound is reached when every assignment has its own expert.
    worst = np.arange(n, dtype=np.int32).reshape(tokens, top_k) % num_experts
    rows = np.asarray(align_rows(jnp.asarray(worst), num_experts, block)[0])
    assert sorted((rows[rows < n]).tolist()) == list(range(n))


@pytest.mark.parametrize("bits, tokens", [(0, 5), (8, 5), (4, 5), (8, 96), ("fp8", 5)])
def test_layer_of_stacked_experts_read_in_place(bits, tokens):
    """A LayerWeight (layer j of experts stacked over layers) gives what that layer's own weights give, through
    the kernels (which address the stack as layer * E + e) and through the reference door."""
    from moejax.kernels import LayerWeight

    layers, e = 3, 4
    x, w, ids, _ = _problem(tokens, 256, 64, e, 2, jnp.float32)
    rng = np.random.default_rng()
    stacked = [rng.standard_normal((layers, *s)).astype(np.float32) * 0.1 for s in [(e, 256, 64), (e, 256, 64),
                                                                                     (e, 64, 256)]]
    prepare = (lambda a: quantize(jnp.asarray(a), bits, group_size=128)) if bits else jnp.asarray
    if bits == "fp8":
        prepare = lambda a: quantize_fp8(jnp.asarray(a), (32, 32))  # noqa: E731
    ids = ids.at[0, 0].set(-1)  # another rank's assignment stays skipped
    for j in (0, 2):
        own = ExpertWeights(*[prepare(a[j]) for a in stacked])
        ref = np.asarray(experts_reference(x, w, ids, own))
        layered = ExpertWeights(*[LayerWeight(prepare(a), jnp.int32(j)) for a in stacked])
        got = np.asarray(experts_pallas(x, w, ids, layered, interpret=True))
        assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-3, j
        np.testing.assert_allclose(np.asarray(kernels.experts(x, w, ids, layered)), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens, top_k, num_experts", [(1, 8, 128), (3, 2, 32)])
def test_few_assignments_get_a_block_each(tokens, top_k, num_experts):
    """Few assignments skip the grouping (align_each): each its own block, other ranks' skipped, and the
    kernels give the reference's result through it."""
    from moejax.kernels.align import align_each, groups_rows

    assert not groups_rows(tokens * top_k, num_experts, tokens)
    rng = np.random.default_rng()
    ids = np.stack([rng.choice(num_experts + 4, top_k, replace=False) for _ in range(tokens)]).astype(np.int32)
    ids[ids >= num_experts] = -1  # another rank's
    ids[0, 0] = 1
    sorted_ids, block_expert, total, row_of = (np.asarray(a) for a in align_each(jnp.asarray(ids), num_experts, 16))
    flat = ids.reshape(-1)
    mine = flat >= 0
    assert (row_of[~mine] == len(sorted_ids)).all() and (sorted_ids[row_of[mine]] == np.nonzero(mine)[0]).all()
    assert (block_expert[mine] == flat[mine]).all() and (block_expert[~mine] == -1).all()
    assert total == mine.sum() * 16 and ((sorted_ids < len(flat)).sum() == mine.sum())

    x, w, _, params = _problem(tokens, 64, 32, num_experts, top_k, jnp.float32)
    p = ExpertWeights(*[jnp.asarray(a) for a in params])
    np.testing.assert_allclose(np.asarray(experts_pallas(x, w, jnp.asarray(ids), p, interpret=True)),
                               np.asarray(experts_reference(x, w, jnp.asarray(ids), p)), rtol=1e-5, atol=1e-6)
