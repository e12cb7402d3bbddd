"""The device's two rates, measured in the run that uses them (no constants carried over from other machines):
HBM bandwidth from a large device-to-device pass, bf16 matmul rate from a square jnp.dot.

Runs inside the moejax worker, before the engine takes the memory.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from moejax.bench.measure import error_text


def median_seconds(fn, args, repeats: int) -> float:
    """Median seconds of fn(*args) over `repeats` calls, after one call that compiles and warms up."""
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hbm_bandwidth(nbytes: int, repeats: int = 10) -> dict:
    """Bytes read + written per second by a jitted elementwise pass over `nbytes` of bf16 (a negated copy: XLA
    can neither elide it nor alias it to its input)."""
    cols = 4096
    rows = max(nbytes // (2 * cols), 1)
    x = jnp.ones((rows, cols), jnp.bfloat16)
    copy = jax.jit(lambda a: -a)
    seconds = median_seconds(copy, (x,), repeats)
    moved = 2 * x.size * x.dtype.itemsize
    del x
    return {"hbm_bytes_per_s": moved / seconds, "copy_bytes": moved // 2, "copy_ms": seconds * 1e3}


def matmul_rate(n: int, repeats: int = 10) -> dict:
    """bf16 FLOP/s of an n x n x n jnp.dot (float32 accumulation, bf16 result), median of `repeats` calls."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    dot = jax.jit(jnp.dot)
    seconds = median_seconds(dot, (a, b), repeats)
    del a, b
    return {"matmul_flops_per_s": 2 * n**3 / seconds, "matmul_n": n, "matmul_ms": seconds * 1e3}


def measure(copy_bytes: int, matmul_n: int, repeats: int = 10) -> dict:
    """Both rates and the device they were measured on; an entry "error" instead of a rate that failed."""
    device = jax.devices()[0]
    out = {"device": getattr(device, "device_kind", str(device)), "backend": jax.default_backend(),
           "jax": jax.__version__}
    for name, fn, arg in (("bandwidth", hbm_bandwidth, copy_bytes), ("matmul", matmul_rate, matmul_n)):
        try:
            out.update(fn(arg, repeats))
        except Exception as e:  # an OOM here must not cost the engine's measurements
            out[f"{name}_error"] = error_text(e)
    return out
