"""DeepSeek-V3 against transformers: MLA (latent cache, absorbed decode), YaRN, grouped sigmoid routing."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import LLM
from moejax.checkpoints.hf_writer import save_safetensors
from moejax.checkpoints.safetensors import SafetensorsReader
from moejax.layers import kv_cache as kv
from moejax.plan.memory import kv_bytes_per_token
from tests.hf_models import assert_matches_transformers, make_deepseek

PROMPT = np.random.RandomState(3).randint(0, 97, 32).tolist()
VARIANTS = {"q_lora_groups": dict(q_lora_rank=24, n_group=4, topk_group=2),
            "v2_style_no_q_lora": dict(q_lora_rank=None, n_group=1, topk_group=1)}


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = make_deepseek(str(tmp_path_factory.mktemp(name)), **VARIANTS[name])
        return cache[name]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_greedy_match_transformers(deepseek, variant):
    assert_matches_transformers(deepseek(variant), PROMPT, greedy_prompt_len=10)


def test_mla_cache_holds_the_latent_only(deepseek):
    llm = LLM(deepseek("q_lora_groups"))
    c = llm.config
    per_token = c.num_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 4  # float32
    assert kv.kv_bytes_per_token(c, jnp.float32) == per_token == kv_bytes_per_token(c, "float32")
    pool = llm.runner.pool
    assert pool.v is None and pool.k.shape == (c.num_layers, pool.num_pages, pool.page_size, 1, 24)
    assert pool.nbytes == pool.num_pages * pool.page_size * per_token
    assert per_token < c.num_layers * 2 * c.num_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim) * 4 / 4


def _one_sequence_batch(positions, pages, page_size, num_decode):
    """PagedBatch for one sequence's tokens at `positions`: one decode token, or one prefill block."""
    pos = np.asarray(positions)
    table = jnp.asarray([pages], jnp.int32)
    empty = jnp.zeros((0, len(pages)), jnp.int32)
    return kv.PagedBatch(jnp.asarray(np.asarray(pages)[pos // page_size], jnp.int32),
                         jnp.asarray(pos % page_size, jnp.int32), table if num_decode else empty,
                         empty if num_decode else table, jnp.zeros((0 if num_decode else 1,), jnp.int32),
                         num_decode, 1 if num_decode else len(pos))


def test_absorbed_decode_equals_expanded(deepseek):
    llm = LLM(deepseek("q_lora_groups"))
    model = nnx.merge(llm.runner.graphdef, llm.runner.state)
    attn = model.layers[1].attn
    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal((1, 12, 64)), jnp.float32)
    positions = jnp.arange(12)[None]
    expanded, _ = attn(x, positions)
    pool = kv.init_pool(llm.config, num_pages=5, page_size=4, dtype=jnp.float32)
    pages = [3, 1, 4]  # out of order on purpose
    # Prefill the first 11 tokens into the latent pages, then decode the 12th against them.
    prefill, layer_kv = attn(x[:, :11], positions[:, :11], kv.LayerKV(pool, _one_sequence_batch(
        range(11), pages, 4, 0), 1))
    decode, _ = attn(x[:, 11:], positions[:, 11:], kv.LayerKV(layer_kv.commit(), _one_sequence_batch(
        [11], pages, 4, 1), 1))
    absorbed = jnp.concatenate([prefill, decode], axis=1)
    np.testing.assert_allclose(np.asarray(absorbed), np.asarray(expanded), rtol=1e-5, atol=1e-5)


def test_mtp_layer_in_checkpoint_is_skipped(deepseek, tmp_path):
    src = deepseek("q_lora_groups")
    reader = SafetensorsReader(src)
    tensors = {n: np.array(reader.get(n)) for n in reader.names()}
    for name in list(tensors):  # an extra layer numbered num_hidden_layers, as in Hub checkpoints
        if name.startswith("model.layers.2."):
            tensors[name.replace("model.layers.2.", "model.layers.3.")] = tensors[name]
    tensors["model.layers.3.eh_proj.weight"] = np.zeros((64, 128), np.float32)
    save_safetensors(str(tmp_path / "model.safetensors"), tensors)
    config = json.load(open(os.path.join(src, "config.json")))
    config["num_nextn_predict_layers"] = 1
    json.dump(config, open(tmp_path / "config.json", "w"))
    np.testing.assert_array_equal(LLM(str(tmp_path)).logits(PROMPT), LLM(src).logits(PROMPT))
