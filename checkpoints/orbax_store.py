"""moejax checkpoints on Orbax: written one layer at a time, restored straight into target shardings.

Layout of a converted directory:
    config.json, tokenizer files, generation_config.json   copied from the HF directory
    moejax_checkpoint.json                                  metadata (version, sources, dtype, quantization, parts)
    params/<part>/                                          one Orbax checkpoint per part: "embed", "layer_000", ...,
                                                            "final"; each holds that part's parameter subtree
Writing part by part keeps peak host memory near one layer (stacked experts included), not the model. Restoring
passes `jax.ShapeDtypeStruct`s with the target shardings, so each device reads only its own shard.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

METADATA = "moejax_checkpoint.json"
COPIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                "chat_template.jinja", "special_tokens_map.json")


def is_converted(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, METADATA))


def part_of(path: tuple) -> str:
    """Which Orbax checkpoint a parameter lives in."""
    if path[0] == "layers":
        return f"layer_{int(path[1]):03d}"
    return "embed" if path[0] == "embed" else "final"


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def _nest(entries: dict[tuple, object]) -> dict:
    """{("layers", 0, "attn", "q_proj", "kernel"): x} -> nested dicts with string keys."""
    out: dict = {}
    for path, value in entries.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = value
    return out


def save_part(directory: str, part: str, entries: dict[tuple, object], checkpointer=None) -> None:
    """Write one part (a dict path -> array or QuantizedWeight) as its own Orbax checkpoint, synchronously, so
    that the part's host arrays can be freed before the next one is built."""
    ckptr = checkpointer or _checkpointer()
    ckptr.save(os.path.join(os.path.abspath(directory), "params", part), _nest(entries))
    ckptr.wait_until_finished()


def write_metadata(directory: str, metadata: dict) -> None:
    with open(os.path.join(directory, METADATA), "w") as f:
        json.dump(metadata, f, indent=2, sort_keys=True)


def read_metadata(directory: str, config=None) -> dict:
    """The converted checkpoint's metadata, checked key by key (and against `config`, a ModelConfig, when given):
    a tampered file is refused with its name, before any array is restored."""
    from moejax.checkpoints.safetensors import CheckpointError

    from moejax.config import read_json_object

    path = os.path.join(directory, METADATA)
    meta = read_json_object(path, CheckpointError)

    def bad(what: str):
        return CheckpointError(f"{path}: {what}")

    for key in ("family", "dtype", "quantized"):
        if key not in meta:
            raise bad(f"missing key {key!r}")
    if meta["dtype"] not in ("float32", "bfloat16", "float16"):
        raise bad(f"dtype must be float32, bfloat16 or float16, got {meta['dtype']!r}")
    if not isinstance(meta["family"], str):
        raise bad(f"family must be a string, got {meta['family']!r}")
    if meta.get("quantization") is not None and meta["quantization"] not in ("int8", "int4", "fp8"):
        raise bad(f"quantization must be null, int8, int4 or fp8, got {meta['quantization']!r}")
    quantized = meta["quantized"]
    if not isinstance(quantized, dict):
        raise bad(f"quantized must be an object, got {quantized!r}")
    for name, spec in quantized.items():
        if not isinstance(spec, dict) or spec.get("bits") not in (4, 8) or isinstance(spec.get("bits"), bool) \
                or not isinstance(spec.get("group_size"), int) or isinstance(spec.get("group_size"), bool) \
                or spec["group_size"] < 1 or not isinstance(spec.get("zero_point", False), bool):
            raise bad(f"quantized[{name!r}] must be {{bits: 4 or 8, group_size: int >= 1, zero_point: bool}}, "
                      f"got {spec!r}")
        if spec.get("format", "int") not in ("int", "fp8") or (spec.get("format") == "fp8" and (
                spec["bits"] != 8 or not isinstance(spec.get("block_n"), int) or isinstance(spec["block_n"], bool)
                or spec["block_n"] < 1)):
            raise bad(f"quantized[{name!r}]: format must be int or fp8 (with bits 8 and block_n: int >= 1), "
                      f"got {spec!r}")
    layers = meta.get("num_layers")
    if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool) or layers < 1):
        raise bad(f"num_layers must be a positive integer, got {layers!r}")
    if config is not None:
        if meta["family"] != config.family:
            raise bad(f"family {meta['family']!r} disagrees with config.json ({config.family!r})")
        if layers is not None and layers != config.num_layers:
            raise bad(f"num_layers {layers} disagrees with config.json ({config.num_layers})")
        known = {f"layers.{i}" for i in range(config.num_layers)}
        for name in quantized:
            parts = name.split(".")
            if parts[0] == "layers" and ".".join(parts[:2]) not in known:
                raise bad(f"quantized names {name!r}, a layer config.json does not have")
    return meta


def restore_state(directory: str, abstract_state, sharding_for, quantized: dict[str, dict] | None = None):
    """Fill `abstract_state` from a converted directory, each array restored into its sharding.

    quantized: "a.b.c" path -> {"bits", "group_size", "zero_point"} for weights stored as QuantizedWeight
    (fp8: also "format": "fp8" and "block_n"; group_size is the block along K).
    """
    from flax import nnx

    from moejax.checkpoints.hf import flat_params
    from moejax.kernels.quant import QuantizedWeight, group_size_for

    quantized = quantized or {}
    entries = flat_params(abstract_state)
    targets: dict[str, dict[tuple, object]] = {}
    for path, var in entries:
        value = var.get_value()
        spec = quantized.get(".".join(map(str, path)))
        if spec is None:
            target = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding_for(path, var, value.shape))
        elif spec.get("format") == "fp8":
            from moejax.kernels.quant import FP8, fp8_sharding_shape, fp8_weight

            *lead, k, n = value.shape
            block = (spec["group_size"], spec["block_n"])
            shapes = [(*lead, k, n), (*lead, -(-k // block[0]), -(-n // block[1]))]
            sharding = sharding_for(path, var, fp8_sharding_shape(shapes[0], block))
            target = fp8_weight(jax.ShapeDtypeStruct(shapes[0], FP8, sharding=sharding),
                                jax.ShapeDtypeStruct(shapes[1], np.float32, sharding=sharding), block, value.dtype)
        else:
            *lead, k, n = value.shape
            bits = spec["bits"]
            g = group_size_for(k, spec["group_size"]) if bits == 4 else 0
            shapes = {"values": (*lead, k if bits == 8 else k // 2, n),
                      "scales": (*lead, 1 if bits == 8 else k // g, n)}
            dtypes = {"values": np.int8 if bits == 8 else np.uint8, "scales": value.dtype}
            if spec.get("zero_point"):
                shapes["zeros"], dtypes["zeros"] = (*lead, k // g, n), np.uint8
            from moejax.kernels.quant import sharding_shape

            sharding = sharding_for(path, var, sharding_shape(list(shapes.values())))
            leaves = {name: jax.ShapeDtypeStruct(shape, dtypes[name], sharding=sharding)
                      for name, shape in shapes.items()}
            target = QuantizedWeight(leaves["values"], leaves["scales"], leaves.get("zeros"), bits=bits,
                                     group_size=g)
        targets.setdefault(part_of(path), {})[path] = target
    restored: dict[tuple, object] = {}
    ckptr = _checkpointer()
    for part, items in targets.items():
        tree = ckptr.restore(os.path.join(os.path.abspath(directory), "params", part), _nest(items))
        for path in items:
            node = tree
            for key in path:
                node = node[str(key)]
            restored[path] = node
    return nnx.from_flat_state([(path, var.replace(restored[path])) for path, var in entries])
