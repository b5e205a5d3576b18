"""Token-level negative log-likelihood and perplexity over batches of windows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from simdiff.collect.nll import NLL, standard_error, window_nlls
from simdiff.data.text import text_variant
from simdiff.data.windows import Batch


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
