"""Grouped top-k routing as one fused Pallas kernel: scores, bias, group selection, top-k, renormalize, scale.

One program routes a block of tokens with the whole expert row in registers; selection loops over the (few)
groups and the top_k slots statically. Ties go to the lower index, as in `jax.lax.top_k`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax.kernels.routing import RoutingConfig

NEG = -jnp.inf


def _argmax_lowest(values, col, width):
    """(max, index of its first occurrence) along axis 1."""
    best = jnp.max(values, axis=1, keepdims=True)
    idx = jnp.min(jnp.where(values == best, col, width), axis=1, keepdims=True)
    return best, idx


def _routing_kernel(logits_ref, bias_ref, weights_ref, ids_ref, *, num_experts, top_k, n_group, topk_group,
                    scoring, has_bias, renormalize, scale):
    logits = logits_ref[...].astype(jnp.float32)  # [tokens, experts (padded to a power of two)]
    width = logits.shape[1]
    col = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    valid = col < num_experts
    if scoring == "softmax":
        masked = jnp.where(valid, logits, NEG)
        e = jnp.exp(masked - jnp.max(masked, axis=1, keepdims=True))
        scores = e / jnp.sum(e, axis=1, keepdims=True)
    else:
        scores = jax.nn.sigmoid(logits)
    select = scores + bias_ref[...].astype(jnp.float32) if has_bias else scores
    select = jnp.where(valid, select, NEG)

    if n_group > 1:
        group_size = num_experts // n_group
        group = col // group_size
        group_scores = []
        for g in range(n_group):
            in_g = jnp.where(group == g, select, NEG)
            first, idx = _argmax_lowest(in_g, col, width)
            if has_bias:  # sum of the group's two best selection scores
                second = jnp.max(jnp.where(col == idx, NEG, in_g), axis=1, keepdims=True)
                first = first + second
            group_scores.append(first)
        keep = jnp.zeros(select.shape, jnp.bool_)
        taken = [jnp.zeros(group_scores[0].shape, jnp.bool_) for _ in range(n_group)]
        for _ in range(topk_group):
            best = jnp.full(group_scores[0].shape, NEG)
            for g in range(n_group):
                best = jnp.maximum(best, jnp.where(taken[g], NEG, group_scores[g]))
            chosen = jnp.zeros(best.shape, jnp.bool_)
            for g in range(n_group):  # the lowest group index among ties
                pick = (~taken[g]) & (~chosen) & (group_scores[g] == best)
                taken[g] = taken[g] | pick
                chosen = chosen | pick
                keep = keep | (pick & (group == g))
        select = jnp.where(keep, select, NEG)

    k_width = weights_ref.shape[1]
    kcol = jax.lax.broadcasted_iota(jnp.int32, (logits.shape[0], k_width), 1)
    out_w = jnp.zeros((logits.shape[0], k_width), jnp.float32)
    out_i = jnp.zeros((logits.shape[0], k_width), jnp.int32)
    for j in range(top_k):
        _, idx = _argmax_lowest(select, col, width)
        w = jnp.sum(jnp.where(col == idx, scores, 0.0), axis=1, keepdims=True)
        out_w = jnp.where(kcol == j, w, out_w)
        out_i = jnp.where(kcol == j, idx, out_i)
        select = jnp.where(col == idx, NEG, select)
    if renormalize:
        out_w = out_w / jnp.sum(out_w, axis=1, keepdims=True)
    weights_ref[...] = out_w * scale
    ids_ref[...] = out_i


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("config", "block_tokens", "interpret"))
def route_pallas(router_logits, config: RoutingConfig, correction_bias=None, *, block_tokens: int = 16,
                 interpret: bool = False):
    """Pallas version of `grouped_topk`: (weights float32 [T, k], ids int32 [T, k])."""
    num_tokens, num_experts = router_logits.shape
    width, k_width = max(_pow2(num_experts), 16), max(_pow2(config.top_k), 2)
    padded_tokens = pl.cdiv(num_tokens, block_tokens) * block_tokens
    logits = jnp.pad(router_logits, ((0, padded_tokens - num_tokens), (0, width - num_experts)))
    bias = jnp.zeros((1, width), jnp.float32) if correction_bias is None else \
        jnp.pad(correction_bias.astype(jnp.float32), (0, width - num_experts))[None]
    kernel = functools.partial(
        _routing_kernel, num_experts=num_experts, top_k=config.top_k, n_group=config.n_group,
        topk_group=config.topk_group, scoring=config.scoring_func, has_bias=correction_bias is not None,
        renormalize=config.renormalize, scale=config.routed_scaling_factor)
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as plt

        extra["compiler_params"] = plt.CompilerParams(num_warps=4, num_stages=1)
    weights, ids = pl.pallas_call(
        kernel,
        grid=(padded_tokens // block_tokens,),
        in_specs=[pl.BlockSpec((block_tokens, width), lambda i: (i, 0)), pl.BlockSpec((1, width), lambda i: (0, 0))],
        out_specs=[pl.BlockSpec((block_tokens, k_width), lambda i: (i, 0)),
                   pl.BlockSpec((block_tokens, k_width), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((padded_tokens, k_width), jnp.float32),
                   jax.ShapeDtypeStruct((padded_tokens, k_width), jnp.int32)],
        interpret=interpret,
        **extra,
    )(logits, bias)
    return weights[:num_tokens, : config.top_k], ids[:num_tokens, : config.top_k]
