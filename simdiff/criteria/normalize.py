"""Normalisations of one metric across layers (so that metrics of different scales can be combined)."""

from __future__ import annotations

import numpy as np

from simdiff.config.settings import NORMALIZER_NAMES
from simdiff.core.errors import SimdiffError


def minmax(values: np.ndarray) -> np.ndarray:
    """(v - min) / (max - min); all zeros when the values are constant."""
    span = values.max() - values.min()
    return np.zeros_like(values) if span == 0 else (values - values.min()) / span


def zscore(values: np.ndarray) -> np.ndarray:
    """(v - mean) / std (population std); all zeros when the values are constant."""
    std = values.std()
    return np.zeros_like(values) if std == 0 else (values - values.mean()) / std


def rank(values: np.ndarray) -> np.ndarray:
    """Average rank scaled to [0, 1] (lowest value 0, highest 1; ties share their mean rank)."""
    n = len(values)
    if n == 1:
        return np.zeros(1)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.arange(n, dtype=np.float64)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks / (n - 1)


NORMALIZERS = {"minmax": minmax, "zscore": zscore, "rank": rank}

assert tuple(NORMALIZERS) == NORMALIZER_NAMES, "simdiff.config.settings.NORMALIZER_NAMES lists these"


def normalize(values: np.ndarray, method: str) -> np.ndarray:
    if method not in NORMALIZERS:
        raise SimdiffError(f"unknown normalisation {method!r}; choose one of {', '.join(NORMALIZERS)}")
    return NORMALIZERS[method](np.asarray(values, dtype=np.float64))
