"""The engine's form of a model: runs of identically built layers stacked on a leading axis, run under lax.scan.

XLA compiles one layer body per run instead of one per layer, which is what keeps compiling a 48- or 94-layer
model in seconds. A run is a maximal stretch of consecutive layers with the same graph (DeepSeek's dense first
layers are one run, its MoE layers another); per-layer differences that are data (GPT-OSS's alternating
sliding windows) are scanned over as arrays. Parameters are stacked once, one leaf at a time with its source
freed, so loading needs at most one stacked leaf of extra memory.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.compiling import compile_all
from moejax.kernels import host_experts
from moejax.kernels.attention_reference import NO_WINDOW
from moejax.kernels.layer_weight import LayerWeight
from moejax.kernels.quant import QuantizedWeight
from moejax.layers.kv_cache import KVPool, LayerKV, PagedBatch, commit


@dataclasses.dataclass(frozen=True)
class Run:
    start: int
    stop: int
    graphdef: nnx.GraphDef


def _stacked_sharding(x):
    s = getattr(x, "sharding", None)
    if isinstance(s, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(None, *s.spec),
                                          memory_kind=s.memory_kind)
    return None


def _in_host_memory(x) -> bool:
    s = getattr(x, "sharding", None)
    return s is not None and s.memory_kind not in (None, "device")


def _stack_all(groups: list[tuple], free: bool) -> list[jax.Array]:
    """Each group of per-layer arrays stacked on a new leading axis, one group at a time with its sources
    freed; the stacking programs (one per distinct shape) are compiled together first."""
    def stacker(arrays):
        return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=_stacked_sharding(arrays[0]))

    def key(arrays):
        return len(arrays), arrays[0].shape, arrays[0].dtype, tuple(getattr(a, "sharding", None) for a in arrays)

    # Arrays in host memory (offloaded experts) are stacked there, never passing through the device.
    distinct = {key(g): g for g in groups if not _in_host_memory(g[0])}
    compiled = dict(zip(distinct, compile_all([stacker(g).lower(*g) for g in distinct.values()])))
    out = []
    for arrays in groups:
        if _in_host_memory(arrays[0]):
            out.append(_stack_on_host(arrays, free))
            continue
        out.append(compiled[key(arrays)](*arrays))
        if free:
            for a in arrays:
                a.delete()
    return out


def _stack_on_host(arrays: list[jax.Array], free: bool) -> jax.Array:
    """Host-memory arrays stacked in host memory: each layer is copied into one numpy buffer and (free) let go
    at once, so the host holds about one extra copy of a single group at the peak rather than of every layer."""
    sharding = _stacked_sharding(arrays[0])
    stacked = np.empty((len(arrays), *arrays[0].shape), arrays[0].dtype)
    for i, a in enumerate(arrays):
        stacked[i] = np.asarray(a)
        if free:
            a.delete()
    return jax.device_put(stacked, sharding)


def _split_in_place(run_params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(parameters the scan slices per layer, parameters left stacked): the routed experts (first logical axis
    "experts" after the layer axis) stay whole, since slicing them inside the scan would copy each layer's
    experts every step."""
    def experts(path, variable):
        axes = variable.get_metadata().get("logical_axes") or ()
        return bool(axes) and axes[0] == "experts"

    in_place, scanned = nnx.split_state(run_params, experts, ...)
    return scanned, in_place


def run_experts(run_params: nnx.State):
    """The routed expert weights of a run's stacked state as ExpertWeights ([L, E, ...] leaves), or None."""
    from moejax.kernels.experts import ExpertWeights

    _, in_place = _split_in_place(run_params)
    found = {path[-1]: var.get_value() for path, var in nnx.to_flat_state(in_place)}
    if "w_gate" not in found:
        return None
    return ExpertWeights(**{k: found.get(k) for k in ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")})


class StackedModel:
    """Pure functions over `params` = {"top": embeddings, final norm, lm_head; "runs": stacked layer states;
    optionally "caches": per run a host_experts.ExpertCache of its offloaded experts, or None}."""

    def __init__(self, graphdef: nnx.GraphDef, state: nnx.State, *, free_source: bool = True):
        model = nnx.merge(graphdef, state)
        self.config = model.config
        parts = [nnx.split(layer) for layer in model.layers]
        model.layers = nnx.List([])
        self.top_graphdef, top_state = nnx.split(model)
        runs, start = [], 0
        for i in range(1, len(parts) + 1):
            if i == len(parts) or parts[i][0] != parts[start][0]:
                runs.append(Run(start, i, parts[start][0]))
                start = i
        self.runs = tuple(runs)
        self.windows = np.asarray([self.config.window(i) or NO_WINDOW for i in range(len(parts))], np.int32)
        # Each run's layer states leaf by leaf: [leaf][layer] -> one stacked leaf.
        trees = [[parts[j][1] for j in range(r.start, r.stop)] for r in self.runs]
        leaves = [[jax.tree.leaves(t) for t in run] for run in trees]
        groups = [tuple(layer[i] for layer in run) for run in leaves for i in range(len(run[0]))]
        flat = iter(_stack_all(groups, free_source))
        stacked = [jax.tree.unflatten(jax.tree.structure(run[0]), [next(flat) for _ in run_leaves[0]])
                   for run, run_leaves in zip(trees, leaves)]
        self.params = {"top": top_state, "runs": stacked}

    def unstacked(self, params=None) -> tuple[nnx.GraphDef, nnx.State]:
        """The model as it was loaded, one state per layer (a copy: for inspection and tests)."""
        params = self.params if params is None else params
        model = nnx.merge(self.top_graphdef, params["top"])
        layers = []
        for run, stacked in zip(self.runs, params["runs"]):
            for j in range(run.stop - run.start):
                layers.append(nnx.merge(run.graphdef, jax.tree.map(lambda x: x[j], stacked)))
        model.layers = nnx.List(layers)
        return nnx.split(model)

    def forward(self, params, tokens_T, positions_T, pool: KVPool | None = None, batch: PagedBatch | None = None,
                count_experts: bool = False):
        """Flat tokens [T] -> (hidden [T, D] before the final norm, updated pool, the top module for logits,
        expert counts).

        Without a pool the tokens are one sequence attending causally among themselves. count_experts: also
        count, on the device, the tokens (positions >= 0) each MoE layer routed to each expert: int32
        [MoE layers, experts] in layer order (None when not asked)."""
        counts = []
        top = nnx.merge(self.top_graphdef, params["top"])
        x = top.embed(tokens_T[None])
        positions_BT = positions_T[None]
        # Device caches of offloaded experts, one per run or None (engine/expert_cache.py)
        caches = params.get("caches") or [None] * len(self.runs)
        for run, run_params, cache in zip(self.runs, params["runs"], caches):
            layers = jnp.arange(run.start, run.stop)
            scanned, in_place = _split_in_place(run_params)
            xs = (scanned, jnp.arange(run.stop - run.start), layers, jnp.asarray(self.windows[run.start:run.stop]))

            # The pools are read-only inside the scan; each layer's new keys and values come out as the scan's
            # outputs and are written with one scatter per run, in place into the donated pools.
            def body(x, xs, run=run, pool=pool, in_place=in_place, cache=cache):
                layer_params, j, i, window = xs
                # Expert weights stay stacked: the expert kernels read layer j of the stack in place.
                stacked = jax.tree.map(lambda w: LayerWeight(w, j), in_place,
                                       is_leaf=lambda w: isinstance(w, QuantizedWeight))
                layer = nnx.merge(run.graphdef, layer_params, stacked)
                kv = None if pool is None else LayerKV(pool, batch, i)
                with host_experts.layer_cache(cache, j):
                    x, kv, routing = layer(x, positions_BT, kv, window, i)
                ys = {"kv": None if kv is None else (kv.k_TKD, kv.v_TKD)}
                if count_experts and routing is not None:
                    valid_T = (positions_BT[0] >= 0).astype(jnp.int32)
                    ids_TK = routing.ids_TK
                    ys["counts"] = jnp.zeros(self.config.num_experts, jnp.int32).at[ids_TK].add(
                        jnp.broadcast_to(valid_T[:, None], ids_TK.shape), mode="drop")
                return x, ys

            x, ys = jax.lax.scan(body, x, xs)
            new = ys["kv"]
            if "counts" in ys:
                counts.append(ys["counts"])
            if pool is not None:
                with jax.named_scope("kv_write"):
                    pool = commit(pool, batch, layers, *new)
        expert_counts = jnp.concatenate(counts) if counts else None
        return x[0], pool, top, expert_counts
