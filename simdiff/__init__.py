"""simdiff: depth pruning of causal language models with the SimDiff criterion and its baselines."""

from simdiff.config.recipe import Recipe, load_recipe
from simdiff.core.errors import SimdiffError
from simdiff.criteria import CRITERIA, Options, get_criterion
from simdiff.model import find_decoder_layers, load_model
from simdiff.model.layers import bypass_layers
from simdiff.selection.rank import select_block, select_layers
from simdiff.store.save import save_model
from simdiff.surgery.layers import remove_layers
from simdiff.workflows.api import Calibration, PruneResult, prune, score

__version__ = "0.1.0"

__all__ = [
    "CRITERIA",
    "Calibration",
    "Options",
    "PruneResult",
    "Recipe",
    "SimdiffError",
    "bypass_layers",
    "find_decoder_layers",
    "get_criterion",
    "load_model",
    "load_recipe",
    "prune",
    "remove_layers",
    "save_model",
    "score",
    "select_block",
    "select_layers",
]
