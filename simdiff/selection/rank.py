"""Choose which layers to remove from per-layer (or per-block) importances.

Lowest importance goes first; ties break towards the deeper layer, so selection is deterministic.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from simdiff.core.errors import SimdiffError

log = logging.getLogger(__name__)


def resolve_count(total: int, num_layers: int | None = None, ratio: float | None = None) -> int:
    """The number of layers to remove, from ``num_layers`` or ``ratio`` (R * total rounded half up:
    floor(R * total + 0.5), so 0.25 of 26 layers is 7 and 0.25 of 22 is 6)."""
    if (num_layers is None) == (ratio is None):
        raise SimdiffError("give exactly one of --num-layers K or --ratio R")
    if ratio is not None:
        if not 0.0 < ratio < 1.0:
            raise SimdiffError(f"--ratio must lie strictly between 0 and 1, got {ratio}")
        count = math.floor(ratio * total + 0.5)
        log.info("ratio %.3f of %d layers -> removing %d", ratio, total, count)
    else:
        count = int(num_layers)
    if count < 1:
        raise SimdiffError(f"asked to remove {count} layers (of {total}); remove at least 1")
    if count >= total:
        raise SimdiffError(f"asked to remove {count} layers but the model has {total}; keep at least one")
    return count


def resolve_counts(total: int, num_layers: Sequence[int] | None = None,
                   ratios: Sequence[float] | None = None) -> list[int]:
    """Every requested removal count (``--num-layers 4,8`` as given, ``--ratio`` values rounded as
    :func:`resolve_count` does), each checked against ``total``; sorted, duplicates merged."""
    counts = [resolve_count(total, num_layers=k) for k in num_layers or []]
    counts += [resolve_count(total, ratio=r) for r in ratios or []]
    if not counts:
        raise SimdiffError("give at least one layer count (--num-layers 4,8 or --ratio 0.25)")
    return sorted(set(counts))


def check_removable(total: int, count: int, keep_first: int = 0, keep_last: int = 0) -> None:
    """Refuse, before any pass, a count that --keep-first/--keep-last leave no room for."""
    if keep_first < 0 or keep_last < 0:
        raise SimdiffError(f"--keep-first/--keep-last must be >= 0, got {keep_first}/{keep_last}")
    removable = max(0, total - keep_first - keep_last)
    if count > removable:
        raise SimdiffError(f"cannot remove {count} layers: only {removable} are removable with "
                           f"--keep-first {keep_first} --keep-last {keep_last}")


def protected_mask(total: int, keep_first: int = 0, keep_last: int = 0) -> np.ndarray:
    """Boolean mask of layers that may be removed."""
    if keep_first < 0 or keep_last < 0:
        raise SimdiffError(f"--keep-first/--keep-last must be >= 0, got {keep_first}/{keep_last}")
    allowed = np.ones(total, dtype=bool)
    allowed[:keep_first] = False
    if keep_last:
        allowed[total - keep_last :] = False
    return allowed


def select_layers(importance: np.ndarray, count: int, keep_first: int = 0, keep_last: int = 0,
                  exclude: list[int] | tuple[int, ...] = ()) -> list[int]:
    """The ``count`` removable layers with the lowest importance (NaN = not a candidate), sorted."""
    importance = np.asarray(importance, dtype=np.float64)
    allowed = protected_mask(len(importance), keep_first, keep_last) & ~np.isnan(importance)
    allowed[list(exclude)] = False
    candidates = np.flatnonzero(allowed)
    if count > len(candidates):
        raise SimdiffError(
            f"cannot remove {count} layers: only {len(candidates)} are removable with "
            f"--keep-first {keep_first} --keep-last {keep_last}"
        )
    order = sorted(candidates.tolist(), key=lambda i: (importance[i], -i))
    return sorted(order[:count])


def select_block(block_importance: np.ndarray, count: int, keep_first: int = 0, keep_last: int = 0) -> list[int]:
    """The contiguous block of ``count`` layers whose start has the lowest importance."""
    block_importance = np.asarray(block_importance, dtype=np.float64)
    total = len(block_importance) + count - 1
    starts = [s for s in range(len(block_importance)) if s >= keep_first and s + count <= total - keep_last]
    if not starts:
        raise SimdiffError(
            f"no block of {count} layers fits between --keep-first {keep_first} and --keep-last {keep_last}"
        )
    start = min(starts, key=lambda s: (block_importance[s], -s))
    return list(range(start, start + count))
