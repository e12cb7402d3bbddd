"""Attention over KV pages on a tensor-parallel mesh: the Pallas kernels (interpreted) per rank equal the
reference."""

import jax.numpy as jnp
import numpy as np

from moejax import kernels
from moejax.kernels import attention_reference
from moejax.sharding import attention_parallel
from tests.kernels.test_paged_attention import decode_case, decode_reference, prefill_case


def test_door_runs_the_decode_kernel_per_tensor_rank():
    """On the Pallas backend with heads and pools split over a tensor-parallel mesh, the decode kernel runs per
    rank (shard_map) and equals the reference."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    rng = np.random.default_rng()
    case = decode_case(rng, heads=8, kv_heads=2, head_dim=16, page_size=4, max_pages=6, contexts=[0, 9, 23])
    ref = decode_reference(case, 0.25, attention_reference.NO_WINDOW)
    mesh = jax.make_mesh((2,), ("tensor",))
    put = {"q_NHD": P(None, "tensor"), "k_new_NKD": P(None, "tensor"), "v_new_NKD": P(None, "tensor"),
           "k_pool": P(None, None, None, "tensor"), "v_pool": P(None, None, None, "tensor")}
    c = {k: jax.device_put(v, NamedSharding(mesh, put[k])) if k in put else v for k, v in case.items()}
    kernels.set_backend("pallas")
    try:
        with jax.set_mesh(mesh):
            out = jax.jit(lambda q, pos, pages, k, v, kn, vn: attention_parallel.paged_attention(
                q[:, None], pos[:, None], pages, k, v, 1, kn[:, None], vn[:, None], jnp.arange(3), scale=0.25,
                max_back=0)[:, 0])(c["q_NHD"], c["pos_N"], c["page_table_NP"], c["k_pool"], c["v_pool"],
                                   c["k_new_NKD"], c["v_new_NKD"])
    finally:
        kernels.set_backend("auto")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_door_runs_the_prefill_kernel_per_tensor_rank():
    """Prefill blocks on the Pallas backend, heads and pools split over a tensor-parallel mesh: the prefill
    kernel runs per rank and equals dense attention."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    args, ref, _ = prefill_case(np.random.default_rng(), qb=16, window=None, sinks=True, mla=False, heads=8)
    mesh = jax.make_mesh((2,), ("tensor",))
    put = {"q_NQHD": P(None, None, "tensor"), "k_new_NQKD": P(None, None, "tensor"),
           "v_new_NQKD": P(None, None, "tensor"), "k_pool": P(None, None, None, "tensor"),
           "v_pool": P(None, None, None, "tensor"), "sinks_H": P("tensor")}
    arrays = {k: jax.device_put(args[k], NamedSharding(mesh, put.get(k, P())))
              for k in ("q_NQHD", "q_pos_NQ", "page_table_NP", "k_pool", "v_pool", "k_new_NQKD", "v_new_NQKD",
                        "first_N", "sinks_H")}
    kernels.set_backend("pallas")
    try:
        with jax.set_mesh(mesh):
            out = jax.jit(lambda a: attention_parallel.paged_attention(**a, layer=1, scale=0.3))(arrays)
    finally:
        kernels.set_backend("auto")
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=2e-5, atol=2e-5)


def test_layouts_that_do_not_split_heads_take_the_reference():
    """A data-parallel mesh: the heads are whole on every device, so the kernel is not run under shard_map; the
    reference (partitioned by XLA) gives the result."""
    import jax
    from unittest import mock

    from moejax.kernels import pallas_paged_attention

    rng = np.random.default_rng()
    case = decode_case(rng, heads=8, kv_heads=2, head_dim=16, page_size=4, max_pages=6, contexts=[0, 9, 23, 5])
    ref = decode_reference(case, 0.25, attention_reference.NO_WINDOW)
    mesh = jax.make_mesh((2,), ("data",))
    kernels.set_backend("pallas")
    try:
        with mock.patch.object(pallas_paged_attention, "paged_decode", side_effect=AssertionError("kernel ran")), \
                jax.set_mesh(mesh):
            out = jax.jit(lambda q, pos, pages, k, v, kn, vn: attention_parallel.paged_attention(
                q[:, None], pos[:, None], pages, k, v, 1, kn[:, None], vn[:, None], jnp.arange(4), scale=0.25,
                max_back=0)[:, 0])(case["q_NHD"], case["pos_N"], case["page_table_NP"], case["k_pool"],
                                   case["v_pool"], case["k_new_NKD"], case["v_new_NKD"])
    finally:
        kernels.set_backend("auto")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
