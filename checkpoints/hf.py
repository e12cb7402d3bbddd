"""Fill an abstract moejax model from a Hugging Face safetensors checkpoint, tensor by tensor.

Each parameter is read from the memory-mapped files, brought to moejax's layout and dtype, and placed on its
devices in its final sharding before the next one is read, so the host never holds a second copy of the model.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.checkpoints.hf_names import FP8Tensor, hf_source, ignored
from moejax.checkpoints.safetensors import CheckpointError, SafetensorsReader
from moejax.config import ModelConfig

# (path, host array in moejax layout) -> the value to store (an array or a quantized weight).
Transform = Callable[[tuple, np.ndarray], object]


def _key(entry) -> object:
    return entry.key if hasattr(entry, "key") else getattr(entry, "idx", entry)


def flat_params(state: nnx.State) -> list[tuple[tuple, nnx.Variable]]:
    """(path, variable) for every parameter, paths as plain tuples like ("layers", 0, "attn", "q_proj", "kernel")."""
    return [(tuple(_key(k) for k in path), var) for path, var in nnx.to_flat_state(state)]


def load_hf_state(
    directory: str,
    config: ModelConfig,
    abstract_state: nnx.State,
    *,
    sharding_for: Callable[[tuple, nnx.Variable, tuple], jax.sharding.Sharding],
    transform: Transform | None = None,
    keep_fp8: bool = False,
    progress: bool = False,
) -> nnx.State:
    """Return `abstract_state` with every parameter read from `directory` and placed on its devices.
    keep_fp8: an FP8 checkpoint's block-scaled weights stay e4m3 (`QuantizedWeight`s of kind fp8) instead of
    being dequantized; `transform` then sees only the other tensors."""
    reader = SafetensorsReader(directory)
    names = set(reader.names())
    used: set[str] = set()
    entries = flat_params(abstract_state)
    iterator = entries
    if progress:
        from tqdm import tqdm

        iterator = tqdm(entries, desc="loading", unit="tensor", leave=False)
    filled = []
    for path, var in iterator:
        try:
            source = hf_source(config, path, names, keep_fp8=keep_fp8)
        except KeyError:
            raise CheckpointError(f"moejax parameter {'.'.join(map(str, path))} has no checkpoint mapping") from None
        used.update(source.names)
        for name in source.names:
            reader.info(name)  # a missing tensor fails here, naming it
        host = source.load(reader)  # a lazy view: nothing is read until a shard is sliced out of it
        expected = var.get_value().shape
        if tuple(host.shape) != tuple(expected):
            raise CheckpointError(
                f"{directory}: tensor {source.names[0]!r} has shape {list(host.shape)}; "
                f"the config implies {list(expected)} for {'.'.join(map(str, path))}")
        dtype = var.get_value().dtype
        if isinstance(host, FP8Tensor):
            from moejax.kernels.quant import FP8, fp8_sharding_shape, fp8_weight

            sharding = sharding_for(path, var, fp8_sharding_shape(host.values.shape, host.block))
            value = fp8_weight(_place(host.values, sharding, FP8), _place(host.scales, sharding, np.float32),
                               host.block, dtype)
        elif transform is not None:
            value = transform(path, np.asarray(host).astype(dtype, copy=False))
            # A quantized weight's arrays are all split alike (see kernels.quant.sharding_shape).
            shape = getattr(value, "sharding_shape", None) or value.shape
            value = jax.tree.map(lambda a: _place(a, sharding_for(path, var, shape), a.dtype), value)
        else:
            value = _place(host, sharding_for(path, var, host.shape), dtype)
        filled.append((path, var.replace(value)))
        del host, value
    unused = sorted(n for n in names - used if not ignored(config, n))
    if unused:
        raise CheckpointError(f"{directory}: checkpoint tensors not used by the {config.family} model: "
                              f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}")
    return nnx.from_flat_state(filled)


def _place(host, sharding, dtype) -> jax.Array:
    """Put `host` on the devices of `sharding`: each device's shard is read, cast and copied on its own."""
    return jax.make_array_from_callback(
        tuple(host.shape), sharding, lambda index: np.asarray(host[index]).astype(dtype, copy=False),
        dtype=dtype)  # a pipeline stage on another process's devices: nothing here to read it from
