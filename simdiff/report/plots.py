"""PNG plots (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from simdiff.criteria.normalize import minmax


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_score_profiles(scores: Mapping[str, np.ndarray], path: str | Path, title: str = "layer scores") -> Path:
    """Each criterion's per-layer importance, min-max normalised to [0, 1], against layer index."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(values)
        shown = np.full_like(values, np.nan)
        shown[ok] = minmax(values[ok])
        ax.plot(np.arange(len(values)), shown, marker="o", markersize=3, label=name)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("importance (min-max normalised; low = removed first)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
