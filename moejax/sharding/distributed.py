"""Multi-host start-up: `jax.distributed.initialize` from the usual environment, and who may print.

Recognized, in order:
- MOEJAX_COORDINATOR_ADDRESS (or JAX_COORDINATOR_ADDRESS) with MOEJAX_NUM_PROCESSES / JAX_NUM_PROCESSES and
  MOEJAX_PROCESS_ID / JAX_PROCESS_ID (a plain multi-process launch; see examples/multihost_local.sh);
- SLURM (SLURM_JOB_ID with more than one task): jax detects the coordinator, count and rank itself
  (examples/multihost_slurm.sh).
Nothing set: a single process, nothing to do.
"""

from __future__ import annotations

import os

_initialized = False


def _env(*names: str) -> str | None:
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    return None


def initialize_from_env() -> bool:
    """Join the multi-process job described by the environment; returns True when this is one."""
    global _initialized
    if _initialized:
        return True
    coordinator = _env("MOEJAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
    slurm = os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if not coordinator and not slurm:
        return False
    import jax

    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        count, rank = _env("MOEJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"), _env("MOEJAX_PROCESS_ID", "JAX_PROCESS_ID")
        if count is None or rank is None:
            raise ValueError("MOEJAX_COORDINATOR_ADDRESS is set: MOEJAX_NUM_PROCESSES and MOEJAX_PROCESS_ID are "
                             "needed too")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(count), process_id=int(rank))
    else:
        jax.distributed.initialize()
    _initialized = True
    return True


def is_main_process() -> bool:
    """Only process 0 prints and serves."""
    import jax

    return jax.process_index() == 0
