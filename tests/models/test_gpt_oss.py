"""GPT-OSS against transformers: sinks, sliding windows shorter than the prompt, YaRN, biases, MXFP4 experts."""

import json
import os

import numpy as np
import pytest
import torch

from moejax import LLM
from moejax.checkpoints.hf import flat_params
from moejax.checkpoints.hf_writer import save_safetensors
from moejax.checkpoints.safetensors import SafetensorsReader
from tests.hf_models import assert_matches_transformers, make_gpt_oss

PROMPT = np.random.RandomState(3).randint(0, 97, 32).tolist()  # 4x the sliding window


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    return make_gpt_oss(str(tmp_path_factory.mktemp("gpt_oss")))


def test_logits_and_greedy_match_transformers(gpt_oss):
    # Greedy decoding is compared with transformers' full forward at every step: transformers 5.23's generate
    # (its sliding-window cache) disagrees with its own forward once the prompt is longer than the window.
    assert_matches_transformers(gpt_oss, PROMPT, greedy_prompt_len=20)


def test_mxfp4_experts_match_transformers_dequantization(gpt_oss, tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    reader = SafetensorsReader(gpt_oss)
    tensors = {n: np.array(reader.get(n)) for n in reader.names()}
    rng = np.random.default_rng()
    packed = {}
    for name in list(tensors):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, d_in, d_out = tensors.pop(name).shape
            blocks = rng.integers(0, 256, (e, d_out, d_in // 32, 16), dtype=np.uint8)
            scales = rng.integers(120, 131, (e, d_out, d_in // 32), dtype=np.uint8)
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
            packed[name] = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                      dtype=torch.float32).numpy()  # [E, in, out]
    out = tmp_path / "mxfp4"
    out.mkdir()
    save_safetensors(str(out / "model.safetensors"), tensors)
    config = json.load(open(os.path.join(gpt_oss, "config.json")))
    config["quantization_config"] = {"quant_method": "mxfp4"}
    json.dump(config, open(out / "config.json", "w"))

    llm = LLM(str(out), dtype="float32")
    params = dict(flat_params(llm.runner.state))
    for layer in range(4):
        gate_up = packed[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        np.testing.assert_array_equal(np.asarray(params[("layers", layer, "moe", "w_gate")].get_value()),
                                      gate_up[..., 0::2])
        np.testing.assert_array_equal(np.asarray(params[("layers", layer, "moe", "w_up")].get_value()),
                                      gate_up[..., 1::2])
        np.testing.assert_array_equal(np.asarray(params[("layers", layer, "moe", "w_down")].get_value()),
                                      packed[f"model.layers.{layer}.mlp.experts.down_proj"])
