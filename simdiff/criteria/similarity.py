"""Similarity baselines: Block Influence (ShortGPT) and block angular distance (Gromov et al.)."""

from __future__ import annotations

import numpy as np

from simdiff.config.settings import Options
from simdiff.criteria.registry import LAYER_STATS, Evidence, register, require


@register("block_influence", "ShortGPT Block Influence: 1 - mean cos(input, output)",
          "Men et al., ShortGPT, arXiv 2403.03853", needs={LAYER_STATS})
def block_influence(evidence: Evidence, options: Options) -> np.ndarray:
    return 1.0 - require(evidence, "layer_stats", "block_influence").mean_cos


def angular_block_importance(evidence: Evidence, block_size: int) -> np.ndarray:
    """Angular distance between the input of layer s and the output of layer s+n-1, for every start s."""
    return require(evidence, "layer_stats", "angular_block").angular(block_size)


@register("angular_block", "Gromov et al.: drop the contiguous block of n layers with the smallest angular distance",
          "Gromov et al., The Unreasonable Ineffectiveness of the Deeper Layers, arXiv 2403.17887",
          needs={LAYER_STATS}, block_score=angular_block_importance)
def angular_single(evidence: Evidence, options: Options) -> np.ndarray:
    """Per-layer profile: the angular distance of each single layer (block size 1)."""
    return angular_block_importance(evidence, 1)
