"""Attention over KV pages on a mesh: the Pallas kernels per tensor-parallel rank.

XLA partitions the pure-JAX attention by itself (heads and pools split over `tensor`), but it cannot partition
a kernel's custom call: under a mesh the kernels run inside shard_map, each rank on its own query heads, KV
heads and pool shards (GQA groups never straddle ranks: heads split evenly and KV heads, replicated per rank
where fewer, stay with their query heads). Layouts that do not split the heads over `tensor` alone take the
reference, which XLA partitions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import kernels
from moejax.sharding.rules import TENSOR


def paged_attention(q_NQHD, q_pos_NQ, page_table_NP, k_pool, v_pool, layer, k_new_NQKD, v_new_NQKD, first_N, *,
                    scale, window=None, sinks_H=None, value_dim=None, max_back=None):
    """`kernels.paged_attention` over the mesh in context (same arguments and result)."""
    static = dict(scale=scale, value_dim=value_dim, max_back=max_back)
    args = [q_NQHD, q_pos_NQ, page_table_NP, k_pool, v_pool, layer, k_new_NQKD, v_new_NQKD, first_N, window,
            sinks_H]

    def call(q, pos, pages, k, v, lay, kn, vn, first, win, sinks, use_kernel=True):
        return kernels.paged_attention(q, pos, pages, k, v, lay, kn, vn, first, window=win, sinks_H=sinks,
                                       use_kernel=use_kernel, **static)

    mesh = jax.sharding.get_abstract_mesh()
    # axes already manual (the pipeline stages' shard_map) are not this call's to split
    manual = set(getattr(mesh, "manual_axes", ()))
    sizes = {a: s for a, s in zip(mesh.axis_names, mesh.axis_sizes) if a not in manual} if mesh.axis_names else {}
    n, qb, h, d = q_NQHD.shape
    dv = value_dim if v_pool is None else v_pool.shape[-1]
    if all(s == 1 for s in sizes.values()) or kernels.attention_kernel(qb, h, d, k_pool.shape, dv, max_back) is None:
        return call(*args)
    tensor = sizes.get(TENSOR, 1)
    kvh = k_pool.shape[3]
    if [s for a, s in sizes.items() if a != TENSOR and s > 1] or kvh % tensor or h % tensor:
        return call(*args, use_kernel=False)
    heads, pool = P(None, None, TENSOR, None), P(None, None, None, TENSOR, None)
    args[5] = jnp.asarray(layer, jnp.int32)
    if window is not None:
        args[9] = jnp.asarray(window, jnp.int32)
    specs = [heads, P(), P(), pool, pool, P(), heads, heads, P(), P(), P(TENSOR)]
    keep = [i for i, a in enumerate(args) if a is not None]

    def local(*present):
        full = [None] * len(args)
        for i, a in zip(keep, present):
            full[i] = a
        return call(*full)

    return jax.shard_map(local, in_specs=tuple(specs[i] for i in keep), out_specs=heads,
                         check_vma=False)(*(args[i] for i in keep))
