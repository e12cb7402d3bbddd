"""The real config.json files of the flagship MoE models, bundled with the package, and lookup by model name.

`resolve("Qwen/Qwen3-235B-A22B")` (case-insensitive; the part after "/" alone, or a unique prefix of either, also
match) gives the directory of its bundled config.json, so `moejax plan`, `moejax bench generate` and
`LLM(name, load_format="dummy")` work on a full-size shape with no file of the user's. Where each file came
from is in data/model_configs/index.json.
"""

from __future__ import annotations

import functools
import json
import os

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "data", "model_configs")


@functools.cache
def index() -> dict[str, dict]:
    """{directory name: {"name": Hugging Face name, "status": verbatim|reconstructed|written, "source": ...}}."""
    with open(os.path.join(CONFIG_DIR, "index.json"), encoding="utf-8") as f:
        return json.load(f)


def names() -> list[str]:
    return [entry["name"] for entry in index().values()]


def path_of(name: str) -> str:
    """Directory of a known model's bundled config.json; ValueError listing the known names otherwise."""
    key = name.strip().lower()
    exact, prefix = [], []
    for slug, entry in index().items():
        full = entry["name"].lower()
        forms = (full, full.split("/", 1)[-1], slug)
        if key in forms:
            exact.append(slug)
        elif any(f.startswith(key) for f in forms):
            prefix.append(slug)
    matches = exact or prefix
    if len(matches) == 1:
        return os.path.join(CONFIG_DIR, matches[0])
    known = ", ".join(names())
    if matches:
        which = ", ".join(index()[s]["name"] for s in matches)
        raise ValueError(f"model name {name!r} is ambiguous: it matches {which}")
    raise ValueError(f"{name!r} is neither a file, a directory nor a known model name; known models: {known}")


def resolve(model: str) -> str:
    """model itself when it is a path that exists, else the bundled config directory of that model name."""
    if os.path.exists(model):
        return model
    return path_of(model)
