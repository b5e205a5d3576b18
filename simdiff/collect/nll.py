"""Token-level negative log-likelihood over batches of windows: what collection, the held-out search,
evaluation and recovery all measure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from simdiff.core.progress import progress
from simdiff.data.windows import Batch
from simdiff.model.load import model_device


@dataclass
class NLL:
    """Summed negative log-likelihood (nats) over ``tokens`` predicted tokens."""

    total: float = 0.0
    tokens: int = 0

    @property
    def mean(self) -> float:
        return self.total / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean) if self.tokens else float("nan")


def batch_nll(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL of one batch (a float64 scalar tensor, differentiable) and its token count.

    A token is predicted (and counted) when it and its predecessor are both real (mask 1).
    """
    batch = batch.to(model_device(model))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logits = logits[:, :-1].float()
    targets = batch.input_ids[:, 1:].to(logits.device)
    mask = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).bool().to(logits.device)
    nll = nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum")
    return nll.double(), int(mask.sum())


@torch.no_grad()
def nll_over(model: nn.Module, batches: Sequence[Batch], desc: str | None = "perplexity") -> NLL:
    """Summed NLL over all batches (no gradients); ``desc=None`` hides the progress bar."""
    result = NLL()
    for batch in (progress(batches, desc=desc) if desc else batches):
        total, count = batch_nll(model, batch)
        result.total += float(total)
        result.tokens += count
    return result


@torch.no_grad()
def window_nlls(model: nn.Module, batches: Sequence[Batch], desc: str | None = "perplexity") -> tuple[list[float], list[int]]:
    """Summed next-token NLL and predicted-token count of every window (row) of every batch."""
    totals, counts = [], []
    for batch in (progress(batches, desc=desc) if desc else batches):
        batch = batch.to(model_device(model))
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        mask = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).to(logits.device)
        nll = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch.input_ids[:, 1:].to(logits.device),
                                          reduction="none")
        totals += (nll.double() * mask).sum(1).tolist()
        counts += mask.sum(1).tolist()
    return totals, counts


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of ``values`` (sample std / sqrt(n)); NaN for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
