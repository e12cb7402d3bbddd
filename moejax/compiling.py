"""Compiling many small jitted functions at once.

Loading a model runs a few dozen tiny programs (one random initializer or one layer-stacking copy per distinct
tensor shape). Each compiles in about 0.2 s on a GPU and falls under the persistent cache's minimum compile
time, so one after the other they cost start-up seconds, cold or warm. XLA releases the GIL while it compiles:
lowering them in turn and compiling them on a pool of threads takes about the time of the slowest one.
"""

from __future__ import annotations

import concurrent.futures
import os

import jax


def compile_threads() -> int:
    """Threads that compile at once: MOEJAX_COMPILE_THREADS, or the host's cores."""
    return int(os.environ.get("MOEJAX_COMPILE_THREADS", 0)) or os.cpu_count() or 1


def compile_all(lowered: list[jax.stages.Lowered], threads: int | None = None) -> list[jax.stages.Compiled]:
    """The compiled executables of `lowered`, in order, compiled on up to `threads` threads (default:
    `compile_threads()`)."""
    threads = max(1, min(threads or compile_threads(), len(lowered)))
    if threads == 1:
        return [low.compile() for low in lowered]
    with concurrent.futures.ThreadPoolExecutor(threads) as workers:
        return list(workers.map(lambda low: low.compile(), lowered))


__all__ = ["compile_all", "compile_threads"]
