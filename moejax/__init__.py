"""moejax: Mixture-of-Experts inference in JAX."""

import os as _os

# kernels/ and checkpoints/ sit at the repository top level and import as moejax.kernels / moejax.checkpoints.
# Installed packages (wheel or PEP 660 editable) map them; a source tree reached through sys.path or a legacy
# `setup.py develop` does not, so let the package also search the repository root.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and _os.path.isfile(
        _os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)  # noqa: F821

from moejax.config import ModelConfig  # noqa: E402
from moejax.engine.llm import LLM  # noqa: E402
from moejax.engine.outputs import CompletionOutput, RequestOutput  # noqa: E402
from moejax.engine.sampling import SamplingParams  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "ModelConfig", "RequestOutput", "SamplingParams", "__version__"]
