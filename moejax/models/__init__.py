"""Model families. Every family maps to one NNX module class built from a ModelConfig."""

from __future__ import annotations

from moejax.config import ModelConfig
from moejax.models.transformer import MoETransformer

FAMILIES = {
    "mixtral": MoETransformer,
    "qwen2_moe": MoETransformer,
    "qwen3_moe": MoETransformer,
    "olmoe": MoETransformer,
    "gpt_oss": MoETransformer,  # GQA with sinks, sliding windows, biases and a clamped activation
}


def model_class(config: ModelConfig):
    try:
        return FAMILIES[config.family]
    except KeyError:
        raise ValueError(
            f"model family {config.family!r} is parsed but has no model yet; available: {sorted(FAMILIES)}"
        ) from None


def build_abstract(config: ModelConfig, dtype):
    """The model's graph and its parameters as shapes only: nothing is allocated."""
    import jax.numpy as jnp
    from flax import nnx

    cls = model_class(config)
    abstract = nnx.eval_shape(lambda: cls(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def build_random(config: ModelConfig, dtype, seed: int = 0):
    """A randomly initialized model (training and tests)."""
    import jax.numpy as jnp
    from flax import nnx

    return model_class(config)(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed))
