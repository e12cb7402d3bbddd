"""The embedded default model: loads in transformers with equal logits, has learned its corpus, uses every expert."""

import glob
import json
import os
import subprocess
import sys
import sysconfig

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import LLM
from moejax.engine.llm import default_model_path
from moejax.kernels import route
from moejax.layers.moe import routing_config

PATH = default_model_path()


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")


@pytest.fixture(scope="module")
def held_out_tokens(llm):
    with open(os.path.join(PATH, "training.json")) as f:
        names = json.load(f)["held_out_files"]
    stdlib = sysconfig.get_paths()["stdlib"]
    texts = [open(os.path.join(stdlib, n), encoding="utf-8", errors="replace").read() for n in names
             if os.path.isfile(os.path.join(stdlib, n))]
    if not texts:
        pytest.skip("held-out standard library files not found")
    return np.asarray(llm.get_tokenizer().encode("".join(texts), add_special_tokens=False), np.int32)


def test_shipped_files():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(PATH, name))
    assert json.load(open(os.path.join(PATH, "tokenizer_config.json")))["chat_template"]
    assert sum(os.path.getsize(p) for p in glob.glob(os.path.join(PATH, "*"))) < 10e6


def test_transformers_logits_equal(llm):
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32).eval()
    ids = llm.get_tokenizer().encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    got = llm.logits(ids)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


def test_held_out_loss_far_below_uniform_and_unigram(llm, held_out_tokens):
    vocab = llm.config.vocab_size
    chunk = 128
    tokens = held_out_tokens[: (len(held_out_tokens) // chunk) * chunk][: 16 * chunk].reshape(-1, chunk)
    losses = []
    for row in tokens:
        logits = llm.logits(row.tolist()).astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        losses.append(-logp[np.arange(chunk - 1), row[1:]].mean())
    loss = float(np.mean(losses))
    # A unigram model fitted on the held-out text itself (an optimistic baseline) for comparison.
    counts = np.bincount(held_out_tokens, minlength=vocab) + 1.0
    unigram = float(-(np.log(counts / counts.sum())[tokens[:, 1:]]).mean())
    assert loss < 0.6 * np.log(vocab)
    assert loss < unigram - 1.0


def test_every_expert_receives_tokens(llm, held_out_tokens):
    model = nnx.merge(llm.runner.graphdef, llm.runner.state)
    tokens = jnp.asarray(held_out_tokens[: 8 * 256].reshape(8, 256))
    positions = jnp.broadcast_to(jnp.arange(256), tokens.shape)
    _, _, router_logits = model(tokens, positions)
    config = llm.config
    for layer, logits in enumerate(router_logits):
        _, ids = route(logits, routing_config(config))
        counts = np.bincount(np.asarray(ids).reshape(-1), minlength=config.num_experts)
        assert (counts > 0).all(), f"layer {layer}: expert loads {counts.tolist()}"
        assert counts.max() / counts.mean() < 4, f"layer {layer}: expert loads {counts.tolist()}"


def test_cli_generates_code_without_a_model():
    out = subprocess.run([sys.executable, "-m", "moejax.cli", "generate", "--prompt", "def ", "--max-tokens", "24",
                          "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("def ") and len(text.strip()) > 10
    assert any(s in text for s in ("(", ":", "=", "self", "return", "#"))
