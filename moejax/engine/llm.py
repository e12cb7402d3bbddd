"""`LLM`: load a model once, then generate, chat and score, with vLLM's offline API."""

from __future__ import annotations

import itertools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from moejax.checkpoints.hf import load_hf_state
from moejax.config import ModelConfig
from moejax.engine import cache as kv
from moejax.engine.outputs import CompletionOutput, RequestOutput
from moejax.engine.runner import ModelRunner, bucket
from moejax.engine.sampling import SamplingBatch, SamplingParams
from moejax.engine.tokenizer import Tokenizer
from moejax.models import build_abstract
from moejax.plan.memory import Mesh, plan_memory
from moejax.sharding.distributed import initialize_from_env
from moejax.sharding.mesh import make_mesh, sharding_for_axes

logger = logging.getLogger("moejax")

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
QUANTIZATIONS = (None, "int8", "int4")
MIN_PREFILL_BUCKET = 16
MIN_CACHE_BUCKET = 128


def default_model_path() -> str:
    """The embedded tiny MoE shipped inside the package."""
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "tiny-moe")


class LLM:
    """A loaded MoE model. See CONTRACT.md for the arguments."""

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        quantization: str | None = None,
        tensor_parallel_size: int = 1,
        expert_parallel_size: int = 1,
        data_parallel_size: int = 1,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        gpu_memory_utilization: float = 0.9,
        seed: int = 0,
    ):
        initialize_from_env()
        model = default_model_path() if model is None else os.fspath(model)
        if not os.path.isdir(model):
            raise ValueError(f"model: {model!r} is not a directory")
        self.model_path = model
        self.config = ModelConfig.from_file(model)
        c = self.config
        from moejax.checkpoints import orbax_store

        self.checkpoint = orbax_store.read_metadata(model) if orbax_store.is_converted(model) else None
        if self.checkpoint is not None:  # a converted checkpoint fixes its dtype and quantization
            dtype = self.checkpoint["dtype"] if dtype == "auto" else dtype
            if dtype != self.checkpoint["dtype"]:
                raise ValueError(f"dtype={dtype!r}: {model} was converted to {self.checkpoint['dtype']}")
            stored = self.checkpoint.get("quantization")
            if quantization not in (None, stored):
                raise ValueError(f"quantization={quantization!r}: {model} was converted with {stored!r}")
            quantization = stored
        if dtype == "auto":
            dtype = c.dtype if c.dtype in DTYPES else "bfloat16"
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        for name, value in (("tensor_parallel_size", tensor_parallel_size),
                            ("expert_parallel_size", expert_parallel_size),
                            ("data_parallel_size", data_parallel_size), ("max_num_seqs", max_num_seqs)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if max_model_len is not None and max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {max_model_len}")
        self.dtype = DTYPES[dtype]
        self.dtype_name = dtype
        self.quantization = quantization
        self.max_num_seqs = max_num_seqs
        self.gpu_memory_utilization = gpu_memory_utilization
        self.seed = seed
        self._request_counter = itertools.count()

        self.mesh = make_mesh(tensor_parallel_size, expert_parallel_size, data_parallel_size)
        # The planner is the memory model: it sizes the KV cache and caps the default max_model_len.
        self.memory_plan = plan_memory(
            c, mesh=Mesh(tensor_parallel_size, expert_parallel_size, data_parallel_size), dtype=dtype,
            quantization=quantization, device_memory_bytes=device_memory_bytes(),
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len or c.max_position_embeddings, max_num_seqs=max_num_seqs, suggest=False)
        capacity = self.memory_plan.kv_cache_tokens
        self.max_model_len = max_model_len or max(min(c.max_position_embeddings, capacity), 1)
        logger.info("KV cache size: %s tokens; maximum concurrency for %s tokens per request: %.2fx",
                    f"{capacity:,}", f"{self.max_model_len:,}", capacity / self.max_model_len)
        graphdef, abstract = build_abstract(c, self.dtype)

        def sharding_for(path, var, shape):
            return sharding_for_axes(self.mesh, var.get_metadata().get("logical_axes", ()), shape)

        if self.checkpoint is not None:
            state = orbax_store.restore_state(model, abstract, sharding_for, self.checkpoint.get("quantized"))
        else:
            state = load_hf_state(model, c, abstract, sharding_for=sharding_for, transform=self._quantizer())
        self.runner = ModelRunner(graphdef, state, self.mesh, "highest" if self.dtype == jnp.float32 else None)
        self.tokenizer = Tokenizer(model) if Tokenizer.exists(model) else None
        self.eos_token_ids = set(c.eos_token_ids) | _generation_eos(model)

    # -- public API ----------------------------------------------------------------------------------------
    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer

    def generate(self, prompts=None, sampling_params=None, *, prompt_token_ids=None, use_tqdm: bool = True):
        """Complete each prompt; returns one RequestOutput per prompt, in order."""
        texts, ids = self._prompts(prompts, prompt_token_ids)
        params = self._params(sampling_params, len(ids))
        requests = []
        for i, (text, prompt_ids, p) in enumerate(zip(texts, ids, params)):
            self._check_prompt(prompt_ids, i)
            request_id = str(next(self._request_counter))
            # Unseeded requests draw from the LLM's seed and the request's number: reproducible across runs.
            base_seed = p.seed if p.seed is not None else (self.seed * 1_000_003 + int(request_id)) & 0x7FFFFFFF
            out = RequestOutput(request_id, text, list(prompt_ids), [])
            for j in range(p.n):
                out.outputs.append(CompletionOutput(j, "", [], 0.0, [] if p.logprobs is not None else None))
                requests.append((out, j, list(prompt_ids), p, base_seed + j))
            out.finished = False
        results = _unique([r[0] for r in requests])
        progress = None
        if use_tqdm and len(results) > 1:
            from tqdm import tqdm

            progress = tqdm(total=len(results), desc="Processed prompts", leave=False)
        for batch in self._batches(requests):
            self._generate_batch(batch)
            if progress is not None:
                progress.n = sum(r.finished for r in results)
                progress.refresh()
        if progress is not None:
            progress.close()
        return results

    def chat(self, messages, sampling_params=None, use_tqdm: bool = False):
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer: this model directory has no tokenizer.json")
        batch = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in batch]
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outputs = self.generate(sampling_params=sampling_params, prompt_token_ids=ids, use_tqdm=use_tqdm)
        for out, text in zip(outputs, prompts):
            out.prompt = text
        return outputs

    def logits(self, token_ids) -> np.ndarray:
        """Next-token logits at every position of one forward pass: [len(token_ids), vocab] float32."""
        token_ids = [int(t) for t in token_ids]
        self._check_prompt(token_ids, 0, name="token_ids")
        n = len(token_ids)
        t = bucket(n, MIN_PREFILL_BUCKET)
        tokens = np.zeros((1, t), np.int32)
        tokens[0, :n] = token_ids
        positions = np.full((1, t), -1, np.int32)
        positions[0, :n] = np.arange(n)
        logits = self.runner.forward_logits(tokens, positions)
        return np.asarray(logits[0, :n], np.float32)

    # -- internals -----------------------------------------------------------------------------------------
    def _quantizer(self):
        if self.quantization is None:
            return None
        from moejax.kernels import quant

        return quant.model_transform(self.quantization, self.dtype)

    def _prompts(self, prompts, prompt_token_ids):
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts and prompt_token_ids")
        if prompts is not None:
            if isinstance(prompts, str):
                prompts = [prompts]
            if self.tokenizer is None:
                raise ValueError("prompts: this model has no tokenizer.json; pass prompt_token_ids instead")
            for i, p in enumerate(prompts):
                if not isinstance(p, str) or not p:
                    raise ValueError(f"prompts[{i}] is empty or not a string")
            return list(prompts), [self.tokenizer.encode(p) for p in prompts]
        if prompt_token_ids and isinstance(prompt_token_ids[0], int):
            prompt_token_ids = [prompt_token_ids]
        return [None] * len(prompt_token_ids), [list(map(int, ids)) for ids in prompt_token_ids]

    def _params(self, sampling_params, n):
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if len(sampling_params) != n:
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for {n} prompts")
        return list(sampling_params)

    def _check_prompt(self, ids, i, name="prompt"):
        if not ids:
            raise ValueError(f"{name} {i} is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"{name} {i} has {len(ids)} tokens; max_model_len is {self.max_model_len}")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"{name} {i} has token ids outside the vocabulary [0, {self.config.vocab_size}): {bad[:5]}")

    def _budget(self, prompt_len: int, p: SamplingParams) -> int:
        room = self.max_model_len - prompt_len
        return room if p.max_tokens is None else min(p.max_tokens, room)

    def _batches(self, requests):
        """Consecutive groups of at most max_num_seqs requests whose cache fits the planned KV capacity."""
        capacity = max(self.memory_plan.kv_cache_tokens, 1)
        start = 0
        while start < len(requests):
            size = min(self.max_num_seqs, len(requests) - start)
            while size > 1:
                group = requests[start : start + size]
                need = max(len(r[2]) + self._budget(len(r[2]), r[3]) for r in group)
                if bucket(size) * bucket(need, MIN_CACHE_BUCKET) <= capacity:
                    break
                size //= 2
            yield requests[start : start + size]
            start += size

    def _generate_batch(self, requests):
        """Run one static batch to completion: a batched prefill, then decode steps until every row stops."""
        n = len(requests)
        budgets = [self._budget(len(r[2]), r[3]) for r in requests]
        batch = bucket(n)
        prompt_len = max(len(r[2]) for r in requests)
        t = bucket(prompt_len, MIN_PREFILL_BUCKET)
        total = max(len(r[2]) + b for r, b in zip(requests, budgets))
        max_len = bucket(max(total, t), MIN_CACHE_BUCKET, max(self.max_model_len, t))
        cache_sharding = sharding_for_axes(self.mesh, kv.CACHE_AXES, kv.cache_shape(self.config, batch, max_len))
        cache = kv.init_cache(self.config, batch, max_len, self.dtype, cache_sharding)

        tokens = np.zeros((batch, t), np.int32)
        positions = np.full((batch, t), -1, np.int32)
        lengths = np.zeros(batch, np.int32)
        for row, r in enumerate(requests):
            ids = r[2]
            tokens[row, : len(ids)] = ids
            positions[row, : len(ids)] = np.arange(len(ids))
            lengths[row] = len(ids)
        last = np.maximum(lengths - 1, 0)
        params = [r[3] for r in requests]
        seeds = [r[4] for r in requests]
        num_logprobs = max((p.logprobs or 0) for p in params)
        done = [b <= 0 for b in budgets]
        for row, r in enumerate(requests):
            if done[row]:
                self._finish(r, "length", None)
        generated = [0] * n

        step_tokens, step_positions, step_last = tokens, positions, last
        while not all(done):
            sampling = SamplingBatch.build(params, seeds, generated, batch)
            next_tokens, logprobs, top, cache = self.runner.step(
                step_tokens, step_positions, step_last, cache, sampling, num_logprobs)
            next_tokens = np.asarray(next_tokens)
            logprobs = np.asarray(logprobs)
            top = None if top is None else (np.asarray(top[0]), np.asarray(top[1]))
            for row, r in enumerate(requests):
                if done[row]:
                    continue
                done[row] = self._append(r, int(next_tokens[row]), float(logprobs[row]),
                                         None if top is None else (top[0][row], top[1][row]), budgets[row])
                generated[row] += 1
            step_tokens = next_tokens.reshape(batch, 1).astype(np.int32)
            step_positions = np.full((batch, 1), -1, np.int32)
            for row in range(n):
                if not done[row]:
                    step_positions[row, 0] = lengths[row] + generated[row] - 1
            step_last = np.zeros(batch, np.int32)
        for r in requests:
            r[0].finished = all(o.finish_reason is not None for o in r[0].outputs)

    def _append(self, request, token: int, logprob: float, top, budget: int) -> bool:
        """Record one sampled token; returns True when the sequence is finished."""
        out, j, _, p, _ = request
        completion = out.outputs[j]
        completion.token_ids.append(token)
        completion.cumulative_logprob += logprob
        if p.logprobs is not None:
            entry = {token: logprob}
            if top is not None:
                entry.update({int(i): float(v) for v, i in zip(top[0][: p.logprobs], top[1][: p.logprobs])})
            completion.logprobs.append(entry)
        if token in p.stop_token_ids:
            return self._finish(request, "stop", token, drop_last=True)
        if not p.ignore_eos and token in self.eos_token_ids:
            return self._finish(request, "stop", None, drop_last=True)
        if p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(completion.token_ids)
            hits = [(text.find(s), s) for s in p.stop if s in text]
            if hits:
                at, s = min(hits)
                return self._finish(request, "stop", s, text=text[:at])
        if len(completion.token_ids) >= budget:
            return self._finish(request, "length", None)
        return False

    def _finish(self, request, reason, stop_reason, drop_last=False, text=None) -> bool:
        out, j = request[0], request[1]
        completion = out.outputs[j]
        completion.finish_reason = reason
        completion.stop_reason = stop_reason
        if text is None and self.tokenizer is not None:
            ids = completion.token_ids[:-1] if drop_last else completion.token_ids
            text = self.tokenizer.decode(ids)
        completion.text = text or ""
        return True


def device_memory_bytes() -> int:
    """Memory of one device: the accelerator's limit, or the host's RAM for the CPU backend."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(len(jax.local_devices()), 1)


def _unique(items):
    seen, out = set(), []
    for x in items:
        if id(x) not in seen:
            seen.add(id(x))
            out.append(x)
    return out


def _generation_eos(directory: str) -> set[int]:
    import json

    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        return set()
    with open(path) as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}
