"""Layer-importance criteria: pure functions of per-layer evidence, registered by name."""

from simdiff.config.settings import Options
from simdiff.criteria import baselines, simdiff, similarity  # noqa: F401  (registration)
from simdiff.criteria.normalize import NORMALIZERS, normalize
from simdiff.criteria.registry import (
    CRITERIA,
    LAYER_STATS,
    SKIP_LOSS,
    TAYLOR,
    Criterion,
    Evidence,
    get_criterion,
)
from simdiff.criteria.simdiff import simdiff_importance

# Listing order (help texts, tables): SimDiff first, then its terms' baselines, then the rest.
_ORDER = ["simdiff", "block_influence", "angular_block", "mssd", "masd", "ppl_skip", "taylor", "reverse", "random"]
for _name in sorted(CRITERIA, key=lambda n: _ORDER.index(n) if n in _ORDER else len(_ORDER)):
    CRITERIA[_name] = CRITERIA.pop(_name)

__all__ = [
    "CRITERIA",
    "LAYER_STATS",
    "NORMALIZERS",
    "SKIP_LOSS",
    "TAYLOR",
    "Criterion",
    "Evidence",
    "Options",
    "get_criterion",
    "normalize",
    "simdiff_importance",
]
