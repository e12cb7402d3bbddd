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
PIPELINE = "pipeline"  # stages of consecutive layers (sharding/pipeline.py)
MESH_AXES = (PIPELINE, DATA, EXPERT, TENSOR)

# logical axis -> mesh axis (None: replicated).
LOGICAL_AXIS_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    # embeddings and lm_head split over the vocabulary, on every pipeline stage (each holds 1 / (pp * tp))
    "vocab": (PIPELINE, TENSOR),
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
    "layers": PIPELINE,  # stacked layers and the KV pools' layer axis: each stage its own layers
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
    earlier axis of the array is not used again (experts over `tensor` leave their width whole). A rule of
    several mesh axes splits over all of them, dropping the outer ones first until the size divides.
    """
    spec: list = []
    used: set[str] = set()
    for i, name in enumerate(axes):
        rule = (experts_axis() if name == "experts" else LOGICAL_AXIS_RULES.get(name)) if name is not None else None
        mesh_axes = [] if rule is None else [rule] if isinstance(rule, str) else list(rule)
        mesh_axes = [a for a in mesh_axes if a not in used]
        if mesh_shape is not None:
            mesh_axes = [a for a in mesh_axes if mesh_shape.get(a, 1) > 1]
            while mesh_axes and shape is not None and shape[i] % _product(mesh_shape, mesh_axes):
                mesh_axes = mesh_axes[1:]
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
    return PartitionSpec(*spec)


def _product(mesh_shape: Mapping[str, int], mesh_axes: Sequence[str]) -> int:
    n = 1
    for a in mesh_axes:
        n *= mesh_shape.get(a, 1)
    return n


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
