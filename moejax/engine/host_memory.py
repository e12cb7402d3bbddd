"""Host memory for offloaded experts: what is free, and XLA's pool of pinned host memory.

XLA keeps GPU-visible ("pinned_host") buffers in one BFC pool whose cap, XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB (64 GiB
by default), is read once when the GPU backend starts. The pool grows in regions that double in size each time it
grows, up to the cap, and never gives memory back; with a cap at the host's RAM, loading 38 GiB of experts left
84 GiB pinned. So the engine sets the cap, before the backend starts, to what offloading needs: the experts
twice over and a margin. Twice, because the layers are loaded one by one and then stacked: a stacked weight needs
one free stretch of pinned memory, and the per-layer pieces freed before it leave holes between the pieces still
held that it cannot use (measured on the H200: DeepSeek-V3's 38 GiB of int4 experts did not stack in a 58 GiB
pool). This caps the experts a host can offload at about half its RAM.
"""

from __future__ import annotations

import math
import os

PINNED_POOL_ENV = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
XLA_DEFAULT_POOL_GIB = 64
GIB = 1024**3


def pinned_pool_bytes() -> int:
    """The cap of XLA's pinned host memory pool as this process's environment gives it."""
    try:
        return int(os.environ.get(PINNED_POOL_ENV, XLA_DEFAULT_POOL_GIB)) * GIB
    except ValueError:
        return XLA_DEFAULT_POOL_GIB * GIB


def pool_bytes_for(host_weight_bytes: int) -> int:
    """The pinned pool that holds `host_weight_bytes` of experts while they are stacked: the per-layer pieces
    and the stacked arrays, 2 GiB more."""
    return 2 * host_weight_bytes + 2 * GIB


def size_pinned_pool(host_weight_bytes: int) -> int | None:
    """Set PINNED_POOL_ENV for `host_weight_bytes` of offloaded experts (capped at the host's RAM), unless the
    user set it or a backend already started (then the pool is what it is); returns the GiB set, or None."""
    import jax._src.xla_bridge as xla_bridge

    if PINNED_POOL_ENV in os.environ or xla_bridge.backends_are_initialized():
        return None
    gib = math.ceil(pool_bytes_for(host_weight_bytes) / GIB)
    total = total_host_memory()
    if total is not None:
        gib = min(gib, total // GIB)
    gib = max(gib, 1)
    os.environ[PINNED_POOL_ENV] = str(gib)
    return gib


def proc_bytes(path: str, field: str) -> int | None:
    """A "Field: N kB" line of a /proc file (/proc/meminfo, /proc/self/status) in bytes, or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_host_memory() -> int | None:
    """Bytes of host memory available now (MemAvailable), or None where it cannot be read."""
    return proc_bytes("/proc/meminfo", "MemAvailable")


def total_host_memory() -> int | None:
    return proc_bytes("/proc/meminfo", "MemTotal")


def pool_too_small(host_weight_bytes: int) -> str:
    """What to tell a user whose offloaded experts exceed the pinned pool."""
    return (f"offload_experts=True keeps {host_weight_bytes / GIB:.2f} GiB of routed experts in pinned host "
            f"memory, and XLA's pool of it is capped at {pinned_pool_bytes() / GIB:.0f} GiB; set "
            f"{PINNED_POOL_ENV} (GiB) before jax starts, or quantize the experts")
