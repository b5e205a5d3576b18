"""The criterion registry: name -> pure function from per-layer evidence to per-layer importance.

Importance is "higher = keep": selection removes the layers (or block) with the lowest importance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from simdiff.config.settings import Options
from simdiff.core.errors import SimdiffError, did_you_mean

if TYPE_CHECKING:  # the record type only: criteria never import collect (import-linter contract)
    from simdiff.collect.stats import LayerStatistics

# What a criterion can need; the pipeline runs one collector per kind, once, for all criteria.
LAYER_STATS = "layer_stats"  # one streaming hook pass (cosine, MSSD, MASD, angular blocks)
SKIP_LOSS = "skip_loss"  # one loss pass per layer with that layer bypassed
TAYLOR = "taylor"  # one forward+backward pass for |w * dL/dw|


@dataclass
class Evidence:
    """Everything criteria are computed from; fields a criterion does not need may be None."""

    num_layers: int
    layer_stats: LayerStatistics | None = None
    skip_loss_increase: np.ndarray | None = None
    taylor: np.ndarray | None = None


@dataclass(frozen=True)
class Criterion:
    name: str
    description: str
    reference: str
    needs: frozenset[str]
    score: Callable[[Evidence, Options], np.ndarray]
    block_score: Callable[[Evidence, int], np.ndarray] | None = field(default=None)
    reads: frozenset[str] = frozenset()  # the Options fields the score depends on (a variant may set only these)

    @property
    def is_block(self) -> bool:
        return self.block_score is not None


CRITERIA: dict[str, Criterion] = {}


def register(name: str, description: str, reference: str, needs: set[str] | frozenset[str] = frozenset(),
             block_score: Callable[[Evidence, int], np.ndarray] | None = None,
             reads: set[str] | frozenset[str] = frozenset()):
    """Decorator registering ``fn(evidence, options) -> importance`` under ``name``; ``reads``: the
    :class:`Options` fields ``fn`` uses."""

    def wrap(fn: Callable[[Evidence, Options], np.ndarray]):
        CRITERIA[name] = Criterion(name, description, reference, frozenset(needs), fn, block_score, frozenset(reads))
        return fn

    return wrap


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise SimdiffError(
            f"unknown criterion {name!r}; available: {', '.join(CRITERIA)}.{did_you_mean(name, list(CRITERIA))}"
        )
    return CRITERIA[name]


def require(evidence: Evidence, attr: str, name: str):
    value = getattr(evidence, attr)
    if value is None:
        raise SimdiffError(f"criterion {name!r} needs {attr}, which was not collected")
    return value
