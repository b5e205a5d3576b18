"""Model-based and trivial baselines: perplexity when skipped, Taylor, reverse order, random."""

from __future__ import annotations

import numpy as np

from simdiff.config.settings import Options
from simdiff.core.errors import SimdiffError
from simdiff.criteria.registry import SKIP_LOSS, TAYLOR, Evidence, register, require


def require_finite(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` if every layer's score is finite; else a clear error (never a silent exclusion)."""
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise SimdiffError(f"{name} score of layer {int(bad[0])} is {values[bad[0]]}: the calibration loss overflowed "
                           "or is NaN; run with --dtype float32 or check the calibration text")
    return values


@register("ppl_skip", "calibration loss increase when the layer alone is skipped (SLEB-style with --iterative)",
          "Kim et al., Shortened LLaMA, arXiv 2402.02834; Song et al., SLEB, arXiv 2402.09025", needs={SKIP_LOSS})
def ppl_skip(evidence: Evidence, options: Options) -> np.ndarray:
    return require_finite(require(evidence, "skip_loss_increase", "ppl_skip"), "ppl_skip")


@register("taylor", "first-order Taylor importance: sum over the layer's weights of |w * dL/dw|",
          "Kim et al., Shortened LLaMA, arXiv 2402.02834", needs={TAYLOR})
def taylor(evidence: Evidence, options: Options) -> np.ndarray:
    return require_finite(require(evidence, "taylor", "taylor"), "taylor")


@register("reverse", "drop the last layers before the final one (deepest first)",
          "Gromov et al., arXiv 2403.17887 (reverse-order baseline)")
def reverse(evidence: Evidence, options: Options) -> np.ndarray:
    n = evidence.num_layers
    importance = np.arange(n, 0, -1, dtype=np.float64)  # layer i -> n - i: deeper = less important
    importance[-1] = n + 1  # the final layer is kept
    return importance


@register("random", "uniformly random order (seeded by --seed)", "control", reads={"seed"})
def random_order(evidence: Evidence, options: Options) -> np.ndarray:
    return np.random.default_rng(options.seed).random(evidence.num_layers)
