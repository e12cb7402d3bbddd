"""load_format="dummy": random weights from the config alone, the same for the same seed, in the model's
shardings, and a model that runs."""

import json
import os

import jax
import numpy as np
import pytest

from moejax import LLM, SamplingParams
from moejax.checkpoints.dummy import dummy_state
from moejax.checkpoints.hf import flat_params
from moejax.config import ModelConfig
from moejax.models import build_abstract

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "moejax", "data", "tiny-moe")


def _state(seed):
    config = ModelConfig.from_file(TINY)
    _, abstract = build_abstract(config, jax.numpy.float32)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return dict(flat_params(dummy_state(abstract, sharding_for=lambda *_: device, seed=seed)))


def test_dummy_weights_follow_the_seed_and_their_kind():
    a, b, c = _state(0), _state(0), _state(1)
    assert a.keys() == b.keys() == c.keys()
    normal = 0
    for path, var in a.items():
        x = np.asarray(var.get_value())
        np.testing.assert_array_equal(x, np.asarray(b[path].get_value()), err_msg=str(path))
        if path[-1] == "weight":  # RMSNorm scales
            np.testing.assert_array_equal(x, 1.0)
        elif x.size >= 4096:
            normal += 1
            assert abs(x.std() - 0.02) < 0.002 and abs(x.mean()) < 0.002, path
            assert not np.array_equal(x, np.asarray(c[path].get_value())), path
    assert normal >= 4
    # Tensors of one shape differ from each other: each is drawn from its own name.
    same_shape = [np.asarray(v.get_value()) for p, v in a.items() if p[-1] == "kernel"]
    shapes = {}
    for x in same_shape:
        shapes.setdefault(x.shape, []).append(x)
    pairs = [xs for xs in shapes.values() if len(xs) > 1]
    assert pairs and all(not np.array_equal(xs[0], xs[1]) for xs in pairs)


def test_llm_runs_on_dummy_weights_from_a_config_alone(tmp_path):
    with open(os.path.join(TINY, "config.json")) as f:
        (tmp_path / "config.json").write_text(json.dumps(json.load(f)))
    llm = LLM(str(tmp_path), load_format="dummy", dtype="float32", max_model_len=64, max_num_seqs=2, seed=3)
    out = llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=SamplingParams(temperature=0, max_tokens=4,
                                                                                    ignore_eos=True),
                       use_tqdm=False)
    tokens = out[0].outputs[0].token_ids
    assert len(tokens) == 4
    ids = [5, 6, 7]  # the engine's tokens are the model's own greedy ones on these weights
    for _ in range(4):
        ids.append(int(np.argmax(llm.logits(ids)[-1])))
    assert tokens == ids[3:]
    with pytest.raises(ValueError, match="load_format"):
        LLM(str(tmp_path), load_format="pickle")


def test_quantized_dummy_weights_are_the_float_draws_quantized_and_offload_to_host():
    """With a quantization, each tensor is drawn as in float and quantized inside its initializer; offloaded
    experts land in host memory that way and decode as the device-resident model does."""
    from moejax.kernels.quant import QuantizedWeight, dequantize, model_transform

    config = ModelConfig.from_file(TINY)
    _, abstract = build_abstract(config, jax.numpy.float32)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    plain = dict(flat_params(dummy_state(abstract, sharding_for=lambda *_: device, seed=2)))
    quant = dict(flat_params(dummy_state(abstract, sharding_for=lambda *_: device, seed=2,
                                         transform=model_transform("int4", jax.numpy.float32))))
    packed = 0
    for path, var in quant.items():
        value, want = var.get_value(), np.asarray(plain[path].get_value())
        if isinstance(value, QuantizedWeight):
            packed += 1
            assert value.bits == 4 and value.values.dtype == np.uint8, path
            got = np.asarray(dequantize(value))
            # int4 with per-128 group scales: within half a step (max |w| / 7 / 2) of the float draw.
            assert np.abs(got - want).max() <= np.abs(want).max() / 14 + 1e-6, path
        else:
            np.testing.assert_array_equal(np.asarray(value), want, err_msg=str(path))
    assert packed >= 3

    kw = dict(load_format="dummy", dtype="float32", quantization="int4", max_model_len=64, max_num_seqs=2, seed=2)
    ref, off = LLM(TINY, **kw), LLM(TINY, offload_experts=True, **kw)
    host = [leaf for leaf in jax.tree.leaves(off.runner.params) if leaf.sharding.memory_kind == "pinned_host"]
    assert host and sum(a.nbytes for a in host) == off.memory_plan.host_weight_bytes
    np.testing.assert_allclose(off.logits([5, 6, 7, 8]), ref.logits([5, 6, 7, 8]), rtol=1e-5, atol=1e-5)
