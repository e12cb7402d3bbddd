"""checkpoints.hf_writer: a loaded model written back gives the checkpoint's own tensors; the file format reads back."""

import glob
import os

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch

from moejax import LLM
from moejax.checkpoints.hf_writer import hf_tensors, save_safetensors
from tests.hf_models import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_written_tensors_equal_the_loaded_checkpoint(hf_model_dir, family):
    path = hf_model_dir(family)
    llm = LLM(path, dtype="float32")
    written = hf_tensors(llm.config, llm.runner.state)
    original = {}
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        original.update(load_file(f))
    assert sorted(written) == sorted(original), (set(written) ^ set(original))
    for name, value in original.items():
        assert written[name].shape == value.shape, name
        np.testing.assert_array_equal(written[name], value.astype(np.float32), err_msg=name)


def test_safetensors_file_reads_back_in_every_dtype(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "b.bf16": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
        "c.i32": rng.integers(-9, 9, (2, 2, 2)).astype(np.int32),
        "d.scalar": np.asarray(1.5, np.float16),
    }
    file = str(tmp_path / "t.safetensors")
    save_safetensors(file, tensors)
    back = load_torch(file)
    assert sorted(back) == sorted(tensors)
    for name, value in tensors.items():
        assert tuple(back[name].shape) == value.shape, name
        np.testing.assert_array_equal(back[name].to(torch.float32).numpy(), value.astype(np.float32), err_msg=name)
    assert back["b.bf16"].dtype == torch.bfloat16
