"""Shared fixtures: tiny random Hugging Face models written with save_pretrained, for every family."""

from __future__ import annotations

import os

import sys  # noqa: E402

# Eight virtual CPU devices for the sharding tests; must be set before jax is imported anywhere. A run of the
# GPU tests (`-m gpu`) keeps the accelerator.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
_argv = sys.argv[1:]
if not ("-m" in _argv and "gpu" in _argv[_argv.index("-m") + 1: _argv.index("-m") + 2]):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _import_hub_kernels() -> None:
    """transformers >= 5.25 imports Hugging Face's `kernels` package, and the repository's top-level kernels/
    folder (which installs as moejax.kernels) would shadow it while the root is on sys.path: import the
    installed one first, with the root left out, so `kernels` names it for the rest of the run."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    try:
        import kernels  # noqa: F401
    except ImportError:
        pass
    finally:
        sys.path[:] = saved


_import_hub_kernels()

import pytest  # noqa: E402

from tests.hf_models import FAMILIES, make_hf_model  # noqa: E402,F401


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """hf_model_dir(family, **options) -> directory of a saved tiny transformers model (cached per options)."""
    cache: dict = {}

    def make(family: str, **options) -> str:
        key = (family, tuple(sorted(options.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"hf_{family}")
            cache[key] = make_hf_model(family, str(path), **options)
        return cache[key]

    return make
