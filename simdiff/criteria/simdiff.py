"""SimDiff (arXiv 2604.19520): similarity and transformation difference, combined.

importance = alpha * N(1 - mean cos) + (1 - alpha) * (beta * N(MSSD) + (1 - beta) * N(MASD))

N is a normalisation across layers (``minmax``, ``zscore`` or ``rank``); MSSD/MASD are the mean squared /
absolute entries of Delta = y - x, either in the model's ``absolute`` scale or ``relative`` to each token's
input RMS. Defaults are chosen by measurement (docs/criteria.md).
"""

from __future__ import annotations

import numpy as np

from simdiff.config.settings import DIFF_SCALES, Options
from simdiff.core.errors import SimdiffError
from simdiff.criteria.normalize import normalize
from simdiff.criteria.registry import LAYER_STATS, Evidence, register, require


def check_options(options: Options) -> None:
    """alpha and beta are checked when :class:`Options` is made; the difference scale here."""
    if options.diff_scale not in DIFF_SCALES:
        raise SimdiffError(f"unknown --diff-scale {options.diff_scale!r}; choose one of {', '.join(DIFF_SCALES)}")


def simdiff_importance(one_minus_cos: np.ndarray, mssd: np.ndarray, masd: np.ndarray, options: Options) -> np.ndarray:
    """The SimDiff combination of the three raw per-layer metrics."""
    check_options(options)
    similarity = normalize(one_minus_cos, options.normalize)
    difference = options.beta * normalize(mssd, options.normalize) + (1 - options.beta) * normalize(
        masd, options.normalize
    )
    return options.alpha * similarity + (1 - options.alpha) * difference


@register("simdiff", "SimDiff: normalised (1 - cos) combined with normalised MSSD and MASD of y - x",
          "SimDiff, arXiv 2604.19520 (2026)", needs={LAYER_STATS},
          reads={"alpha", "beta", "normalize", "diff_scale"})
def simdiff(evidence: Evidence, options: Options) -> np.ndarray:
    stats = require(evidence, "layer_stats", "simdiff")
    check_options(options)
    return simdiff_importance(
        1.0 - stats.mean_cos, stats.mssd(options.diff_scale), stats.masd(options.diff_scale), options
    )


@register("mssd", "mean squared entry of y - x (outlier-sensitive difference term of SimDiff)",
          "SimDiff, arXiv 2604.19520 (2026)", needs={LAYER_STATS}, reads={"diff_scale"})
def mssd(evidence: Evidence, options: Options) -> np.ndarray:
    check_options(options)
    return require(evidence, "layer_stats", "mssd").mssd(options.diff_scale)


@register("masd", "mean absolute entry of y - x (robust difference term of SimDiff)",
          "SimDiff, arXiv 2604.19520 (2026)", needs={LAYER_STATS}, reads={"diff_scale"})
def masd(evidence: Evidence, options: Options) -> np.ndarray:
    check_options(options)
    return require(evidence, "layer_stats", "masd").masd(options.diff_scale)
