"""Calibration and evaluation text, tokenised into windows."""

from __future__ import annotations

from simdiff.data.text import DATA_DIR_ENV, data_dir, load_text
from simdiff.data.windows import (
    Batch,
    batches,
    bos_token_id,
    contiguous_windows,
    pad_sequences,
    sample_windows,
    tokenize_text,
)


def calibration_windows(tokenizer, source: str = "wikitext2", samples: int = 32, seq_len: int = 512,
                        seed: int = 0, data_root: str | None = None, split: str = "valid"):
    """``samples`` seeded windows of ``seq_len`` tokens from ``source`` (WikiText-2 validation by default)."""
    ids = tokenize_text(tokenizer, load_text(source, split=split, root=data_root))
    return sample_windows(ids, samples, seq_len, seed, bos_token_id(tokenizer))


__all__ = [
    "DATA_DIR_ENV",
    "Batch",
    "batches",
    "bos_token_id",
    "calibration_windows",
    "contiguous_windows",
    "data_dir",
    "load_text",
    "pad_sequences",
    "sample_windows",
    "tokenize_text",
]


def calibration_batches(calibration, tokenizer, samples: int | None = None) -> list[Batch]:
    """The calibration windows :class:`~simdiff.config.recipe.Calibration` describes, batched; ``samples``
    draws that many windows instead (same text, length and seed: ``--heal-samples``)."""
    windows = calibration_windows(tokenizer, calibration.source, samples or calibration.samples,
                                  calibration.seq_len, calibration.seed, calibration.data_dir)
    return batches(windows, calibration.batch_size, calibration.skip_first_token)
