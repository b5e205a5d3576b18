"""One streaming calibration pass with forward hooks on every decoder layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from simdiff.collect.stats import LayerStatistics, token_vectors
from simdiff.core.progress import progress
from simdiff.data.windows import Batch
from simdiff.model.layers import find_decoder_layers
from simdiff.model.load import model_device


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer was called with."""
    return args[0] if args else kwargs["hidden_states"]


def layer_output(output) -> torch.Tensor:
    """The hidden states a decoder layer returned (plain tensor, or first element of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def forward_hooks(modules: dict[int, nn.Module], make_hook: Callable[[int], Callable]) -> Iterator[None]:
    """Register ``make_hook(index)`` as a with-kwargs forward hook on each module; always removed."""
    handles = [m.register_forward_hook(make_hook(i), with_kwargs=True) for i, m in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class StatisticsRecorder:
    """Feeds each hooked layer's (input, output) token vectors into a :class:`LayerStatistics`."""

    def __init__(self, num_layers: int, block_sizes: Sequence[int] = ()) -> None:
        self.stats = LayerStatistics(num_layers)
        self.block_sizes = sorted(set(block_sizes))
        self.mask: torch.Tensor | None = None
        self._inputs: dict[int, torch.Tensor] = {}

    def start_batch(self, mask: torch.Tensor | None) -> None:
        self.mask = mask
        self._inputs.clear()

    def record(self, layer: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        """Add one layer call. Input and output are brought to the output's device, as float32, before any
        arithmetic: under ``--device-map`` a forward hook sees the input before accelerate moves it onto the
        layer's device, so at a device boundary it is still on the previous layer's."""
        y = token_vectors(hidden_out, self.mask)
        x = token_vectors(hidden_in.to(y.device), self.mask)
        self.stats.add_layer(layer, x, y)
        if not self.block_sizes:
            return
        self._inputs[layer] = x
        for n in self.block_sizes:
            start = layer - n + 1
            if start in self._inputs:
                self.stats.add_block(n, start, self._inputs[start].to(y.device), y)
        self._inputs.pop(layer - max(self.block_sizes) + 1, None)

    def hook_for(self, layer: int) -> Callable:
        def hook(module, args, kwargs, output):
            self.record(layer, layer_input(args, kwargs), layer_output(output))

        return hook


@torch.no_grad()
def run_decoder(model: nn.Module, batch: Batch) -> None:
    """Forward through the decoder stack only (no LM head), no KV cache."""
    batch = batch.to(model_device(model))
    model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)


def collect_layer_statistics(
    model: nn.Module,
    batches: Sequence[Batch],
    block_sizes: Sequence[int] = (),
    active_layers: Sequence[int] | None = None,
) -> LayerStatistics:
    """One pass over ``batches`` accumulating :class:`LayerStatistics` for every (active) decoder layer.

    ``block_sizes`` lists the contiguous block lengths n whose angular distances are wanted.
    ``active_layers`` restricts hooks to those indices (the others may be bypassed).
    """
    decoder = find_decoder_layers(model)
    indices = range(len(decoder)) if active_layers is None else active_layers
    recorder = StatisticsRecorder(len(decoder), block_sizes)
    with forward_hooks({i: decoder.modules[i] for i in indices}, recorder.hook_for):
        for batch in progress(batches, desc="calibration pass"):
            recorder.start_batch(batch.statistics_mask())
            run_decoder(model, batch)
    recorder.stats.check_finite(None if active_layers is None else list(active_layers),
                                next(model.parameters()).dtype)
    return recorder.stats
