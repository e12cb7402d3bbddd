"""`LLM`: load a model once, then generate, chat and score, with vLLM's offline API."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.checkpoints.hf import load_hf_state
from moejax.config import ModelConfig
from moejax.engine.engine import LLMEngine
from moejax.engine.host_memory import (available_host_memory, pinned_pool_bytes, pool_bytes_for, pool_too_small,
                                      size_pinned_pool)
from moejax.engine.outputs import RequestOutput
from moejax.engine.runner import Buckets, ModelRunner, bucket
from moejax.engine.sampling import SamplingParams
from moejax.engine.tokenizer import Tokenizer
from moejax.kernels.quant import fp8_block
from moejax.models import build_abstract
from moejax.plan.memory import (KV_CACHE_DTYPES, Mesh, check_divisible, plan_memory, resolve_weights, smallest_fix,
                                stage_split)
from moejax.sharding.distributed import initialize_from_env
from moejax.sharding.mesh import make_mesh, sharding_for_axes, stage_mesh
from moejax.sharding.rules import EXPERT, TENSOR, experts_over

logger = logging.getLogger("moejax")

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
QUANTIZATIONS = (None, "int8", "int4", "fp8")
LOAD_FORMATS = ("auto", "dummy")
MIN_PREFILL_BUCKET = 16
HOST_MEMORY = "pinned_host"  # where offload_experts=True keeps the routed experts
DEFAULT_BATCHED_TOKENS = 8192  # a step's token budget unless max_num_batched_tokens says otherwise
CPU_DEFAULT_KV_REQUESTS = 16  # on the CPU backend, the default KV cache holds this many full-length requests
PREFILL_BLOCK = 64  # prefill chunks are laid out in query blocks of this many tokens (at most 4 pages)


def default_model_path() -> str:
    """The embedded tiny MoE shipped inside the package."""
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "tiny-moe")


class LLM:
    """A loaded MoE model and its serving engine. docs/python-api.md describes every argument."""

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
        kv_cache_tokens: int | None = None,
        page_size: int = 16,
        kv_cache_dtype: str = "auto",
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        load_format: str = "auto",
        offload_experts: bool = False,
        offload_cache_experts: int = 0,
        moe_top_k: int | None = None,
        pipeline_parallel_size: int = 1,
        enable_expert_parallel: bool = False,
        enable_dp_attention: bool = False,
        warmup: bool = False,
    ):
        """warmup: compile every step shape now (a server does), rather than on first use."""
        initialize_from_env()
        enable_compilation_cache()
        model = default_model_path() if model is None else os.fspath(model)
        if not os.path.exists(model):  # a known model name: its bundled config.json, weights random
            from moejax.known_models import path_of

            try:
                known = path_of(model)
            except ValueError as e:
                raise ValueError(f"model: {e}") from None
            if load_format != "dummy":
                raise ValueError(f"model: {model!r} is a known model name whose config.json ships with moejax, but "
                                 "its weights do not: pass load_format='dummy' for random weights, or the "
                                 "checkpoint's directory")
            model = known
        if not os.path.isdir(model):
            raise ValueError(f"model: {model!r} is not a directory")
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
        if not isinstance(offload_experts, bool):
            raise ValueError(f"offload_experts must be True or False, got {offload_experts!r}")
        if offload_experts and (tensor_parallel_size, expert_parallel_size, data_parallel_size,
                                pipeline_parallel_size) != (1, 1, 1, 1):
            raise ValueError("offload_experts=True runs on one device: tensor_parallel_size, "
                             "expert_parallel_size, data_parallel_size and pipeline_parallel_size must be 1")
        if not isinstance(offload_cache_experts, int) or isinstance(offload_cache_experts, bool) or \
                offload_cache_experts < 0:
            raise ValueError(f"offload_cache_experts must be a non-negative integer, got {offload_cache_experts!r}")
        if offload_cache_experts and not offload_experts:
            raise ValueError("offload_cache_experts caches offloaded experts on the device: it needs "
                             "offload_experts=True")
        if not isinstance(enable_dp_attention, bool):
            raise ValueError(f"enable_dp_attention must be True or False, got {enable_dp_attention!r}")
        if enable_dp_attention and (pipeline_parallel_size, data_parallel_size) != (1, 1):
            raise ValueError("enable_dp_attention splits the requests over the expert ranks: "
                             "pipeline_parallel_size and data_parallel_size must be 1")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
        self.model_path = model
        self.config = with_top_k(ModelConfig.from_file(model), moe_top_k)
        c = self.config
        if offload_cache_experts > c.num_experts:
            raise ValueError(f"offload_cache_experts={offload_cache_experts} exceeds the model's "
                             f"{c.num_experts} experts per layer")
        from moejax.checkpoints import orbax_store

        converted = load_format == "auto" and orbax_store.is_converted(model)
        self.checkpoint = orbax_store.read_metadata(model, c) if converted else None
        if self.checkpoint is not None:  # a converted checkpoint fixes its dtype and quantization
            dtype = self.checkpoint["dtype"] if dtype == "auto" else dtype
            if dtype != self.checkpoint["dtype"]:
                raise ValueError(f"dtype={dtype!r}: {model} was converted to {self.checkpoint['dtype']}")
            stored = self.checkpoint.get("quantization")
            if quantization not in (None, stored):
                raise ValueError(f"quantization={quantization!r}: {model} was converted with {stored!r}")
            quantization = stored
        if self.checkpoint is None:  # an FP8 checkpoint stays FP8, as vLLM follows quantization_config
            dtype, quantization = resolve_weights(c, dtype, quantization)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        if offload_experts:
            # XLA's pinned pool is sized when the GPU backend starts, so before anything touches the devices
            host_bytes = plan_memory(c, dtype=dtype, quantization=quantization, offload_experts=True,
                                     suggest=False, max_model_len=2, max_num_seqs=1).host_weight_bytes
            size_pinned_pool(host_bytes)
            if HOST_MEMORY not in {m.kind for m in jax.local_devices()[0].addressable_memories()}:
                raise ValueError(f"offload_experts=True: the {jax.default_backend()} device has no "
                                 f"{HOST_MEMORY!r} memory to hold the experts")
        for name, value in (("tensor_parallel_size", tensor_parallel_size),
                            ("expert_parallel_size", expert_parallel_size),
                            ("data_parallel_size", data_parallel_size),
                            ("pipeline_parallel_size", pipeline_parallel_size), ("max_num_seqs", max_num_seqs),
                            ("page_size", page_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if max_model_len is not None and max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {max_model_len}")
        if kv_cache_tokens is not None and (not isinstance(kv_cache_tokens, int) or kv_cache_tokens < 1):
            raise ValueError(f"kv_cache_tokens must be a positive integer, got {kv_cache_tokens!r}")
        if max_num_batched_tokens is not None and max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be positive, got {max_num_batched_tokens}")
        self.dtype = DTYPES[dtype]
        self.dtype_name = dtype
        # e4m3 pages (unit scale, saturating: vLLM's default without calibrated scales) or the model's dtype
        self.kv_dtype = jnp.float8_e4m3fn if kv_cache_dtype == "fp8" else self.dtype
        self.quantization = quantization
        self.max_num_seqs = max_num_seqs
        self.gpu_memory_utilization = gpu_memory_utilization
        self.seed = seed
        self._request_counter = itertools.count()

        if not isinstance(enable_expert_parallel, bool):
            raise ValueError(f"enable_expert_parallel must be True or False, got {enable_expert_parallel!r}")
        plan_mesh = Mesh(tensor_parallel_size, expert_parallel_size, data_parallel_size,
                         expert_over_tp=enable_expert_parallel, pp=pipeline_parallel_size,
                         dp_attention=enable_dp_attention)
        check_divisible(c, plan_mesh)
        self.mesh = make_mesh(tensor_parallel_size, expert_parallel_size, data_parallel_size,
                              pipeline=pipeline_parallel_size)
        # pipeline stages: which layers each stage's devices hold (the planner counts the same split)
        self.stages = stage_split(c, pipeline_parallel_size)
        # enable_expert_parallel: the routed experts go whole over the tensor-parallel ranks (rules.experts_over),
        # for loading here and for every trace of the step (ModelRunner enters the same context)
        self.experts_axis = TENSOR if enable_expert_parallel else EXPERT
        # The planner is the memory model: it sizes the KV cache and caps the default max_model_len. It is held
        # against the devices' memory before anything is allocated.
        self.memory_plan = plan_memory(
            c, mesh=plan_mesh, dtype=dtype, quantization=quantization, device_memory_bytes=device_memory_bytes(),
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len or c.max_position_embeddings,
            max_num_seqs=max_num_seqs, model=model, kv_cache_dtype=kv_cache_dtype, offload_experts=offload_experts,
            offload_cache_experts=offload_cache_experts)
        plan = self.memory_plan
        capacity = plan.kv_cache_tokens if kv_cache_tokens is None else kv_cache_tokens
        self.max_model_len = max_model_len or max(min(c.max_position_embeddings, capacity), 2)
        self._check_fits(kv_cache_tokens, plan_mesh)
        # DP attention: each expert rank caches its own requests in its own pages
        self.attention_ranks = expert_parallel_size if enable_dp_attention else 1
        if kv_cache_tokens is None:  # never more than max_num_seqs full-length requests can use
            capacity = min(capacity, max_num_seqs * self.max_model_len)
            if jax.default_backend() == "cpu":  # host RAM is shared with everything else: stay modest
                capacity = min(capacity, CPU_DEFAULT_KV_REQUESTS * self.max_model_len * self.attention_ranks)
        if capacity < self.max_model_len:
            raise ValueError(f"kv_cache_tokens={capacity} cannot hold one request of max_model_len="
                             f"{self.max_model_len} tokens")
        self.kv_cache_tokens = capacity
        logger.info("KV cache size: %s tokens; maximum concurrency for %s tokens per request: %.2fx",
                    f"{capacity:,}", f"{self.max_model_len:,}", capacity / self.max_model_len)

        graphdef, abstract = build_abstract(c, self.dtype)
        per_rank = capacity // self.attention_ranks
        if per_rank < self.max_model_len:
            raise ValueError(f"kv_cache_tokens={capacity} over {self.attention_ranks} attention ranks cannot hold one "
                             f"request of max_model_len={self.max_model_len} tokens on each")
        num_pages = per_rank // page_size + 1

        layer_stage = {i: s for s, layers in enumerate(self.stages.stages) for i in layers}

        def sharding_for(path, var, shape):
            axes = var.get_metadata().get("logical_axes", ())
            # a layer's weights load straight onto its pipeline stage's devices
            mesh = stage_mesh(self.mesh, layer_stage[int(path[1])]) if self.stages.pp > 1 and \
                path[0] == "layers" else self.mesh
            with experts_over(self.experts_axis):
                sharding = sharding_for_axes(mesh, axes, shape)
            if offload_experts and axes and axes[0] == "experts":  # routed experts: loaded straight to the host
                sharding = sharding.with_memory_kind(HOST_MEMORY)
            return sharding

        if load_format == "dummy":
            from moejax.checkpoints.dummy import dummy_state

            state = dummy_state(abstract, sharding_for=sharding_for, seed=seed, transform=self._quantizer())
        elif self.checkpoint is not None:
            state = orbax_store.restore_state(model, abstract, sharding_for, self.checkpoint.get("quantized"))
        else:
            state = load_hf_state(model, c, abstract, sharding_for=sharding_for, transform=self._quantizer(),
                                  keep_fp8=quantization == "fp8")
        budget = max_num_batched_tokens or DEFAULT_BATCHED_TOKENS
        block = min(PREFILL_BLOCK, page_size * 4)
        buckets = Buckets(max_decode=bucket(-(-max_num_seqs // self.attention_ranks)), max_prefill=max(budget // block, 1) * block,
                          prefill_block=block)
        try:
            self.runner = ModelRunner(
                graphdef, state, self.mesh, num_pages=num_pages, page_size=page_size,
                kv_dtype=self.kv_dtype, max_model_len=self.max_model_len, buckets=buckets,
                experts_axis=self.experts_axis, stages=self.stages, attention_ranks=self.attention_ranks,
                matmul_precision="highest" if self.dtype == jnp.float32 else None)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            if "Out of host memory" in str(e):
                raise ValueError(f"model {self.model_path!r} does not fit: "
                                 f"{pool_too_small(plan.host_weight_bytes)}") from None
            # The plan fitted but the allocator did not (fragmentation, or memory used outside the plan).
            pool_gib = num_pages * page_size * plan.kv_bytes_per_token / 1024**3
            raise ValueError(
                f"kv_cache_tokens={capacity}: the KV cache's {pool_gib:.2f} GiB per device could not be "
                f"allocated beside the weights ({str(e).splitlines()[0][:160]}); lower kv_cache_tokens or "
                f"gpu_memory_utilization") from None
        del state
        expert_cache = None
        if offload_cache_experts:
            from moejax.engine.expert_cache import ExpertCachePolicy

            expert_cache = ExpertCachePolicy(self.runner, offload_cache_experts)
        self.tokenizer = Tokenizer(model) if Tokenizer.exists(model) else None
        self.eos_token_ids = set(c.eos_token_ids) | _generation_eos(model)
        self.llm_engine = LLMEngine(
            self.runner, max_model_len=self.max_model_len, vocab_size=c.vocab_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(budget, block), enable_prefix_caching=enable_prefix_caching,
            tokenizer=self.tokenizer, eos_token_ids=self.eos_token_ids, seed=seed, expert_cache=expert_cache)
        if warmup:
            self.warmup()

    def _check_fits(self, kv_cache_tokens, mesh) -> None:
        """Raise, naming the smallest change that fits, when the weights and the cache exceed device memory."""
        plan = self.memory_plan
        gib = 1024**3
        host_free = available_host_memory()
        on_gpu = jax.default_backend() == "gpu"
        if plan.host_weight_bytes and on_gpu and plan.host_weight_bytes > pinned_pool_bytes():
            raise ValueError(f"model {self.model_path!r} does not fit: {pool_too_small(plan.host_weight_bytes)}")
        if plan.host_weight_bytes and on_gpu and host_free is not None and \
                pool_bytes_for(plan.host_weight_bytes) > host_free:
            raise ValueError(f"model {self.model_path!r} does not fit: offload_experts=True keeps "
                             f"{plan.host_weight_bytes / gib:.2f} GiB of routed experts in pinned host memory and "
                             f"needs {pool_bytes_for(plan.host_weight_bytes) / gib:.2f} GiB of it while stacking "
                             f"the layers, but the host has {host_free / gib:.2f} GiB available; "
                             f"quantization='int4' or 'int8' shrinks them")
        if plan.host_weight_bytes and host_free is not None and plan.host_weight_bytes > host_free:
            raise ValueError(f"model {self.model_path!r} does not fit: offload_experts=True keeps "
                             f"{plan.host_weight_bytes / gib:.2f} GiB of routed experts in host memory, which has "
                             f"{host_free / gib:.2f} GiB available; quantization='int4' or 'int8' shrinks them")
        budget = int(plan.device_memory_bytes * plan.gpu_memory_utilization)
        need = plan.weight_bytes_per_device + plan.workspace_bytes
        if kv_cache_tokens is not None:
            need += kv_cache_tokens * plan.kv_bytes_per_token
        else:
            need += self.max_model_len * plan.kv_bytes_per_token
        if need <= budget:
            return
        fix = plan.suggestion or smallest_fix(plan, self.config, self.max_num_seqs)
        raise ValueError(
            f"model {self.model_path!r} does not fit: {plan.weight_bytes_per_device / gib:.2f} GiB of weights + "
            f"{plan.workspace_bytes / gib:.2f} GiB workspace + KV cache need {need / gib:.2f} GiB per device; "
            f"gpu_memory_utilization={plan.gpu_memory_utilization} of {plan.device_memory_bytes / gib:.2f} GiB "
            f"allows {budget / gib:.2f} GiB. " + (f"Smallest change that fits: {fix}" if fix else
                                                 "No single change fits; use more devices."))

    # -- public API ----------------------------------------------------------------------------------------
    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer

    def warmup(self) -> int:
        """Compile every step shape the engine can use; returns how many. Nothing compiles after it."""
        return self.runner.warmup()

    def generate(self, prompts=None, sampling_params=None, *, prompt_token_ids=None, use_tqdm: bool = True):
        """Complete each prompt; returns one RequestOutput per prompt, in order."""
        texts, ids = self._prompts(prompts, prompt_token_ids)
        params = self._params(sampling_params, len(ids))
        engine = self.llm_engine
        for i, prompt_ids in enumerate(ids):
            engine.check_prompt(prompt_ids, f"prompt {i}")
        request_ids = []
        for text, prompt_ids, p in zip(texts, ids, params):
            request_ids.append(f"generate-{next(self._request_counter)}")
            engine.add_request(request_ids[-1], prompt_ids, p, prompt=text)
        wanted = set(request_ids)
        done: dict[str, RequestOutput] = {}
        progress = _Progress(len(ids)) if use_tqdm and len(ids) > 1 else None
        try:
            while len(done) < len(wanted):
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        if progress is not None:
                            progress.update(out)
        except BaseException:
            for rid in wanted - set(done):
                engine.abort_request(rid)
            raise
        finally:
            if progress is not None:
                progress.close()
        return [done[r] for r in request_ids]

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
        token_ids = self.llm_engine.check_prompt(token_ids, "token_ids")
        n = len(token_ids)
        t = bucket(n, MIN_PREFILL_BUCKET)
        tokens = np.zeros(t, np.int32)
        tokens[:n] = token_ids
        positions = np.full(t, -1, np.int32)
        positions[:n] = np.arange(n)
        logits = self.runner.forward_logits(tokens, positions)
        return np.asarray(logits[:n], np.float32)

    def register_moe_routing_func(self, fn) -> None:
        """fn(router_logits [tokens, experts] float, layer int32 scalar) -> logits of the same shape, applied to
        every MoE layer's router logits before top-k inside the jitted step (and `logits`); None removes it.
        It is traced once here on a dummy input, so a failing or misshapen function is refused now, not in the
        middle of a generation. Each step shape compiles once more with it (all at once if warmed up)."""
        if fn is not None:
            if not callable(fn):
                raise TypeError(f"register_moe_routing_func: fn must be callable or None, got {type(fn).__name__}")
            e = self.config.num_experts
            dummy = jax.ShapeDtypeStruct((8, e), self.dtype)
            try:
                out = jax.eval_shape(fn, dummy, jax.ShapeDtypeStruct((), jnp.int32))
            except Exception as err:
                raise ValueError(f"register_moe_routing_func: fn failed on router logits [8, {e}] and a layer "
                                 f"index: {type(err).__name__}: {err}") from err
            if not hasattr(out, "shape") or tuple(out.shape) != (8, e) or \
                    not jnp.issubdtype(out.dtype, jnp.floating):
                got = f"{getattr(out, 'shape', type(out).__name__)} {getattr(out, 'dtype', '')}".strip()
                raise ValueError(f"register_moe_routing_func: fn must return float logits of the input's shape "
                                 f"[tokens, {e}]; for [8, {e}] it returned {got}")
        self.runner.routing_fn = fn
        if self.runner.warmed_up:
            self.warmup()

    # -- internals -----------------------------------------------------------------------------------------
    def _quantizer(self):
        if self.quantization is None:
            return None
        from moejax.kernels import quant

        return quant.model_transform(self.quantization, self.dtype, fp8_block=fp8_block(self.config))

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


class _Progress:
    """vLLM's bar: requests done, with input and output tokens per second."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="Processed prompts", leave=False, dynamic_ncols=True)
        self.start = time.perf_counter()
        self.tokens_in = self.tokens_out = 0

    def update(self, out: RequestOutput) -> None:
        self.tokens_in += len(out.prompt_token_ids)
        self.tokens_out += sum(len(o.token_ids) for o in out.outputs)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"est. speed input: {self.tokens_in / elapsed:.2f} toks/s, "
                                 f"output: {self.tokens_out / elapsed:.2f} toks/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, on by default for accelerators in the user's cache directory
    (MOEJAX_COMPILATION_CACHE=/path moves it, =0 turns it off; a directory the user configured is kept).

    Off by default on the CPU backend, where compiling is quick and jax 0.10's CPU cache served a stale
    executable to a different tiny model in our tests."""
    if jax.config.jax_compilation_cache_dir:
        return
    where = os.environ.get("MOEJAX_COMPILATION_CACHE")
    if where in ("0", "off", "false") or (not where and jax.default_backend() == "cpu"):
        return
    if not where:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        where = os.path.join(base, "moejax", "jax")
    try:
        os.makedirs(where, exist_ok=True)
    except OSError:
        return
    jax.config.update("jax_compilation_cache_dir", where)


def device_memory_bytes() -> int:
    """Memory of one device: the accelerator's limit, or the host's RAM for the CPU backend."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(len(jax.local_devices()), 1)


def _generation_eos(directory: str) -> set[int]:
    from moejax.config import read_json_object, token_ids

    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        return set()
    return set(token_ids(path, read_json_object(path), "eos_token_id"))


def with_top_k(config: ModelConfig, moe_top_k) -> ModelConfig:
    """The model with `moe_top_k` experts per token instead of its own (None: its own), checked against its
    experts and, for grouped routing, the experts its chosen groups hold."""
    if moe_top_k is None:
        return config
    if not isinstance(moe_top_k, int) or isinstance(moe_top_k, bool) or moe_top_k < 1:
        raise ValueError(f"moe_top_k must be a positive integer, got {moe_top_k!r}")
    if moe_top_k > config.num_experts:
        raise ValueError(f"moe_top_k={moe_top_k} exceeds the model's {config.num_experts} experts")
    if config.n_group > 1:
        reachable = config.topk_group * (config.num_experts // config.n_group)
        if moe_top_k > reachable:
            raise ValueError(f"moe_top_k={moe_top_k} exceeds the {reachable} experts in the model's "
                             f"topk_group={config.topk_group} of n_group={config.n_group} groups")
    return dataclasses.replace(config, num_experts_per_tok=moe_top_k)
