"""Plain-text and Markdown tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def format_score_table(scores: Mapping[str, np.ndarray], digits: int = 4) -> str:
    """Per-layer table: one row per layer, one column per criterion (higher = keep)."""
    names = list(scores)
    num_layers = len(next(iter(scores.values())))
    rows = [[str(i)] + [f"{scores[n][i]:.{digits}g}" for n in names] for i in range(num_layers)]
    widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(["layer", *names])]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format("layer", *names)] + [fmt.format(*r) for r in rows])
