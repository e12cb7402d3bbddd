"""The bundled config.json files of the flagship models and lookup by name (moejax.known_models)."""

import json
import os
import subprocess
import sys

import pytest

from moejax import LLM, known_models
from moejax.config import ModelConfig


def test_every_bundled_config_is_indexed_and_parses():
    index = known_models.index()
    dirs = {d for d in os.listdir(known_models.CONFIG_DIR) if os.path.isdir(os.path.join(known_models.CONFIG_DIR, d))}
    assert dirs == set(index) and len(index) >= 11
    for slug, entry in index.items():
        assert entry["status"] in ("verbatim", "reconstructed", "written") and entry["source"], slug
        config = ModelConfig.from_file(os.path.join(known_models.CONFIG_DIR, slug))
        assert config.num_experts > 1, slug


@pytest.mark.parametrize("name, slug", [
    ("Qwen/Qwen3-235B-A22B", "qwen3-235b-a22b"), ("qwen3-235b-a22b", "qwen3-235b-a22b"),
    ("QWEN3-30B", "qwen3-30b-a3b"), ("deepseek-ai/DeepSeek-R1", "deepseek-r1"), ("olmoe", "olmoe-1b-7b-0924"),
    ("mistralai/Mixtral-8x22B", "mixtral-8x22b-v0.1"), ("gpt-oss-12", "gpt-oss-120b")])
def test_names_resolve(name, slug):
    assert known_models.path_of(name) == os.path.join(known_models.CONFIG_DIR, slug)


def test_unknown_and_ambiguous_names_list_the_choices(tmp_path):
    with pytest.raises(ValueError, match="ambiguous.*Qwen3-30B-A3B.*Qwen3-235B-A22B"):
        known_models.path_of("qwen3")
    with pytest.raises(ValueError, match="known models: .*DeepSeek-V3"):
        known_models.path_of("llama-3-8b")
    assert known_models.resolve(str(tmp_path)) == str(tmp_path)  # a real path is itself
    with pytest.raises(ValueError, match="model: .*known models"):
        LLM("no-such-model")
    with pytest.raises(ValueError, match="load_format='dummy'"):
        LLM("qwen3-30b-a3b")  # a name has a config but no weights


def _plan(*args):
    proc = subprocess.run([sys.executable, "-m", "moejax.cli", "plan", *args, "--json"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_plan_by_name_gives_the_documented_cases():
    qwen = _plan("qwen3-235b-a22b", "--tp", "8")  # the seeds' "about 59 GB" per device
    assert 58e9 < qwen["weight_bytes_per_device"] < 60e9
    ktransformers = _plan("deepseek-v3", "--offload-experts", "--quantization", "int4", "--tp", "1")
    assert 11e9 < ktransformers["weight_bytes_per_device"] < 12.5e9 and ktransformers["host_weight_bytes"] > 3e11
