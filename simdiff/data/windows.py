"""Token windows for calibration (random, seeded) and evaluation (contiguous, non-overlapping)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from simdiff.core.errors import SimdiffError


@dataclass
class Batch:
    """A batch of token ids with its attention mask (1 = real token, 0 = padding).

    ``skip_first_token``: hidden-state statistics leave out position 0 of each window (the BOS / attention-sink
    token, which carries massive activations); the model still sees it.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    skip_first_token: bool = False

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.skip_first_token)

    def statistics_mask(self) -> torch.Tensor:
        """The tokens whose hidden states enter the layer statistics."""
        if not self.skip_first_token:
            return self.attention_mask
        mask = self.attention_mask.clone()
        mask[:, 0] = 0
        return mask


def bos_token_id(tokenizer) -> int | None:
    """The BOS id if the tokenizer itself starts sequences with it, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bos if ids and ids[0] == bos else None


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of ids, without special tokens."""
    if not text.strip():
        raise SimdiffError("the text is empty; give a non-empty calibration/evaluation text")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False).input_ids
    return torch.tensor(ids, dtype=torch.long)


def _with_bos(chunks: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return chunks
    return torch.cat([torch.full((chunks.shape[0], 1), bos, dtype=chunks.dtype), chunks], dim=1)


def sample_windows(token_ids: torch.Tensor, samples: int, seq_len: int, seed: int, bos: int | None = None) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens (BOS included) at seeded random offsets: ``[samples, seq_len]``."""
    if samples < 1 or seq_len < 2:
        raise SimdiffError(f"need samples >= 1 and seq_len >= 2, got samples={samples}, seq_len={seq_len}")
    body = seq_len - (bos is not None)
    if len(token_ids) < body + 1:
        raise SimdiffError(
            f"text too short: {len(token_ids)} tokens, but a window needs {body + 1}; "
            f"use a longer text or a smaller --calib-seq-len (now {seq_len})"
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(token_ids) - body + 1, size=samples)
    chunks = torch.stack([token_ids[s : s + body] for s in starts.tolist()])
    return _with_bos(chunks, bos)


def contiguous_windows(token_ids: torch.Tensor, seq_len: int, bos: int | None = None, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows covering the text (the last partial window is dropped): ``[n, seq_len]``."""
    body = seq_len - (bos is not None)
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    n = len(token_ids) // body
    if n == 0:
        raise SimdiffError(
            f"text too short: {len(token_ids)} tokens, fewer than one window of {body}; lower the window length (--eval-seq-len, or --train-seq-len in recover)"
        )
    return _with_bos(token_ids[: n * body].view(n, body), bos)


def batches(windows: torch.Tensor, batch_size: int, skip_first_token: bool = False) -> list[Batch]:
    """Split ``[n, T]`` windows into batches with all-ones attention masks."""
    if batch_size < 1:
        raise SimdiffError(f"batch size must be >= 1, got {batch_size}")
    return [Batch(w, torch.ones_like(w), skip_first_token) for w in windows.split(batch_size)]


def pad_sequences(sequences: list[list[int]], pad_id: int) -> Batch:
    """Right-pad variable-length sequences into one batch with a mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return Batch(ids, mask)
