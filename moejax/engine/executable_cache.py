"""Compiled step executables kept on disk, so that a warm start skips tracing and lowering as well as compiling.

JAX's persistent compilation cache is keyed by the lowered program, so a process must still trace and lower
every step shape before it can look one up (about 0.45 s a shape for a 48-layer model, most of a warm start).
This cache is keyed instead by everything that decides the program before it is traced: moejax's own source,
the jax/jaxlib versions, the devices and mesh, the model config, the parameters' and KV pool's shapes, dtypes
and shardings, the runner's buckets and page geometry, the environment variables that pick kernels and XLA
flags, and the step's static arguments. Anything it cannot key (a user's routing function, several processes)
is not cached. Files sit beside JAX's own cache, one per step shape; a file that fails to load is recompiled.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import tempfile

import jax

logger = logging.getLogger("moejax")

_FORMAT = 1
_SUBDIR = "moejax-steps"


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """A hash of every Python file of moejax (with its kernels and checkpoints packages)."""
    import moejax
    import moejax.checkpoints
    import moejax.kernels

    h = hashlib.sha256()
    roots = sorted({os.path.dirname(os.path.abspath(m.__file__)) for m in (moejax, moejax.kernels,
                                                                             moejax.checkpoints)})
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    h.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as f:
                        h.update(f.read())
    return h.hexdigest()


def directory() -> str | None:
    """Where step executables go: beside JAX's persistent compilation cache, when that is on."""
    base = jax.config.jax_compilation_cache_dir
    if not base or jax.process_count() > 1:
        return None
    return os.path.join(base, _SUBDIR)


def _avals(tree) -> str:
    leaves, treedef = jax.tree.flatten(tree)
    return repr(treedef) + repr([(x.shape, str(x.dtype), str(getattr(x, "sharding", None))) for x in leaves])


def program_fingerprint(*, config, params, pool, mesh, facts: dict) -> str:
    """The part of every step's key shared by all its shapes."""
    import jaxlib

    devices = mesh.devices.flat if mesh is not None else jax.local_devices()
    client = jax.local_devices()[0].client
    env = sorted((k, v) for k, v in os.environ.items()
                 if (k.startswith("MOEJAX_") and k != "MOEJAX_COMPILATION_CACHE") or k.startswith("XLA_"))
    parts = [
        _FORMAT, source_digest(), jax.__version__, jaxlib.__version__, client.platform, client.platform_version,
        [(d.id, d.platform, d.device_kind) for d in devices],
        None if mesh is None else (mesh.axis_names, mesh.devices.shape),
        repr(config), _avals(params), _avals(pool), sorted(facts.items()), env,
        jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision,
    ]
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _path(where: str, fingerprint: str, static: tuple) -> str:
    key = hashlib.sha256((fingerprint + repr(static)).encode()).hexdigest()
    return os.path.join(where, f"step-{key[:40]}.bin")


def load(where: str, fingerprint: str, static: tuple, devices):
    """The stored executable of a step's static arguments, loaded onto `devices` (the mesh's), or None (absent,
    or unreadable: then recompiled)."""
    from jax.experimental import serialize_executable

    path = _path(where, fingerprint, static)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            fmt, payload, in_tree, out_tree = pickle.load(f)
        if fmt != _FORMAT:
            return None
        return serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                         backend=devices[0].client, execution_devices=devices)
    except Exception as e:  # a truncated or foreign file: compile it again
        logger.warning("step executable cache: cannot load %s (%s: %s); compiling it", path, type(e).__name__, e)
        return None


def store(where: str, fingerprint: str, static: tuple, compiled) -> None:
    """Write a compiled step atomically (a temporary file renamed into place); failures only log."""
    from jax.experimental import serialize_executable

    try:
        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
        os.makedirs(where, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=where, prefix=".step-")
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump((_FORMAT, payload, in_tree, out_tree), f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, _path(where, fingerprint, static))
        except BaseException:
            os.unlink(tmp)
            raise
    except Exception as e:
        logger.warning("step executable cache: cannot store a step (%s: %s)", type(e).__name__, e)


__all__ = ["directory", "load", "program_fingerprint", "source_digest", "store"]
