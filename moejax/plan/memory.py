"""The memory model: bytes per device for weights and KV cache on a (data, expert, tensor) mesh.

The engine sizes its KV cache with `plan_memory` and tests compare every number here with what the engine
really allocates, so this is the one source of truth for "does it fit".
"""

from __future__ import annotations

import dataclasses
import math

from moejax.config import ModelConfig
from moejax.kernels.quant import fp8_block, fp8_sharding_shape, sharding_shape
from moejax.plan.params import KINDS, ParamCounts, TensorSpec, count_params, inventory
from moejax.sharding.pipeline import StageSplit, split_stages
from moejax.sharding.rules import DATA, EXPERT, PIPELINE, TENSOR, experts_over, logical_to_spec, spec_axes

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}
QUANTIZATIONS = (None, "int8", "int4", "fp8")
# bytes a weight keeps, smallest last: what --quantization suggestions may step down to
_QUANT_RANK = {None: 0, "fp8": 1, "int8": 1, "int4": 2}
INT4_GROUP = 128
WORKSPACE_TOKENS = 8192  # the largest prefill the workspace reserve is sized for
ATTENTION_QUERY_BLOCK = 512  # moejax.layers.attention.QUERY_CHUNK


@dataclasses.dataclass(frozen=True)
class Mesh:
    tp: int = 1
    ep: int = 1
    dp: int = 1
    expert_over_tp: bool = False  # enable_expert_parallel: routed experts split whole over the tp ranks
    pp: int = 1  # pipeline stages: contiguous runs of layers, each held by its own tp x ep x dp devices
    dp_attention: bool = False  # attention's requests (and their KV cache) split over the ep ranks

    @property
    def devices(self) -> int:
        return self.tp * self.ep * self.dp * self.pp

    @property
    def request_ranks(self) -> int:
        """Ranks of one model replica that hold different requests' KV caches (ep with DP attention)."""
        return self.ep if self.dp_attention else 1

    @property
    def shape(self) -> dict[str, int]:
        return {PIPELINE: self.pp, DATA: self.dp, EXPERT: self.ep, TENSOR: self.tp}


def int4_group_size(k: int, group: int = INT4_GROUP) -> int:
    return group if k % group == 0 else k


MODEL_DTYPES = ("bfloat16", "float16", "float32")


def resolve_weights(config: ModelConfig, dtype: str, quantization: str | None) -> tuple[str, str | None]:
    """(dtype, quantization) that `LLM` loads for "auto" and None: the config's dtype, and an FP8 checkpoint
    (quantization_config fp8) stays FP8 (computing in the config's dtype). An explicit dtype with no
    quantization dequantizes it exactly to that dtype; quantization="fp8" keeps it FP8 with any dtype."""
    if config.checkpoint_quant == "fp8" and quantization is None and dtype == "auto":
        quantization = "fp8"
    if dtype == "auto":
        dtype = config.dtype if config.dtype in MODEL_DTYPES else "bfloat16"
    return dtype, quantization


def stored_arrays(t: TensorSpec, dtype: str, quantization: str | None,
                  fp8_block: tuple[int, int] = (128, 128)) -> list[tuple[tuple[int, ...], int]]:
    """(shape, bytes per element) of each array moejax stores for tensor `t`. dtype "fp8" stands for bfloat16
    with quantization "fp8"; fp8_block: (block_k, block_n) of the input-major layout."""
    if dtype == "fp8":
        dtype, quantization = "bfloat16", "fp8"
    elem = 4 if t.float32 else DTYPE_BYTES[dtype]
    if not t.quantizable:
        return [(t.shape, elem)]
    *lead, k, n = t.shape
    lead = tuple(lead)
    if quantization == "fp8":  # e4m3 values with float32 scales, one per block
        return [(t.shape, 1), ((*lead, math.ceil(k / fp8_block[0]), math.ceil(n / fp8_block[1])), 4)]
    if quantization == "int8":
        return [(t.shape, 1), ((*lead, 1, n), elem)]
    if quantization == "int4":
        g = int4_group_size(k)
        return [((*lead, k // 2, n), 1), ((*lead, k // g, n), elem)]
    return [(t.shape, elem)]


def shard_factor(axes, shape, mesh: Mesh) -> int:
    """How many ways an array of this shape and these logical axes is split on the mesh."""
    with experts_over(TENSOR if mesh.expert_over_tp else EXPERT):
        spec = logical_to_spec(axes, mesh.shape, shape)
    factor = 1
    for entry in spec:
        for axis in spec_axes(entry):
            factor *= mesh.shape[axis]
    return factor


def tensor_bytes_per_device(t: TensorSpec, dtype: str, quantization: str | None, mesh: Mesh,
                            fp8_block: tuple[int, int] = (128, 128)) -> int:
    arrays = stored_arrays(t, dtype, quantization, fp8_block)
    # The stored arrays of one weight are split alike: only along axes that every one of them divides (fp8:
    # in whole scale blocks).
    if t.quantizable and (dtype == "fp8" or quantization == "fp8"):
        factor = shard_factor(t.axes, fp8_sharding_shape(t.shape, fp8_block), mesh)
    else:
        factor = shard_factor(t.axes, sharding_shape([shape for shape, _ in arrays]), mesh)
    total = 0
    for shape, elem in arrays:
        n = 1
        for s in shape:
            n *= s
        total += n * elem // factor
    return total


KV_CACHE_DTYPES = ("auto", "fp8")


def stage_split(config: ModelConfig, pp: int) -> StageSplit:
    """The engine's pipeline stages for this model (sharding/pipeline.py): the split of the layers whose slots
    weigh least, layers weighed by their parameter count."""
    sizes = [0] * config.num_layers
    for t in inventory(config):
        if t.path[0] == "layers":
            sizes[t.path[1]] += math.prod(t.shape)
    return split_stages(list(config.moe_layers), pp, sizes)


def stage_layers(config: ModelConfig, pp: int) -> tuple[range, ...]:
    """The layers of each pipeline stage: contiguous, as the engine splits them."""
    return stage_split(config, pp).stages


def kv_bytes_per_token(config: ModelConfig, dtype: str, mesh: Mesh = Mesh(), kv_cache_dtype: str = "auto") -> int:
    """Cache bytes one token takes on one device, summed over the layer slots of its pipeline stage.
    kv_cache_dtype "auto" keeps the model's dtype (bf16 for fp8 weights); "fp8" stores e4m3 pages, one byte a
    value."""
    elem = 1 if kv_cache_dtype == "fp8" else DTYPE_BYTES["bfloat16" if dtype == "fp8" else dtype]
    layers = stage_split(config, mesh.pp).slots_per_stage
    if config.is_mla:  # the compressed latent and the shared rope key, replicated over tensor ranks
        return layers * (config.kv_lora_rank + config.qk_rope_head_dim) * elem
    heads = config.num_kv_heads
    if heads % mesh.tp == 0:
        heads //= mesh.tp
    elif mesh.tp % heads == 0:  # fewer KV heads than ranks: each rank stores the one its query heads use
        heads = 1
    return layers * 2 * heads * config.head_dim * elem


def workspace_bytes(config: ModelConfig, mesh: Mesh, max_model_len: int, max_num_seqs: int) -> int:
    """Activation reserve: one prefill of min(max_model_len, 8192) tokens (or max_num_seqs decode rows).

    Float32 throughout: per token, the residual stream and its temporaries (8 x hidden) and the widest MLP
    activation (gate, up and product for top_k experts or the dense width, split over tensor); one attention
    block of scores [512 queries, max_model_len keys, heads / tp]; and for each of max_num_seqs rows the
    logits and the sampler's sorted copy (2 x vocab / tp): only each row's last position reaches the lm_head.
    """
    tokens = max(min(max_model_len, WORKSPACE_TOKENS), max_num_seqs)
    widest = max(config.intermediate_size if not all(config.moe_layers) else 0,
                 config.num_experts_per_tok * config.moe_intermediate_size,
                 config.shared_expert_intermediate_size)
    per_token = 8 * config.hidden_size + 3 * widest // mesh.tp
    heads = max(config.num_heads // mesh.tp, 1)
    scores = min(ATTENTION_QUERY_BLOCK, tokens) * max_model_len * heads
    logits = max_num_seqs * 2 * config.vocab_size // mesh.tp
    return 4 * (tokens * per_token + scores + logits)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    model: str
    mesh: Mesh
    dtype: str
    quantization: str | None
    offload_experts: bool
    params: ParamCounts
    weight_bytes_by_kind: dict[str, int]  # per device (the largest device)
    weight_bytes_per_device: int
    host_weight_bytes: int  # routed experts kept in host memory when offloaded
    kv_bytes_per_token: int  # per device
    device_memory_bytes: int
    gpu_memory_utilization: float
    workspace_bytes: int
    kv_cache_bytes: int  # per device
    kv_cache_tokens: int  # per model replica
    max_model_len: int
    max_concurrency: float
    fits: bool
    suggestion: str | None = None
    kv_cache_dtype: str = "auto"
    offload_cache_experts: int = 0  # experts per MoE layer also kept on the device (counted in the weights)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["mesh"] = dataclasses.asdict(self.mesh)
        d["params"] = dataclasses.asdict(self.params)
        return d


def plan_memory(
    config: ModelConfig,
    *,
    mesh: Mesh = Mesh(),
    dtype: str = "bfloat16",
    quantization: str | None = None,
    offload_experts: bool = False,
    offload_cache_experts: int = 0,
    device_memory_bytes: int = 80 * GIB,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    max_num_seqs: int = 256,
    model: str = "",
    suggest: bool = True,
    kv_cache_dtype: str = "auto",
) -> MemoryPlan:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    if dtype == "fp8" and quantization not in (None, "fp8"):
        raise ValueError("dtype fp8 and quantization are exclusive")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    check_divisible(config, mesh)
    max_model_len = max_model_len or config.max_position_embeddings
    host = 0
    block = fp8_block(config)
    split = stage_split(config, mesh.pp)
    by_kind = {k: 0 for k in KINDS}
    for t in inventory(config):
        if offload_experts and t.kind == "routed_experts":
            # The host keeps every routed expert whole, for all of its devices.
            host += tensor_bytes_per_device(t, dtype, quantization, Mesh(), block)
            continue
        by_kind[t.kind] += tensor_bytes_per_device(t, dtype, quantization, mesh, block) * _copies(t, split)
    if offload_cache_experts and host:
        # the device cache: S of the E experts of every MoE layer, and each layer's [E] int32 slot table
        by_kind["routed_experts"] += host * offload_cache_experts // config.num_experts + \
            4 * config.num_moe_layers * config.num_experts
    weights = sum(by_kind.values())
    kv_token = kv_bytes_per_token(config, dtype, mesh, kv_cache_dtype)
    budget = int(device_memory_bytes * gpu_memory_utilization)
    workspace = workspace_bytes(config, mesh, max_model_len, max_num_seqs)
    kv_bytes = max(budget - weights - workspace, 0)
    # with DP attention each of the replica's request ranks caches its own requests' tokens
    kv_tokens = kv_bytes // kv_token * mesh.request_ranks
    fits = weights + workspace <= budget and kv_bytes // kv_token >= max_model_len
    plan = MemoryPlan(
        model=model, mesh=mesh, dtype=dtype, quantization=quantization, offload_experts=offload_experts,
        params=count_params(config), weight_bytes_by_kind=by_kind, weight_bytes_per_device=weights,
        host_weight_bytes=host, kv_bytes_per_token=kv_token, device_memory_bytes=device_memory_bytes,
        gpu_memory_utilization=gpu_memory_utilization, workspace_bytes=workspace, kv_cache_bytes=kv_bytes,
        kv_cache_tokens=int(kv_tokens), max_model_len=max_model_len,
        max_concurrency=kv_tokens / max_model_len, fits=fits, kv_cache_dtype=kv_cache_dtype,
        offload_cache_experts=offload_cache_experts if offload_experts else 0)
    if not fits and suggest:
        plan = dataclasses.replace(plan, suggestion=smallest_fix(plan, config, max_num_seqs))
    return plan


def _copies(t, split: StageSplit) -> int:
    """How many of tensor t's kind a device holds: a layer's tensors once per slot of its run (every stage has
    as many slots as the stage holding most of the run's layers; counted at the run's first layer), the
    embeddings, final norm and lm_head once (on every stage; the vocabulary split over the stages too)."""
    if t.path[0] != "layers":
        return 1
    run = next(r for r, rng in enumerate(split.runs) if t.path[1] in rng)
    return split.slots[run] if t.path[1] == split.runs[run].start else 0


def check_divisible(config: ModelConfig, mesh: Mesh) -> None:
    """Parallel sizes must divide what they split."""
    if mesh.pp > config.num_layers:
        raise ValueError(f"pipeline_parallel_size={mesh.pp} exceeds num_hidden_layers={config.num_layers}")
    if mesh.dp_attention and (mesh.ep < 2 or mesh.tp != 1 or mesh.expert_over_tp):
        raise ValueError(f"enable_dp_attention splits attention's requests over the expert-parallel ranks: it "
                         f"needs expert_parallel_size >= 2 and tensor_parallel_size 1 (got ep={mesh.ep}, "
                         f"tp={mesh.tp})")
    if mesh.dp_attention and (mesh.pp > 1 or mesh.dp > 1):
        raise ValueError(f"enable_dp_attention splits the requests over the expert ranks: "
                         f"pipeline_parallel_size and data_parallel_size must be 1 (got pp={mesh.pp}, dp={mesh.dp})")
    if config.num_experts % mesh.ep:
        raise ValueError(f"expert_parallel_size={mesh.ep} does not divide num_experts={config.num_experts}")
    if config.num_heads % mesh.tp:
        raise ValueError(f"tensor_parallel_size={mesh.tp} does not divide num_attention_heads={config.num_heads}")
    if mesh.expert_over_tp and mesh.ep > 1:
        raise ValueError(f"enable_expert_parallel splits the experts over the tensor-parallel ranks; "
                         f"expert_parallel_size={mesh.ep} must then be 1")
    if mesh.expert_over_tp and config.num_experts % mesh.tp:
        raise ValueError(f"enable_expert_parallel: tensor_parallel_size={mesh.tp} does not divide "
                         f"num_experts={config.num_experts}")


def smallest_fix(plan: MemoryPlan, config: ModelConfig, max_num_seqs: int) -> str | None:
    """The first change, in order of how little it changes, that makes the plan fit."""
    kw = dict(dtype=plan.dtype, quantization=plan.quantization, offload_experts=plan.offload_experts,
              offload_cache_experts=plan.offload_cache_experts,
              device_memory_bytes=plan.device_memory_bytes, gpu_memory_utilization=plan.gpu_memory_utilization,
              max_model_len=plan.max_model_len, max_num_seqs=max_num_seqs, suggest=False,
              kv_cache_dtype=plan.kv_cache_dtype)
    m = plan.mesh
    candidates = []
    for length in (plan.max_model_len // 2, plan.max_model_len // 4, 8192, 4096):
        if 0 < length < plan.max_model_len:
            candidates.append((f"--max-model-len {length}", dict(kw, max_model_len=length), m))
    if plan.kv_cache_dtype == "auto":
        candidates.append(("--kv-cache-dtype fp8", dict(kw, kv_cache_dtype="fp8"), m))
    if plan.dtype != "fp8":
        for q in ("fp8", "int8", "int4"):  # fp8 first: int8's bytes with float scales per block
            if _QUANT_RANK[q] > _QUANT_RANK[plan.quantization]:
                candidates.append((f"--quantization {q}", dict(kw, quantization=q), m))
    for ep in (2, 4, 8, 16, 32, 64):
        if ep > m.ep and config.num_experts % ep == 0:
            if not m.expert_over_tp:
                candidates.append((f"--ep {ep} ({m.tp * ep * m.dp * m.pp} devices)", kw,
                                   dataclasses.replace(m, ep=ep)))
    for tp in (2, 4, 8):
        if tp > m.tp and config.num_heads % tp == 0:
            candidates.append((f"--tp {tp} ({tp * m.ep * m.dp * m.pp} devices)", kw,
                               dataclasses.replace(m, tp=tp)))
    if not plan.offload_experts:
        candidates.append(("--offload-experts", dict(kw, offload_experts=True), m))
        candidates.append(("--offload-experts --quantization int4", dict(kw, offload_experts=True,
                                                                         quantization="int4"), m))
    for text, args, mesh in candidates:
        try:
            if plan_memory(config, mesh=mesh, **args).fits:
                return text
        except ValueError:
            continue
    return None
