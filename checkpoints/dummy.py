"""`load_format="dummy"`: random weights of the right shapes made directly on the devices, in their shardings.

No checkpoint is read, so a full-size model can be benchmarked from its config.json alone. Norm weights are
ones, biases zeros and everything else normal with std 0.02, which keeps activations and routing ordinary.
With a quantization transform the weights are drawn on the host tensor by tensor and quantized there.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.checkpoints.hf import Transform, flat_params
from moejax.compiling import compile_all


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


def _initializer(kind: str, shape, dtype, sharding, seed: int):
    """A tensor's initializer: its key is folded from the seed and the tensor's salt inside the program, so
    no key is built eagerly per tensor (hundreds of small dispatches on a big model)."""
    def init(salt):
        return _init(kind, shape, dtype, jax.random.fold_in(jax.random.key(seed), salt))

    return jax.jit(init, out_shardings=sharding)


def dummy_state(abstract_state: nnx.State, *, sharding_for, seed: int = 0,
                transform: Transform | None = None) -> nnx.State:
    filled, pending = {}, []
    params = list(flat_params(abstract_state))
    for path, var in params:
        shape, dtype = var.get_value().shape, var.get_value().dtype
        kind = _kind(path)
        # Each tensor's values come from its name, so a tensor is the same whatever else the model holds.
        salt = zlib.crc32(".".join(map(str, path)).encode())
        if transform is not None and kind == "normal":
            rng = np.random.default_rng(salt + seed)
            host = (0.02 * rng.standard_normal(shape, np.float32)).astype(dtype)
            value = transform(path, host)
            target = getattr(value, "sharding_shape", None) or value.shape
            filled[path] = jax.tree.map(lambda a: jax.device_put(a, sharding_for(path, var, target)), value)
        else:
            pending.append((path, (kind, tuple(shape), jnp.dtype(dtype), sharding_for(path, var, shape)), salt))
    # One initializer per distinct kind, shape and sharding (the layers share theirs), compiled all at once.
    specs = list(dict.fromkeys(spec for _, spec, _ in pending))
    salt_type = jax.ShapeDtypeStruct((), jnp.uint32)
    compiled = dict(zip(specs, compile_all([_initializer(*spec, seed).lower(salt_type) for spec in specs])))
    for path, spec, salt in pending:
        filled[path] = compiled[spec](np.uint32(salt))
    return nnx.from_flat_state([(path, var.replace(filled[path])) for path, var in params])
