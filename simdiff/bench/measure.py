"""Timed prefill and decode passes: warm-up, synchronised timing, median of repeats.

Prefill runs the full model (LM head over every position, no KV cache) on ``batch x seq_len`` random
tokens: its per-token work is exactly what :mod:`simdiff.bench.weights` counts. Decode fills a KV cache
with a ``prompt_len`` prompt, then times ``new_tokens`` greedy single-token steps at a given batch size.
With ``compile=True`` decoding uses a static KV cache and a ``torch.compile``-d forward
(``mode="reduce-overhead"``: CUDA graphs on GPUs), so that batch-1 decoding is bound by weight reads rather
than by Python and kernel-launch overhead.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from simdiff.model.checks import cache_kwarg
from simdiff.model.load import model_device

log = logging.getLogger(__name__)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of ``fn``, synchronised with the device before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def random_tokens(model: nn.Module, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random token ids (speed does not depend on them), skipping the first few special ids."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(min(4, vocab - 1), vocab, (batch, length), generator=generator)
    return ids.to(model_device(model))


@torch.no_grad()
def prefill(model: nn.Module, ids: torch.Tensor) -> None:
    """One full forward pass (every position's logits), no KV cache."""
    model(input_ids=ids, use_cache=False)


@dataclass
class Decoder:
    """Greedy decoding with a KV cache, eager (dynamic cache) or compiled (static cache)."""

    model: nn.Module
    batch: int
    prompt_len: int
    new_tokens: int
    compile: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        self.prompt = random_tokens(self.model, self.batch, self.prompt_len, seed=1)
        self.device = self.prompt.device
        self.cache = None
        self.step = self.model.forward
        if self.compile:
            from transformers import StaticCache

            self.cache = StaticCache(config=self.model.config, max_cache_len=self.prompt_len + self.new_tokens)
            if self.compile_backend != "none":  # "none": static cache, eager forward (for tests)
                mode = "reduce-overhead" if self.compile_backend == "inductor" else None
                self.step = torch.compile(self.model.forward, mode=mode, fullgraph=True, backend=self.compile_backend)

    def _fresh_cache(self):
        if self.cache is not None:
            self.cache.reset()
            return self.cache
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def tokens(self, new_tokens: int | None = None) -> tuple[torch.Tensor, float]:
        """Prefill the prompt, then greedily decode ``new_tokens``; return them and the seconds the steps took."""
        new_tokens = self.new_tokens if new_tokens is None else new_tokens
        key = cache_kwarg(self.model)
        cache = self._fresh_cache()
        positions = torch.arange(self.prompt_len, device=self.device)[None]
        out = self.model(input_ids=self.prompt, position_ids=positions, use_cache=True, logits_to_keep=1,
                         **{key: cache})
        token = out.logits[:, -1:].argmax(-1)
        generated = []
        synchronize(self.device)
        start = time.perf_counter()
        for i in range(new_tokens):
            position = torch.full((1, 1), self.prompt_len + i, device=self.device)
            out = self.step(input_ids=token, position_ids=position, use_cache=True, **{key: cache})
            token = out.logits[:, -1:].argmax(-1)
            generated.append(token)
        synchronize(self.device)
        return torch.cat(generated, dim=1), time.perf_counter() - start

    def run(self) -> float:
        """Seconds taken by ``new_tokens`` decode steps (after an untimed prefill)."""
        return self.tokens()[1]
