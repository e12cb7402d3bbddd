"""Routing and grouped expert matmul kernels (`moejax.kernels`).

The MoE block reaches them only through `route` and `experts`; which implementation runs (Pallas on GPU, the
pure-JAX reference elsewhere) is decided here, never in model code.
"""

from moejax.kernels.experts import Activation, ExpertWeights, experts_reference, gated_activation
from moejax.kernels.routing import RoutingConfig, grouped_topk, route_reference


def matmul(x, w):
    """x [..., K] @ w [K, N] with float32 accumulation; returns x's dtype. Accepts quantized weights."""
    import jax.numpy as jnp

    from moejax.kernels.quant import as_array

    return jnp.matmul(x, as_array(w, x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def route(router_logits, config: RoutingConfig, correction_bias=None):
    """Router logits [T, E] -> (weights float32 [T, k], ids int32 [T, k])."""
    return route_reference(router_logits, config, correction_bias)


def experts(x_TD, weights_TK, ids_TK, params: ExpertWeights, activation: Activation = Activation()):
    """Weighted sum of each token's top-k experts: [T, D] -> [T, D]."""
    return experts_reference(x_TD, weights_TK, ids_TK, params, activation)


__all__ = [
    "Activation",
    "ExpertWeights",
    "RoutingConfig",
    "experts",
    "experts_reference",
    "gated_activation",
    "grouped_topk",
    "matmul",
    "route",
    "route_reference",
]
