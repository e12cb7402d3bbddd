"""The one table that maps parameter and cache logical axes to mesh axes.

Model code names axes logically (`vocab`, `embed`, `q_heads`, ...); changing a parallel layout means editing
`LOGICAL_AXIS_RULES`, never model code.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Mapping, Sequence

from jax.sharding import PartitionSpec

# Mesh axis names.
DATA = "data"
TENSOR = "tensor"
EXPERT = "expert"
MESH_AXES = (DATA, EXPERT, TENSOR)

# logical axis -> mesh axis (None: replicated).
LOGICAL_AXIS_RULES: Mapping[str, str | None] = {
    "vocab": TENSOR,  # embeddings and lm_head split over the vocabulary
    "embed": None,  # the residual stream is replicated
    "q_heads": TENSOR,  # flattened heads * head_dim of q and o projections
    "kv_heads": TENSOR,  # flattened kv_heads * head_dim; replicated when kv heads < tensor ranks
    "heads": TENSOR,  # per-head vectors (attention sinks)
    "head_dim": None,
    "mlp": TENSOR,  # dense and shared-expert MLP width
    "experts": EXPERT,  # routed experts
    "expert_mlp": TENSOR,  # a routed expert's width
    "router": None,  # router output (one logit per expert), small: replicated
    "latent": None,  # MLA compressed dims
    "batch": DATA,  # KV cache and activations
    "seq": None,
}


# The one variation of the table: `enable_expert_parallel` (vLLM's name) splits the routed experts whole over the
# tensor-parallel ranks that also split attention, instead of each expert's width. A context (not a second
# table) so that model code stays layout-free: the engine enters it around loading and tracing.
_EXPERTS_AXIS: contextvars.ContextVar[str] = contextvars.ContextVar("moejax_experts_axis", default=EXPERT)


@contextlib.contextmanager
def experts_over(mesh_axis: str):
    """Within this context the "experts" logical axis maps to `mesh_axis` (EXPERT, or TENSOR for
    enable_expert_parallel); a routed expert's width is then split only if another axis is left for it."""
    if mesh_axis not in (EXPERT, TENSOR):
        raise ValueError(f"experts go over {EXPERT!r} or {TENSOR!r}, not {mesh_axis!r}")
    token = _EXPERTS_AXIS.set(mesh_axis)
    try:
        yield
    finally:
        _EXPERTS_AXIS.reset(token)


def experts_axis() -> str:
    """The mesh axis routed experts are split over in the current context."""
    return _EXPERTS_AXIS.get()


def logical_to_spec(
    axes: Sequence[str | None], mesh_shape: Mapping[str, int] | None = None, shape: Sequence[int] | None = None
) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes.

    With `mesh_shape` and `shape`, an axis whose size the mesh axis does not divide is replicated instead
    (kv heads fewer than tensor ranks); a mesh axis of size 1 is dropped. A mesh axis already used by an
    earlier axis of the array is not used again (experts over `tensor` leave their width whole).
    """
    spec: list[str | None] = []
    used: set[str] = set()
    for i, name in enumerate(axes):
        mesh_axis = (experts_axis() if name == "experts" else LOGICAL_AXIS_RULES.get(name)) \
            if name is not None else None
        if mesh_axis is not None and mesh_shape is not None:
            size = mesh_shape.get(mesh_axis, 1)
            if size == 1 or (shape is not None and shape[i] % size):
                mesh_axis = None
        if mesh_axis in used:
            mesh_axis = None
        if mesh_axis is not None:
            used.add(mesh_axis)
        spec.append(mesh_axis)
    return PartitionSpec(*spec)
