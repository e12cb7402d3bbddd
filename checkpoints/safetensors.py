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
    """Tensor entries of one file, validated as the format specifies: a JSON object whose entries have a known
    dtype, a shape of non-negative integers and data_offsets that match dtype x shape and tile the data section
    exactly (no gaps, no overlaps, nothing outside it); `__metadata__` a map of strings to strings."""
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
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object, got {type(header).__name__}")
    base = 8 + header_len
    data_size = size - base
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
            continue
        out[name] = _entry(path, name, entry, base, data_size)
    spans = sorted((t.start - base, t.end - base, n) for n, t in out.items())
    covered = 0
    for start, end, name in spans:
        if start < covered:
            raise CheckpointError(f"{path}: tensor {name!r} overlaps the bytes of another tensor")
        if start > covered:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {start} of the data, leaving a gap "
                                  f"after byte {covered}")
        covered = end
    if covered != data_size:
        raise CheckpointError(f"{path}: the tensors cover {covered} of the {data_size} data bytes")
    return out


def _entry(path: str, name: str, entry, base: int, data_size: int) -> TensorInfo:
    def bad(what: str):
        return CheckpointError(f"{path}: tensor {name!r}: {what}")

    if not isinstance(entry, dict):
        raise bad(f"entry must be an object, got {type(entry).__name__}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise bad(f"missing {key!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"unsupported dtype {dtype!r}")

    def is_index(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(shape, list) or not all(is_index(d) for d in shape):
        raise bad(f"shape must be a list of non-negative integers, got {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_index(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise bad(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    start, end = offsets
    if end > data_size:
        raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte {base + end} "
                              f"of {base + data_size}")
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize if shape else \
        np.dtype(DTYPES[dtype]).itemsize
    if end - start != expected:
        raise CheckpointError(f"{path}: tensor {name!r} spans {end - start} bytes, its shape needs {expected}")
    return TensorInfo(path, dtype, tuple(shape), base + start, base + end)


def shard_path(directory: str, name, index_path: str) -> str:
    """The path of a shard the index names: a plain file name inside the model directory, else refused."""
    if not isinstance(name, str) or not name or name in (".", "..") or os.path.basename(name) != name \
            or "/" in name or "\\" in name or "\0" in name:
        raise CheckpointError(f"{index_path}: weight_map names {name!r}, not a file name inside the model "
                              "directory")
    return os.path.join(directory, name)


def _weight_map(index_path: str) -> dict[str, str]:
    from moejax.config import read_json_object

    weight_map = read_json_object(index_path, CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) for k in weight_map):
        raise CheckpointError(f"{index_path}: must be an object with a weight_map of tensor name -> file name")
    return weight_map


class SafetensorsReader:
    """All tensors of a checkpoint directory, by name."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            weight_map = _weight_map(index_path)
            paths = [shard_path(directory, n, index_path) for n in sorted(set(weight_map.values()))]
        else:
            paths = [os.path.join(directory, f) for f in sorted(os.listdir(directory)) if f.endswith(".safetensors")]
        if not paths:
            raise CheckpointError(f"{directory}: no *.safetensors files")
        self.tensors: dict[str, TensorInfo] = {}
        for path in paths:
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
