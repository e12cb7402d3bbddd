"""The model runner: one jitted step over a flat, ragged batch of prefill chunks and decodes.

A step's shape is fixed by two bucketed numbers, the decode slots D and the prefill slots P (a multiple of the
prefill block), so a long mixed workload compiles a small fixed set of variants (`step_shapes`). Everything a
step needs from the host (tokens, positions, KV slots, page tables, sampling settings) is packed into one int32
buffer and sent as one transfer. Decode tokens that the previous step sampled are taken from that step's
device output (`prev_src`), so the host can launch step n+1 before it has read step n's tokens.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.engine import executable_cache
from moejax.engine.sampling import MAX_LOGPROBS, SamplingBatch, sample
from moejax.engine.scheduler import ScheduledStep
from moejax.layers.kv_cache import POOL_AXES, KVPool, PagedBatch, init_pool, pool_shape
from moejax.layers.moe import routing_func
from moejax.compiling import compile_threads
from moejax.models.pipelined import PipelinedModel
from moejax.models.stacked import StackedModel
from moejax.sharding.pipeline import StageSplit
from moejax.sharding.mesh import mesh_shape, sharding_for_axes
from moejax.sharding.rules import EXPERT, TENSOR, experts_over, spec_axes

logger = logging.getLogger("moejax")


MIXED_DECODE_STEP = 8  # decode slots of mixed steps go up by this factor


def bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """The smallest power of two >= n (and >= minimum), capped at maximum when that still holds n."""
    size = max(minimum, 1 << max(0, (n - 1).bit_length()))
    if maximum is not None and n <= maximum < size:
        return maximum
    return size


@dataclasses.dataclass(frozen=True)
class StepShape:
    num_decode: int  # D decode slots
    num_prefill: int  # P prefill slots, a multiple of the prefill block
    num_logprobs: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_decode + self.num_prefill


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The step shapes a runner compiles: decode-only steps in powers of two; steps with prefill slots in
    powers of two of the prefill block, with 8, 64, 512... decode slots (a prefill step without decodes runs
    with 8 padded ones: they cost it little, and every shape costs start-up a compile)."""

    max_decode: int
    max_prefill: int
    prefill_block: int

    def decode_sizes(self, mixed: bool) -> list[int]:
        sizes, n = [], MIXED_DECODE_STEP if mixed else 1
        while n < self.max_decode:
            sizes.append(n)
            n *= MIXED_DECODE_STEP if mixed else 2
        return sizes + [self.max_decode]

    def prefill_sizes(self) -> list[int]:
        sizes, n = [], self.prefill_block
        while n < self.max_prefill:
            sizes.append(n)
            n *= 2
        return sizes + [self.max_prefill]

    def shape(self, num_decode: int, num_prefill: int, num_logprobs: int = 0) -> StepShape:
        pick = lambda n, sizes: next(s for s in sizes if s >= n)  # noqa: E731
        p = pick(num_prefill, self.prefill_sizes()) if num_prefill else 0
        return StepShape(pick(num_decode, self.decode_sizes(mixed=p > 0)), p, num_logprobs)

    def all_shapes(self) -> list[StepShape]:
        shapes = [StepShape(d, 0) for d in self.decode_sizes(False)]
        for p in self.prefill_sizes():
            shapes += [StepShape(d, p) for d in self.decode_sizes(True)]
        return shapes

    @property
    def max_sample_rows(self) -> int:
        return self.max_decode + self.max_prefill // self.prefill_block


_RING = 3
_INT_FIELDS = ("tokens", "prev_src", "positions", "slot_page", "slot_offset")
_ROW_FIELDS = ("sample_index", "temperature", "top_p", "top_k", "min_p", "seed", "step")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p")


def layout(shape: StepShape, prefill_block: int, max_pages: int) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Offset and shape of every field inside the packed int32 step input."""
    t, d = shape.num_tokens, shape.num_decode
    nb = shape.num_prefill // prefill_block
    fields = [(name, (t,)) for name in _INT_FIELDS]
    fields += [("decode_pages", (d, max_pages)), ("prefill_pages", (nb, max_pages)), ("prefill_first", (nb,))]
    fields += [(name, (d + nb,)) for name in _ROW_FIELDS]
    out, offset = {}, 0
    for name, dims in fields:
        out[name] = (offset, dims)
        offset += int(np.prod(dims))
    out["_size"] = (offset, ())
    return out


@dataclasses.dataclass
class InFlight:
    """A launched step: its schedule and the device results the host reads one step later."""

    scheduled: ScheduledStep
    rows: list  # (sequence, output index) per sample row, None for rows that sample nothing
    tokens: jax.Array
    logprobs: jax.Array
    top: tuple | None
    expert_counts: jax.Array | None = None  # [MoE layers, experts], when the runner counts them
    num_tokens: int = 0  # the step shape's token slots (padding included)

    def fetch(self):
        top = None if self.top is None else (np.asarray(self.top[0]), np.asarray(self.top[1]))
        return np.asarray(self.tokens), np.asarray(self.logprobs), top


class ModelRunner:
    def __init__(self, graphdef: nnx.GraphDef, state: nnx.State, mesh, *, num_pages: int, page_size: int,
                 kv_dtype, max_model_len: int, buckets: Buckets, matmul_precision: str | None = None,
                 pool: KVPool | None = None, experts_axis: str = EXPERT, stages: StageSplit | None = None,
                 attention_ranks: int = 1):
        # DP attention (attention_ranks > 1, the expert ranks): each rank its own requests, step inputs and
        # pages (num_pages each); the step runs inside a shard_map manual over `expert` and the MoE layers
        # dispatch with all-to-all (sharding/expert_parallel.all_to_all_experts)
        self.attention_ranks = attention_ranks
        self.experts_axis = experts_axis  # the mesh axis routed experts are split over (rules.experts_over)
        # pipeline stages (stages.pp > 1): each stage's devices hold its layers and their pools
        self.stages = stages if stages is not None and stages.pp > 1 else None
        self.model = StackedModel(graphdef, state) if self.stages is None else \
            PipelinedModel(graphdef, state, mesh, self.stages)
        self.graphdef = graphdef
        self.params = self.model.params
        self.config = self.model.config
        self.mesh = mesh
        self.matmul_precision = matmul_precision
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_pages = -(-max_model_len // page_size)
        self.buckets = buckets
        self.prefill_block = buckets.prefill_block
        layers = None if self.stages is None else self.stages.pp * self.stages.slots_per_stage
        self.pool = pool if pool is not None else allocate_pool(self.config, mesh, num_pages, page_size, kv_dtype,
                                                                layers, attention_ranks)
        self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        # per rank under DP attention: the step inputs and the tokens fed back, [ranks, ...] split over `expert`
        self._by_rank = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(EXPERT)) \
            if attention_ranks > 1 else self._replicated
        prev_shape = (attention_ranks, buckets.max_sample_rows) if attention_ranks > 1 else (buckets.max_sample_rows,)
        self._prev = jax.device_put(np.zeros(prev_shape, np.int32), self._by_rank)
        # the parameters' splits over `expert` (routed experts), for the DP-attention step's shard_map
        self._param_specs = jax.tree.map(lambda a: _expert_only(a.sharding.spec), self.params)
        # Per shape, a ring of host buffers: the transfer of a step's input (zero-copy on the CPU backend) may
        # still read its buffer after launch returns; by the time a buffer comes round again the host has read
        # the results of the step that used it.
        self._buffers: dict[StepShape, list[np.ndarray]] = {}
        # Executables compiled ahead of time by `warmup`, keyed by the step's static arguments; a step whose key
        # is here skips jit's dispatch-time tracing (the jitted `step` compiles anything else on first use).
        self._compiled: dict[tuple, jax.stages.Compiled] = {}
        self._program_fingerprint: str | None = None
        self.warmup_stats: dict = {}  # what the last warmup loaded, lowered and compiled, and how long it took
        self.warmed_up = False
        self.unexpected_compilations = 0
        # Count each MoE layer's routed tokens per expert inside the step (the server's expert metrics); a
        # static argument of the step, so turning it on compiles its own variants (warm up again after).
        self.count_experts = False
        # A user's function on every MoE layer's router logits before top-k (`LLM.register_moe_routing_func`):
        # a static argument too, so registering one compiles each step shape once more.
        self.routing_fn = None
        model = self.model
        max_rows = buckets.max_sample_rows

        # Outputs keep their inputs' shardings, so the pool and the sampled tokens fed back never change a step's
        # compiled variant.
        out_shardings = (self._replicated, self._by_rank, jax.tree.map(lambda a: a.sharding, self.pool))

        def local_step(params, pool: KVPool, packed, prev_sampled, shape: StepShape, count_experts: bool,
                       routing_fn):
            f = self._unpack(packed, shape)
            tokens_T = jnp.where(f["prev_src"] >= 0, prev_sampled[jnp.maximum(f["prev_src"], 0)], f["tokens"])
            batch = PagedBatch(f["slot_page"], f["slot_offset"], f["decode_pages"], f["prefill_pages"],
                               f["prefill_first"], shape.num_decode, self.prefill_block)
            with routing_func(routing_fn):
                hidden_TD, pool, top, counts = model.forward(params, tokens_T, f["positions"], pool, batch,
                                                             count_experts=count_experts)
            with jax.named_scope("lm_head"):
                logits_SV = top.logits(hidden_TD[f["sample_index"]])
            with jax.named_scope("sampling"):
                sampling = SamplingBatch(f["temperature"], f["top_p"], f["top_k"], f["min_p"],
                                         jax.lax.bitcast_convert_type(f["seed"], jnp.uint32), f["step"])
                tokens_S, logprobs_S, top_lp = sample(logits_SV, sampling, shape.num_logprobs)
            sampled = jnp.zeros(max_rows, jnp.int32).at[: tokens_S.shape[0]].set(tokens_S)
            return (tokens_S, logprobs_S, top_lp, counts), sampled, pool

        @functools.partial(jax.jit, donate_argnames=("pool",),
                           static_argnames=("shape", "count_experts", "routing_fn"), out_shardings=out_shardings)
        def step(params, pool: KVPool, packed, prev_sampled, shape: StepShape, count_experts: bool = False,
                 routing_fn=None):
            if self.attention_ranks == 1:
                results, sampled, pool = local_step(params, pool, packed, prev_sampled, shape, count_experts,
                                                    routing_fn)
                return _replicate(results), _replicate(sampled), pool
            return self._rank_step(local_step, params, pool, packed, prev_sampled, shape, count_experts,
                                   routing_fn)

        @functools.partial(jax.jit, static_argnames=("routing_fn",))
        def forward_logits(params, tokens_T, positions_T, routing_fn=None):
            with routing_func(routing_fn):
                hidden_TD, _, top, _ = model.forward(params, tokens_T, positions_T)
            return _replicate(top.logits(hidden_TD))

        self.step_fn = step
        self.forward_logits_fn = forward_logits

    def _rank_step(self, local_step, params, pool, packed_RN, prev_RS, shape, count_experts, routing_fn):
        """DP attention: every rank runs the step on its own row of inputs and its own pages; sampled rows come
        back rank-major ([ranks * rows]), expert counts summed over the ranks."""
        P = jax.sharding.PartitionSpec
        param_specs = self._param_specs
        pool_specs = jax.tree.map(lambda _: P(None, EXPERT), pool)

        def per_rank(params, pool, packed_1N, prev_1S):
            results, sampled, pool = local_step(params, pool, packed_1N[0], prev_1S[0], shape, count_experts,
                                                routing_fn)
            tokens, logprobs, top, counts = results
            if counts is not None:
                counts = jax.lax.psum(counts, EXPERT)
            ranked = jax.tree.map(lambda x: x[None], (tokens, logprobs, top))
            return (*ranked, counts), sampled[None], pool

        row_spec = P(EXPERT)
        top_spec = None if shape.num_logprobs == 0 else (row_spec, row_spec)
        mapped = jax.shard_map(
            per_rank, in_specs=(param_specs, pool_specs, row_spec, row_spec),
            out_specs=((row_spec, row_spec, top_spec, P()), row_spec, pool_specs), axis_names={EXPERT},
            check_vma=False)
        (tokens, logprobs, top, counts), sampled, pool = mapped(params, pool, packed_RN, prev_RS)
        flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), (tokens, logprobs, top))
        return _replicate((*flat, counts)), sampled, pool

    # -- inspection ----------------------------------------------------------------------------------------
    @property
    def state(self) -> nnx.State:
        """The parameters one state per layer, as loaded (a copy, for inspection and tests)."""
        return self.model.unstacked(self.params)[1]

    def compilations(self) -> int:
        """Compiled variants of the step so far (tests bound it; nothing should compile after warm-up)."""
        return len(self._compiled) + self.step_fn._cache_size()

    def step_temp_bytes(self, shape: StepShape) -> int:
        """Scratch memory the compiled step of `shape` needs beside its inputs and outputs. The pool is
        donated and updated in place, so this stays far below the pool's size (a copy of the pool would not)."""
        buf, _ = self._buffer(shape)
        with self._context():
            compiled = self.step_fn.lower(self.params, self.pool, buf, self._prev, shape).compile()
        return int(compiled.memory_analysis().temp_size_in_bytes)

    # -- inputs --------------------------------------------------------------------------------------------
    def _unpack(self, packed, shape: StepShape) -> dict:
        out = {}
        for name, (offset, dims) in layout(shape, self.prefill_block, self.max_pages).items():
            if name == "_size":
                continue
            x = packed[offset: offset + int(np.prod(dims))].reshape(dims)
            out[name] = jax.lax.bitcast_convert_type(x, jnp.float32) if name in _FLOAT_FIELDS else x
        return out

    def _buffer(self, shape: StepShape) -> tuple[np.ndarray, dict[str, np.ndarray] | list[dict[str, np.ndarray]]]:
        """The preallocated host buffer of a shape, reset to padding, and writable views of its fields (DP
        attention: [ranks, size], one dict of views per rank)."""
        lay = layout(shape, self.prefill_block, self.max_pages)
        ring = self._buffers.setdefault(shape, [])
        dims = (self.attention_ranks, lay["_size"][0]) if self.attention_ranks > 1 else (lay["_size"][0],)
        buf = np.zeros(dims, np.int32) if len(ring) < _RING else ring.pop(0)
        ring.append(buf)
        rows = [self._views(row, lay) for row in (buf if buf.ndim == 2 else [buf])]
        return buf, rows if buf.ndim == 2 else rows[0]

    def _views(self, row: np.ndarray, lay: dict) -> dict[str, np.ndarray]:
        views = {}
        for name, (offset, dims) in lay.items():
            if name != "_size":
                v = row[offset: offset + int(np.prod(dims))].reshape(dims)
                views[name] = v.view(np.float32) if name in _FLOAT_FIELDS else v
        row[:] = 0
        views["prev_src"][:] = -1
        views["positions"][:] = -1
        views["slot_page"][:] = self.num_pages  # out of range: the write is dropped
        views["top_p"][:] = 1.0
        views["prefill_first"][:] = np.arange(len(views["prefill_first"]))  # padding blocks: chunks of their own
        return views

    def prepare(self, scheduled, num_logprobs: int):
        """Fill the packed input of a schedule (DP attention: a RankedStep, each rank's own row, all ranks at
        the shape of the largest); returns (shape, buffer, sample rows: the sequence sampled at each row, rank
        major)."""
        qb = self.prefill_block
        steps = scheduled.ranks if self.attention_ranks > 1 else [scheduled]
        decodes = max(len(s.decodes) for s in steps if s is not None)
        slots = max(sum(-(-c.length // qb) * qb for c in s.prefills) for s in steps if s is not None)
        shape = self.buckets.shape(decodes, slots, num_logprobs)
        buf, views = self._buffer(shape)
        rows: list = []
        for step, f in zip(steps, views if self.attention_ranks > 1 else [views]):
            rows += self._fill(step, shape, f)
        return shape, buf, rows

    def _fill(self, scheduled: ScheduledStep | None, shape: StepShape, f: dict) -> list:
        """One (rank's) schedule into its views; returns its sample rows."""
        qb = self.prefill_block
        d = shape.num_decode
        rows: list = [None] * (d + shape.num_prefill // qb)
        if scheduled is None:  # an idle rank: all padding
            return rows
        ps = self.page_size

        def place(chunk, first_token, table_row, row):
            seq, start, n = chunk.seq, chunk.start, chunk.length
            ids = seq.tokens(start, start + n)
            sl = slice(first_token, first_token + n)
            known = [0 if t is None else t for t in ids]
            f["tokens"][sl] = known
            if None in ids:  # only a decode's input can still be in flight: it is the previous step's output
                f["prev_src"][first_token] = seq.sample_row
            pos = np.arange(start, start + n, dtype=np.int32)
            f["positions"][sl] = pos
            pages = np.asarray(seq.pages, np.int32)
            f["slot_page"][sl] = pages[pos // ps]
            f["slot_offset"][sl] = pos % ps
            table_row[: len(seq.pages)] = pages
            if chunk.samples:
                f["sample_index"][row] = first_token + n - 1
                p = seq.params
                f["temperature"][row], f["top_p"][row] = p.temperature, p.top_p
                f["top_k"][row], f["min_p"][row] = p.top_k, p.min_p
                f["seed"][row] = np.uint32(seq.seed & 0xFFFFFFFF).view(np.int32)
                f["step"][row] = len(seq.output_ids)
                rows[row] = seq

        for i, chunk in enumerate(scheduled.decodes):
            place(chunk, i, f["decode_pages"][i], i)
        block = 0
        for chunk in scheduled.prefills:
            nblocks = -(-chunk.length // qb)
            for b in range(block, block + nblocks):
                f["prefill_pages"][b][: len(chunk.seq.pages)] = chunk.seq.pages
                f["prefill_first"][b] = block
            place(chunk, d + block * qb, f["prefill_pages"][block], d + block)
            block += nblocks
        return rows

    # -- running -------------------------------------------------------------------------------------------
    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(jax.default_matmul_precision(self.matmul_precision))
        stack.enter_context(experts_over(self.experts_axis))
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
        return stack

    def _static(self, shape: StepShape) -> tuple:
        return shape, self.count_experts, self.routing_fn

    def _run(self, shape: StepShape, buf: np.ndarray):
        packed = jax.device_put(buf, self._by_rank)
        before = self.compilations() if self.warmed_up else None
        compiled = self._compiled.get(self._static(shape))
        with self._context():
            if compiled is not None:
                out = compiled(self.params, self.pool, packed, self._prev)
            else:
                out = self.step_fn(self.params, self.pool, packed, self._prev, *self._static(shape))
            (tokens, logprobs, top, counts), self._prev, self.pool = out
        if before is not None and self.compilations() != before:
            self.unexpected_compilations += 1
            logger.warning("step shape %s compiled after warm-up", shape)
        return tokens, logprobs, top, counts

    def launch(self, scheduled: ScheduledStep, num_logprobs: int = 0) -> InFlight:
        """Start a step on the device and its results' copy to the host; returns without waiting."""
        shape, buf, rows = self.prepare(scheduled, num_logprobs)
        tokens, logprobs, top, counts = self._run(shape, buf)
        for x in (tokens, logprobs, *(top or ()), *(() if counts is None else (counts,))):
            x.copy_to_host_async()
        sampled = []
        per_rank = len(rows) // self.attention_ranks
        for row, seq in enumerate(rows):
            if seq is not None:
                seq.sample_row = row % per_rank  # where its rank's next step finds the token (prev_src)
                sampled.append((row, seq, len(seq.output_ids)))
                seq.output_ids.append(None)
        return InFlight(scheduled, sampled, tokens, logprobs, top, counts, shape.num_tokens)

    def warmup(self, threads: int | None = None) -> int:
        """Compile every step shape ahead of time; returns how many. Shapes stored by an earlier process
        (executable_cache, on with JAX's persistent cache) load without tracing. The rest are traced and lowered
        one after the other (tracing holds the GIL) and compiled by `threads` workers at once (XLA releases the
        GIL while it compiles). MOEJAX_COMPILE_THREADS sets the default (the machine's cores)."""
        if threads is None:
            threads = compile_threads()
        shapes = self.buckets.all_shapes()
        todo = [s for s in shapes if self._static(s) not in self._compiled]
        t0 = time.perf_counter()
        where = executable_cache.directory() if self.routing_fn is None else None
        fingerprint = self._fingerprint() if where else None
        loaded = 0
        devices = list(self.mesh.devices.flat) if self.mesh is not None else jax.local_devices()[:1]
        if where:
            for shape in list(todo):
                executable = executable_cache.load(where, fingerprint, self._static(shape), devices)
                if executable is not None:
                    self._compiled[self._static(shape)] = executable
                    todo.remove(shape)
                    loaded += 1
        t1 = time.perf_counter()
        # Largest shapes first (their compiles are the longest); each compile starts as soon as its shape is
        # lowered, so lowering the rest overlaps the compiles.
        todo.sort(key=lambda s: -s.num_tokens)
        with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(todo) or 1))) as workers:
            futures = []
            with self._context():
                for shape in todo:
                    buf, _ = self._buffer(shape)
                    lowered = self.step_fn.lower(self.params, self.pool, buf, self._prev, *self._static(shape))
                    futures.append(workers.submit(lowered.compile))
            t2 = time.perf_counter()
            executables = [f.result() for f in futures]
        for shape, executable in zip(todo, executables):
            self._compiled[self._static(shape)] = executable
            if where:
                executable_cache.store(where, fingerprint, self._static(shape), executable)
        self.warmup_stats = {"loaded": loaded, "loaded_s": t1 - t0, "lowered": len(todo), "lowered_s": t2 - t1,
                             "compiled_s": time.perf_counter() - t2, "threads": threads}
        logger.info("step shapes: %d loaded from the executable cache in %.1f s, %d lowered in %.1f s while "
                    "compiling on %d threads, compiled %.1f s after that", loaded, t1 - t0, len(todo), t2 - t1,
                    threads, time.perf_counter() - t2)
        self.warmed_up = True
        return len(shapes)

    def _fingerprint(self) -> str:
        if self._program_fingerprint is None:
            facts = {"buckets": self.buckets, "page_size": self.page_size, "num_pages": self.num_pages,
                     "max_pages": self.max_pages, "matmul_precision": self.matmul_precision,
                     "experts_axis": self.experts_axis, "stages": self.stages, "attention_ranks": self.attention_ranks, "prev": (self._prev.shape, str(self._prev.sharding))}
            self._program_fingerprint = executable_cache.program_fingerprint(
                config=self.config, params=self.params, pool=self.pool, mesh=self.mesh, facts=facts)
        return self._program_fingerprint

    def forward_logits(self, tokens_T, positions_T):
        with self._context():
            return self.forward_logits_fn(self.params, tokens_T, positions_T, routing_fn=self.routing_fn)


def allocate_pool(config, mesh, num_pages: int, page_size: int, kv_dtype, layers: int | None = None,
                  attention_ranks: int = 1) -> KVPool:
    """layers: the pools' layer slots (pipeline stages: pp * slots per stage, split over `pipeline`).
    attention_ranks > 1 (DP attention): num_pages for each rank, the pages axis split over `expert`."""
    tensor = mesh_shape(mesh).get(TENSOR, 1) if mesh is not None else 1
    pages = num_pages * attention_ranks
    shape = pool_shape(config, pages, page_size, tensor, layers)
    sharding = sharding_for_axes(mesh, POOL_AXES, shape)
    if attention_ranks > 1:
        spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(spec[0], EXPERT, *spec[2:]))
    pool = init_pool(config, pages, page_size, kv_dtype, sharding, tensor, layers)
    return jax.block_until_ready(pool)


def _expert_only(spec) -> jax.sharding.PartitionSpec:
    return jax.sharding.PartitionSpec(
        *(EXPERT if entry is not None and EXPERT in spec_axes(entry) else None for entry in spec))


def _replicate(tree):
    """Constrain results to be replicated over the mesh in context, so that every process can read them."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.axis_names:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec()), tree)


__all__ = ["allocate_pool", "Buckets", "InFlight", "ModelRunner", "StepShape", "bucket", "MAX_LOGPROBS"]
