"""A hand-built FP8 block-quantized checkpoint with dimensions that are not multiples of the block."""

import json
import os

import ml_dtypes
import numpy as np

from moejax import LLM
from moejax.checkpoints.hf import flat_params
from moejax.checkpoints.hf_writer import save_safetensors
from moejax.checkpoints.safetensors import SafetensorsReader
from moejax.checkpoints.quantized_formats import dequantize_fp8_block

BLOCK = (16, 32)  # 48 / 16 and 64 / 32 divide, 80 / 32 and 24-wide heads do not: partial edge blocks


def quantize_fp8(w: np.ndarray, scale_dtype):
    rows, cols = w.shape
    grid = (-(-rows // BLOCK[0]), -(-cols // BLOCK[1]))
    scale = np.zeros(grid, np.float32)
    for i in range(grid[0]):
        for j in range(grid[1]):
            blk = w[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]]
            scale[i, j] = max(np.abs(blk).max() / 448.0, 1e-12)
    full = np.repeat(np.repeat(scale, BLOCK[0], 0), BLOCK[1], 1)[:rows, :cols]
    q = (w / full).astype(ml_dtypes.float8_e4m3fn)
    return q, scale.astype(scale_dtype)


def own_dequant(q, scale):
    out = np.zeros(q.shape, np.float64)
    for i in range(q.shape[0]):
        for j in range(q.shape[1]):
            out[i, j] = float(q[i, j]) * float(scale[i // BLOCK[0], j // BLOCK[1]])
    return out.astype(np.float32)


def test_fp8_checkpoint_loads_exactly_and_runs(hf_model_dir, tmp_path):
    src = hf_model_dir("qwen3_moe")
    reader = SafetensorsReader(src)
    tensors, expected = {}, {}
    for i, name in enumerate(reader.names()):
        w = np.array(reader.get(name))
        quantized = name.endswith("_proj.weight") and w.ndim == 2
        if quantized:
            q, s = quantize_fp8(w, np.float32 if i % 2 else ml_dtypes.bfloat16)
            tensors[name], tensors[name + "_scale_inv"] = q, s
            expected[name] = own_dequant(q, s)
        else:
            tensors[name] = w
            expected[name] = w
    fp8_dir, f32_dir = tmp_path / "fp8", tmp_path / "f32"
    for d in (fp8_dir, f32_dir):
        d.mkdir()
    config = json.load(open(os.path.join(src, "config.json")))
    json.dump(config, open(f32_dir / "config.json", "w"))
    save_safetensors(str(f32_dir / "model.safetensors"), expected)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK),
                                     "activation_scheme": "dynamic"}
    json.dump(config, open(fp8_dir / "config.json", "w"))
    save_safetensors(str(fp8_dir / "model.safetensors"), tensors)

    fp8 = LLM(str(fp8_dir), dtype="float32")
    ref = LLM(str(f32_dir), dtype="float32")
    ref_params = dict(flat_params(ref.runner.state))
    for path, var in flat_params(fp8.runner.state):
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(ref_params[path].get_value()),
                                      err_msg=str(path))
    ids = list(range(5, 37))
    np.testing.assert_array_equal(fp8.logits(ids), ref.logits(ids))


def test_scale_grid_mismatch_names_the_shapes():
    q = np.zeros((40, 70), ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(dequantize_fp8_block(q, np.ones((3, 3), np.float32), (16, 32)), np.zeros((40, 70)))
    try:
        dequantize_fp8_block(q, np.ones((2, 3), np.float32), (16, 32))
    except ValueError as e:
        assert "[2, 3]" in str(e) and "[40, 70]" in str(e)
    else:
        raise AssertionError("expected a ValueError")
