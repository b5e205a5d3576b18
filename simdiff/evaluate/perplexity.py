"""Token-level negative log-likelihood and perplexity over batches of windows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from simdiff.core.progress import progress
from simdiff.data.text import text_variant
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


@dataclass
class PerplexityProtocol:
    """How a perplexity is measured: non-overlapping windows over a split of a text source."""

    source: str = "wikitext2"
    split: str = "test"
    seq_len: int = 1024
    max_tokens: int | None = None
    batch_size: int = 2
    data_dir: str | None = None

    def describe(self, bos: int | None) -> dict:
        return {
            "windows": "non-overlapping, last partial window dropped",
            "seq_len": self.seq_len,
            "bos_per_window": bos is not None,
            "max_tokens": self.max_tokens,
            "split": self.split if self.source in _named() else None,
            "text": text_variant(self.source, self.split, self.data_dir),
            "loss": "summed next-token NLL over predicted tokens, exp(total / tokens)",
        }


def _named() -> dict:
    from simdiff.data.text import NAMED_DATASETS

    return NAMED_DATASETS



def evaluation_batches(tokenizer, protocol: PerplexityProtocol) -> tuple[list[Batch], int | None]:
    """The protocol's windows (BOS first where the tokenizer uses one), batched; and the BOS id."""
    from simdiff.data import batches, bos_token_id, contiguous_windows, load_text, tokenize_text

    text = load_text(protocol.source, split=protocol.split, root=protocol.data_dir)
    bos = bos_token_id(tokenizer)
    windows = contiguous_windows(tokenize_text(tokenizer, text), protocol.seq_len, bos, protocol.max_tokens)
    return batches(windows, protocol.batch_size), bos


def perplexity_report(model: nn.Module, batches: Sequence[Batch], protocol: PerplexityProtocol,
                      bos: int | None, desc: str | None = "perplexity") -> dict:
    """Perplexity, NLL and token count of ``model`` on prepared evaluation batches, with the protocol.

    ``window_nll`` holds each window's mean NLL, for paired comparisons of two models on the same windows;
    ``mean_nll_stderr`` is the standard error of the mean over windows, and ``perplexity_stderr`` its
    first-order (delta-method) image, perplexity * stderr.
    """
    totals, counts = window_nlls(model, batches, desc=desc)
    nll = NLL(sum(totals), sum(counts))
    per_window = [t / c for t, c in zip(totals, counts)]
    stderr = standard_error(per_window)
    return {"source": protocol.source, "perplexity": nll.perplexity, "mean_nll": nll.mean, "tokens": nll.tokens,
            "windows": len(per_window), "mean_nll_stderr": stderr, "perplexity_stderr": nll.perplexity * stderr,
            "window_nll": per_window, "protocol": protocol.describe(bos)}


def evaluate_perplexity(model: nn.Module, tokenizer, protocol: PerplexityProtocol | None = None) -> dict:
    """Load, window and score one text source (WikiText-2 test by default)."""
    protocol = protocol or PerplexityProtocol()
    eval_batches, bos = evaluation_batches(tokenizer, protocol)
    return perplexity_report(model, eval_batches, protocol, bos, desc=f"perplexity {protocol.source}")
