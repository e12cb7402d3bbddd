"""A lazy, memory-mapped safetensors reader: single files or sharded checkpoints with their index.

Tensors come back as read-only numpy views of the mapped file (no copy until a caller needs one); bf16 and fp8
use ml_dtypes. Headers are validated up front so that a truncated or corrupt file fails with its name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: names the file or tensor."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str) -> dict[str, TensorInfo]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {header_len} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    base = 8 + header_len
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        if entry["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        info = TensorInfo(path, entry["dtype"], tuple(entry["shape"]), base + start, base + end)
        expected = int(np.prod(info.shape, dtype=np.int64)) * np.dtype(DTYPES[info.dtype]).itemsize
        if info.nbytes != expected:
            raise CheckpointError(f"{path}: tensor {name!r} spans {info.nbytes} bytes, its shape needs {expected}")
        if info.end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {info.end} of {size}")
        out[name] = info
    return out


class SafetensorsReader:
    """All tensors of a checkpoint directory, by name."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{directory}: no *.safetensors files")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: shard named in model.safetensors.index.json is missing")
            self.tensors.update(read_header(path))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is missing from the checkpoint") from None

    def get(self, name: str) -> np.ndarray:
        """A read-only view of the tensor, mapped from its file on its own: the mapping (and the resident pages
        it brought in) goes away with the last array that uses it, so streaming readers stay small."""
        info = self.info(name)
        if info.nbytes == 0:
            return np.zeros(info.shape, DTYPES[info.dtype])
        mapped = np.memmap(info.file, dtype=DTYPES[info.dtype], mode="r", offset=info.start, shape=info.shape or (1,))
        return mapped.reshape(info.shape)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
