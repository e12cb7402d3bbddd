"""moejax convert: same logits as the HF directory, streaming memory, shard-only restore, clean failures."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from moejax import LLM
from moejax.checkpoints.convert import convert
from moejax.checkpoints.hf_writer import save_safetensors
from moejax.cli import main as cli
from tests.hf_models import FAMILIES, make_deepseek, make_gpt_oss

IDS = list(range(3, 40))


def rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("family", [*FAMILIES, "deepseek_v3", "gpt_oss"])
def test_convert_then_load_equals_hf(hf_model_dir, tmp_path, family):
    if family == "deepseek_v3":
        src = make_deepseek(str(tmp_path / "src"))
    elif family == "gpt_oss":
        src = make_gpt_oss(str(tmp_path / "src"))
    else:
        src = hf_model_dir(family)
    # Quantized conversion is family-agnostic: it runs for one GQA family and for the two unusual layouts.
    modes = [None, "int8", "int4"] if family in ("qwen3_moe", "deepseek_v3", "gpt_oss") else [None]
    modes += ["fp8"] if family == "deepseek_v3" else []
    for quantization in modes:
        out = str(tmp_path / f"out_{quantization}")
        convert(src, out, quantization=quantization)
        np.testing.assert_array_equal(LLM(out).logits(IDS), LLM(src, quantization=quantization).logits(IDS))
    meta = json.load(open(os.path.join(tmp_path, "out_None", "moejax_checkpoint.json")))
    assert meta["family"] == family and meta["dtype"] == "float32" and meta["source"]["files"]


def test_restore_into_ep4_reads_only_shards(hf_model_dir, tmp_path):
    out = str(tmp_path / "out")
    convert(hf_model_dir("qwen3_moe"), out)
    llm = LLM(out, expert_parallel_size=4, tensor_parallel_size=2)
    from moejax.checkpoints.hf import flat_params

    for path, var in flat_params(llm.runner.state):
        arr = var.get_value()
        for shard in arr.addressable_shards:
            if path[-1] in ("w_gate", "w_up", "w_down"):
                assert shard.data.shape[0] == arr.shape[0] // 4
                assert shard.data.size == arr.size // 8
    assert rel(llm.logits(IDS), LLM(hf_model_dir("qwen3_moe")).logits(IDS)) < 1e-5


def synthetic_checkpoint(path: str, gigabytes: float = 1.0) -> int:
    """A Qwen3-MoE-shaped float32 checkpoint of about `gigabytes`, written layer by layer."""
    hidden, experts, width, vocab = 512, 16, 256, 1024
    layer_bytes = 4 * (experts * 3 * hidden * width + 4 * hidden * hidden + hidden * experts + 2 * hidden)
    layers = int(gigabytes * 1e9 // layer_bytes)
    config = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
              "intermediate_size": 1024, "moe_intermediate_size": width, "num_hidden_layers": layers,
              "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 64, "num_experts": experts,
              "num_experts_per_tok": 2, "norm_topk_prob": True, "torch_dtype": "float32",
              "max_position_embeddings": 512}
    os.makedirs(path, exist_ok=True)
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    rng = np.random.default_rng(0)
    r = lambda *shape: rng.standard_normal(shape, dtype=np.float32) * 0.02  # noqa: E731
    weight_map, total = {}, 0
    for i in range(-1, layers):
        p = f"model.layers.{i}"
        if i < 0:
            tensors = {"model.embed_tokens.weight": r(vocab, hidden), "lm_head.weight": r(vocab, hidden),
                       "model.norm.weight": np.ones(hidden, np.float32)}
        else:
            tensors = {f"{p}.self_attn.{n}_proj.weight": r(hidden, hidden) for n in "qkvo"}
            tensors.update({f"{p}.self_attn.q_norm.weight": np.ones(64, np.float32),
                            f"{p}.self_attn.k_norm.weight": np.ones(64, np.float32),
                            f"{p}.input_layernorm.weight": np.ones(hidden, np.float32),
                            f"{p}.post_attention_layernorm.weight": np.ones(hidden, np.float32),
                            f"{p}.mlp.gate.weight": r(experts, hidden)})
            for e in range(experts):
                tensors[f"{p}.mlp.experts.{e}.gate_proj.weight"] = r(width, hidden)
                tensors[f"{p}.mlp.experts.{e}.up_proj.weight"] = r(width, hidden)
                tensors[f"{p}.mlp.experts.{e}.down_proj.weight"] = r(hidden, width)
        name = f"model-{i + 1:05d}.safetensors"
        save_safetensors(os.path.join(path, name), tensors)
        weight_map.update({t: name for t in tensors})
        total += sum(t.nbytes for t in tensors.values())
    json.dump({"weight_map": weight_map}, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    return total


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("big"))
    return path, synthetic_checkpoint(path, 1.1)


# Growth of the peak RSS of this process image over its resident size once jax and moejax are loaded and the
# backend is up: the conversion's own memory (VmHWM starts afresh at exec, whereas getrusage's ru_maxrss would also
# count the (v)forked copy of the big pytest process before exec; on a GPU machine the CUDA libraries alone are
# hundreds of MB resident, which is not the conversion's).
CONVERT_AND_REPORT_RSS = (
    "import sys\n"
    "import jax, jax.numpy as jnp\n"
    "from moejax.checkpoints.convert import convert\n"
    "jnp.zeros(1).block_until_ready()\n"
    "status = lambda key: int([l for l in open('/proc/self/status') if l.startswith(key)][0].split()[1]) * 1024\n"
    "base = status('VmRSS:')\n"
    "convert(sys.argv[1], sys.argv[2])\n"
    "print(status('VmHWM:') - base)\n"
)


def test_streaming_peak_rss_under_40_percent(big_checkpoint, tmp_path):
    path, size = big_checkpoint
    assert 1.0e9 < size < 1.2e9
    proc = subprocess.run([sys.executable, "-c", CONVERT_AND_REPORT_RSS, path, str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = int(proc.stdout.strip().splitlines()[-1])
    assert peak < 0.4 * size, f"peak RSS growth {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint"


def test_killed_conversion_leaves_no_out_dir(big_checkpoint, tmp_path):
    path, _ = big_checkpoint
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "moejax.cli", "convert", path, str(out), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir()):
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()


@pytest.fixture
def broken(hf_model_dir, tmp_path):
    """A copy of a sharded tiny checkpoint to break in one way."""
    import torch
    import transformers as tf

    src = tmp_path / "hf"
    model = tf.AutoModelForCausalLM.from_pretrained(hf_model_dir("mixtral"), dtype=torch.float32)
    model.save_pretrained(src, max_shard_size="100KB")
    return src


def run_cli(*args):
    return cli(["convert", *map(str, args), "--no-progress"])


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(n in err[0] for n in needles), err


def test_missing_shard(broken, tmp_path, capsys):
    index = json.load(open(broken / "model.safetensors.index.json"))
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(broken / victim)
    assert run_cli(broken, tmp_path / "out") != 0
    one_error_line(capsys, victim)
    assert not (tmp_path / "out").exists()


def test_truncated_file(broken, tmp_path, capsys):
    victim = sorted(f for f in os.listdir(broken) if f.endswith(".safetensors"))[0]
    with open(broken / victim, "r+b") as f:
        f.truncate(os.path.getsize(broken / victim) - 100)
    assert run_cli(broken, tmp_path / "out") != 0
    one_error_line(capsys, victim, "truncated")
    assert not (tmp_path / "out").exists()


def rewrite_tensor(directory, name, value):
    from moejax.checkpoints.safetensors import SafetensorsReader

    index = json.load(open(directory / "model.safetensors.index.json"))
    file = index["weight_map"][name]
    reader = SafetensorsReader(str(directory))
    tensors = {n: np.array(reader.get(n)) for n, f in index["weight_map"].items() if f == file}
    del reader
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_safetensors(str(directory / file), tensors)


def test_wrong_shape(broken, tmp_path, capsys):
    rewrite_tensor(broken, "model.layers.1.self_attn.q_proj.weight", np.zeros((8, 8), np.float32))
    assert run_cli(broken, tmp_path / "out") != 0
    one_error_line(capsys, "model.layers.1.self_attn.q_proj.weight", "shape")
    assert not (tmp_path / "out").exists()


def test_missing_tensor(broken, tmp_path, capsys):
    rewrite_tensor(broken, "model.layers.2.post_attention_layernorm.weight", None)
    assert run_cli(broken, tmp_path / "out") != 0
    one_error_line(capsys, "model.layers.2.post_attention_layernorm.weight", "missing")
    assert not (tmp_path / "out").exists()


def test_unknown_architecture(broken, tmp_path, capsys):
    cfg = json.load(open(broken / "config.json"))
    cfg["architectures"] = ["FancyNewForCausalLM"]
    json.dump(cfg, open(broken / "config.json", "w"))
    assert run_cli(broken, tmp_path / "out") != 0
    one_error_line(capsys, "FancyNewForCausalLM", "supported")
    assert not (tmp_path / "out").exists()


def test_existing_out_dir_is_left_untouched(broken, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert run_cli(broken, out) != 0
    one_error_line(capsys, str(out), "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me" and len(os.listdir(out)) == 1
    assert run_cli(broken, out, "--overwrite") == 0
    assert not (out / "precious.txt").exists() and (out / "moejax_checkpoint.json").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.")]
