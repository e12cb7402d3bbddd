"""Jitted model steps over a split NNX state.

`step` is the one forward for prefill (T > 1) and decode (T = 1): it writes the new keys into the donated cache,
takes the hidden state at each row's last real token, and samples the next token on device. It compiles once
per (batch, tokens, cache length) bucket. `forward_logits` is the cache-free forward behind `LLM.logits`.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.engine.cache import KVCache
from moejax.engine.sampling import SamplingBatch, sample


def bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """The smallest power of two >= n (and >= minimum), capped at maximum when that still holds n."""
    size = max(minimum, 1 << max(0, (n - 1).bit_length()))
    if maximum is not None and n <= maximum < size:
        return maximum
    return size


def replicated(tree):
    """Constrain results to be replicated over the mesh in context (a no-op without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.axis_names:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec()), tree)


class ModelRunner:
    def __init__(self, graphdef: nnx.GraphDef, state: nnx.State, mesh=None, matmul_precision: str | None = None):
        """mesh: the device mesh every step runs under (expert-parallel dispatch reads it from context).
        matmul_precision: "highest" keeps float32 models in true float32 on GPUs that default to TF32."""
        self.graphdef = graphdef
        self.state = state
        self.mesh = mesh
        self.matmul_precision = matmul_precision
        graph = graphdef

        @functools.partial(jax.jit, donate_argnames=("cache",), static_argnames=("num_logprobs",))
        def step(state, tokens_BT, positions_BT, last_B, cache: KVCache, sampling: SamplingBatch,
                 num_logprobs: int = 0):
            model = nnx.merge(graph, state)
            hidden_BTD, cache, _ = model(tokens_BT, positions_BT, cache)
            # [batch, embed] at each row's last real token
            h_BD = jnp.take_along_axis(hidden_BTD, last_B[:, None, None], axis=1)[:, 0]
            logits_BV = model.logits(h_BD)
            tokens, logprobs, top = sample(logits_BV, sampling, num_logprobs)
            # Host-bound results are replicated so that every process can read them.
            return replicated((tokens, logprobs, top)) + (cache,)

        @jax.jit
        def forward_logits(state, tokens_BT, positions_BT):
            model = nnx.merge(graph, state)
            hidden_BTD, _, _ = model(tokens_BT, positions_BT, None)
            return replicated(model.logits(hidden_BTD))

        self.step_fn = step
        self.forward_logits_fn = forward_logits

    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(jax.default_matmul_precision(self.matmul_precision))
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
        return stack

    def step(self, tokens_BT, positions_BT, last_B, cache, sampling, num_logprobs=0):
        with self._context():
            return self.step_fn(self.state, tokens_BT, positions_BT, last_B, cache, sampling, num_logprobs)

    def forward_logits(self, tokens_BT, positions_BT):
        with self._context():
            return self.forward_logits_fn(self.state, tokens_BT, positions_BT)

    def compilations(self) -> int:
        """Number of compiled variants of the step function so far (tests use it to catch recompiles)."""
        return self.step_fn._cache_size()
