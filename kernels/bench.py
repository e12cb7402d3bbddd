"""Kernel benchmark (GPU): grouped expert matmul and routing against their peers and the roofline, in one run.

    python -m moejax.kernels.bench            # or: moejax bench kernels

For the six shapes of REFERENCE.md section 3 (x @ W_gate_up with random routing) it prints moejax's fused
gate/up kernel in bf16, int8 and int4, XLA's ragged_dot, torch._grouped_mm (when torch has CUDA), the whole
moejax expert layer (alignment, gather, both kernels, combine), and the roofline from the bytes and flops each
shape needs. Then routing (T=4096, E=256, 8 groups, top-4 groups, top-8, sigmoid with bias) against its jitted
pure-JAX reference. Every kernel output is checked against its reference first.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.kernels.align import moe_align_block_size
from moejax.kernels.experts import ExpertWeights, experts_reference
from moejax.kernels.pallas_experts import choose_tiles, experts_pallas, grouped_matmul
from moejax.kernels.pallas_routing import route_pallas
from moejax.kernels.quant import quantize
from moejax.kernels.routing import RoutingConfig, route_reference

HBM = 2.6e12  # bytes/s, measured on H100 (REFERENCE.md section 1)
PEAK = 680e12  # bf16 flop/s, measured XLA matmul on H100

SHAPES = [  # name, tokens, experts, hidden, expert width, top_k
    ("qwen3 decode 1", 1, 128, 2048, 768, 8),
    ("qwen3 decode 64", 64, 128, 2048, 768, 8),
    ("qwen3 decode 256", 256, 128, 2048, 768, 8),
    ("qwen3 prefill 4096", 4096, 128, 2048, 768, 8),
    ("mixtral decode 64", 64, 8, 4096, 14336, 2),
    ("mixtral prefill 4096", 4096, 8, 4096, 14336, 2),
]


def timeit(fn, *args, iters: int = 20) -> float:
    """Microseconds per call after warm-up: the best of 3 rounds of `iters` back-to-back calls (dispatch overlaps
    the GPU), so short kernels are not timed by the host's call overhead alone."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / iters)
    return best * 1e6


def torch_grouped_mm_us(x_rows: np.ndarray, counts: np.ndarray, e: int, d: int, n: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        return None
    x = torch.tensor(x_rows, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(e, n, d, dtype=torch.bfloat16, device="cuda")  # transformers' layout, transposed per call
    offs = torch.tensor(np.cumsum(counts), dtype=torch.int32, device="cuda")
    fn = lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)  # noqa: E731
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return float(np.median(times))


def bench_shape(name, tokens, e, d, f, k, rng):
    x = jnp.asarray(rng.standard_normal((tokens, d)), jnp.bfloat16)
    logits = jnp.asarray(rng.standard_normal((tokens, e)), jnp.float32)
    weights, ids = route_reference(logits, RoutingConfig(k))
    w_gate = jnp.asarray(rng.standard_normal((e, d, f)) * 0.02, jnp.bfloat16)
    w_up = jnp.asarray(rng.standard_normal((e, d, f)) * 0.02, jnp.bfloat16)
    w_down = jnp.asarray(rng.standard_normal((e, f, d)) * 0.02, jnp.bfloat16)
    tiles = choose_tiles(tokens * k, e, d, f)

    @jax.jit
    def prepare(x, ids):
        sorted_ids, block_expert, _ = moe_align_block_size(ids, e, tiles.block_m)
        rows = x[jnp.minimum(sorted_ids // k, tokens - 1)]
        return rows, block_expert

    rows, block_expert = prepare(x, ids)
    log = lambda what: print(f"  {name}: {what}", flush=True)  # noqa: E731
    variants = {"bf16": (w_gate, w_up)}
    quantize_jit = jax.jit(quantize, static_argnums=(1,))
    for bits in (8, 4):
        variants[f"int{bits}"] = (quantize_jit(w_gate, bits), quantize_jit(w_up, bits))
    results = {}
    for label, (g, u) in variants.items():
        fn = jax.jit(lambda rows, be, g=g, u=u: grouped_matmul(rows, be, [g, u], tiles, fuse=True,
                                                               out_dtype=jnp.bfloat16))
        results[label] = timeit(fn, rows, block_expert)
        log(f"{label} {results[label]:.1f} us")

    # Correctness of the whole layer against the reference, in bf16 and int4.
    params = ExpertWeights(w_gate, w_up, w_down)
    ref = experts_reference(x, weights, ids, params).astype(jnp.float32)
    got = experts_pallas(x, weights, ids, params).astype(jnp.float32)
    err = float(jnp.abs(got - ref).max() / jnp.abs(ref).max())
    log(f"layer error {err:.1e}")
    layer_us = timeit(lambda x, w, i: experts_pallas(x, w, i, params), x, weights, ids)
    ref_layer_us = timeit(jax.jit(lambda x, w, i: experts_reference(x, w, i, params)), x, weights, ids)

    # Peers on the same rows: XLA ragged_dot and torch._grouped_mm over x_sorted @ W_gate_up [E, D, 2F].
    flat = np.asarray(ids).reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=e)
    x_sorted = jnp.asarray(np.asarray(x, np.float32)[order // k], jnp.bfloat16)
    w_gate_up = jnp.concatenate([w_gate, w_up], axis=-1)
    sizes = jnp.asarray(counts, jnp.int32)
    ragged = timeit(jax.jit(lambda a, w, s: jax.lax.ragged_dot(a, w, s)), x_sorted, w_gate_up, sizes)
    torch_us = torch_grouped_mm_us(np.asarray(x_sorted, np.float32), counts, e, d, 2 * f)

    m = tokens * k
    active = int((counts > 0).sum())
    bytes_needed = active * d * 2 * f * 2 + m * d * 2 + m * 2 * f * 2
    roof = max(bytes_needed / HBM, 2 * m * d * 2 * f / PEAK) * 1e6
    return dict(name=name, m=m, active=active, mb=bytes_needed / 1e6, roof=roof, ragged=ragged, torch=torch_us,
                layer=layer_us, ref_layer=ref_layer_us, err=err, **results)


def bench_routing(rng):
    config = RoutingConfig(8, "sigmoid", True, 8, 4, 2.5)
    logits = jnp.asarray(rng.standard_normal((4096, 256)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(256) * 0.1, jnp.float32)
    ref_fn = jax.jit(lambda l, b: route_reference(l, config, b))
    w_ref, i_ref = ref_fn(logits, bias)
    w, i = route_pallas(logits, config, bias)
    same = bool((np.asarray(i) == np.asarray(i_ref)).all())
    werr = float(np.abs(np.asarray(w) - np.asarray(w_ref)).max())
    return timeit(lambda l, b: route_pallas(l, config, b), logits, bias), timeit(ref_fn, logits, bias), same, werr


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", type=int, nargs="*", default=None, help="indices into SHAPES")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    if args.verbose:
        ours, ref, same, werr = bench_routing(rng)
        print(f"routing: pallas {ours:.1f} us, reference {ref:.1f} us, ids equal {same}", flush=True)
    rows = []
    for i, shape in enumerate(SHAPES):
        if args.shapes is not None and i not in args.shapes:
            continue
        t0 = time.time()
        rows.append(bench_shape(*shape, rng))
        if args.verbose:
            print(f"{shape[0]} done in {time.time() - t0:.0f}s: {rows[-1]}", flush=True)
    head = (f"{'shape':<22}{'M':>6}{'experts':>8}{'MB':>7}{'bf16':>9}{'int8':>9}{'int4':>9}{'ragged_dot':>11}"
            f"{'torch_gmm':>10}{'roofline':>9}{'bf16/roof':>10}{'bf16/torch':>11}{'layer':>9}{'ref layer':>10}"
            f"{'layer err':>10}")
    print("\nx @ W_gate_up (moejax: fused gate/up + silu), microseconds\n" + head + "\n" + "-" * len(head))
    for r in rows:
        t = f"{r['torch']:10.1f}" if r["torch"] else f"{'-':>10}"
        vs_t = f"{r['bf16'] / r['torch']:10.2f}x" if r["torch"] else f"{'-':>11}"
        print(f"{r['name']:<22}{r['m']:>6}{r['active']:>8}{r['mb']:>7.0f}{r['bf16']:>9.1f}{r['int8']:>9.1f}"
              f"{r['int4']:>9.1f}{r['ragged']:>11.1f}{t}{r['roof']:>9.1f}{r['bf16'] / r['roof']:>9.2f}x{vs_t}"
              f"{r['layer']:>9.1f}{r['ref_layer']:>10.1f}{r['err']:>10.1e}")
    r64 = next((r for r in rows if r["name"] == "qwen3 decode 64"), rows[0])
    print(f"\n{r64['name']}: int8/bf16 = {r64['int8'] / r64['bf16']:.2f} (target <= 0.6), "
          f"int4/bf16 = {r64['int4'] / r64['bf16']:.2f} (target <= 0.4)")
    ours, ref, same, werr = bench_routing(rng)
    print(f"routing T=4096 E=256 groups 8/4 top-8 sigmoid+bias: pallas {ours:.1f} us, jitted reference {ref:.1f} us, "
          f"speedup {ref / ours:.2f}x (target >= 2); ids equal: {same}, max weight diff {werr:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
