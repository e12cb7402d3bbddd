"""The communication model: bytes each device sends per step under a parallel layout, and a step-time estimate
that ranks the layouts that fit on N devices (`moejax plan MODEL --devices N`).

Per-device bytes follow the ring algorithms: an all-reduce of S bytes over g ranks sends 2 (g - 1) / g * S, an
all-to-all sends the (g - 1) / g of its S bytes bound for other ranks, a pipeline hand-off sends S. What each
layout communicates, per replica step of T tokens with hidden size D (activations in the compute dtype):
  - tensor parallelism: an all-reduce of [T, D] after attention and after each MLP (a MoE layer's shared expert
    too), one for the vocabulary-split embedding, and the all-gather of the [T, V] float32 logits (with
    pipeline stages the vocabulary is split over pp x tp, and those two run over that group on every stage);
  - today's expert parallelism: every expert rank sees all T tokens and one all-reduce of [T, D] over the ranks
    that split the experts (expert x tensor when the width is split too) combines the routed experts;
  - DP attention with expert parallelism: each expert rank attends over its own T / ep tokens, and a MoE layer
    sends its tokens' k assignments to the ranks of their experts and back (two all-to-alls of dense buffers:
    a slot for every assignment towards every rank, as the engine runs them);
  - pipeline stages: each stage hands [T, D] to the next in every stage time, and the last stage's hidden
    states reach every stage for the logits (one all-reduce over pp of every micro-batch's [T, D] per step).
Collectives whose ranks span more than one node (devices are numbered pipeline, data, expert, tensor from the
outside in, `node_devices` to a node) run at the inter-node link rate, the others at the intra-node rate.

The step estimate is a decode step of `batch` sequences of `context` cached tokens spread over the replicas
(each replica runs as many as its KV cache holds): per device max(bytes read from HBM / HBM rate, FLOPs / matmul rate) plus the communication at the link rates
with a per-collective latency. Bytes read are the weights a step touches (routed experts by the expected share
a uniform router touches) and the KV cache of the device's requests. A pipeline of pp stages runs pp
micro-batches, each reading its stage's weights: (2 pp - 1) stage times per step. Layouts are ranked by decode
tokens per second over all replicas. It is a model to order layouts, not a prediction of milliseconds; with
offloaded experts it leaves out their host-to-device traffic.
"""

from __future__ import annotations

import dataclasses
import itertools

from moejax.config import ModelConfig
from moejax.plan.memory import Mesh, MemoryPlan, plan_memory, stage_layers

NVLINK_GBPS = 3600.0  # gigabits per second per GPU, one direction (NVLink 4: 450 GB/s)
INFINIBAND_GBPS = 400.0  # one NDR port per GPU
NODE_DEVICES = 8
COLLECTIVE_LATENCY_S = {"intra": 10e-6, "inter": 25e-6}
HBM_TBPS = 3.35  # H100 SXM; an H200 reads about 4.3 TB/s
MATMUL_TFLOPS = 790.0  # dense bf16 rate reached by a large matmul on Hopper


@dataclasses.dataclass(frozen=True)
class Links:
    intra_gbps: float = NVLINK_GBPS
    inter_gbps: float = INFINIBAND_GBPS
    node_devices: int = NODE_DEVICES

    def bytes_per_s(self, kind: str) -> float:
        return (self.intra_gbps if kind == "intra" else self.inter_gbps) * 1e9 / 8


@dataclasses.dataclass(frozen=True)
class Collective:
    """One kind of collective in a step: per-device bytes sent and how many times it runs."""

    # "tp_all_reduce", "moe_all_reduce", "all_to_all", "pipeline_send", "pipeline_all_reduce",
    # "vocab_all_reduce", "logits_all_gather"
    kind: str
    axes: tuple[str, ...]  # mesh axes of its group
    bytes_per_device: float
    count: int
    link: str  # "intra" | "inter"


def _group_link(mesh: Mesh, axes: tuple[str, ...], links: Links) -> str:
    """Whether a collective over `axes` stays inside one node: devices are numbered (pp, dp, ep, tp) from the
    outside in, so a group over an axis spans its size times the sizes of every axis inside it."""
    order = [("pp", mesh.pp), ("dp", mesh.dp), ("ep", mesh.ep), ("tp", mesh.tp)]
    span = 1
    inner = 1
    for name, size in reversed(order):
        if name in axes:
            span = inner * size
        inner *= size
    return "intra" if span <= links.node_devices else "inter"


def _product(mesh: Mesh, axes: tuple[str, ...]) -> int:
    sizes = {"pp": mesh.pp, "dp": mesh.dp, "ep": mesh.ep, "tp": mesh.tp}
    n = 1
    for a in axes:
        n *= sizes[a]
    return n


def _all_reduce(nbytes: float, ranks: int) -> float:
    return 2 * (ranks - 1) / ranks * nbytes if ranks > 1 else 0.0


def step_collectives(config: ModelConfig, mesh: Mesh, tokens: int, dtype: str = "bfloat16",
                     links: Links = Links()) -> list[Collective]:
    """The collectives of one replica step (or micro-batch) over `tokens` tokens on a device of the pipeline
    stage that communicates most (see the module docstring)."""
    act = 4 if dtype == "float32" else 2
    d = config.hidden_size
    row = tokens * d * act  # one [T, D] activation

    def add(out, kind, axes, per_device, count):
        if per_device > 0 and count > 0:
            out.append(Collective(kind, axes, per_device, count, _group_link(mesh, axes, links)))

    # attention's batch: split over the expert ranks too with DP attention
    attn_tokens = tokens / mesh.ep if mesh.dp_attention else tokens
    tp_row = attn_tokens * d * act
    stages = stage_layers(config, mesh.pp)
    # the vocabulary is split over pp x tp where it divides (the outer axis dropped first, as the rules do)
    vocab_axes = tuple(a for a, n in (("pp", mesh.pp), ("tp", mesh.tp)) if n > 1)
    while vocab_axes and config.vocab_size % _product(mesh, vocab_axes):
        vocab_axes = vocab_axes[1:]
    vocab_ranks = _product(mesh, vocab_axes)
    per_stage = []
    for s, layers in enumerate(stages):
        out = []
        moe_here = sum(config.moe_layers[i] for i in layers)
        dense_here = len(layers) - moe_here
        if mesh.tp > 1:
            shared = 1 if config.shared_expert_intermediate_size else 0
            # attention out per layer, the dense MLP's out, the shared expert's out; the embedding's when the
            # vocabulary is split over tp alone
            count = len(layers) + dense_here + shared * moe_here + (vocab_axes == ("tp",))
            add(out, "tp_all_reduce", ("tp",), _all_reduce(tp_row, mesh.tp), count)
        if vocab_ranks > 1:
            # the vocabulary is split (over pp x tp on every stage): the embedding's all-reduce (over tp alone
            # it is one of the tp all-reduces above) and the all-gather of the logits
            if vocab_axes != ("tp",):
                add(out, "vocab_all_reduce", vocab_axes, _all_reduce(row, vocab_ranks), 1)
            if mesh.pp > 1 or s == len(stages) - 1:
                logits = tokens * config.vocab_size * 4
                add(out, "logits_all_gather", vocab_axes, (vocab_ranks - 1) / vocab_ranks * logits, 1)
        if mesh.pp > 1:  # the last stage's hidden states to every stage, for the logits
            add(out, "pipeline_all_reduce", ("pp",), _all_reduce(row, mesh.pp), 1)
        if moe_here:
            if mesh.dp_attention:
                k = config.num_experts_per_tok
                # dispatch and combine: the engine's dense all-to-all gives each of a rank's T k assignments a
                # slot in the buffer bound for every rank (no token dropped, whatever the routing), and sends
                # the ep - 1 buffers bound for other ranks
                per = attn_tokens * k * d * act * (mesh.ep - 1)
                add(out, "all_to_all", ("ep",), per, 2 * moe_here)
            else:
                # the routed experts' partial outputs, over the ranks that split them (ep, and tp: their width,
                # or whole experts with enable_expert_parallel)
                axes = tuple(a for a, n in (("ep", mesh.ep), ("tp", mesh.tp)) if n > 1)
                add(out, "moe_all_reduce", axes, _all_reduce(row, mesh.ep * mesh.tp), moe_here)
        if s < len(stages) - 1:
            add(out, "pipeline_send", ("pp",), row, 1)
        per_stage.append(out)
    # a device holds one stage: the one that communicates most
    out = max(per_stage, key=lambda cs: sum(c.bytes_per_device * c.count for c in cs))
    return out


@dataclasses.dataclass(frozen=True)
class LayoutEstimate:
    mesh: Mesh
    plan: MemoryPlan
    fits: bool  # the plan fits and the replica's KV cache holds the workload
    collectives: list[Collective]
    comm_bytes_per_device: float
    read_bytes_per_device: float
    flops_per_device: float
    step_s: float
    tokens_per_s: float  # over all replicas
    sequences: int  # of the batch the layout's KV caches hold at once (all replicas)

    def to_json(self) -> dict:
        return {
            "layout": describe(self.mesh), "mesh": dataclasses.asdict(self.mesh), "fits": self.fits,
            "weight_bytes_per_device": self.plan.weight_bytes_per_device,
            "kv_cache_tokens": self.plan.kv_cache_tokens,
            "comm_bytes_per_device": self.comm_bytes_per_device,
            "comm_by_kind": {c.kind: c.bytes_per_device * c.count for c in self.collectives},
            "read_bytes_per_device": self.read_bytes_per_device, "flops_per_device": self.flops_per_device,
            "step_ms": self.step_s * 1e3, "tokens_per_s": self.tokens_per_s, "sequences": self.sequences,
        }


def describe(mesh: Mesh) -> str:
    parts = [f"{name}{size}" for name, size in (("tp", mesh.tp), ("ep", mesh.ep), ("dp", mesh.dp), ("pp", mesh.pp))
             if size > 1] or ["single device"]
    text = " x ".join(parts)
    if mesh.expert_over_tp:
        text += " (experts over tp)"
    if mesh.dp_attention:
        text += " (DP attention)"
    return text


def touched_share(tokens: float, experts: int, k: int) -> float:
    """Expected share of a layer's experts that `tokens` tokens touch under uniform routing."""
    return 1 - (1 - k / experts) ** max(tokens, 0)


def estimate(config: ModelConfig, mesh: Mesh, *, batch: int, context: int, links: Links = Links(),
             hbm_tbps: float = HBM_TBPS, matmul_tflops: float = MATMUL_TFLOPS, **plan_kw) -> LayoutEstimate:
    """One layout's plan, collectives and decode-step estimate (module docstring). Each replica runs as many
    of its batch // dp sequences as its KV cache holds at `context` tokens (with DP attention, as many as each
    expert rank's cache holds, times the ranks)."""
    plan = plan_memory(config, mesh=mesh, suggest=False, **plan_kw)
    per_rank_kv = plan.kv_cache_tokens // mesh.request_ranks
    sequences = min(batch // mesh.dp, per_rank_kv // context * mesh.request_ranks)  # per replica
    micro = max(sequences / mesh.pp, 1)  # tokens of one micro-batch (the whole step without a pipeline)
    collectives = step_collectives(config, mesh, max(int(round(micro)), 1), plan.dtype, links)
    # every stage time runs its stage's collectives and hand-off; the last stage's hidden states reach every
    # stage once per step, all pp micro-batches in one all-reduce (models/pipelined.py)
    per_stage = [c for c in collectives if c.kind != "pipeline_all_reduce"]
    comm_s = sum(c.bytes_per_device * c.count / links.bytes_per_s(c.link)
                 + c.count * COLLECTIVE_LATENCY_S[c.link] for c in per_stage)
    final_s = sum(mesh.pp * c.bytes_per_device * c.count / links.bytes_per_s(c.link) + COLLECTIVE_LATENCY_S[c.link]
                  for c in collectives if c.kind == "pipeline_all_reduce")
    weights = dict(plan.weight_bytes_by_kind)
    routed = weights.pop("routed_experts", 0)
    # every token of the micro-batch reaches the experts (replicated, or through the all-to-all)
    share = touched_share(micro, config.num_experts, config.num_experts_per_tok) if config.num_experts else 1.0
    read = sum(weights.values()) + routed * share + plan.kv_bytes_per_token * micro / mesh.request_ranks * context
    # (an approximation: plain EP repeats attention on every expert rank)
    flops = 2 * plan.params.active * micro / (mesh.tp * mesh.ep * mesh.pp)
    stage_s = max(read / (hbm_tbps * 1e12), flops / (matmul_tflops * 1e12)) + comm_s
    # pp micro-batches through pp stages: 2 pp - 1 stage times
    step_s = stage_s * (2 * mesh.pp - 1) + final_s
    fits = plan.fits and sequences >= 1
    return LayoutEstimate(mesh, plan, fits, collectives, sum(c.bytes_per_device * c.count for c in collectives),
                          read, flops, step_s, sequences * mesh.dp / step_s if fits else 0.0, sequences * mesh.dp)


def _divisors(n: int) -> list[int]:
    small = [x for x in range(1, int(n ** 0.5) + 1) if n % x == 0]
    return sorted(set(small + [n // x for x in small]))


def candidate_meshes(config: ModelConfig, devices: int, max_tp: int = NODE_DEVICES) -> list[Mesh]:
    """Every layout of exactly `devices` devices the engine's rules allow: tp dividing the attention heads
    (at most `max_tp`, a node), ep dividing the experts (models with MoE layers), pp at most the layers; experts
    over tp when ep is 1; DP attention when ep >= 2 is all there is (tp, dp and pp 1)."""
    moe = config.num_moe_layers > 0 and config.num_experts > 0
    divisors = _divisors(devices)
    meshes = []
    for tp, ep, pp in itertools.product(divisors, repeat=3):
        if devices % (tp * ep * pp):
            continue
        dp = devices // (tp * ep * pp)
        if tp > max_tp or config.num_heads % tp or pp > config.num_layers:
            continue
        if ep > 1 and (not moe or config.num_experts % ep):
            continue
        meshes.append(Mesh(tp, ep, dp, pp=pp))
        if moe and tp > 1 and ep == 1 and config.num_experts % tp == 0:
            meshes.append(Mesh(tp, 1, dp, expert_over_tp=True, pp=pp))
        if ep > 1 and tp == 1 and dp == 1 and pp == 1:
            meshes.append(Mesh(1, ep, dp_attention=True))
    return meshes


NOT_IN_MEMORY = "do not fit in memory"
NO_SEQUENCE = "hold no sequence of --context tokens in a replica's KV cache"
FEW_SEQUENCES = "have more replicas than --batch sequences"


def rank_layouts(config: ModelConfig, devices: int, *, batch: int, context: int, links: Links = Links(),
                 hbm_tbps: float = HBM_TBPS, matmul_tflops: float = MATMUL_TFLOPS,
                 **plan_kw) -> tuple[list[LayoutEstimate], dict[str, int]]:
    """(the layouts of `devices` devices that fit, most estimated decode tokens per second first; how many were
    left out, by reason)."""
    if devices < 1:
        raise ValueError(f"--devices must be a positive integer, got {devices}")
    plan_memory(config, suggest=False, **plan_kw)  # bad arguments fail here, not as layouts that "do not fit"
    fitting, left_out = [], {}
    for mesh in candidate_meshes(config, devices, max_tp=links.node_devices):
        try:
            est = estimate(config, mesh, batch=batch, context=context, links=links, hbm_tbps=hbm_tbps,
                           matmul_tflops=matmul_tflops, **plan_kw)
        except ValueError:  # the layout's sizes do not divide what they split
            continue
        if est.fits:
            fitting.append(est)
            continue
        reason = NOT_IN_MEMORY if not est.plan.fits else FEW_SEQUENCES if batch < mesh.dp else NO_SEQUENCE
        left_out[reason] = left_out.get(reason, 0) + 1
    fitting.sort(key=lambda e: -e.tokens_per_s)
    return fitting, left_out


__all__ = ["Collective", "LayoutEstimate", "Links", "candidate_meshes", "describe", "estimate", "rank_layouts",
           "step_collectives", "touched_share"]
