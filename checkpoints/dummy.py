"""`load_format="dummy"`: random weights of the right shapes made directly on the devices, in their shardings.

No checkpoint is read, so a full-size model can be benchmarked from its config.json alone. Norm weights are
ones, biases zeros and everything else normal with std 0.02, which keeps activations and routing ordinary.
A quantization transform runs inside the same jitted initializer (it is written for numpy and jax alike), so
quantized weights are drawn and quantized on the device and land in their sharding, host memory included
(offloaded experts), without a float copy ever held on the host.
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


def _initializer(kind: str, shape, dtype, sharding, seed: int, transform=None):
    """A tensor's initializer: its key is folded from the seed and the tensor's salt inside the program, so
    no key is built eagerly per tensor (hundreds of small dispatches on a big model). `transform` (a path
    bound in) turns the drawn array into its stored form, e.g. a QuantizedWeight."""
    def init(salt):
        x = _init(kind, shape, dtype, jax.random.fold_in(jax.random.key(seed), salt))
        return x if transform is None else transform(x)

    return jax.jit(init, out_shardings=sharding)


def _stored_form(transform, path, shape, dtype):
    """(the abstract value `transform` makes of this tensor, or None where it leaves the array as it is)."""
    value = jax.eval_shape(lambda x: transform(path, x), jax.ShapeDtypeStruct(shape, dtype))
    leaves = jax.tree.leaves(value)
    if len(leaves) == 1 and leaves[0].shape == tuple(shape) and leaves[0].dtype == dtype:
        return None
    return value


def dummy_state(abstract_state: nnx.State, *, sharding_for, seed: int = 0,
                transform: Transform | None = None) -> nnx.State:
    params = list(flat_params(abstract_state))
    pending = []
    for path, var in params:
        shape, dtype = tuple(var.get_value().shape), jnp.dtype(var.get_value().dtype)
        kind = _kind(path)
        # Each tensor's values come from its name, so a tensor is the same whatever else the model holds.
        salt = zlib.crc32(".".join(map(str, path)).encode())
        stored = None if transform is None or kind != "normal" else _stored_form(transform, path, shape, dtype)
        if stored is None:
            spec = (kind, shape, dtype, sharding_for(path, var, shape), None)
        else:
            target = getattr(stored, "sharding_shape", None) or shape
            sharding = sharding_for(path, var, target)
            # Tensors whose stored forms match share one program (the transform decides by name and shape
            # alone, so the first such path stands for them all).
            form = jax.tree.structure(stored), tuple((a.shape, a.dtype) for a in jax.tree.leaves(stored))
            spec = (kind, shape, dtype, jax.tree.map(lambda _: sharding, stored), (form, path))
        pending.append((path, spec, salt))
    # One initializer per distinct kind, shape, stored form and sharding (the layers share theirs), compiled
    # all at once; the key leaves out the path that stands for a stored form.
    programs, keys = {}, []
    for _, (kind, shape, dtype, sharding, stored), _ in pending:
        key = (kind, shape, dtype, sharding, stored and stored[0])
        keys.append(key)
        if key not in programs:
            bound = None if stored is None else (lambda x, p=stored[1]: transform(p, x))
            programs[key] = _initializer(kind, shape, dtype, sharding, seed, bound)
    salt_type = jax.ShapeDtypeStruct((), jnp.uint32)
    compiled = dict(zip(programs, compile_all([f.lower(salt_type) for f in programs.values()])))
    filled = {path: compiled[key](np.uint32(salt)) for (path, _, salt), key in zip(pending, keys)}
    return nnx.from_flat_state([(path, var.replace(filled[path])) for path, var in params])
