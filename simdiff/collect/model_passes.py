"""Evidence that needs the model itself, not hidden-state statistics: skip losses and Taylor scores."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from simdiff.collect.distributed import all_reduce_nll
from simdiff.collect.nll import batch_nll, nll_over
from simdiff.core.progress import progress
from simdiff.data.windows import Batch
from simdiff.model.layers import bypass_layers, find_decoder_layers


def skip_loss_increase(model: nn.Module, batches: Sequence[Batch], already_removed: Sequence[int] = (),
                       candidates: Sequence[int] | None = None) -> np.ndarray:
    """Mean calibration NLL increase when each candidate layer is bypassed (on top of ``already_removed``).

    Layers are bypassed in the loaded model (no copies). Non-candidates get NaN. In a data-parallel group
    ``batches`` are this process's share and the losses are summed over every process.
    """
    n = len(find_decoder_layers(model))
    removed = list(already_removed)
    with bypass_layers(model, removed):
        base = all_reduce_nll(nll_over(model, batches, desc="dense loss")).mean
    candidates = [i for i in range(n) if i not in removed] if candidates is None else list(candidates)
    increase = np.full(n, np.nan)
    for layer in progress(candidates, desc="ppl_skip: skipping each layer"):
        with bypass_layers(model, removed + [layer]):
            increase[layer] = all_reduce_nll(nll_over(model, batches, desc=None)).mean - base
    return increase


def taylor_importance(model: nn.Module, batches: Sequence[Batch]) -> np.ndarray:
    """Per layer, sum over its weights of |w * dL/dw|, with L the mean calibration NLL (float64 sums)."""
    decoder = find_decoder_layers(model)
    params = [p for p in model.parameters()]
    was_training = model.training
    flags = [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    for layer in decoder.modules:
        for p in layer.parameters():
            p.requires_grad_(True)
    try:
        model.zero_grad(set_to_none=True)
        total_tokens = 0
        for batch in progress(batches, desc="taylor: gradients"):
            total, count = batch_nll(model, batch)
            total.backward()
            total_tokens += count
        importance = np.zeros(len(decoder), dtype=np.float64)
        with torch.no_grad():
            for i, layer in enumerate(decoder.modules):
                for p in layer.parameters():
                    if p.grad is not None:
                        importance[i] += float((p.detach().double() * p.grad.double()).abs().sum()) / total_tokens
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return importance
