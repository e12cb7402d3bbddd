"""Expert-parallel dispatch of the routed experts.

Routed experts are split over the `expert` mesh axis (and their width over `tensor`), or, with
`enable_expert_parallel`, whole over `tensor` (rules.experts_over). XLA cannot infer a
dispatch for a grouped matmul whose groups live on different devices (it would all-gather the expert weights),
so the expert computation runs inside shard_map: every rank sees the tokens of its data shard, computes only the
assignments that route to its own experts (ids shifted by its expert offset; the rest are skipped inside the
grouped matmul), and one psum over the axes that split them adds the partial outputs, already weighted.

Replicate-then-psum was chosen over all_to_all: tokens are already replicated across expert ranks (the batch
is split over `data` only), so dispatch costs no communication, and the combine is a single all-reduce of
[tokens, hidden] per layer; all_to_all would only pay off once attention is also data-parallel across expert
ranks (tokens not replicated), which this engine does not do yet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import kernels
from moejax.kernels.layer_weight import unstacked
from moejax.sharding.rules import DATA, EXPERT, TENSOR, logical_to_spec

EXPERT_AXES = {
    "w_gate": ("experts", "embed", "expert_mlp"),
    "w_up": ("experts", "embed", "expert_mlp"),
    "w_down": ("experts", "expert_mlp", "embed"),
    "b_gate": ("experts", "expert_mlp"),
    "b_up": ("experts", "expert_mlp"),
    "b_down": ("experts", "embed"),
}


def _mesh_shape(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes)) if mesh is not None and mesh.axis_names else {}


def moe_experts(x_TD, weights_TK, ids_TK, params: kernels.ExpertWeights, activation: kernels.Activation):
    """`kernels.experts`, dispatched over the mesh in context when experts are sharded."""
    mesh = jax.sharding.get_abstract_mesh()
    shape = _mesh_shape(mesh)
    if EXPERT in set(getattr(mesh, "manual_axes", ())) and shape.get(EXPERT, 1) > 1:
        return all_to_all_experts(x_TD, weights_TK, ids_TK, params, activation)
    if shape.get(EXPERT, 1) * shape.get(TENSOR, 1) == 1:
        return kernels.experts(x_TD, weights_TK, ids_TK, params, activation)

    fields = {name: getattr(params, name) for name in EXPERT_AXES if getattr(params, name) is not None}
    specs = {name: logical_to_spec(EXPERT_AXES[name], shape, _shape_of(v)) for name, v in fields.items()}
    expert_axis = specs["w_gate"][0]  # EXPERT; TENSOR under enable_expert_parallel; None: not split
    # The expert width must be split alike in all three matmuls (a quantized weight may not divide); if any
    # does not split it, none does here.
    width_sharded = specs["w_gate"][2] == specs["w_up"][2] == specs["w_down"][1] == TENSOR
    if not width_sharded:
        specs = {n: P(spec[0], *(None if a == TENSOR else a for a in spec[1:])) for n, spec in specs.items()}
    reduce_axes = tuple(a for a in (expert_axis, TENSOR if width_sharded else None) if a is not None)
    num_tokens = x_TD.shape[0]
    token_spec = P(DATA) if num_tokens % shape.get(DATA, 1) == 0 else P()
    names = tuple(fields)

    # One layer of weights stacked over layers (kernels.LayerWeight) crosses shard_map as its stack (a leading
    # unsplit layer axis) and its layer index, and is put back together inside.
    layered = {n for n in names if isinstance(fields[n], kernels.LayerWeight)}
    layer = next((fields[n].layer for n in layered), jnp.zeros((), jnp.int32))
    arrays = [fields[n].stacked if n in layered else fields[n] for n in names]
    array_specs = [P(None, *specs[n]) if n in layered else specs[n] for n in names]

    def local(x_TD, weights_TK, ids_TK, layer, *arrays):
        arrays = [kernels.LayerWeight(a, layer) if n in layered else a for n, a in zip(names, arrays)]
        local_params = kernels.ExpertWeights(**dict(zip(names, arrays)))
        if expert_axis is not None:
            offset = jax.lax.axis_index(expert_axis) * local_params.w_gate.shape[0]
            ids_TK = ids_TK - offset  # ids of other ranks fall outside [0, local experts) and are skipped
        y_TD = kernels.experts(x_TD, weights_TK, ids_TK, local_params, activation)
        if width_sharded and local_params.b_down is not None:
            # The down bias must be added once, not once per tensor rank.
            y_TD = y_TD - jnp.where(jax.lax.axis_index(TENSOR) == 0, 0, 1) * _bias_term(
                weights_TK, ids_TK, local_params.b_down, x_TD.dtype)
        return jax.lax.psum(y_TD.astype(jnp.float32), reduce_axes).astype(x_TD.dtype) if reduce_axes else y_TD

    mapped = jax.shard_map(
        local,
        in_specs=(token_spec, token_spec, token_spec, P(), *array_specs),
        out_specs=token_spec,
        check_vma=False,
    )
    return mapped(x_TD, weights_TK, ids_TK, layer, *arrays)


def all_to_all_experts(x_TD, weights_TK, ids_TK, params: kernels.ExpertWeights, activation: kernels.Activation,
                       axis: str = EXPERT):
    """DP attention's dispatch, inside a shard_map manual over `axis`: this rank's own tokens go to the ranks
    holding their experts with one all-to-all and come back computed with a second; none is dropped.

    Each of the T * k assignments has a slot in the buffer bound for every rank, filled only in the one for the
    rank of its expert (a dense all-to-all that any backend runs; jax's ragged_all_to_all would send only the
    filled rows, but XLA:CPU does not run it). A rank computes the rows it receives for its E / ranks experts
    (unit weights; the rest skipped in the grouped matmul) and the source applies the routing weights."""
    ranks = jax.lax.axis_size(axis)
    local = params.w_gate.shape[0]  # this rank's experts
    t, k = ids_TK.shape
    c = t * k
    ids_C = ids_TK.reshape(c)
    rank_C = ids_C // local
    mine_RC = rank_C[None, :] == jnp.arange(ranks)[:, None]
    # [ranks, C, D]: assignment a's token row in the buffer of its expert's rank, zeros elsewhere
    rows_CD = jnp.repeat(x_TD, k, axis=0)
    send_RCD = jnp.where(mine_RC[..., None], rows_CD[None], jnp.zeros((), x_TD.dtype))
    send_ids_RC = jnp.where(mine_RC, (ids_C % local)[None, :], -1)
    recv_RCD = jax.lax.all_to_all(send_RCD, axis, 0, 0)
    recv_ids_RC = jax.lax.all_to_all(send_ids_RC, axis, 0, 0)
    y_ND = kernels.experts(recv_RCD.reshape(ranks * c, -1), jnp.ones((ranks * c, 1), x_TD.dtype),
                           recv_ids_RC.reshape(ranks * c, 1), params, activation)
    back_RCD = jax.lax.all_to_all(y_ND.reshape(ranks, c, -1), axis, 0, 0)
    # only the slot from the expert's rank is filled: the sum over ranks picks it
    out_TKD = jnp.sum(back_RCD.astype(jnp.float32), axis=0).reshape(t, k, -1)
    return jnp.sum(weights_TK.astype(jnp.float32)[..., None] * out_TKD, axis=1).astype(x_TD.dtype)


def _bias_term(weights_TK, ids_TK, b_down_ED, dtype):
    """sum_k weight * b_down[id] for the assignments this rank owns."""
    b_down_ED = unstacked(b_down_ED)
    num_experts = b_down_ED.shape[0]
    mine = (ids_TK >= 0) & (ids_TK < num_experts)
    bias_TKD = b_down_ED[jnp.clip(ids_TK, 0, num_experts - 1)].astype(jnp.float32)
    return jnp.sum(jnp.where(mine, weights_TK, 0)[..., None] * bias_TKD, axis=1).astype(dtype)


def _shape_of(v):
    return getattr(v, "sharding_shape", None) or v.shape
