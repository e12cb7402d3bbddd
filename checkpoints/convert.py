"""`moejax convert HF_DIR OUT_DIR`: a Hugging Face checkpoint to a moejax (Orbax) checkpoint, streamed.

Tensors are read one at a time from the memory-mapped safetensors, brought to moejax's layout and dtype
(experts stacked per layer), quantized if asked, and written one layer at a time, so peak host memory stays near
one layer. Everything is written into a hidden directory beside OUT_DIR that is renamed at the end: a failed or
killed conversion leaves no OUT_DIR behind, and an existing OUT_DIR is never touched without --overwrite.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import time

import numpy as np

DTYPES = ("bfloat16", "float16", "float32")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--dtype", default="auto", help="bfloat16 | float16 | float32 (default: the checkpoint's)")
    p.add_argument("--quantization", default=None, choices=["int8", "int4", "fp8"],
                   help="int8 | int4 (weight-only) | fp8 (e4m3, 128x128 blocks); an FP8 checkpoint stays FP8")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    convert(args.hf_dir, args.out_dir, dtype=args.dtype, quantization=args.quantization, overwrite=args.overwrite,
            progress=not args.no_progress)
    print(f"wrote {args.out_dir}", file=sys.stderr)
    return 0


def release_memory() -> None:
    """Give freed host memory back to the OS between layers. glibc raises its mmap threshold after large frees,
    so later layer-sized buffers come from the heap and would otherwise stay resident."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def convert(hf_dir: str, out_dir: str, *, dtype: str = "auto", quantization: str | None = None,
            overwrite: bool = False, progress: bool = False) -> None:
    import ml_dtypes

    from moejax import __version__
    from moejax.checkpoints import orbax_store
    from moejax.checkpoints.hf_names import FP8Tensor, hf_source, ignored
    from moejax.checkpoints.hf import flat_params
    from moejax.checkpoints.safetensors import CheckpointError, SafetensorsReader
    from moejax.config import ModelConfig
    from moejax.models import build_abstract

    out_dir = os.path.normpath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"OUT_DIR {out_dir} exists; pass --overwrite to replace it")
    if quantization not in (None, "int8", "int4", "fp8"):
        raise ValueError(f"--quantization must be int8, int4 or fp8, got {quantization!r}")
    if not os.path.isdir(hf_dir):
        raise ValueError(f"HF_DIR {hf_dir} is not a directory")
    config = ModelConfig.from_file(hf_dir)
    from moejax.plan.memory import resolve_weights

    dtype, quantization = resolve_weights(config, dtype, quantization)  # an FP8 checkpoint stays FP8
    keep_fp8 = quantization == "fp8" and config.checkpoint_quant == "fp8"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    reader = SafetensorsReader(hf_dir)  # validates every header: missing shards, truncated files
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    _, abstract = build_abstract(config, np_dtype)
    entries = flat_params(abstract)
    names = set(reader.names())

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        quantized: dict[str, dict] = {}
        if quantization:
            from moejax.kernels.quant import fp8_block, fp8_weight, quantize, quantize_fp8, should_quantize

            bits = {"int8": 8, "int4": 4, "fp8": 8}[quantization]
            block = fp8_block(config)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(entries), desc="converting", unit="tensor")
        used: set[str] = set()
        part, pending = None, {}
        checkpointer = orbax_store._checkpointer()  # one for all parts: its thread pools are not rebuilt
        for path, var in entries:
            this_part = orbax_store.part_of(path)
            if this_part != part and pending:
                orbax_store.save_part(tmp, part, pending, checkpointer)
                pending = {}
                release_memory()
            part = this_part
            source = hf_source(config, path, names, keep_fp8=keep_fp8)
            for name in source.names:
                reader.info(name)
            used.update(source.names)
            host = source.load(reader)
            expected = var.get_value().shape
            if tuple(host.shape) != tuple(expected):
                raise CheckpointError(
                    f"{hf_dir}: tensor {source.names[0]!r} has shape {list(host.shape)}; "
                    f"the config implies {list(expected)} for {'.'.join(map(str, path))}")
            if isinstance(host, FP8Tensor):  # kept as stored, with its own blocks
                value = fp8_weight(np.asarray(host.values), np.asarray(host.scales, np.float32), host.block,
                                   var.get_value().dtype)
            elif quantization == "fp8" and should_quantize(path):
                value = quantize_fp8(np.asarray(host).astype(var.get_value().dtype, copy=False), block)
            else:
                value = np.asarray(host).astype(var.get_value().dtype, copy=False)
            if quantization in ("int8", "int4") and should_quantize(path) and \
                    not (bits == 4 and value.shape[-2] % 2):
                value = quantize(value, bits)
                quantized[".".join(map(str, path))] = {"bits": bits, "group_size": 128, "zero_point": False}
            if getattr(value, "kind", None) == "fp8":
                quantized[".".join(map(str, path))] = {"bits": 8, "group_size": value.group_size,
                                                       "block_n": value.block_n, "zero_point": False, "format": "fp8"}
            pending[path] = value
            del host
            if bar is not None:
                bar.update()
        if pending:
            orbax_store.save_part(tmp, part, pending, checkpointer)
        checkpointer.close()
        if bar is not None:
            bar.close()
        unused = sorted(n for n in names - used if not ignored(config, n))
        if unused:
            raise CheckpointError(f"{hf_dir}: checkpoint tensors not used by the {config.family} model: "
                                  f"{', '.join(unused[:5])}")
        for name in orbax_store.COPIED_FILES:
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copy2(os.path.join(hf_dir, name), os.path.join(tmp, name))
        orbax_store.write_metadata(tmp, {
            "moejax_version": __version__,
            "family": config.family,
            "num_layers": config.num_layers,
            "dtype": dtype,
            "quantization": quantization,
            "quantized": quantized,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"directory": os.path.abspath(hf_dir),
                       "files": {os.path.basename(f): os.path.getsize(f)
                                 for f in sorted({t.file for t in reader.tensors.values()})}},
        })
        if os.path.exists(out_dir):  # --overwrite: swap in the new directory, then drop the old one
            old = os.path.join(parent, f".{os.path.basename(out_dir)}.old-{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
