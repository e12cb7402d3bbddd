"""The MoE block: router, routed experts (stacked [E, ...] weights) and optional shared experts.

Routing and the expert computation go through `moejax.kernels.route` / `experts` only, so the backend
(Pallas or pure JAX, sharded or not) never shows here.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kernels
from moejax.config import ModelConfig
from moejax.layers.linear import Linear, param
from moejax.layers.mlp import MLP
from moejax.sharding.expert_parallel import moe_experts


# A user's function fn(router_logits [T, E], layer) -> logits [T, E], applied before top-k while a step traces
# (`LLM.register_moe_routing_func`); the runner sets it around the model's forward.
_routing_func: contextvars.ContextVar = contextvars.ContextVar("moe_routing_func", default=None)


@contextlib.contextmanager
def routing_func(fn):
    """Apply fn to every MoE layer's router logits (before top-k) in the forwards traced inside this block."""
    token = _routing_func.set(fn)
    try:
        yield
    finally:
        _routing_func.reset(token)


def routing_config(config: ModelConfig) -> kernels.RoutingConfig:
    return kernels.RoutingConfig(
        top_k=config.num_experts_per_tok,
        scoring_func=config.scoring_func,
        renormalize=config.norm_topk_prob,
        n_group=config.n_group,
        topk_group=config.topk_group,
        routed_scaling_factor=config.routed_scaling_factor,
    )


class MoEBlock(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs | None = None):
        c = config
        self.config = c
        e, d, f = c.num_experts, c.hidden_size, c.moe_intermediate_size
        self.router = Linear(d, e, ("embed", "router"), bias=c.router_bias, dtype=dtype, rngs=rngs)
        self.correction_bias = (
            param((e,), jnp.float32, ("router",), init="zeros") if c.correction_bias else None
        )
        self.w_gate = param((e, d, f), dtype, ("experts", "embed", "expert_mlp"), rngs)
        self.w_up = param((e, d, f), dtype, ("experts", "embed", "expert_mlp"), rngs)
        self.w_down = param((e, f, d), dtype, ("experts", "expert_mlp", "embed"), rngs)
        if c.expert_bias:
            self.b_gate = param((e, f), dtype, ("experts", "expert_mlp"), init="zeros")
            self.b_up = param((e, f), dtype, ("experts", "expert_mlp"), init="zeros")
            self.b_down = param((e, d), dtype, ("experts", "embed"), init="zeros")
        else:
            self.b_gate = self.b_up = self.b_down = None
        self.shared = MLP(d, c.shared_expert_intermediate_size, dtype=dtype, rngs=rngs) \
            if c.shared_expert_intermediate_size else None
        self.shared_gate = Linear(d, 1, ("embed", None), dtype=dtype, rngs=rngs) if c.shared_expert_gate else None
        self.activation = kernels.Activation("gpt_oss", c.swiglu_limit) if c.swiglu_limit is not None \
            else kernels.Activation("silu")

    def expert_weights(self) -> kernels.ExpertWeights:
        value = lambda p: None if p is None else p.get_value()  # noqa: E731
        return kernels.ExpertWeights(
            value(self.w_gate), value(self.w_up), value(self.w_down),
            value(self.b_gate), value(self.b_up), value(self.b_down),
        )

    def __call__(self, x_BTD: jax.Array, layer=0) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (output [B, T, D], router logits [B*T, E], chosen expert ids [B*T, k]). layer: this layer's
        index (traced under the engine's scan), for a registered routing function."""
        b, t, d = x_BTD.shape
        x_TD = x_BTD.reshape(b * t, d)
        with jax.named_scope("router"):
            logits_TE = self.router(x_TD)
            fn = _routing_func.get()
            if fn is not None:
                logits_TE = fn(logits_TE, jnp.asarray(layer, jnp.int32)).astype(logits_TE.dtype)
            bias = self.correction_bias[...] if self.correction_bias is not None else None
            weights_TK, ids_TK = kernels.route(logits_TE, routing_config(self.config), bias)
        with jax.named_scope("experts"):
            y_TD = moe_experts(x_TD, weights_TK, ids_TK, self.expert_weights(), self.activation)
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = jax.nn.sigmoid(self.shared_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        return y_TD.reshape(b, t, d), logits_TE, ids_TK
