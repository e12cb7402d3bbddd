"""moejax: Mixture-of-Experts inference in JAX."""

from moejax.config import ModelConfig
from moejax.engine.llm import LLM
from moejax.engine.outputs import CompletionOutput, RequestOutput
from moejax.engine.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "ModelConfig", "RequestOutput", "SamplingParams", "__version__"]
