"""Prefill-chunk attention benchmark (GPU), the prefill half of `moejax bench attention`.

For each attention shape of attention_bench.MODELS and three chunk layouts (one fresh 4,096-token prompt; a
2,048-token chunk after a 2,048-token cached prefix; 8 chunks of 512 after 1,536 cached), in device time per
call:
- moejax: `kernels.pallas_paged_prefill.paged_prefill` over shuffled pages of 16 tokens (bf16), the chunk cut
  into blocks of 64 queries as the engine lays it out;
- the pure-JAX reference behind the same door;
- fresh prompts only (the peers' causal masks are top-left aligned: no cached prefix): cuDNN flash attention
  through `jax.nn.dot_product_attention`, jax's Pallas `ops.gpu.attention.mha` (no GQA: K/V repeated per
  head) and torch's scaled_dot_product_attention, each on contiguous [batch, tokens, heads, dim] tensors;
- the roofline: the causal FLOPs (QK^T and PV over the keys each query sees) at the bf16 matmul rate measured
  in the same run, and the share of that rate moejax reaches.
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from moejax.kernels.attention_reference import NO_WINDOW, paged_attention as reference
from moejax.kernels.bench import chained, cuda_event_us
from moejax.kernels.pallas_paged_prefill import paged_prefill

PAGE, QB = 16, 64
# (chunks, new tokens per chunk, cached tokens before each chunk)
CASES = [(1, 4096, 0), (1, 2048, 2048), (8, 512, 1536)]
REPS = 3


class PrefillProblem:
    def __init__(self, rng, model: dict, chunks: int, new: int, cached: int, interpret: bool):
        self.h, self.kvh, self.d = model["heads"], model["kv_heads"], model["head_dim"]
        self.dv = model.get("value_dim") or self.d
        self.mla = "value_dim" in model
        self.window = model.get("window", NO_WINDOW)
        self.chunks, self.new, self.cached = chunks, new, cached
        self.interpret = interpret
        per = -(-new // QB)
        max_pages = -(-(cached + new) // PAGE)
        pages = chunks * max_pages + 1
        order = rng.permutation(np.arange(1, pages))
        tables, pos, first = [], [], []
        for c in range(chunks):
            table = order[c * max_pages:(c + 1) * max_pages]
            for b in range(per):
                p = np.full(QB, -1, np.int32)
                lo, hi = cached + b * QB, min(cached + (b + 1) * QB, cached + new)
                p[: hi - lo] = np.arange(lo, hi)
                tables.append(table), pos.append(p), first.append(c * per)
        self.table, self.pos = jnp.asarray(np.stack(tables)), jnp.asarray(np.stack(pos))
        self.first = jnp.asarray(first, jnp.int32)
        n = len(pos)
        q_pos = np.arange(cached, cached + new)
        seen = np.minimum(q_pos + 1, self.window).sum() * chunks  # keys each query sees, summed
        self.flops = 2 * int(seen) * self.h * (self.d + self.dv)
        ks = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 6)
        dt = jnp.bfloat16
        self.k_pool = jax.random.normal(ks[0], (REPS, pages, PAGE, self.kvh, self.d), dt)
        self.v_pool = None if self.mla else jax.random.normal(ks[1], (REPS, pages, PAGE, self.kvh, self.dv), dt)
        self.q = jax.random.normal(ks[2], (REPS, n, QB, self.h, self.d), dt)
        self.k_new = jax.random.normal(ks[3], (n, QB, self.kvh, self.d), dt)
        self.v_new = None if self.mla else jax.random.normal(ks[4], (n, QB, self.kvh, self.dv), dt)
        self.sinks = jax.random.normal(ks[5], (self.h,), jnp.float32) if model.get("sinks") else None
        self.scale = float(1 / np.sqrt(self.d))

    def _paged(self, fn, **extra):
        def run(q, k_pool, v_pool):
            return chained(lambda r, qr: fn(
                qr, self.pos, self.table, k_pool, v_pool, r, self.k_new, self.v_new, self.first, scale=self.scale,
                window=self.window, sinks_H=self.sinks, value_dim=self.dv if self.mla else None, **extra),
                [(jnp.int32(r), q[r]) for r in range(REPS)])
        return jax.jit(run), (self.q, self.k_pool, self.v_pool)

    def moejax(self, tiles=None):
        return self._paged(paged_prefill, interpret=self.interpret, tiles=tiles)

    def reference(self):
        return self._paged(reference)

    def contiguous(self):
        """[REPS, chunks, new, heads, dim] q and [chunks, new, kv_heads, dim] K, V of a fresh prompt (None:
        the peers' causal masks cannot express a cached prefix; MLA has no dense peer here)."""
        if self.cached or self.mla or self.interpret:
            return None
        ks = jax.random.split(jax.random.key(7), 3)
        b, s = self.chunks, self.new
        return (jax.random.normal(ks[0], (REPS, b, s, self.h, self.d), jnp.bfloat16),
                jax.random.normal(ks[1], (b, s, self.kvh, self.d), jnp.bfloat16),
                jax.random.normal(ks[2], (b, s, self.kvh, self.dv), jnp.bfloat16))

    def cudnn(self, qkv):
        if qkv is None or self.d > 128 or self.sinks is not None:
            return None
        window = None if self.window == NO_WINDOW else (self.window - 1, 0)

        def run(q, k, v):
            return chained(lambda r, qr: jax.nn.dot_product_attention(
                qr, k, v, scale=self.scale, is_causal=True, local_window_size=window, implementation="cudnn"),
                [(r, q[r]) for r in range(REPS)])
        return jax.jit(run), qkv

    def jax_mha(self, qkv):
        if qkv is None or self.sinks is not None or self.window != NO_WINDOW:
            return None
        from jax.experimental.pallas.ops.gpu.attention import mha

        g = self.h // self.kvh

        def run(q, k, v):
            k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
            return chained(lambda r, qr: mha(qr, k, v, None, sm_scale=self.scale, causal=True),
                           [(r, q[r]) for r in range(REPS)])
        return jax.jit(run), qkv


def torch_sdpa_us(p: PrefillProblem, rounds: int = 7) -> float | None:
    """torch SDPA, causal (flash backend, GQA), on a fresh prompt of the same shape."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or p.cached or p.mla or p.sinks is not None or p.window != NO_WINDOW:
        return None
    b, s = p.chunks, p.new
    q = [torch.randn(b, p.h, s, p.d, device="cuda", dtype=torch.bfloat16) for _ in range(REPS)]
    k = torch.randn(b, p.kvh, s, p.d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, p.kvh, s, p.dv, device="cuda", dtype=torch.bfloat16)
    f = torch.nn.functional.scaled_dot_product_attention

    def run():
        for r in range(REPS):
            f(q[r], k, v, is_causal=True, enable_gqa=True)

    us = cuda_event_us(run, REPS, rounds)
    del run, q, k, v
    torch.cuda.empty_cache()
    return us


def run_prefill(models: dict, rate: float, median_us, fmt, interpret: bool, cases=CASES) -> list[dict]:
    """Print one row per (model, case); returns the rows. median_us(fn, args, per_call) times a job."""
    head = (f"{'model':<16} {'chunks':>6} {'new':>6} {'cached':>6} {'GFLOP':>7} {'moejax':>9} {'cudnn':>9} "
            f"{'jax mha':>9} {'torch':>9} {'ref':>9} {'roof':>9} {'of rate':>7} {'err':>8}")
    print("prefill chunks (blocks of 64 queries), times in us per call\n" + head)
    rows = []
    rng = np.random.default_rng(1)
    for name, model in models.items():
        for chunks, new, cached in cases:
            p = PrefillProblem(rng, model, chunks, new, cached, interpret)
            row = dict(model=name, chunks=chunks, new=new, cached=cached, flops=p.flops)
            try:
                fn, args = p.moejax()
                ref_fn, _ = p.reference()
                got, ref = np.asarray(fn(*args)[0], np.float32), np.asarray(ref_fn(*args)[0], np.float32)
                row["err"] = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
                row["moejax"] = median_us(fn, args, REPS)
                row["reference"] = median_us(ref_fn, args, REPS)
            except Exception as e:  # noqa: BLE001 - a failing case is printed, the run goes on
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            qkv = p.contiguous()
            for peer in ("cudnn", "jax_mha"):
                try:
                    job = getattr(p, peer)(qkv)
                    row[peer] = None if job is None else median_us(*job, REPS)
                except Exception as e:  # noqa: BLE001
                    row[peer + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            del qkv
            try:
                row["torch"] = None if interpret else torch_sdpa_us(p)
            except Exception as e:  # noqa: BLE001
                row["torch_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            row["roofline"] = p.flops / rate * 1e6
            share = row["roofline"] / row["moejax"] if row.get("moejax") else None
            print(f"{name:<16} {chunks:>6} {new:>6} {cached:>6} {p.flops / 1e9:>7.1f} {fmt(row.get('moejax'))} "
                  f"{fmt(row.get('cudnn'))} {fmt(row.get('jax_mha'))} {fmt(row.get('torch'))} "
                  f"{fmt(row.get('reference'))} {fmt(row['roofline'])} {(f'{share:.0%}' if share else '-'):>7} "
                  f"{row.get('err', float('nan')):>8.1e}", flush=True)
            for key in [k for k in row if k.endswith("error")]:
                print(f"   {key}: {row[key]}")
            rows.append(row)
            del p
    return rows
