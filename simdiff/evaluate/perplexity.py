"""Token-level negative log-likelihood and perplexity over batches of windows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from simdiff.data.windows import Batch
from simdiff.model.load import model_device
from simdiff.progress import progress


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


def window_nll(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window summed next-token NLL (float64, differentiable) and per-window predicted-token counts.

    A token is predicted (and counted) when it and its predecessor are both real (mask 1).
    """
    batch = batch.to(model_device(model))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logits = logits[:, :-1].float()
    targets = batch.input_ids[:, 1:].to(logits.device)
    mask = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).bool().to(logits.device)
    rows = torch.arange(mask.shape[0], device=logits.device).unsqueeze(1).expand_as(mask)[mask]
    losses = nn.functional.cross_entropy(logits[mask], targets[mask], reduction="none").double()
    totals = torch.zeros(mask.shape[0], dtype=torch.float64, device=logits.device).index_add(0, rows, losses)
    return totals, mask.sum(dim=1)


def batch_nll(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL of one batch (a float64 scalar tensor, differentiable) and its token count."""
    totals, counts = window_nll(model, batch)
    return totals.sum(), int(counts.sum())


@torch.no_grad()
def nll_over(model: nn.Module, batches: Sequence[Batch], desc: str | None = "perplexity") -> NLL:
    """Summed NLL over all batches (no gradients); ``desc=None`` hides the progress bar."""
    result = NLL()
    for batch in (progress(batches, desc=desc) if desc else batches):
        total, count = batch_nll(model, batch)
        result.total += float(total)
        result.tokens += count
    return result


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


@torch.no_grad()
def window_nlls(model: nn.Module, batches: Sequence[Batch], desc: str | None = "perplexity") -> tuple[list, list]:
    """Summed NLL and predicted-token count of every window, in order (no gradients)."""
    totals, counts = [], []
    for batch in (progress(batches, desc=desc) if desc else batches):
        total, count = window_nll(model, batch)
        totals += total.tolist()
        counts += count.tolist()
    return totals, counts


def mean_nll_stderr(totals: Sequence[float], counts: Sequence[int]) -> float:
    """Standard error of the token-weighted mean NLL over windows (ratio estimator; NaN below 2 windows).

    Windows are treated as independent draws, which contiguous windows of one text only approximate.
    """
    n = len(totals)
    tokens = sum(counts)
    if n < 2 or not tokens:
        return float("nan")
    mean = sum(totals) / tokens
    residual = sum((t - mean * c) ** 2 for t, c in zip(totals, counts))
    return math.sqrt(n / (n - 1) * residual) / tokens


def perplexity_report(model: nn.Module, batches: Sequence[Batch], protocol: PerplexityProtocol,
                      bos: int | None, desc: str | None = "perplexity") -> dict:
    """Perplexity, NLL (with standard errors over windows) and token count of ``model`` on prepared batches.

    ``perplexity_stderr`` is the delta-method error, perplexity × stderr(mean NLL); None below 2 windows.
    """
    totals, counts = window_nlls(model, batches, desc=desc)
    nll = NLL(math.fsum(totals), sum(counts))
    stderr = mean_nll_stderr(totals, counts)
    known = math.isfinite(stderr)
    return {"source": protocol.source,
            "perplexity": nll.perplexity, "perplexity_stderr": nll.perplexity * stderr if known else None,
            "mean_nll": nll.mean, "mean_nll_stderr": stderr if known else None,
            "tokens": nll.tokens, "windows": len(totals), "protocol": protocol.describe(bos)}


def evaluate_perplexity(model: nn.Module, tokenizer, protocol: PerplexityProtocol | None = None) -> dict:
    """Load, window and score one text source (WikiText-2 test by default)."""
    protocol = protocol or PerplexityProtocol()
    eval_batches, bos = evaluation_batches(tokenizer, protocol)
    return perplexity_report(model, eval_batches, protocol, bos, desc=f"perplexity {protocol.source}")
