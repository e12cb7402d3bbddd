"""The engine's model split into pipeline stages: each stage's devices hold only its layers and their KV cache.

The step stays one SPMD program. Each run of identically built layers is stacked stage-major as
[pp * slots, ...] over the `pipeline` mesh axis (sharding/pipeline.py: a stage's own layers first, zeros in the
slots it does not use), and so are the KV pools' layers. Inside a shard_map manual over `pipeline` only (tensor,
expert and data stay XLA's), the step's flat batch is cut into M micro-batches along whole sequences: the
decode tokens into M equal groups, the prefill blocks into M equal groups of blocks (a chunk cut in two
attends to its first part through the pages, which the earlier micro-batch has already written, exactly as a
chunked prefill does). Micro-batch m is at stage s in iteration m + s, so after the first pp - 1 iterations
every stage works on a different micro-batch: M + pp - 1 stage times a step instead of M * pp. Activations move
to the next stage with one collective permute per iteration; the last stage's hidden states reach every stage
with one all-reduce, and the logits are computed from the vocabulary split over pipeline x tensor ranks.
Iterations where a stage has no micro-batch compute on zeros and write nothing (their KV slots are dropped).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.kernels.attention_reference import NO_WINDOW
from moejax.kernels.layer_weight import LayerWeight
from moejax.kernels.quant import QuantizedWeight
from moejax.layers.kv_cache import KVPool, LayerKV, PagedBatch, commit
from moejax.models.stacked import Run, _split_in_place
from moejax.sharding.mesh import stage_mesh
from moejax.sharding.pipeline import StageSplit
from moejax.sharding.rules import PIPELINE


def micro_batches(num_decode: int, num_blocks: int, pp: int) -> int:
    """How many micro-batches a step of these decode slots and prefill blocks is cut into: the most, up to pp,
    that divide both evenly (every micro-batch has the same shape: one program for every stage)."""
    return max(m for m in range(1, pp + 1) if num_decode % m == 0 and num_blocks % m == 0)


class PipelinedModel:
    """StackedModel's interface (params, forward, unstacked) with the layers in pipeline stages."""

    def __init__(self, graphdef: nnx.GraphDef, state: nnx.State, mesh, split: StageSplit, *,
                 free_source: bool = True):
        model = nnx.merge(graphdef, state)
        self.config = model.config
        self.mesh = mesh
        self.split = split
        parts = [nnx.split(layer) for layer in model.layers]
        model.layers = nnx.List([])
        self.top_graphdef, top_state = nnx.split(model)
        for r in split.runs:
            if any(parts[i][0] != parts[r.start][0] for i in r):
                raise ValueError(f"layers {r.start}-{r.stop - 1} are not built alike; pipeline stages need runs "
                                 f"of identical layers")
        self.runs = tuple(Run(r.start, r.stop, parts[r.start][0]) for r in split.runs)
        self.slot_layers = [np.asarray(split.slot_layers(r), np.int32) for r in range(len(self.runs))]  # [pp, n]
        windows = np.asarray([self.config.window(i) or NO_WINDOW for i in range(len(parts))], np.int32)
        self.slot_windows = [np.where(t >= 0, windows[np.maximum(t, 0)], NO_WINDOW).astype(np.int32)
                             for t in self.slot_layers]
        moe_row = np.cumsum(self.config.moe_layers) - 1
        num_moe = int(sum(self.config.moe_layers))
        self.slot_moe_rows = [np.where((t >= 0) & np.asarray(self.config.moe_layers)[np.maximum(t, 0)],
                                       moe_row[np.maximum(t, 0)], num_moe).astype(np.int32)
                              for t in self.slot_layers]
        stacked = []
        for r, run in enumerate(self.runs):
            layers = [jax.tree.leaves(parts[i][1]) for i in range(run.start, run.stop)]
            structure = jax.tree.structure(parts[run.start][1])
            leaves = [self._stack_leaf(r, [layer[k] for layer in layers], free_source)
                      for k in range(len(layers[0]))]
            stacked.append(jax.tree.unflatten(structure, leaves))
        self.params = {"top": top_state, "runs": stacked}

    def _stack_leaf(self, r: int, arrays: list[jax.Array], free: bool) -> jax.Array:
        """One leaf of run r's layers (in layer order) as [pp * slots, ...] over `pipeline`: each stage's slice
        stacked on that stage's devices (empty slots zero), then the slices joined without moving data."""
        split, run = self.split, self.runs[r]
        slots = split.slots[r]
        spec = arrays[0].sharding.spec if isinstance(arrays[0].sharding, NamedSharding) else P()
        shape, dtype = arrays[0].shape, arrays[0].dtype
        per_device = {}
        for s in range(split.pp):
            sub = stage_mesh(self.mesh, s)
            layer_sharding = NamedSharding(sub, spec)
            n, first = split.count(r, s), split.first_layer(r, s)
            mine = [jax.device_put(a, layer_sharding) for a in arrays[first - run.start: first - run.start + n]]
            part = _stacker(shape, dtype, len(mine), slots, NamedSharding(sub, P(None, *spec)))(*mine)
            per_device.update({shard.device: shard.data for shard in part.addressable_shards})
        if free:
            for a in arrays:
                a.delete()
        sharding = NamedSharding(self.mesh, P(PIPELINE, *spec))
        global_shape = (split.pp * slots, *shape)
        devices = sharding.addressable_devices_indices_map(global_shape)
        return jax.make_array_from_single_device_arrays(global_shape, sharding, [per_device[d] for d in devices])

    def unstacked(self, params=None) -> tuple[nnx.GraphDef, nnx.State]:
        """The model as it was loaded, one state per layer (a copy: for inspection and tests)."""
        params = self.params if params is None else params
        model = nnx.merge(self.top_graphdef, params["top"])
        layers = [None] * self.config.num_layers
        for r, (run, stacked) in enumerate(zip(self.runs, params["runs"])):
            for s, row in enumerate(self.slot_layers[r]):
                for j, layer in enumerate(row):
                    if layer >= 0:
                        index = s * self.split.slots[r] + j
                        layers[layer] = nnx.merge(run.graphdef, jax.tree.map(lambda x: x[index], stacked))
        model.layers = nnx.List(layers)
        return nnx.split(model)

    def forward(self, params, tokens_T, positions_T, pool: KVPool | None = None, batch: PagedBatch | None = None,
                count_experts: bool = False):
        """StackedModel.forward's contract: (hidden [T, D], updated pool, top module, expert counts or None)."""
        top = nnx.merge(self.top_graphdef, params["top"])
        x_TD = top.embed(tokens_T[None])[0]
        t = tokens_T.shape[0]
        pp = self.split.pp
        if batch is None:
            m, idx = 1, np.arange(t)[None]
            meta = {}
        else:
            nd, qb = batch.num_decode, batch.prefill_block
            nb = (t - nd) // qb
            m = micro_batches(nd, nb, pp)
            dm, bm = nd // m, nb // m
            idx = np.stack([np.concatenate([i * dm + np.arange(dm), nd + i * bm * qb + np.arange(bm * qb)])
                            for i in range(m)])
            first = batch.prefill_first_B.reshape(m, bm) - (np.arange(m) * bm)[:, None]
            meta = {"slot_page": batch.slot_page_T[idx], "slot_offset": batch.slot_offset_T[idx],
                    "decode_pages": batch.decode_pages_DP.reshape(m, dm, batch.decode_pages_DP.shape[1]),
                    "prefill_pages": batch.prefill_pages_BP.reshape(m, bm, batch.prefill_pages_BP.shape[1]),
                    "prefill_first": jnp.maximum(first, 0)}
        inputs = {"x": x_TD[idx], "positions": positions_T[idx], **meta}
        num_moe = int(sum(self.config.moe_layers))
        stage_fn = functools.partial(self._stages, micro=m, batch=batch, count_experts=count_experts,
                                     num_moe=num_moe)
        stage_specs = jax.tree.map(lambda _: P(PIPELINE), (params["runs"], pool))
        mapped = jax.shard_map(
            stage_fn, in_specs=(jax.tree.map(lambda _: P(), inputs), *stage_specs),
            out_specs=(P(), stage_specs[1], P()), axis_names={PIPELINE}, check_vma=False)
        hidden_MTD, pool, counts = mapped(inputs, params["runs"], pool)
        hidden_TD = jnp.zeros_like(x_TD).at[idx.reshape(-1)].set(hidden_MTD.reshape(t, -1))
        return hidden_TD, pool, top, counts if count_experts and num_moe else None

    def _stages(self, inputs, runs_params, pool, *, micro, batch, count_experts, num_moe):
        """One stage's side of the pipeline (manual over `pipeline`): micro-batch i at iteration i + stage."""
        pp = self.split.pp
        stage = jax.lax.axis_index(PIPELINE)
        x_MTD = inputs["x"]
        count = count_experts and num_moe > 0

        # One loop iteration (traced once, not unrolled: the step compiles as one stage time's program)
        def iteration(state, it):
            carry_TD, out_MTD, pool, counts = state
            i = it - stage
            active = (i >= 0) & (i < micro)
            ic = jnp.clip(i, 0, micro - 1)
            x_TD = jnp.where(stage == 0, x_MTD[jnp.minimum(it, micro - 1)], carry_TD)
            mb = None
            if batch is not None:
                mb = PagedBatch(jnp.where(active, inputs["slot_page"][ic], pool.num_pages), inputs["slot_offset"][ic],
                                inputs["decode_pages"][ic], inputs["prefill_pages"][ic], inputs["prefill_first"][ic],
                                batch.num_decode // micro, batch.prefill_block)
            x_TD, pool, layer_counts = self._stage_layers(runs_params, x_TD, inputs["positions"][ic], pool, mb,
                                                          stage, count)
            if layer_counts is not None:
                counts = counts + jnp.where(active, layer_counts, 0)
            out_MTD = jnp.where(active & (stage == pp - 1), out_MTD.at[ic].set(x_TD), out_MTD)
            carry_TD = jax.lax.ppermute(x_TD, PIPELINE, [(s, s + 1) for s in range(pp - 1)])
            return (carry_TD, out_MTD, pool, counts), None

        counts = jnp.zeros((num_moe, self.config.num_experts), jnp.int32)
        state = (jnp.zeros_like(x_MTD[0]), jnp.zeros_like(x_MTD), pool, counts)
        (_, out_MTD, pool, counts), _ = jax.lax.scan(iteration, state, jnp.arange(micro + pp - 1))
        hidden_MTD = jax.lax.psum(jnp.where(stage == pp - 1, out_MTD, jnp.zeros_like(out_MTD)), PIPELINE)
        return hidden_MTD, pool, jax.lax.psum(counts, PIPELINE)

    def _stage_layers(self, runs_params, x_TD, positions_T, pool, batch, stage, count_experts):
        """This stage's layers over one micro-batch: each run's slots scanned, empty slots passing x through;
        each run's keys and values written with one scatter into this stage's pools."""
        counts = None
        positions_BT = positions_T[None]
        x = x_TD[None]
        for r, (run, run_params) in enumerate(zip(self.runs, runs_params)):
            n = self.split.slots[r]
            first_slot = sum(self.split.slots[:r])
            layers = jnp.asarray(self.slot_layers[r])[stage]
            scanned, in_place = _split_in_place(run_params)
            xs = (scanned, jnp.arange(n), jnp.maximum(layers, 0), jnp.asarray(self.slot_windows[r])[stage],
                  layers >= 0)

            def body(x, xs, run=run, in_place=in_place, first_slot=first_slot):
                layer_params, j, i, window, used = xs
                stacked = jax.tree.map(lambda w: LayerWeight(w, j), in_place,
                                       is_leaf=lambda w: isinstance(w, QuantizedWeight))
                layer = nnx.merge(run.graphdef, layer_params, stacked)
                kv = None if pool is None else LayerKV(pool, batch, first_slot + j)
                y, kv, routing = layer(x, positions_BT, kv, window, i)
                ys = {"kv": None if kv is None else (kv.k_TKD, kv.v_TKD)}
                if count_experts and routing is not None:
                    valid_T = ((positions_BT[0] >= 0) & used).astype(jnp.int32)
                    ids_TK = routing.ids_TK
                    ys["counts"] = jnp.zeros(self.config.num_experts, jnp.int32).at[ids_TK].add(
                        jnp.broadcast_to(valid_T[:, None], ids_TK.shape), mode="drop")
                return jnp.where(used, y, x), ys

            x, ys = jax.lax.scan(body, x, xs)
            if "counts" in ys:
                rows = jnp.asarray(self.slot_moe_rows[r])[stage]
                add = jnp.zeros((int(sum(self.config.moe_layers)), self.config.num_experts), jnp.int32)
                add = add.at[rows].add(ys["counts"], mode="drop")
                counts = add if counts is None else counts + add
            if pool is not None:
                with jax.named_scope("kv_write"):
                    pool = commit(pool, batch, first_slot + jnp.arange(n), *ys["kv"])
        return x[0], pool, counts


@functools.lru_cache(maxsize=None)
def _stacker(shape, dtype, count: int, slots: int, sharding):
    """[count layers] + zeros -> [slots, *shape] on one stage's devices."""
    def stack(*xs):
        pad = jnp.zeros((slots - count, *shape), dtype)
        return jnp.concatenate([jnp.stack(xs), pad]) if xs else pad

    return jax.jit(stack, out_shardings=sharding)


__all__ = ["PipelinedModel", "micro_batches"]
