"""Routed expert computation: the pure-JAX reference (sort by expert, grouped matmuls, weighted sum over k)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    """Stacked routed-expert weights, input-major so that y = x @ W.

    w_gate, w_up: [experts, embed, mlp]; w_down: [experts, mlp, embed]. Biases (GPT-OSS) are [experts, width].
    """

    w_gate: jax.Array
    w_up: jax.Array
    w_down: jax.Array
    b_gate: jax.Array | None = None
    b_up: jax.Array | None = None
    b_down: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Activation:
    """The gated activation between the two expert matmuls."""

    kind: str = "silu"  # "silu": silu(gate) * up; "gpt_oss": clamped (up + 1) * gate * sigmoid(1.702 gate)
    limit: float | None = None


def gated_activation(gate: jax.Array, up: jax.Array, activation: Activation) -> jax.Array:
    if activation.kind == "silu":
        return jax.nn.silu(gate) * up
    if activation.kind == "gpt_oss":
        limit = activation.limit if activation.limit is not None else 7.0
        gate = jnp.minimum(gate, limit)
        up = jnp.clip(up, -limit, limit)
        return (up + 1.0) * (gate * jax.nn.sigmoid(1.702 * gate))
    raise ValueError(f"unknown activation {activation.kind!r}")


def experts_reference(
    x_TD: jax.Array,
    weights_TK: jax.Array,
    ids_TK: jax.Array,
    params: ExpertWeights,
    activation: Activation = Activation(),
) -> jax.Array:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]), with float32 accumulation; returns x's dtype.

    Assignments whose id is outside [0, E) (another shard's experts) are skipped: they sort last and fall
    outside every group.
    """
    from moejax.kernels.quant import as_array

    params = dataclasses.replace(params, w_gate=as_array(params.w_gate, x_TD.dtype),
                                 w_up=as_array(params.w_up, x_TD.dtype), w_down=as_array(params.w_down, x_TD.dtype))
    num_tokens, top_k = ids_TK.shape
    num_experts = params.w_gate.shape[0]
    ids_TK = jnp.where((ids_TK >= 0) & (ids_TK < num_experts), ids_TK, num_experts)
    weights_TK = jnp.where(ids_TK < num_experts, weights_TK, 0)
    flat_ids = ids_TK.reshape(-1)
    # Rows sorted by expert: row r is assignment order[r] = token * top_k + slot.
    order = jnp.argsort(flat_ids, stable=True)
    token_of_row = order // top_k
    expert_of_row = flat_ids[order]
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)

    # [rows, embed]
    x_RD = x_TD[token_of_row]
    gate_RF = jax.lax.ragged_dot(x_RD, params.w_gate, group_sizes, preferred_element_type=jnp.float32)
    up_RF = jax.lax.ragged_dot(x_RD, params.w_up, group_sizes, preferred_element_type=jnp.float32)
    if params.b_gate is not None:
        gate_RF = gate_RF + params.b_gate[expert_of_row].astype(jnp.float32)
        up_RF = up_RF + params.b_up[expert_of_row].astype(jnp.float32)
    h_RF = gated_activation(gate_RF, up_RF, activation).astype(x_TD.dtype)
    y_RD = jax.lax.ragged_dot(h_RF, params.w_down, group_sizes, preferred_element_type=jnp.float32)
    if params.b_down is not None:
        y_RD = y_RD + params.b_down[expert_of_row].astype(jnp.float32)
    y_RD = y_RD * weights_TK.reshape(-1)[order][:, None].astype(jnp.float32)
    # [tokens, embed]
    y_TD = jnp.zeros((num_tokens, x_TD.shape[-1]), jnp.float32).at[token_of_row].add(y_RD)
    return y_TD.astype(x_TD.dtype)
