"""Find the decoder-layer list of any causal LM, generically.

The decoder layers are the ``nn.ModuleList`` whose elements are the model's no-split decoder-layer class
(``_no_split_modules``), or failing that the ``nn.ModuleList`` whose length equals the configured layer
count. A tiny table keyed by ``model_type`` names the path only where that search could be ambiguous.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from simdiff.core.errors import SimdiffError

# model_type -> dotted path of the decoder-layer ModuleList (only where the generic search needs help).
LAYER_PATHS: dict[str, str] = {
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
}


@dataclass
class DecoderLayers:
    """Where the decoder layers live: ``parent.<attr>`` is the ``nn.ModuleList``."""

    parent: nn.Module
    attr: str
    path: str

    @property
    def modules(self) -> nn.ModuleList:
        return getattr(self.parent, self.attr)

    def __len__(self) -> int:
        return len(self.modules)

    def replace(self, layers: nn.ModuleList) -> None:
        setattr(self.parent, self.attr, layers)


def num_layers_in_config(config) -> int:
    """The configured number of decoder layers (``num_hidden_layers`` or its alias)."""
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise SimdiffError(
            f"config of type {type(config).__name__} has no integer num_hidden_layers; "
            "simdiff needs a decoder-only causal LM"
        )
    return n


def _resolve(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, attr = path.split(".")
    parent = model
    for name in parents:
        parent = getattr(parent, name)
    return parent, attr


def _check_decoder_only(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None:
        raise SimdiffError(f"{type(model).__name__} has no .config: pass a Hugging Face PreTrainedModel")
    if getattr(config, "is_encoder_decoder", False):
        raise SimdiffError(
            f"model_type {config.model_type!r} is an encoder-decoder model; simdiff prunes decoder-only "
            "causal LMs (load it with AutoModelForCausalLM)"
        )
    if not type(model).__name__.endswith("ForCausalLM") and not hasattr(model, "lm_head"):
        raise SimdiffError(
            f"{type(model).__name__} is not a causal LM; load a decoder-only model with AutoModelForCausalLM"
        )


def find_decoder_layers(model: nn.Module) -> DecoderLayers:
    """Locate the decoder layers; raise :class:`SimdiffError` for models simdiff cannot prune."""
    _check_decoder_only(model)
    config = model.config
    model_type = getattr(config, "model_type", "")
    if model_type in LAYER_PATHS:
        parent, attr = _resolve(model, LAYER_PATHS[model_type])
        return DecoderLayers(parent, attr, LAYER_PATHS[model_type])

    n_layers = num_layers_in_config(config)
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    by_class: list[tuple[str, nn.ModuleList]] = []
    by_length: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if no_split and all(type(m).__name__ in no_split for m in module):
            by_class.append((name, module))
        elif len(module) == n_layers:
            by_length.append((name, module))
    candidates = by_class or by_length
    if len(candidates) != 1:
        found = ", ".join(name for name, _ in candidates) or "none"
        raise SimdiffError(
            f"cannot find a unique decoder-layer list in {type(model).__name__} (model_type "
            f"{model_type!r}; candidates: {found}); add its path to simdiff.model.layers.LAYER_PATHS"
        )
    path = candidates[0][0]
    parent, attr = _resolve(model, path)
    return DecoderLayers(parent, attr, path)


class SkippedLayer(nn.Module):
    """Stands in for a bypassed decoder layer: returns its input hidden states unchanged."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def validate_layer_indices(indices: Sequence[int], num_layers: int) -> list[int]:
    """Sorted unique indices, checked to lie in range and to leave at least one layer."""
    unique = sorted(set(int(i) for i in indices))
    bad = [i for i in unique if not 0 <= i < num_layers]
    if bad:
        raise SimdiffError(f"layer indices {bad} out of range: the model has layers 0..{num_layers - 1}")
    if len(unique) >= num_layers:
        raise SimdiffError(f"cannot remove all {num_layers} layers; keep at least one")
    return unique


@contextmanager
def bypass_layers(model: nn.Module, indices: Sequence[int]) -> Iterator[nn.Module]:
    """Within the block, the chosen decoder layers pass their input through unchanged; restored on exit."""
    decoder = find_decoder_layers(model)
    chosen = validate_layer_indices(indices, len(decoder)) if indices else []
    originals = {i: decoder.modules[i] for i in chosen}
    try:
        for i in chosen:
            decoder.modules[i] = SkippedLayer(i)
        yield model
    finally:
        for i, layer in originals.items():
            decoder.modules[i] = layer
