"""simdiff: depth pruning of causal language models with the SimDiff criterion and its baselines.

The public names below are imported on first use (PEP 562), so ``import simdiff`` and ``simdiff --version``
load no torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {  # name -> the module that defines it
    "CRITERIA": "simdiff.criteria",
    "Calibration": "simdiff.config.recipe",
    "Options": "simdiff.config.settings",
    "PruneResult": "simdiff.workflows.api",
    "Recipe": "simdiff.config.recipe",
    "SimdiffError": "simdiff.core.errors",
    "bypass_layers": "simdiff.model.layers",
    "find_decoder_layers": "simdiff.model",
    "get_criterion": "simdiff.criteria",
    "load_model": "simdiff.model",
    "load_recipe": "simdiff.config.recipe",
    "prune": "simdiff.workflows.api",
    "recipe_from_settings": "simdiff.config.recipe",
    "remove_layers": "simdiff.surgery.layers",
    "save_model": "simdiff.store.save",
    "score": "simdiff.workflows.api",
    "select_block": "simdiff.selection.rank",
    "select_layers": "simdiff.selection.rank",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module 'simdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
