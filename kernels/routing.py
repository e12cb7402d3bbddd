"""Top-k expert routing: the pure-JAX reference every backend must equal."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    """How router logits become (weights, expert ids) for one MoE layer."""

    top_k: int
    scoring_func: str = "softmax"  # "softmax" | "sigmoid"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0


def grouped_topk(
    router_logits: jax.Array,
    top_k: int,
    *,
    n_group: int = 1,
    topk_group: int = 1,
    scoring_func: str = "softmax",
    correction_bias: jax.Array | None = None,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """vLLM / DeepSeek grouped top-k routing in float32.

    Returns (weights float32 [T, top_k], ids int32 [T, top_k]). Ties go to the lower expert id, as in
    `jax.lax.top_k`.
    """
    # [tokens, experts]
    logits_TE = router_logits.astype(jnp.float32)
    num_tokens, num_experts = logits_TE.shape
    if scoring_func == "softmax":
        scores_TE = jax.nn.softmax(logits_TE, axis=-1)
    elif scoring_func == "sigmoid":
        scores_TE = jax.nn.sigmoid(logits_TE)
    else:
        raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}")

    select_TE = scores_TE
    if correction_bias is not None:
        select_TE = scores_TE + correction_bias.astype(jnp.float32)[None, :]

    if n_group > 1:
        if num_experts % n_group:
            raise ValueError(f"n_group={n_group} does not divide the {num_experts} experts")
        # [tokens, groups, experts per group]
        grouped_TGe = select_TE.reshape(num_tokens, n_group, num_experts // n_group)
        if correction_bias is not None:
            group_score_TG = jax.lax.top_k(grouped_TGe, 2)[0].sum(axis=-1)
        else:
            group_score_TG = grouped_TGe.max(axis=-1)
        _, group_ids = jax.lax.top_k(group_score_TG, topk_group)
        group_mask_TG = jnp.zeros((num_tokens, n_group), bool).at[jnp.arange(num_tokens)[:, None], group_ids].set(True)
        expert_mask_TE = jnp.repeat(group_mask_TG, num_experts // n_group, axis=-1)
        select_TE = jnp.where(expert_mask_TE, select_TE, -jnp.inf)

    _, ids_TK = jax.lax.top_k(select_TE, top_k)
    weights_TK = jnp.take_along_axis(scores_TE, ids_TK, axis=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(axis=-1, keepdims=True)
    weights_TK = weights_TK * routed_scaling_factor
    return weights_TK, ids_TK.astype(jnp.int32)


def route_reference(
    router_logits: jax.Array, config: RoutingConfig, correction_bias: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    return grouped_topk(
        router_logits,
        config.top_k,
        n_group=config.n_group,
        topk_group=config.topk_group,
        scoring_func=config.scoring_func,
        correction_bias=correction_bias,
        renormalize=config.renormalize,
        routed_scaling_factor=config.routed_scaling_factor,
    )
