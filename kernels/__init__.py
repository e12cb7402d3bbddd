"""Routing and grouped expert matmul kernels (`moejax.kernels`).

The MoE block reaches them only through `route` and `experts`; which implementation runs (Pallas on GPU, the
pure-JAX reference elsewhere) is decided here, never in model code.
"""

import os

import jax

from moejax.kernels.align import moe_align_block_size
from moejax.kernels.experts import Activation, ExpertWeights, experts_reference, gated_activation
from moejax.kernels.layer_weight import LayerWeight
from moejax.kernels.routing import RoutingConfig, grouped_topk, route_reference

BACKENDS = ("auto", "pallas", "reference")
_backend = os.environ.get("MOEJAX_KERNELS", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"MOEJAX_KERNELS must be one of {BACKENDS}, got {_backend!r}")


def set_backend(name: str) -> None:
    """"auto" (Pallas on GPU, reference elsewhere), "pallas" (interpreted off GPU: slow, for tests) or
    "reference"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def _static_loops() -> bool:
    import os

    # dynamic (default): walk only the chunks the contexts need; static: every chunk, masked, with trip counts
    # known at compile time. Which is faster on the GPU is still to be measured (see the engine issue's note).
    mode = os.environ.get("MOEJAX_ATTENTION_LOOPS", "dynamic")
    if mode not in ("dynamic", "static"):
        raise ValueError(f"MOEJAX_ATTENTION_LOOPS must be 'dynamic' or 'static', got {mode!r}")
    return mode == "static"


def _pallas() -> tuple[bool, bool]:
    """(use Pallas, interpret it) for the backend in force and the platform being traced for."""
    on_gpu = jax.default_backend() == "gpu"
    if _backend == "reference" or (_backend == "auto" and not on_gpu):
        return False, False
    return True, not on_gpu


def attention_kernel(q_block: int, heads: int, head_dim: int, k_pool_shape, value_dim: int, max_back) -> str | None:
    """Which Pallas kernel `paged_attention` runs for these shapes on the backend in force: "decode" (one query
    per block, max_back=0), "prefill", or None (the pure-JAX reference). k_pool_shape: [layers, pages,
    page_size, kv_heads, dim]."""
    use, _ = _pallas()
    if not use:
        return None
    page_size, kvh = k_pool_shape[2], k_pool_shape[3]
    if q_block == 1 and max_back == 0:
        from moejax.kernels import pallas_paged_attention as decode

        return "decode" if decode.supported(head_dim, value_dim, page_size) else None
    from moejax.kernels import pallas_paged_prefill as prefill

    return "prefill" if prefill.supported(q_block, heads // kvh, head_dim, value_dim, page_size) else None


def paged_attention(q_NQHD, q_pos_NQ, page_table_NP, k_pool, v_pool, layer, k_new_NQKD, v_new_NQKD, first_N, *,
                    scale, window=None, sinks_H=None, value_dim=None, max_back=None, use_kernel: bool = True):
    """Causal attention of query blocks over their sequences' KV pages and this step's own keys (see
    attention_reference.py), on one device (`sharding.attention_parallel` runs it per tensor rank). On the GPU,
    decode blocks (one query, max_back=0) run the Pallas flash-decoding kernel (pallas_paged_attention.py) and
    prefill blocks the Pallas prefill kernel (pallas_paged_prefill.py); shapes they do not tile, everything off
    the GPU, and use_kernel=False take the pure-JAX version."""
    from moejax.kernels.attention_reference import NO_WINDOW, paged_attention as reference

    window = NO_WINDOW if window is None else window
    _, interpret = _pallas()
    dv = value_dim if v_pool is None else v_pool.shape[-1]
    n, qb, h, d = q_NQHD.shape
    kind = attention_kernel(qb, h, d, k_pool.shape, dv, max_back) if use_kernel else None
    if kind == "decode":
        from moejax.kernels.pallas_paged_attention import paged_decode

        return paged_decode(q_NQHD[:, 0], q_pos_NQ[:, 0], page_table_NP, k_pool, v_pool, layer, k_new_NQKD[:, 0],
                            None if v_new_NQKD is None else v_new_NQKD[:, 0], scale=scale, window=window,
                            sinks_H=sinks_H, value_dim=value_dim, interpret=interpret)[:, None]
    if kind == "prefill":
        from moejax.kernels.pallas_paged_prefill import paged_prefill

        return paged_prefill(q_NQHD, q_pos_NQ, page_table_NP, k_pool, v_pool, layer, k_new_NQKD, v_new_NQKD,
                             first_N, scale=scale, window=window, sinks_H=sinks_H, value_dim=value_dim,
                             interpret=interpret)
    # On a GPU, a loop whose trip count is only known on the device may read its condition back to the host
    # every iteration; MOEJAX_ATTENTION_LOOPS=static trades that for masked work.
    return reference(q_NQHD, q_pos_NQ, page_table_NP, k_pool, v_pool, layer, k_new_NQKD, v_new_NQKD, first_N,
                     scale=scale, window=window, sinks_H=sinks_H, value_dim=value_dim, max_back=max_back,
                     static_bounds=_static_loops())


# fp8 dense linears: "xla" (dequantize in the step, then XLA's matmul; the default) or "pallas" (the grouped
# expert kernel as one expert, on one device only: a custom call under a mesh would be gathered). Which is
# faster is for `moejax bench kernels` to measure (its dense section times both).
FP8_DENSE = os.environ.get("MOEJAX_FP8_DENSE", "xla")
if FP8_DENSE not in ("xla", "pallas"):
    raise ValueError(f"MOEJAX_FP8_DENSE must be 'xla' or 'pallas', got {FP8_DENSE!r}")


def _one_device() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.axis_names or all(s == 1 for s in mesh.axis_sizes)


def matmul(x, w):
    """x [..., K] @ w [K, N] with float32 accumulation; returns x's dtype. Accepts quantized weights."""
    import jax.numpy as jnp

    from moejax.kernels.quant import as_array

    if FP8_DENSE == "pallas":
        from moejax.kernels import pallas_experts

        use, interpret = _pallas()
        if use and pallas_experts.dense_supported(w) and _one_device():
            return pallas_experts.linear_fp8(x, w, interpret=interpret)
    return jnp.matmul(x, as_array(w, x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def route(router_logits, config: RoutingConfig, correction_bias=None):
    """Router logits [T, E] -> (weights float32 [T, k], ids int32 [T, k])."""
    use, interpret = _pallas()
    if use:
        from moejax.kernels.pallas_routing import route_pallas

        return route_pallas(router_logits, config, correction_bias, interpret=interpret)
    return route_reference(router_logits, config, correction_bias)


def experts(x_TD, weights_TK, ids_TK, params: ExpertWeights, activation: Activation = Activation()):
    """Weighted sum of each token's top-k experts: [T, D] -> [T, D]. The weights may be `LayerWeight`s, one layer
    of a stack (the Pallas kernels read it in place; the reference takes the slice)."""
    import dataclasses

    from moejax.kernels import host_experts
    from moejax.kernels.layer_weight import unstacked

    if host_experts.on_host(params):  # offloaded: bring this step's routed experts to the device
        params, ids_TK = host_experts.fetch_routed(ids_TK, params, params.w_gate.shape[0])
    use, interpret = _pallas()
    if use:
        from moejax.kernels import pallas_experts

        if pallas_experts.supported(params, activation, x_TD.shape[-1]):
            return pallas_experts.experts_pallas(x_TD, weights_TK, ids_TK, params, activation, interpret=interpret)
    params = ExpertWeights(*(unstacked(getattr(params, f.name)) for f in dataclasses.fields(params)))
    return experts_reference(x_TD, weights_TK, ids_TK, params, activation)


__all__ = [
    "Activation",
    "attention_kernel",
    "ExpertWeights",
    "LayerWeight",
    "RoutingConfig",
    "experts",
    "experts_reference",
    "gated_activation",
    "get_backend",
    "grouped_topk",
    "moe_align_block_size",
    "paged_attention",
    "set_backend",
    "matmul",
    "route",
    "route_reference",
]
