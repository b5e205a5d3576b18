"""Plots (matplotlib, headless), each written as PNG and SVG."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 130, svg_twin: bool = True) -> Path:
    """Write ``fig`` to ``path`` (format from its suffix) and, with ``svg_twin``, beside it as SVG; close it."""
    path = Path(path)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    if svg_twin:
        fig.savefig(path.with_suffix(".svg"), bbox_inches="tight")
    _pyplot().close(fig)
    return path


def removal_ranks(values: np.ndarray) -> np.ndarray:
    """1 for the layer removed first (lowest importance; ties: the deeper layer first), NaN where undefined."""
    values = np.asarray(values, dtype=np.float64)
    ranks = np.full(values.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(values))
    order = ok[np.lexsort((-ok, values[ok]))]
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks


def plot_layer_ranks(scores: Mapping[str, np.ndarray], path: str | Path, title: str = "layer ranks",
                     removed: Mapping[str, Mapping[int, int]] | None = None, svg_twin: bool = True) -> Path:
    """Write :func:`layer_rank_figure` to ``path`` (and, with ``svg_twin``, as SVG beside it)."""
    return save_figure(layer_rank_figure(scores, title, removed), path, svg_twin=svg_twin)


def layer_rank_figure(scores: Mapping[str, np.ndarray], title: str = "layer ranks",
                      removed: Mapping[str, Mapping[int, int]] | None = None):
    """Layer × criterion heatmap of each criterion's removal order (1 = removed first).

    ``removed``: criterion -> {layer: the smallest count of removed layers at which it is removed}; those
    cells are outlined and show that count.
    """
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    names = list(scores)
    num_layers = max(len(np.asarray(v)) for v in scores.values())
    grid = np.full((len(names), num_layers), np.nan)
    for row, name in enumerate(names):
        ranks = removal_ranks(scores[name])
        grid[row, : len(ranks)] = ranks
    fig, ax = plt.subplots(figsize=(2.5 + 0.32 * num_layers, 1.6 + 0.42 * len(names)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", vmin=1, vmax=num_layers)
    for row, name in enumerate(names):
        for layer, count in (removed or {}).get(name, {}).items():
            ax.add_patch(Rectangle((layer - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="#d62728", linewidth=2))
            shade = grid[row, layer]
            color = "white" if np.isfinite(shade) and shade < num_layers / 2 else "black"
            ax.text(layer, row, str(count), ha="center", va="center", fontsize=7, color=color, fontweight="bold")
    ax.set_xticks(range(num_layers))
    ax.set_xticklabels([str(i) for i in range(num_layers)], fontsize=7)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("decoder layer")
    ax.set_title(title, pad=16 if removed else 6)
    bar = fig.colorbar(image, ax=ax, pad=0.01, fraction=0.04)
    bar.set_label("removal order (1 = least important,\nremoved first)", fontsize=8)
    bar.ax.invert_yaxis()
    notes = ["outlined: removed, at the number of removed layers shown"] if removed else []
    if np.isnan(grid).any():
        notes.append("grey: no score")
    if notes:
        ax.text(0.5, 1.005, "; ".join(notes), transform=ax.transAxes, fontsize=8, va="bottom", ha="center",
                color="#b22222")
    return fig
