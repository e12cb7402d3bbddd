"""Write a moejax model as a Hugging Face checkpoint (config.json + model.safetensors, Hub expert layout).

The inverse of `hf_names`: used to ship the embedded default model and by tests that need a checkpoint of a
model trained or modified in moejax.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from moejax.checkpoints.hf import flat_params
from moejax.checkpoints.hf_names import hf_source
from moejax.config import ModelConfig

SAFETENSORS_DTYPES = {
    np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int32): "I32", np.dtype(np.int64): "I64", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8",
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3", np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2",
}


def hf_tensors(config: ModelConfig, state, dtype=None) -> dict[str, np.ndarray]:
    """Every parameter under its HF name(s), in HF layout ([out, in] per expert)."""
    out: dict[str, np.ndarray] = {}
    # hf_source picks the layout from the names a checkpoint holds; these select the per-expert Hub layout
    # (for Mixtral, block_sparse_moe.experts.N.w1/w2/w3).
    hub_names = {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(config.num_layers)} \
        if config.family == "mixtral" else set()
    for path, var in flat_params(state):
        value = np.asarray(var.get_value())
        if dtype is not None and value.dtype.kind == "f" and path[-1] != "correction_bias":
            value = value.astype(dtype)
        source = hf_source(config, path, hub_names)
        if len(source.names) > 1:  # stacked per-expert tensors [E, in, out] -> E x [out, in]
            for name, expert in zip(source.names, value):
                out[name] = np.ascontiguousarray(expert.T)
            continue
        (name,) = source.names
        # Round-trip through the Source to learn whether it transposes.
        probe = source.assemble([np.zeros((2, 3))]) if value.ndim == 2 else None
        transposed = probe is not None and probe.shape == (3, 2)
        out[name] = np.ascontiguousarray(value.T if transposed else value)
    return out


def save_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name]).tobytes())


def save_hf_checkpoint(directory: str, hf_config: dict, config: ModelConfig, state, dtype=None) -> None:
    """config.json (as given) and model.safetensors for `state`."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    save_safetensors(os.path.join(directory, "model.safetensors"), hf_tensors(config, state, dtype))
