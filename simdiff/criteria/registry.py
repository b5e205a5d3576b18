"""The criterion registry: name -> pure function from per-layer evidence to per-layer importance.

Importance is "higher = keep": selection removes the layers (or block) with the lowest importance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from simdiff.collect.stats import LayerStatistics
from simdiff.criteria.normalize import NORMALIZERS
from simdiff.errors import SimdiffError, did_you_mean
from simdiff.flags import number_or_auto, option

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


DIFF_SCALES = ("absolute", "relative")
SEED_HELP = "seed of every random choice: calibration windows, the random criterion, training order and dropout"


@dataclass
class Options:
    """Criterion options (the SimDiff knobs and the seed of ``random``)."""

    alpha: float | str = option(0.75, "SimDiff weight of the similarity term (1 - alpha goes to the difference "
                                      "terms); 'auto' evaluates every distinct selection along alpha in [0, 1] on "
                                      "held-out calibration windows (--objective) and keeps the best; with "
                                      "--criterion best-of, its set is the --margin reference",
                                parse=number_or_auto)
    beta: float = option(1.0, "SimDiff weight of MSSD within the difference term (1 - beta goes to MASD)")
    normalize: str = option("rank", "how each SimDiff metric is normalised across layers", choices=NORMALIZERS)
    diff_scale: str = option("relative", "MSSD/MASD of y - x in the model's scale, or relative to each token's "
                                         "input RMS", choices=DIFF_SCALES)
    seed: int = option(0, SEED_HELP)

    def __post_init__(self) -> None:
        """Refuse out-of-range values when the options are made, before any calibration pass."""
        self.check()

    def check(self) -> Options:
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if name == "alpha" and isinstance(value, str) and value.strip().lower() == "auto":
                continue  # tuned later by simdiff.tune
            if isinstance(value, str) or not 0.0 <= value <= 1.0:
                raise SimdiffError(f"--{name} must lie in [0, 1]{' or be auto' if name == 'alpha' else ''}, "
                                   f"got {value}")
        if self.seed < 0:
            raise SimdiffError(f"--seed must be >= 0, got {self.seed}")
        return self


@dataclass(frozen=True)
class Criterion:
    name: str
    description: str
    reference: str
    needs: frozenset[str]
    score: Callable[[Evidence, Options], np.ndarray]
    block_score: Callable[[Evidence, int], np.ndarray] | None = field(default=None)

    @property
    def is_block(self) -> bool:
        return self.block_score is not None


CRITERIA: dict[str, Criterion] = {}


def register(name: str, description: str, reference: str, needs: set[str] | frozenset[str] = frozenset(),
             block_score: Callable[[Evidence, int], np.ndarray] | None = None):
    """Decorator registering ``fn(evidence, options) -> importance`` under ``name``."""

    def wrap(fn: Callable[[Evidence, Options], np.ndarray]):
        CRITERIA[name] = Criterion(name, description, reference, frozenset(needs), fn, block_score)
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
