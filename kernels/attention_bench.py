"""Attention benchmark (GPU): moejax's paged kernels against their peers and the rooflines, in one run.

    python -m moejax bench attention [--quick] [--part decode|prefill|all] [--json FILE]

Prefill chunks come first (kernels/prefill_bench.py: against the bf16 matmul rate); then decode.

For the attention shapes of Qwen3-30B-A3B (GQA 32/4 x 128), Mixtral (32/8 x 128), GPT-OSS's sliding layers
(64/8 x 64, window 128, sinks) and DeepSeek-V3's MLA (128 heads over one 576-wide latent, 512 values), at
batch 1, 16, 64, 256 with uniform and mixed contexts of 512 to 32k tokens, it prints per call:
- moejax: `kernels.pallas_paged_attention.paged_decode` over shuffled pages of 16 tokens (bf16 KV);
- the pure-JAX reference behind the same door (XLA gathers pages chunk by chunk);
- jax's `pallas.ops.gpu.paged_attention` (decode only, its own [kv_heads, pages, ...] layout; no windows or
  sinks, so it runs only where the work is the same);
- cuDNN through `jax.nn.dot_product_attention` on a contiguous [batch, max context] cache (head dims <= 128);
- torch's scaled_dot_product_attention on a contiguous cache (when torch has CUDA; uniform contexts);
- the roofline: KV bytes the step must read / the HBM bandwidth measured in the same run, and the share of
  that bandwidth moejax reaches.

Method: one jitted call runs the op R times back to back, each time on another copy of the cache (R chosen so
that the copies outgrow the 50 MB L2), chained so XLA cannot merge them; 7 such calls run under the profiler
and a figure is the device's busy time / (7 R): the GPU's clock, as torch's CUDA events are (a benchmark
call's host dispatch is not the op's cost; inside the engine's step there is none). The roofline uses the
faster of two measured bandwidths: a copy (read + write) and a read-only sum. Every kernel is checked against the
reference first. Run with XLA_PYTHON_CLIENT_PREALLOCATE=false so that torch finds memory.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.bench.device_time import device_seconds
from moejax.bench.roofline import hbm_bandwidth
from moejax.kernels.attention_reference import NO_WINDOW, paged_attention as reference
from moejax.kernels.bench import chained, cuda_event_us
from moejax.kernels.pallas_paged_attention import paged_decode

PAGE = 16
MODELS = {  # heads, kv heads, head dim, value dim (MLA), window, sinks
    "qwen3-30b-a3b": dict(heads=32, kv_heads=4, head_dim=128),
    "mixtral": dict(heads=32, kv_heads=8, head_dim=128),
    "gpt-oss sliding": dict(heads=64, kv_heads=8, head_dim=64, window=128, sinks=True),
    "deepseek-v3 mla": dict(heads=128, kv_heads=1, head_dim=576, value_dim=512),
}
# (batch, context, mixed): mixed contexts are uniform in [512, context]
CASES = [(1, 512, False), (1, 4096, False), (1, 32768, False), (16, 2048, False), (16, 8192, False),
         (64, 2048, False), (64, 8192, False), (64, 8192, True), (256, 2048, False), (256, 4096, True)]
QUICK = [(1, 32768, False), (64, 2048, False), (64, 8192, False), (256, 2048, False)]
L2_BYTES = 50 << 20
ROUNDS = 7
INTERPRET = jax.default_backend() != "gpu"  # off the GPU the kernel is interpreted (a smoke test of this script)


def _median_us(fn, args, per_call: int) -> float:
    """Device time per op call: the profiler's busy time over ROUNDS calls (the GPU's own clock, as torch's CUDA
    events are; the host's dispatch of each benchmark call is not the op's cost); wall time off the GPU."""
    jax.block_until_ready(fn(*args))

    def rounds():
        for _ in range(ROUNDS):
            jax.block_until_ready(fn(*args))

    seconds = device_seconds(rounds) if not INTERPRET else None
    if seconds is None:
        t0 = time.perf_counter()
        rounds()
        seconds = time.perf_counter() - t0
    return seconds / ROUNDS / per_call * 1e6


class Problem:
    """One shape: R copies of the cache as R layers of one pool, shuffled page tables, contexts, queries."""

    def __init__(self, rng, model: dict, batch: int, context: int, mixed: bool):
        self.h, self.kvh, self.d = model["heads"], model["kv_heads"], model["head_dim"]
        self.dv = model.get("value_dim") or self.d
        self.mla = "value_dim" in model
        self.window = model.get("window", NO_WINDOW)
        lengths = rng.integers(min(512, context // 2), context + 1, batch) if mixed else np.full(batch, context)
        self.lengths = lengths.astype(np.int32)  # cached tokens; the step's own token comes on top
        self.max_pages = -(-(context + 1) // PAGE)
        pages = int(sum(-(-(n + 1) // PAGE) for n in self.lengths)) + 1
        seen = np.minimum(self.lengths, self.window)
        per_token = self.kvh * (self.d + (0 if self.mla else self.dv)) * 2
        self.kv_bytes = int(seen.sum()) * per_token
        self.reps = int(np.clip(-(-2 * L2_BYTES // max(self.kv_bytes, 1)), 1, 16))
        order = rng.permutation(np.arange(1, pages))
        table = np.zeros((batch, self.max_pages), np.int32)
        at = 0
        for i, n in enumerate(self.lengths):
            used = -(-(n + 1) // PAGE)
            table[i, :used] = order[at: at + used]
            at += used
        self.table = jnp.asarray(table)
        dt = jnp.bfloat16
        key = jax.random.key(int(rng.integers(1 << 30)))
        ks = jax.random.split(key, 6)
        shape = (self.reps, pages, PAGE, self.kvh)
        self.k_pool = jax.random.normal(ks[0], (*shape, self.d), dt)
        self.v_pool = None if self.mla else jax.random.normal(ks[1], (*shape, self.dv), dt)
        self.q = jax.random.normal(ks[2], (self.reps, batch, self.h, self.d), dt)
        self.k_new = jax.random.normal(ks[3], (batch, self.kvh, self.d), dt)
        self.v_new = None if self.mla else jax.random.normal(ks[4], (batch, self.kvh, self.dv), dt)
        self.sinks = jax.random.normal(ks[5], (self.h,), jnp.float32) if model.get("sinks") else None
        self.pos = jnp.asarray(self.lengths)
        self.scale = float(1 / np.sqrt(self.d))

    def moejax(self, tiles=None):
        def run(q, k_pool, v_pool):
            return chained(lambda r, qr: paged_decode(
                qr, self.pos, self.table, k_pool, v_pool, r, self.k_new, self.v_new, scale=self.scale,
                window=self.window, sinks_H=self.sinks, value_dim=self.dv if self.mla else None, tiles=tiles,
                interpret=INTERPRET), [(jnp.int32(r), q[r]) for r in range(self.reps)])
        return jax.jit(run), (self.q, self.k_pool, self.v_pool)

    def reference(self):
        def run(q, k_pool, v_pool):
            n = q.shape[1]
            return chained(lambda r, qr: reference(
                qr[:, None], self.pos[:, None], self.table, k_pool, v_pool, r, self.k_new[:, None],
                None if self.v_new is None else self.v_new[:, None], jnp.arange(n), scale=self.scale,
                window=self.window, sinks_H=self.sinks, value_dim=self.dv if self.mla else None, max_back=0)[:, 0],
                [(jnp.int32(r), q[r]) for r in range(self.reps)])
        return jax.jit(run), (self.q, self.k_pool, self.v_pool)

    def jax_paged(self):
        """jax.experimental.pallas.ops.gpu.paged_attention on its layout ([kv_heads, pages, page, dim]);
        the step's own token is in its cache (lengths + 1)."""
        if self.mla or self.window != NO_WINDOW or self.sinks is not None or INTERPRET:
            return None
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

        k = jnp.moveaxis(self.k_pool, 3, 1)  # [reps, kv_heads, pages, page, dim]
        v = jnp.moveaxis(self.v_pool, 3, 1)
        splits = 16
        width = -(-self.max_pages // (8 * splits)) * 8 * splits
        table = jnp.pad(self.table, ((0, 0), (0, width - self.max_pages)))
        lengths = self.pos + 1

        def run(q, k, v):
            return chained(lambda r, qr: paged_attention(qr * self.scale, k[r], v[r], table, lengths,
                                                         k_splits=splits),
                           [(r, q[r]) for r in range(self.reps)])
        return jax.jit(run), (self.q, k, v)

    def contiguous(self):
        """[reps, batch, max context + 1, kv_heads, dim] K and V for the dense peers (None: too large)."""
        b = self.table.shape[0]
        s = int(self.lengths.max()) + 1
        if self.mla or self.reps * b * s * self.kvh * (self.d + self.dv) * 2 > 24e9:
            return None
        k = jax.random.normal(jax.random.key(1), (self.reps, b, s, self.kvh, self.d), jnp.bfloat16)
        v = jax.random.normal(jax.random.key(2), (self.reps, b, s, self.kvh, self.dv), jnp.bfloat16)
        return k, v

    def cudnn(self, kv):
        if kv is None or self.d > 128 or self.sinks is not None or INTERPRET:
            return None
        lengths = self.pos + 1
        window = None if self.window == NO_WINDOW else (self.window - 1, 0)

        def run(q, k, v):
            return chained(lambda r, qr: jax.nn.dot_product_attention(
                qr[:, None], k[r], v[r], scale=self.scale, key_value_seq_lengths=lengths,
                local_window_size=window, implementation="cudnn"),
                [(r, q[r]) for r in range(self.reps)])
        return jax.jit(run), (self.q, *kv)


def torch_sdpa_us(p: Problem, rounds: int = 7) -> float | None:
    """torch SDPA (flash / memory-efficient backends, GQA) on a contiguous cache of the same shape; uniform
    contexts only (mixed ones would need a mask, which leaves the fast kernels)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or p.mla or p.sinks is not None or p.window != NO_WINDOW or \
            len(set(p.lengths.tolist())) > 1:
        return None
    b, s = len(p.lengths), int(p.lengths[0]) + 1
    reps = p.reps
    q = [torch.randn(b, p.h, 1, p.d, device="cuda", dtype=torch.bfloat16) for _ in range(reps)]
    k = [torch.randn(b, p.kvh, s, p.d, device="cuda", dtype=torch.bfloat16) for _ in range(reps)]
    v = [torch.randn(b, p.kvh, s, p.dv, device="cuda", dtype=torch.bfloat16) for _ in range(reps)]
    f = torch.nn.functional.scaled_dot_product_attention

    def run():
        for r in range(reps):
            f(q[r], k[r], v[r], enable_gqa=True)

    us = cuda_event_us(run, reps, rounds)
    del run, q, k, v
    torch.cuda.empty_cache()
    return us


def read_bandwidth(nbytes: int) -> float:
    """Bytes per second of a jitted read-only pass (a float32 sum of bf16 values) over `nbytes`."""
    x = jnp.ones((max(nbytes // 8192, 1), 4096), jnp.bfloat16)
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    jax.block_until_ready(total(x))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(total(x))
        times.append(time.perf_counter() - t0)
    return x.size * 2 / float(np.median(times))


def _check(p: Problem) -> float:
    """Relative error of the kernel against the reference on the first copy."""
    fn, args = p.moejax()
    ref_fn, _ = p.reference()
    got = np.asarray(fn(*args)[0], np.float32)
    ref = np.asarray(ref_fn(*args)[0], np.float32)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def _fmt(x, width=9):
    return f"{x:>{width}.1f}" if isinstance(x, float) else f"{'-':>{width}}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="four cases per model")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--part", choices=["decode", "prefill", "all"], default="all")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    result = {}
    if args.part in ("prefill", "all"):
        from moejax.bench.roofline import matmul_rate
        from moejax.kernels.prefill_bench import CASES as PREFILL_CASES, run_prefill

        rate = matmul_rate(8192 if not INTERPRET else 256)["matmul_flops_per_s"]
        print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: bf16 matmul measured {rate / 1e12:.0f} "
              "TFLOP/s (8192^3 jnp.dot)")
        models = {k: MODELS[k] for k in args.models}
        cases = PREFILL_CASES[:1] if args.quick else PREFILL_CASES
        result.update(matmul_flops_per_s=rate, prefill_rows=run_prefill(models, rate, _median_us, _fmt, INTERPRET,
                                                                          cases))
    if args.part == "prefill":
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    copy_bw = hbm_bandwidth(4 << 30)["hbm_bytes_per_s"]
    read_bw = read_bandwidth(4 << 30)
    bw = max(copy_bw, read_bw)  # the roofline takes the faster: a decode only reads
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: HBM measured {copy_bw / 1e12:.2f} TB/s (copy), "
          f"{read_bw / 1e12:.2f} TB/s (read); roofline at {bw / 1e12:.2f} TB/s")
    head = (f"{'model':<16} {'batch':>5} {'context':>9} {'KV MB':>8} {'moejax':>9} {'jax pa':>9} {'cudnn':>9} "
            f"{'torch':>9} {'ref':>9} {'roof':>9} {'of BW':>6} {'err':>8}")
    print("times in us per call\n" + head)
    rows = []
    rng = np.random.default_rng(0)
    for name in args.models:
        for batch, context, mixed in (QUICK if args.quick else CASES):
            if name == "deepseek-v3 mla" and batch * context > 64 * 8192:
                continue
            p = Problem(rng, MODELS[name], batch, context, mixed)
            row = dict(model=name, batch=batch, context=context, mixed=mixed, kv_bytes=p.kv_bytes, reps=p.reps)
            try:
                row["err"] = _check(p)
                row["moejax"] = _median_us(*p.moejax(), p.reps)
            except Exception as e:  # noqa: BLE001 - a failing case is printed, the run goes on
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            for peer in ("reference", "jax_paged"):
                try:
                    job = getattr(p, peer)()
                    row[peer] = None if job is None else _median_us(*job, p.reps)
                except Exception as e:  # noqa: BLE001
                    row[peer + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            try:
                kv = p.contiguous()
                job = p.cudnn(kv)
                row["cudnn"] = None if job is None else _median_us(*job, p.reps)
                del kv
            except Exception as e:  # noqa: BLE001
                row["cudnn_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            try:
                row["torch"] = torch_sdpa_us(p)
            except Exception as e:  # noqa: BLE001
                row["torch_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            row["roofline"] = p.kv_bytes / bw * 1e6
            share = row["roofline"] / row["moejax"] if row.get("moejax") else None
            ctx = f"{'~' if mixed else ''}{context}"
            print(f"{name:<16} {batch:>5} {ctx:>9} {p.kv_bytes / 1e6:>8.1f} {_fmt(row.get('moejax'))} "
                  f"{_fmt(row.get('jax_paged'))} {_fmt(row.get('cudnn'))} {_fmt(row.get('torch'))} "
                  f"{_fmt(row.get('reference'))} {_fmt(row['roofline'])} "
                  f"{(f'{share:.0%}' if share else '-'):>6} {row.get('err', float('nan')):>8.1e}", flush=True)
            for key in [k for k in row if k.endswith("error")]:
                print(f"   {key}: {row[key]}")
            rows.append(row)
            del p
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(result, hbm_bytes_per_s=bw, copy_bytes_per_s=copy_bw, read_bytes_per_s=read_bw,
                           rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
