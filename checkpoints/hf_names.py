"""Where each moejax parameter lives in a Hugging Face checkpoint, and how to bring it to moejax's layout.

moejax keeps linear weights input-major ([in, out]) and routed experts stacked ([E, in, out]); HF stores
[out, in] per expert (Hub layout) or fused [E, 2I, H] / [E, H, I] (transformers-5 layout). Each parameter path
maps to a `Source` that reads its tensors from a reader and returns the array in moejax's layout.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from moejax.config import ModelConfig

Path = tuple  # e.g. ("layers", 0, "attn", "q_proj", "kernel")


@dataclasses.dataclass(frozen=True)
class Source:
    """The HF tensors behind one parameter and the function that assembles them."""

    names: tuple[str, ...]
    assemble: Callable[[list[np.ndarray]], np.ndarray]
    row_parts: int = 1  # > 1: assemble splits each tensor's rows into this many parts (fused gate/up)

    def load(self, reader) -> np.ndarray:
        return self.assemble([reader.get(n) for n in self.names])


def tensor(name: str, transpose: bool = False) -> Source:
    return Source((name,), lambda a: a[0].T if transpose else a[0])


class StackedExperts:
    """Per-expert [out, in] tensors seen as one [E, in, out] array that reads only the experts it is sliced to.

    A process loading its shard of an expert-parallel layer touches only its own experts' bytes.
    """

    def __init__(self, arrays: list[np.ndarray], transpose: bool):
        self.arrays = [a.T if transpose else a for a in arrays]
        self.shape = (len(arrays), *self.arrays[0].shape)
        self.dtype = self.arrays[0].dtype

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        experts = range(len(self.arrays))[index[0]] if index else range(len(self.arrays))
        return np.stack([self.arrays[e][index[1:]] for e in experts])

    def __array__(self, dtype=None, copy=None):
        out = self[(slice(None),)]
        return out if dtype is None else out.astype(dtype)


def stacked(names: list[str], transpose: bool = True) -> Source:
    """Per-expert [out, in] tensors -> one lazily stacked [E, in, out] array."""
    return Source(tuple(names), lambda a: StackedExperts(a, transpose))


def fused_gate_up(name: str, part: int) -> Source:
    """transformers-5 gate_up_proj [E, 2I, H] -> gate (part 0) or up (part 1) as [E, H, I]."""

    def assemble(a):
        width = a[0].shape[1] // 2
        return np.swapaxes(a[0][:, part * width : (part + 1) * width, :], 1, 2)

    return Source((name,), assemble, row_parts=2)


def fused_down(name: str) -> Source:
    """transformers-5 down_proj [E, H, I] -> [E, I, H]."""
    return Source((name,), lambda a: np.swapaxes(a[0], 1, 2))


def _linear(prefix: str, path: Path, leaf: str) -> Source:
    return tensor(f"{prefix}.weight", transpose=True) if leaf == "kernel" else tensor(f"{prefix}.bias")


def hf_source(config: ModelConfig, path: Path, names: set[str], keep_fp8: bool = False) -> Source:
    """The Source of parameter `path`, given the tensor names present in the checkpoint. FP8 block-scaled
    tensors are dequantized to float32, or with keep_fp8 kept as an `FP8Tensor` (values and scales in moejax's
    layout)."""
    from moejax.kernels.quant import should_quantize

    source = _layout_source(config, path, names)
    if config.checkpoint_quant == "fp8" and any(f"{n}_scale_inv" in names for n in source.names):
        if keep_fp8 and should_quantize(path) and all(f"{n}_scale_inv" in names for n in source.names):
            return _fp8_kept(source, config.fp8_block_size)
        return _fp8(source, names, config.fp8_block_size)
    return source


def check_fp8_tensor(name: str, values, scales, block) -> None:
    """An FP8 block weight as stored: e4m3 values [..., out, in] and float scales on the rounded-up grid of
    `block` (out, in); anything else is refused naming the tensor."""
    import ml_dtypes

    from moejax.checkpoints.safetensors import CheckpointError

    grid = (*values.shape[:-2], *(-(-d // b) for d, b in zip(values.shape[-2:], block)))
    if values.dtype != ml_dtypes.float8_e4m3fn:
        raise CheckpointError(f"tensor {name!r} is {values.dtype}, but it has a {name}_scale_inv: FP8 block "
                              "weights (quantization_config fp8) must be float8_e4m3fn")
    if not (np.issubdtype(scales.dtype, np.floating) or scales.dtype == ml_dtypes.bfloat16):
        raise CheckpointError(f"tensor {name + '_scale_inv'!r} is {scales.dtype}; FP8 block scales must be "
                              "float32 or bfloat16")
    if tuple(scales.shape) != grid:
        raise CheckpointError(f"tensor {name + '_scale_inv'!r} has shape {list(scales.shape)}; weight "
                              f"{list(values.shape)} with blocks {list(block)} needs {list(grid)}")


@dataclasses.dataclass(frozen=True)
class FP8Tensor:
    """A block-scaled e4m3 weight in moejax's layout: values [..., K, N] and scales [..., ceil(K / bk),
    ceil(N / bn)], each possibly a lazy view (`StackedExperts`); block = (bk, bn) along (K, N)."""

    values: object
    scales: object
    block: tuple[int, int]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)


def _fp8_kept(source: Source, block) -> Source:
    """The layout transform applied to the e4m3 values and, alike, to their scale grid. HF blocks are
    (out, in); every layout transform moves the [out, in] axes to [in, out], so the block swaps too."""
    from moejax.checkpoints.quantized_formats import dequantize_fp8_block

    n = len(source.names)

    def assemble(arrays):
        for name, values, scales in zip(source.names, arrays[:n], arrays[n:]):
            check_fp8_tensor(name, values, scales, block)
        rows = arrays[0].shape[-2]
        if source.row_parts > 1 and (rows // source.row_parts) % block[0]:
            # the split would cut a scale block (fused gate/up narrower than the blocks): dequantize exactly
            # instead, and let the loader quantize on moejax's own grid
            return source.assemble([dequantize_fp8_block(v, s, block) for v, s in zip(arrays[:n], arrays[n:])])
        return FP8Tensor(source.assemble(list(arrays[:n])), source.assemble(list(arrays[n:])),
                         (int(block[1]), int(block[0])))

    return Source(source.names + tuple(f"{name}_scale_inv" for name in source.names), assemble)


def _fp8(source: Source, names: set[str], block) -> Source:
    """Dequantize FP8 block-scaled tensors (those with a `_scale_inv` partner) before the layout transform."""
    from moejax.checkpoints.quantized_formats import dequantize_fp8_block

    scaled = [f"{n}_scale_inv" in names for n in source.names]
    extra = tuple(f"{n}_scale_inv" for n, s in zip(source.names, scaled) if s)

    def assemble(arrays):
        tensors, scales = list(arrays[: len(source.names)]), iter(arrays[len(source.names):])
        out = []
        for name, t, s in zip(source.names, tensors, scaled):
            if s:
                scale = next(scales)
                check_fp8_tensor(name, t, scale, block)
                t = dequantize_fp8_block(t, scale, block)
            out.append(t)
        return source.assemble(out)

    return Source(source.names + extra, assemble)


def _layout_source(config: ModelConfig, path: Path, names: set[str]) -> Source:
    top, leaf = path[0], path[-1]
    if top == "embed":
        return tensor("model.embed_tokens.weight")
    if top == "norm":
        return tensor("model.norm.weight")
    if top == "lm_head":
        return tensor("lm_head.weight", transpose=True)
    if top != "layers":
        raise KeyError(path)
    layer = path[1]
    p = f"model.layers.{layer}"
    part = path[2]
    if part == "input_norm":
        return tensor(f"{p}.input_layernorm.weight")
    if part == "post_attn_norm":
        return tensor(f"{p}.post_attention_layernorm.weight")
    if part == "attn":
        module = path[3]
        mla = {"q_a_norm": "q_a_layernorm", "kv_a_norm": "kv_a_layernorm", "kv_a_proj": "kv_a_proj_with_mqa"}
        if module in ("q_a_norm", "kv_a_norm"):
            return tensor(f"{p}.self_attn.{mla[module]}.weight")
        if module == "kv_a_proj":
            return _linear(f"{p}.self_attn.kv_a_proj_with_mqa", path, leaf)
        if module in ("q_norm", "k_norm"):
            return tensor(f"{p}.self_attn.{module}.weight")
        if module == "sinks":
            return tensor(f"{p}.self_attn.sinks")
        return _linear(f"{p}.self_attn.{module}", path, leaf)
    if part == "mlp":
        return _linear(f"{p}.mlp.{path[3]}", path, leaf)
    if part == "moe":
        return _moe_source(config, p, path[3:], names)
    raise KeyError(path)


def _moe_source(config: ModelConfig, p: str, rest: tuple, names: set[str]) -> Source:
    mixtral_hub = config.family == "mixtral" and f"{p}.block_sparse_moe.gate.weight" in names
    block = f"{p}.block_sparse_moe" if mixtral_hub else f"{p}.mlp"
    what = rest[0]
    if what == "router":
        router = f"{block}.router" if config.family == "gpt_oss" else f"{block}.gate"
        return _linear(router, rest, rest[-1])
    if what == "correction_bias":
        return tensor(f"{block}.gate.e_score_correction_bias")
    if what == "shared":
        shared = f"{block}.shared_experts" if config.family == "deepseek_v3" else f"{block}.shared_expert"
        return _linear(f"{shared}.{rest[1]}", rest, rest[-1])
    if what == "shared_gate":
        return tensor(f"{block}.shared_expert_gate.weight", transpose=True)
    experts = f"{block}.experts"
    num = config.num_experts
    if config.family == "gpt_oss" and f"{experts}.gate_up_proj_blocks" in names:  # MXFP4 experts
        from moejax.checkpoints.quantized_formats import dequantize_mxfp4

        def mxfp4(stem, part=None):
            def assemble(a):
                w = np.swapaxes(dequantize_mxfp4(a[0], a[1]), -1, -2)  # [E, out, in] -> [E, in, out]
                return w if part is None else w[..., part::2]

            return Source((f"{stem}_blocks", f"{stem}_scales"), assemble)

        if what in ("w_gate", "w_up"):
            return mxfp4(f"{experts}.gate_up_proj", 0 if what == "w_gate" else 1)
        if what == "w_down":
            return mxfp4(f"{experts}.down_proj")
    if config.family == "gpt_oss":  # fused, input-major, gate and up interleaved by column, with biases
        interleaved = {"w_gate": (f"{experts}.gate_up_proj", 0), "w_up": (f"{experts}.gate_up_proj", 1),
                       "b_gate": (f"{experts}.gate_up_proj_bias", 0), "b_up": (f"{experts}.gate_up_proj_bias", 1)}
        if what in interleaved:
            name, part = interleaved[what]
            return Source((name,), lambda a, part=part: a[0][..., part::2])
        if what == "w_down":
            return tensor(f"{experts}.down_proj")
        if what == "b_down":
            return tensor(f"{experts}.down_proj_bias")
    if what in ("w_gate", "w_up", "w_down"):
        if f"{experts}.gate_up_proj" in names:
            if what == "w_down":
                return fused_down(f"{experts}.down_proj")
            return fused_gate_up(f"{experts}.gate_up_proj", 0 if what == "w_gate" else 1)
        hub = {"w_gate": "w1", "w_up": "w3", "w_down": "w2"} if mixtral_hub else \
              {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
        return stacked([f"{experts}.{e}.{hub[what]}.weight" for e in range(num)])
    raise KeyError(rest)


def ignored(config: ModelConfig, name: str) -> bool:
    """Checkpoint tensors moejax deliberately does not load (MTP layers, cached rotary tables)."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    if config.num_mtp_layers and name.startswith("model.layers."):
        return int(name.split(".")[2]) >= config.num_layers
    return False
