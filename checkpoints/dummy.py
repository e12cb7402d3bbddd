"""`load_format="dummy"`: random weights of the right shapes made directly on the devices, in their shardings.

No checkpoint is read, so a full-size model can be benchmarked from its config.json alone. Norm weights are
ones, biases zeros and everything else normal with std 0.02, which keeps activations and routing ordinary.
With a quantization transform the weights are drawn on the host tensor by tensor and quantized there.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.checkpoints.hf import Transform, flat_params


def _kind(path) -> str:
    name = path[-1]
    if name == "weight":  # RMSNorm
        return "ones"
    if name.startswith("b_") or name in ("bias", "correction_bias", "sinks"):
        return "zeros"
    return "normal"


def _init(kind: str, shape, dtype, key):
    if kind == "ones":
        return jnp.ones(shape, dtype)
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@functools.lru_cache(maxsize=None)
def _initializer(kind: str, shape, dtype, sharding):
    """One compiled initializer per distinct tensor kind, shape and sharding (layers share theirs)."""
    return jax.jit(lambda key: _init(kind, shape, dtype, key), out_shardings=sharding)


def dummy_state(abstract_state: nnx.State, *, sharding_for, seed: int = 0,
                transform: Transform | None = None) -> nnx.State:
    filled = []
    for path, var in flat_params(abstract_state):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        kind = _kind(path)
        # Each tensor's key comes from its name, so a tensor is the same whatever else the model holds.
        key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(".".join(map(str, path)).encode()))
        if transform is not None and kind == "normal":
            rng = np.random.default_rng(zlib.crc32(".".join(map(str, path)).encode()) + seed)
            host = (0.02 * rng.standard_normal(shape, np.float32)).astype(dtype)
            value = transform(path, host)
            target = getattr(value, "sharding_shape", None) or value.shape
            value = jax.tree.map(lambda a: jax.device_put(a, sharding_for(path, var, target)), value)
        else:
            value = _initializer(kind, tuple(shape), jnp.dtype(dtype), sharding_for(path, var, shape))(key)
        filled.append((path, var.replace(value)))
    return nnx.from_flat_state(filled)
