"""Kernel benchmark (GPU): grouped expert matmuls and routing against their peers and the roofline, in one run.

    python -m moejax.kernels.bench [--sweep] [--shapes 0 3]      # or: moejax bench kernels ...

For the six shapes of REFERENCE.md section 3 (x @ W_gate_up, random routing) it prints moejax's fused gate/up
kernel in bf16, int8, int4 and block-scaled fp8 (W8A16 for decode, W8A8 for prefill; tiles from the tuned
table), XLA's ragged_dot, torch._grouped_mm and torch._scaled_grouped_mm (fp8, row-wise scales; when torch has
CUDA), the rooflines from the bytes and flops each variant needs at the HBM bandwidth and the bf16 and fp8 matmul
rates measured at the start of the same run, and the whole expert layer (moejax vs the ragged_dot reference). Then routing (T=4096, E=256, 8 groups, top-4 groups, top-8, sigmoid with bias) against its
jitted pure-JAX reference. `--sweep` first times a grid of tiles per shape and weight type and prints the best.

Method: every figure is the median of several rounds, each a single jitted call that runs the op on R different
routings back to back (R=8 for decode, 1 for prefill), so that host dispatch is amortized and decode weights do
not sit in L2 between calls; XLA ops are chained so that XLA cannot merge the R calls over shared weights;
quantized prefill includes dequantizing the weights (what the layer does there); torch is timed with CUDA
events over the same R routings. Every kernel is checked against its reference before it is timed.
Compilation runs in a thread pool.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.kernels.align import align_rows
from moejax.kernels.experts import ExpertWeights, experts_reference
from moejax.kernels.pallas_experts import (Tiles, choose_tiles, dequantizes_first, experts_pallas, fp8_activations,
                                          grouped_matmul)
from moejax.kernels.pallas_routing import route_pallas
from moejax.kernels.quant import dequantize, quantize, quantize_fp8, quantized_nbytes
from moejax.kernels.routing import RoutingConfig, route_reference

# Replaced by `measure_machine` at the start of a GPU run; these H100 figures (REFERENCE.md section 1) only
# stand in off the GPU.
RATES = {"hbm": 2.6e12, "bf16": 680e12, "fp8": 1360e12}

SHAPES = [  # name, tokens, experts, hidden, expert width, top_k
    ("qwen3 decode 1", 1, 128, 2048, 768, 8),
    ("qwen3 decode 64", 64, 128, 2048, 768, 8),
    ("qwen3 decode 256", 256, 128, 2048, 768, 8),
    ("qwen3 prefill 4096", 4096, 128, 2048, 768, 8),
    ("mixtral decode 64", 64, 8, 4096, 14336, 2),
    ("mixtral prefill 4096", 4096, 8, 4096, 14336, 2),
]
ROUTING_TOKENS = 4096
BITS = (0, 8, 4, "fp8")
LABEL = {0: "bf16", 8: "int8", 4: "int4", "fp8": "fp8"}
INTERPRET = jax.default_backend() != "gpu"  # off the GPU the kernels are interpreted (a smoke test of this script)


def chained(fn, per_rep_args) -> list:
    """fn over each routing's arguments, each call made to wait for the previous one's output: XLA may not
    merge calls that share weights (its dot merger would otherwise read the weights once for all)."""
    outs, prev = [], None
    for args in per_rep_args:
        if prev is not None:
            args, _ = jax.lax.optimization_barrier((args, prev))
        prev = fn(*args)
        outs.append(prev)
    return outs


def cuda_event_us(run, per_call: int, rounds: int = 7) -> float:
    """A torch peer's time: run() once to warm up, then the median over rounds of CUDA-event time per call
    (run makes per_call calls)."""
    import torch

    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / per_call)
    return float(np.median(times))


def _median_us(run, per_call: int, rounds: int = 7) -> float:
    jax.block_until_ready(run())
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / per_call * 1e6


def measure_machine(size_gb: float = 2.0, n: int = 8192) -> dict:
    """HBM bandwidth (a large copy: bytes read + written per second) and the bf16 and fp8 matmul rates
    (n x n x n, XLA's cuBLAS kernels), measured now on this device."""
    rates = {}
    reps = 5
    x = jnp.ones((int(size_gb * 1e9) // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)  # one read and one write of x a call (one call: nothing to fuse)
    rates["hbm"] = 2 * x.nbytes / (_median_us(lambda: copy(x), 1) * 1e-6)
    del x
    key = jax.random.key(0)
    for name, dtype in (("bf16", jnp.bfloat16), ("fp8", jnp.float8_e4m3fn)):
        a = jax.random.normal(key, (n, n), jnp.bfloat16).astype(dtype)
        bs = [jax.random.normal(jax.random.fold_in(key, i), (n, n), jnp.bfloat16).astype(dtype) for i in range(reps)]
        mm = jax.jit(lambda a, bs: [jax.lax.dot(a, b, preferred_element_type=jnp.bfloat16) for b in bs])
        try:
            rates[name] = 2 * n ** 3 / (_median_us(lambda: mm(a, bs), reps) * 1e-6)
        except Exception as err:  # noqa: BLE001 - e.g. no fp8 matmul on this GPU: keep the stand-in
            print(f"  {name} matmul rate not measured: {str(err).splitlines()[0][:100]}", flush=True)
    return rates


def compile_all(jobs: dict, workers: int = 16) -> dict:
    """{key: (jitted fn, args)} -> {key: compiled executable or the exception}; lowering in order, compiling
    in parallel threads (XLA and Triton release the GIL)."""
    lowered = {}
    for key, (fn, args) in jobs.items():
        try:
            lowered[key] = fn.lower(*args)
        except Exception as err:  # noqa: BLE001 - a tile that does not lower is reported, not fatal
            lowered[key] = err
    out = {}
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {k: pool.submit(v.compile) for k, v in lowered.items() if not isinstance(v, Exception)}
        for key, low in lowered.items():
            if isinstance(low, Exception):
                out[key] = low
                continue
            try:
                out[key] = futures[key].result()
            except Exception as err:  # noqa: BLE001 - e.g. tiles over the shared-memory limit
                out[key] = err
    return out


@dataclasses.dataclass
class Problem:
    name: str
    tokens: int
    e: int
    d: int
    f: int
    k: int
    xs: list  # R x [T, D] bf16
    weights: list  # R x [T, k]
    ids: list  # R x [T, k]
    params: dict  # bits -> ExpertWeights

    @property
    def m(self) -> int:
        return self.tokens * self.k


def build_problem(name, tokens, e, d, f, k, rng, reps) -> Problem:
    xs, ws, ids = [], [], []
    for _ in range(reps):
        xs.append(jnp.asarray(rng.standard_normal((tokens, d)), jnp.bfloat16))
        w, i = route_reference(jnp.asarray(rng.standard_normal((tokens, e)), jnp.float32), RoutingConfig(k))
        ws.append(w)
        ids.append(i)
    key = jax.random.key(int(rng.integers(1 << 30)))
    kg, ku, kd = jax.random.split(key, 3)
    bf16 = ExpertWeights(*(jax.random.normal(kk, s, jnp.bfloat16) * 0.02
                           for kk, s in ((kg, (e, d, f)), (ku, (e, d, f)), (kd, (e, f, d)))))
    quant = jax.jit(quantize, static_argnums=(1,))
    params = {0: bf16}
    for bits in (8, 4):
        params[bits] = ExpertWeights(*(quant(w, bits) for w in (bf16.w_gate, bf16.w_up, bf16.w_down)))
    params["fp8"] = ExpertWeights(*(jax.jit(quantize_fp8)(w) for w in (bf16.w_gate, bf16.w_up, bf16.w_down)))
    return Problem(name, tokens, e, d, f, k, xs, ws, ids, params)


def gate_up_job(p: Problem, bits: int, tiles: Tiles, rows_cache: dict):
    """A jitted call running the fused gate/up kernel on every routing, and its arguments (aligned rows are
    shared by all tiles with the same block_m)."""
    if tiles.block_m not in rows_cache:
        align = jax.jit(lambda i: align_rows(i, p.e, tiles.block_m))
        rows, blocks = [], []
        for x, ids in zip(p.xs, p.ids):
            sorted_ids, block_expert, _, _ = align(ids)
            rows.append(x[jnp.minimum(sorted_ids // p.k, p.tokens - 1)])
            blocks.append(block_expert)
        rows_cache[tiles.block_m] = rows, blocks
    rows, blocks = rows_cache[tiles.block_m]
    w = p.params[bits]

    # what experts_pallas does for prefill: int weights are widened first, fp8 runs W8A8
    dequantize_first = bits in (8, 4) and dequantizes_first(p.m, p.e)
    fp8_x = bits == "fp8" and fp8_activations(p.m, p.e, jnp.bfloat16)

    @jax.jit
    def run(g, u, rows, blocks):
        if dequantize_first:
            g, u = dequantize(g, jnp.bfloat16), dequantize(u, jnp.bfloat16)
        # Not chained: a pallas_call is never merged, and the barrier cost ~2x on some shapes (H100 run).
        return [grouped_matmul(r, b, [g, u], tiles, fuse=True, out_dtype=jnp.bfloat16, interpret=INTERPRET,
                               fp8_x=fp8_x) for r, b in zip(rows, blocks)]

    return run, (w.w_gate, w.w_up, rows, blocks)


def check_gate_up(p: Problem, bits: int, out, args, blocks_checked: int = 4) -> float:
    """Max error of some live blocks of the first routing's fused output against dequantize-then-matmul in
    float32."""
    _, _, rows, blocks = args
    w = p.params[bits]
    block_expert = np.asarray(blocks[0])
    bm = rows[0].shape[0] // len(block_expert)
    live = np.nonzero(block_expert >= 0)[0]
    worst = 0.0
    for b in live[np.linspace(0, len(live) - 1, min(blocks_checked, len(live))).astype(int)]:
        e = int(block_expert[b])
        g, u = ((dequantize(jax.tree.map(lambda a: a[e], a)) if bits else a[e].astype(jnp.float32))
                for a in (w.w_gate, w.w_up))
        r = rows[0][b * bm:(b + 1) * bm].astype(jnp.float32)
        ref = np.asarray(jax.nn.silu(r @ g) * (r @ u))
        got = np.asarray(out[0][b * bm:(b + 1) * bm], np.float32)
        worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
    return worst


def sweep_candidates(per_expert: float, bits: int) -> list[Tiles]:
    if per_expert <= 1:  # a handful of experts with a row each: split K for parallelism
        grid = dict(bm=[16], bn=[32, 64, 128], bk=[64, 128], split=[1, 2, 4, 8], launch=[(4, 3), (4, 4)])
    elif per_expert <= 32:
        grid = dict(bm=[16, 32], bn=[64, 128, 256], bk=[64, 128], split=[1], launch=[(4, 3), (4, 4)])
    else:
        grid = dict(bm=[64, 128], bn=[128, 256], bk=[32, 64], split=[1], launch=[(4, 3), (8, 3), (8, 4)])
    if bits == "fp8":  # column tiles stop at the 128-wide scale block; fp8 MMAs want K steps of 32 or more
        grid["bn"] = sorted({min(b, 128) for b in grid["bn"]} | {32})
        grid["bk"] = [64, 128]
    bks = [b for b in grid["bk"] if bits != 4 or b <= 128]
    return [Tiles(bm, bn, bk, w, st, sk) for bm in grid["bm"] for bn in grid["bn"] for bk in bks
            for sk in grid["split"] for w, st in grid["launch"]]


def time_gate_up(p: Problem, tiles_by_key: dict) -> dict:
    """{(bits, tiles): us per routing (or the error text)}."""
    jobs, args, rows_cache = {}, {}, {}
    for key in tiles_by_key:
        bits, tiles = key
        fn, a = gate_up_job(p, bits, tiles, rows_cache)
        jobs[key], args[key] = (fn, a), a
    compiled = compile_all(jobs)
    out = {}
    for key, exe in compiled.items():
        if isinstance(exe, Exception):
            out[key] = f"{type(exe).__name__}: {str(exe).splitlines()[0][:80] if str(exe) else ''}"
            continue
        a = args[key]
        err = check_gate_up(p, key[0], exe(*a), a)
        # W8A8 rounds the activations to e4m3 (3 mantissa bits): a few percent of the largest output
        if not err < (8e-2 if key[0] == "fp8" and fp8_activations(p.m, p.e, jnp.bfloat16) else 2e-2):
            out[key] = f"wrong: error {err:.1e}"
            continue
        out[key] = _median_us(lambda exe=exe, a=a: exe(*a), len(p.xs))
    return out


def sorted_by_expert(p: Problem) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per routing: (token of each row, rows sorted by expert; rows per expert) - the peers' input layout."""
    out = []
    for ids in p.ids:
        flat = np.asarray(ids).reshape(-1)
        out.append((np.argsort(flat, kind="stable") // p.k, np.bincount(flat, minlength=p.e)))
    return out


def torch_grouped_mm_us(p: Problem, sorted_rows) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        return None
    w = torch.randn(p.e, 2 * p.f, p.d, dtype=torch.bfloat16, device="cuda")  # transformers' layout
    calls = []
    for x, (token_of_row, counts) in zip(p.xs, sorted_rows):
        xs = torch.tensor(np.asarray(x, np.float32)[token_of_row], dtype=torch.bfloat16, device="cuda")
        offs = torch.tensor(np.cumsum(counts), dtype=torch.int32, device="cuda")
        calls.append((xs, offs))

    def run():
        for xs, offs in calls:
            torch._grouped_mm(xs, w.transpose(-2, -1), offs=offs)

    return cuda_event_us(run, len(calls))


def torch_scaled_grouped_mm_us(p: Problem, sorted_rows) -> float | str | None:
    """torch's FP8 grouped GEMM (e4m3 x e4m3, row-wise float32 scales: its supported recipe; moejax's block
    scales are finer), over the same sorted rows; None without torch/CUDA, the error text when it refuses."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or not hasattr(torch, "_scaled_grouped_mm"):
        return None
    e4m3 = torch.float8_e4m3fn
    w = torch.randn(p.e, 2 * p.f, p.d, device="cuda").to(e4m3)  # [E, N, K]: K-major, as the kernel wants
    w_scale = torch.ones(p.e, 2 * p.f, device="cuda", dtype=torch.float32)
    calls = []
    for x, (token_of_row, counts) in zip(p.xs, sorted_rows):
        xs = torch.tensor(np.asarray(x, np.float32)[token_of_row], device="cuda").to(e4m3)
        offs = torch.tensor(np.cumsum(counts), dtype=torch.int32, device="cuda")
        calls.append((xs, torch.ones(xs.shape[0], device="cuda", dtype=torch.float32), offs))

    def run():
        for xs, x_scale, offs in calls:
            torch._scaled_grouped_mm(xs, w.transpose(-2, -1), x_scale, w_scale, offs=offs, out_dtype=torch.bfloat16)

    try:
        return cuda_event_us(run, len(calls))
    except Exception as err:  # noqa: BLE001 - an unsupported build or shape is reported, not fatal
        return f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"


def peers_and_layers(p: Problem, sorted_rows) -> dict:
    """ragged_dot on the sorted rows, and the whole expert layer: moejax (each weight type) vs the reference."""
    sorted_x = [x[jnp.asarray(token_of_row)] for x, (token_of_row, _) in zip(p.xs, sorted_rows)]
    sizes = [jnp.asarray(counts, jnp.int32) for _, counts in sorted_rows]
    w_gate_up = jnp.concatenate([p.params[0].w_gate, p.params[0].w_up], axis=-1)
    ragged = jax.jit(lambda xs, w, ss: chained(lambda a, s: jax.lax.ragged_dot(a, w, s), list(zip(xs, ss))))
    layer = jax.jit(lambda xs, ws, ids, params: chained(
        lambda x, w, i: experts_pallas(x, w, i, params, interpret=INTERPRET), list(zip(xs, ws, ids))))
    ref = jax.jit(lambda xs, ws, ids, params: chained(
        lambda x, w, i: experts_reference(x, w, i, params), list(zip(xs, ws, ids))))
    jobs = {"ragged": (ragged, (sorted_x, w_gate_up, sizes)), "ref layer": (ref, (p.xs, p.weights, p.ids, p.params[0]))}
    for bits in BITS:
        jobs[f"layer {LABEL[bits]}"] = (layer, (p.xs, p.weights, p.ids, p.params[bits]))
    compiled = compile_all(jobs)
    out = {}
    for key, exe in compiled.items():
        if isinstance(exe, Exception):
            out[key] = None
            print(f"  {p.name}: {key} failed: {exe}", flush=True)
            continue
        a = jobs[key][1]
        if key.startswith("layer"):  # the first routing against the reference on the same (dequantized) weights
            got = np.asarray(exe(*a)[0], np.float32)
            want = np.asarray(ref(*a)[0], np.float32)
            out[key + " err"] = float(np.abs(got - want).max() / np.abs(want).max())
        out[key] = _median_us(lambda exe=exe, a=a: exe(*a), len(p.xs), rounds=5)
    return out


def rooflines(p: Problem) -> tuple[dict, int]:
    """Microseconds each weight type needs for x @ W_gate_up at the measured bandwidth and matmul rate."""
    active = len(np.unique(np.asarray(p.ids[0])))
    acts = p.m * p.d * 2 + p.m * 2 * p.f * 2
    flops = 2 * p.m * p.d * 2 * p.f
    out = {}
    for bits in BITS:
        w = active * 2 * p.d * p.f * 2 if bits == 0 else quantized_nbytes((active, p.d, 2 * p.f), bits, jnp.bfloat16)
        rate = RATES["fp8"] if bits == "fp8" and fp8_activations(p.m, p.e, jnp.bfloat16) else RATES["bf16"]
        out[bits] = max((w + acts) / RATES["hbm"], flops / rate) * 1e6
    return out, active


# Dense linears of the FP8 checkpoints (name, in, out): DeepSeek-V3's q_b_proj and o_proj, Qwen3-235B's q_proj.
DENSE_SHAPES = [("deepseek q_b_proj", 1536, 24576), ("deepseek o_proj", 16384, 7168),
                ("qwen3-235b q_proj", 4096, 8192)]
DENSE_TOKENS = (1, 64, 4096)


def bench_dense(rng, reps: int = 8) -> list[dict]:
    """x @ W through `kernels.matmul` (what the model's linears call) for bf16 and fp8 weights: fp8 is
    dequantized by XLA inside the step, so this is what FP8 costs the dense layers, beside the rooflines."""
    from moejax import kernels

    rows = []
    for name, k, n in DENSE_SHAPES:
        w = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), (k, n), jnp.bfloat16) * 0.02
        fp8 = jax.jit(quantize_fp8)(w)
        # (label, weight, kernels.FP8_DENSE while tracing): XLA's in-step dequantization, and the grouped kernel
        variants = [("bf16", w, "xla"), ("fp8", fp8, "xla"), ("fp8 pallas", fp8, "pallas")]
        for tokens in DENSE_TOKENS:
            r = reps if tokens <= 256 else 2
            xs = [jnp.asarray(rng.standard_normal((tokens, k)), jnp.bfloat16) for _ in range(r)]
            row = {"name": name, "k": k, "n": n, "tokens": tokens}
            ref = np.asarray(xs[0].astype(jnp.float32) @ dequantize(fp8))
            for label, weight, mode in variants:
                fn = jax.jit(lambda xs, w: chained(lambda x: kernels.matmul(x, w), [(x,) for x in xs]))
                saved, kernels.FP8_DENSE = kernels.FP8_DENSE, mode
                try:
                    got = np.asarray(fn(xs, weight)[0], np.float32)  # traced (and compiled) here
                    if label != "bf16":
                        row[f"{label} err"] = float(np.abs(got - ref).max() / np.abs(ref).max())
                    row[label] = _median_us(lambda fn=fn, weight=weight: fn(xs, weight), r)
                except Exception as err:  # noqa: BLE001 - reported in the table, not fatal
                    row[label] = f"{type(err).__name__}"
                finally:
                    kernels.FP8_DENSE = saved
            acts, flops = tokens * (k + n) * 2, 2 * tokens * k * n
            stored = {"bf16": k * n * 2, "fp8": quantized_nbytes((k, n), "fp8", jnp.bfloat16)}
            row["roof"] = {label: max((nbytes + acts) / RATES["hbm"], flops / RATES["bf16"]) * 1e6
                           for label, nbytes in stored.items()}
            rows.append(row)
            print(f"  dense {name} x {tokens}: " + json.dumps({a: (round(v, 2) if isinstance(v, float) else v)
                                                              for a, v in row.items() if a != "roof"}), flush=True)
    return rows


def bench_routing(rng, reps: int = 4, sweep: bool = False) -> dict:
    config = RoutingConfig(8, "sigmoid", True, 8, 4, 2.5)
    logits = [jnp.asarray(rng.standard_normal((ROUTING_TOKENS, 256)), jnp.float32) for _ in range(reps)]
    bias = jnp.asarray(rng.standard_normal(256) * 0.1, jnp.float32)
    settings = [(4, 2)] + ([(bt, w) for bt in (2, 4, 8, 16) for w in (1, 2, 4) if (bt, w) != (4, 2)] if sweep else [])
    jobs = {"reference": (jax.jit(lambda ls, b: chained(lambda l: route_reference(l, config, b), [(l,) for l in ls])),
                          (logits, bias))}
    for bt, w in settings:
        fn = jax.jit(lambda ls, b, bt=bt, w=w: chained(
            lambda l: route_pallas(l, config, b, block_tokens=bt, num_warps=w, interpret=INTERPRET),
            [(l,) for l in ls]))
        jobs[(bt, w)] = (fn, (logits, bias))
    compiled = compile_all(jobs)
    w_ref, i_ref = compiled["reference"](logits, bias)[0]
    out = {"reference": _median_us(lambda: compiled["reference"](logits, bias), reps)}
    for key in settings:
        exe = compiled[key]
        if isinstance(exe, Exception):
            print(f"  routing {key} failed: {str(exe)[:100]}", flush=True)
            continue
        w, i = exe(logits, bias)[0]
        same = bool((np.asarray(i) == np.asarray(i_ref)).all())
        werr = float(np.abs(np.asarray(w) - np.asarray(w_ref)).max())
        if not same or werr > 1e-5:
            print(f"  routing {key}: WRONG (ids equal {same}, weight diff {werr:.1e})", flush=True)
            continue
        out[key] = _median_us(lambda exe=exe: exe(logits, bias), reps)
        print(f"  routing block_tokens={key[0]} warps={key[1]}: {out[key]:.1f} us", flush=True)
    return out


def _fmt(v, width=9) -> str:
    return f"{v:>{width}.1f}" if isinstance(v, float) else f"{'-' if v is None else 'x':>{width}}"


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="moejax bench kernels")
    ap.add_argument("--shapes", type=int, nargs="*", default=None, help="indices into SHAPES (default: all six)")
    ap.add_argument("--sweep", action="store_true", help="time a grid of tiles per shape and weight type first")
    ap.add_argument("--no-layer", action="store_true", help="skip the peers and whole-layer timings")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense linears (bf16 and fp8 weights)")
    ap.add_argument("--sweep-weights", nargs="*", default=None, choices=["bf16", "int8", "int4", "fp8"],
                    help="with --sweep: only these weight types (default: all)")
    ap.add_argument("--json", default=os.environ.get("OUT") and os.path.join(os.environ["OUT"], "bench.json"))
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    if not INTERPRET:
        RATES.update(measure_machine())
    print("rates: " + ", ".join(f"{k} {v / 1e12:.2f} {'TB/s' if k == 'hbm' else 'TFLOP/s'}"
                                for k, v in RATES.items()), flush=True)
    results, sweeps = [], {}
    for index, (name, tokens, e, d, f, k) in enumerate(SHAPES):
        if args.shapes is not None and index not in args.shapes:
            continue
        t0 = time.time()
        p = build_problem(name, tokens, e, d, f, k, rng, reps=8 if tokens <= 256 else 1)
        per_expert = p.m / e
        tuned = {(bits, choose_tiles(p.m, e, d, f, 0 if bits in (8, 4) and dequantizes_first(p.m, e) else bits)): None
                 for bits in BITS}
        keys = dict(tuned)
        if args.sweep:
            swept = [b for b in BITS if args.sweep_weights is None or LABEL[b] in args.sweep_weights]
            keys.update({(bits, t): None for bits in swept for t in sweep_candidates(per_expert, bits)})
        times = time_gate_up(p, keys)
        row = dict(name=name, m=p.m)
        for bits in BITS:
            row[LABEL[bits]] = times[next(key for key in tuned if key[0] == bits)]
        if args.sweep:
            for bits in BITS:
                timed = sorted((v, key[1]) for key, v in times.items() if key[0] == bits and isinstance(v, float))
                sweeps[(name, LABEL[bits])] = [(v, dataclasses.astuple(t)) for v, t in timed]
                best = ", ".join(f"{v:.1f} {dataclasses.astuple(t)}" for v, t in timed[:3])
                failed = sum(1 for key, v in times.items() if key[0] == bits and not isinstance(v, float))
                print(f"  sweep {name} {LABEL[bits]}: best {best} ({len(timed)} timed, {failed} failed)", flush=True)
                row[f"best {LABEL[bits]}"] = timed[0][0] if timed else None
        roofs, active = rooflines(p)
        sorted_rows = sorted_by_expert(p)
        row.update(active=active, roof={LABEL[b]: v for b, v in roofs.items()},
                   torch=torch_grouped_mm_us(p, sorted_rows), torch_fp8=torch_scaled_grouped_mm_us(p, sorted_rows))
        if not args.no_layer:
            row.update(peers_and_layers(p, sorted_rows))
        results.append(row)
        print(f"{name} done in {time.time() - t0:.0f} s: "
              + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        del p
    routing = bench_routing(rng, sweep=args.sweep)
    dense = [] if args.no_dense else bench_dense(rng)

    head = (f"{'shape':<21}{'M':>6}{'experts':>8}{'bf16':>9}{'int8':>9}{'int4':>9}{'fp8':>9}{'ragged':>9}"
            f"{'torch':>9}{'torch8':>9}{'roof16':>9}{'roof8':>9}{'roof4':>9}{'rooffp8':>9}{'bf16/roof':>10}"
            f"{'torch/bf16':>11}{'int8/bf16':>10}{'int4/bf16':>10}{'fp8/bf16':>10}{'fp8/roof':>10}")
    lines = ["", "x @ W_gate_up, microseconds (moejax: fused gate/up + silu, tiles from the tuned table)", head,
             "-" * len(head)]
    for r in results:
        ratio = lambda a, b: f"{a / b:>10.2f}" if isinstance(a, float) and isinstance(b, float) else f"{'-':>10}"  # noqa: E731
        lines.append(f"{r['name']:<21}{r['m']:>6}{r['active']:>8}{_fmt(r['bf16'])}{_fmt(r['int8'])}{_fmt(r['int4'])}"
                     f"{_fmt(r['fp8'])}{_fmt(r.get('ragged'))}{_fmt(r['torch'])}{_fmt(r['torch_fp8'])}"
                     f"{_fmt(r['roof']['bf16'])}{_fmt(r['roof']['int8'])}{_fmt(r['roof']['int4'])}"
                     f"{_fmt(r['roof']['fp8'])}{ratio(r['bf16'], r['roof']['bf16'])}"
                     f" {ratio(r['torch'], r['bf16'])}{ratio(r['int8'], r['bf16'])}{ratio(r['int4'], r['bf16'])}"
                     f"{ratio(r['fp8'], r['bf16'])}{ratio(r['fp8'], r['roof']['fp8'])}")
    if not args.no_layer:
        head2 = (f"{'shape':<21}{'layer bf16':>11}{'layer int8':>11}{'layer int4':>11}{'layer fp8':>11}"
                 f"{'reference':>11}{'err bf16':>10}{'err int8':>10}{'err int4':>10}{'err fp8':>10}")
        lines += ["", "whole expert layer (align, gather, both kernels, combine), microseconds; errors vs the "
                  "reference "
                  "on the same weights", head2, "-" * len(head2)]
        for r in results:
            lines.append(f"{r['name']:<21}{_fmt(r.get('layer bf16'), 11)}{_fmt(r.get('layer int8'), 11)}"
                         f"{_fmt(r.get('layer int4'), 11)}{_fmt(r.get('layer fp8'), 11)}{_fmt(r.get('ref layer'), 11)}"
                         + "".join(f"{r.get(f'layer {b} err', float('nan')):>10.1e}"
                                   for b in ("bf16", "int8", "int4", "fp8")))
    if dense:
        head3 = (f"{'dense linear':<21}{'K':>7}{'N':>7}{'tokens':>7}{'bf16':>9}{'fp8':>9}{'fp8 pl':>9}"
                 f"{'fp8/bf16':>10}{'pl/bf16':>9}{'roof16':>9}{'rooffp8':>9}{'err fp8':>10}{'err pl':>9}")
        lines += ["", "dense x @ W through kernels.matmul, microseconds (fp8: dequantized by XLA in the step; "
                  "fp8 pl: MOEJAX_FP8_DENSE=pallas, the grouped kernel as one expert)", head3, "-" * len(head3)]
        for r in dense:
            def ratio(a, width=10):
                ok = all(isinstance(r[x], float) for x in ("bf16", a))
                return f"{r[a] / r['bf16']:>{width}.2f}" if ok else f"{'-':>{width}}"

            lines.append(f"{r['name']:<21}{r['k']:>7}{r['n']:>7}{r['tokens']:>7}{_fmt(r['bf16'])}{_fmt(r['fp8'])}"
                         f"{_fmt(r['fp8 pallas'])}{ratio('fp8')}{ratio('fp8 pallas', 9)}{_fmt(r['roof']['bf16'])}"
                         f"{_fmt(r['roof']['fp8'])}{r.get('fp8 err', float('nan')):>10.1e}"
                         f"{r.get('fp8 pallas err', float('nan')):>9.1e}")
    ours = routing.get((4, 2))
    best = min((v, k) for k, v in routing.items() if k != "reference")
    lines.append(f"\nrouting T={ROUTING_TOKENS} E=256 groups 8/4 top-8 sigmoid+bias: "
                 f"pallas {_fmt(ours, 0)} us (default tiles), "
                 f"best {best[0]:.1f} us {best[1]}, jitted reference {routing['reference']:.1f} us, speedup "
                 f"{routing['reference'] / best[0]:.2f}x")
    print("\n".join(lines), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rates=RATES, results=results, dense=dense, routing={str(k): v for k, v in routing.items()},
                           sweeps={" ".join(k): v for k, v in sweeps.items()}), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
