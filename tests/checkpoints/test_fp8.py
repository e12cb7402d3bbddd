"""A hand-built FP8 block-quantized checkpoint with dimensions that are not multiples of the block."""

import json
import os

import ml_dtypes
import pytest
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


def _fp8_pair(src, tmp_path, block, quantized) -> tuple[str, str, dict]:
    """The checkpoint in `src` as an FP8 block checkpoint (tensors whose name `quantized` accepts, 2-D or stacked
    3-D) and as its exactly dequantized float32 twin: (fp8 dir, float32 dir, the fp8 tensors)."""
    global BLOCK
    reader = SafetensorsReader(src)
    tensors, exact = {}, {}
    saved, BLOCK = BLOCK, block
    try:
        for name in reader.names():
            w = np.array(reader.get(name))
            if quantized(name, w):
                mats = w if w.ndim == 3 else w[None]
                pairs = [quantize_fp8(m, np.float32) for m in mats]
                q, sc = np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs])
                exact[name] = np.stack([own_dequant(a, b) for a, b in pairs]).reshape(w.shape)
                tensors[name], tensors[name + "_scale_inv"] = (q, sc) if w.ndim == 3 else (q[0], sc[0])
            else:
                tensors[name] = exact[name] = w
    finally:
        BLOCK = saved
    fp8_dir, f32_dir = tmp_path / "fp8", tmp_path / "f32"
    config = json.load(open(os.path.join(src, "config.json")))
    for d, ts, quant in ((f32_dir, exact, None), (fp8_dir, tensors, block)):
        d.mkdir()
        cfg = dict(config)
        if quant:
            cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(quant),
                                          "activation_scheme": "dynamic"}
        json.dump(cfg, open(d / "config.json", "w"))
        save_safetensors(str(d / "model.safetensors"), ts)
    return str(fp8_dir), str(f32_dir), tensors


def _fp8_deepseek(tmp_path, block):
    """A tiny DeepSeek-V3 as an FP8 block checkpoint (every linear but the router and lm_head, as the Hub's
    DeepSeek-V3 stores it) and as its exactly dequantized float32 twin."""
    from tests.hf_models import make_deepseek

    src = make_deepseek(str(tmp_path / "src"))
    fp8_dir, f32_dir, _ = _fp8_pair(src, tmp_path, block, lambda name, w: name.endswith(
        ("_proj.weight", "_proj_with_mqa.weight")) and w.ndim == 2)
    return fp8_dir, f32_dir


def test_fp8_deepseek_checkpoint_stays_fp8_and_matches_its_dequantized_model(tmp_path):
    import collections

    import jax

    from moejax.kernels.quant import QuantizedWeight, should_quantize

    # blocks of 16 rows (out) x 32 columns (in), so moejax's input-major blocks are (32, 16); 24-wide
    # projections and 16-wide latents leave partial edge blocks in both directions
    fp8_dir, f32_dir = _fp8_deepseek(tmp_path, (16, 32))
    ref = LLM(f32_dir, dtype="float32")
    ids = list(range(3, 40))
    want = ref.logits(ids)

    # quantization="fp8" with float32 activations: the weights the kernels see are the dequantized ones
    fp8 = LLM(fp8_dir, dtype="float32", quantization="fp8")
    kinds = collections.Counter()
    for path, var in flat_params(fp8.runner.state):
        value = var.get_value()
        if isinstance(value, QuantizedWeight):
            assert value.kind == "fp8" and value.values.dtype == ml_dtypes.float8_e4m3fn, path
            assert value.scales.dtype == np.float32 and (value.group_size, value.block_n) == (32, 16)
            kinds[path[-1]] += 1
        else:
            assert not should_quantize(path), f"{path} was not kept in fp8"
    assert kinds["w_gate"] and kinds["kernel"], kinds
    np.testing.assert_allclose(fp8.logits(ids), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

    # dtype="auto" keeps FP8 (computing in the config's dtype); an explicit dtype dequantizes
    assert LLM(fp8_dir).quantization == "fp8" and LLM(fp8_dir, dtype="bfloat16").quantization is None
    # fp8 weights with bfloat16 activations: bf16's 8 mantissa bits over 4 layers bound the error
    auto = LLM(fp8_dir, dtype="bfloat16", quantization="fp8")
    assert auto.quantization == "fp8"
    got = auto.logits(ids)
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()

    # bytes on the device equal the planner's fp8 figure
    per_device = collections.Counter()
    for leaf in jax.tree.leaves(auto.runner.state):
        for shard in leaf.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    assert max(per_device.values()) == auto.memory_plan.weight_bytes_per_device
    assert auto.memory_plan.quantization == "fp8"


def test_convert_keeps_an_fp8_checkpoint_in_fp8(tmp_path):
    from moejax.checkpoints.convert import convert
    from moejax.kernels.quant import QuantizedWeight

    fp8_dir, _ = _fp8_deepseek(tmp_path, (16, 16))
    out = str(tmp_path / "converted")
    convert(fp8_dir, out)
    meta = json.load(open(os.path.join(out, "moejax_checkpoint.json")))
    assert meta["quantization"] == "fp8" and meta["dtype"] == "float32"
    converted, direct = LLM(out), LLM(fp8_dir)
    assert converted.quantization == "fp8"
    weights = [v.get_value() for _, v in flat_params(converted.runner.state)]
    assert any(isinstance(w, QuantizedWeight) and w.kind == "fp8" for w in weights)
    ids = list(range(3, 40))
    np.testing.assert_array_equal(converted.logits(ids), direct.logits(ids))


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2, expert_parallel_size=2),
                                    dict(tensor_parallel_size=4, enable_expert_parallel=True),
                                    dict(expert_parallel_size=8)])
def test_fp8_weights_split_over_devices_give_the_one_device_logits(tmp_path, layout):
    """e4m3 values and their block scales are split alike (whole blocks per device), so every layout of the
    FP8 model computes what one device computes, and holds the planner's bytes."""
    import collections

    import jax

    fp8_dir, _ = _fp8_deepseek(tmp_path, (16, 16))
    ids = list(range(3, 30))
    one = LLM(fp8_dir, dtype="float32", quantization="fp8")
    split = LLM(fp8_dir, dtype="float32", quantization="fp8", **layout)
    np.testing.assert_allclose(split.logits(ids), one.logits(ids), rtol=1e-4, atol=1e-4)
    per_device = collections.Counter()
    for leaf in jax.tree.leaves(split.runner.state):
        for shard in leaf.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    assert max(per_device.values()) == split.memory_plan.weight_bytes_per_device


@pytest.mark.parametrize("fault", ["values_dtype", "scale_grid"])
def test_a_bad_fp8_tensor_is_refused_by_name(tmp_path, fault):
    from moejax.checkpoints.safetensors import CheckpointError

    fp8_dir, _ = _fp8_deepseek(tmp_path, (16, 16))
    reader = SafetensorsReader(fp8_dir)
    tensors = {n: np.array(reader.get(n)) for n in reader.names()}
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    if fault == "values_dtype":
        tensors[name] = tensors[name].astype(np.float32)
    else:
        tensors[name + "_scale_inv"] = tensors[name + "_scale_inv"][:1]
    save_safetensors(os.path.join(fp8_dir, "model.safetensors"), tensors)
    with pytest.raises(CheckpointError, match="experts.3.up_proj"):
        LLM(fp8_dir)


@pytest.mark.parametrize("block, kept", [((16, 32), True), ((24, 32), False)])
def test_fused_gate_up_fp8_checkpoint(hf_model_dir, tmp_path, block, kept):
    """transformers 5's fused gate_up_proj [E, 2I, H] in FP8: kept as e4m3 when the gate/up split falls on a
    block boundary (I = 32, 16-row blocks); otherwise (24-row blocks) dequantized exactly and quantized again on
    moejax's grid, so a block is never cut in two."""
    from moejax.kernels.quant import QuantizedWeight

    src = hf_model_dir("qwen3_moe", fused=True)
    fp8_dir, f32_dir, tensors = _fp8_pair(src, tmp_path, block, lambda name, w: name.endswith(
        ("_proj.weight", "gate_up_proj", "down_proj")) and w.ndim in (2, 3))
    assert any(n.endswith("gate_up_proj_scale_inv") for n in tensors)
    llm = LLM(fp8_dir, dtype="float32", quantization="fp8")
    experts = [v.get_value() for p, v in flat_params(llm.runner.state) if p[-1] == "w_up"]
    assert experts and all(isinstance(w, QuantizedWeight) and w.kind == "fp8" for w in experts)
    ids = list(range(3, 40))
    want = LLM(f32_dir, dtype="float32").logits(ids)
    err = np.abs(llm.logits(ids) - want).max() / np.abs(want).max()
    # kept: the dequantized weights exactly; requantized: a second e4m3 rounding (2^-4 relative) of the experts
    assert err < (1e-5 if kept else 5e-2), err
