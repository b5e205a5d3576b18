"""Remove decoder layers for real, or bypass them temporarily in place.

Removal rebuilds the layer list, renumbers every ``layer_idx`` inside the kept layers, sets the config's
layer count and slices (or remaps) every per-layer config entry, then checks that the config now builds
exactly the pruned model's structure. Bypassing swaps chosen layers for identity modules and restores
them on exit; layer positions do not move, so per-position config (``layer_types``) stays right.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from simdiff.core.errors import SimdiffError
from simdiff.model.layers import find_decoder_layers, num_layers_in_config

log = logging.getLogger(__name__)

# Config lists that are never per-layer even if their length happens to equal the layer count.
NOT_PER_LAYER = {"architectures", "eos_token_id", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens"}
# Config lists holding layer *indices* (remapped to the new numbering, dropping removed layers).
LAYER_INDEX_LISTS = ("mlp_only_layers",)
# Config integers counting the first k layers of a special kind (recounted over the kept layers).
LEADING_LAYER_COUNTS = ("first_k_dense_replace",)


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


def renumber_layer_indices(layers: Sequence[nn.Module]) -> None:
    """Set every ``layer_idx`` attribute inside layer j (attention, the layer itself, ...) to j."""
    for new_index, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index


def _sparse_step_as_index_list(config) -> None:
    """Turn a ``decoder_sparse_step`` pattern into an explicit ``mlp_only_layers`` list for the kept layers."""
    step = getattr(config, "decoder_sparse_step", None)
    if not isinstance(step, int) or step == 1 or not hasattr(config, "mlp_only_layers"):
        return
    dense_old = {i for i in range(num_layers_in_config(config)) if (i + 1) % step != 0}
    config.mlp_only_layers = sorted(set(config.mlp_only_layers) | dense_old)
    config.decoder_sparse_step = 1


def update_config_for_kept_layers(config, kept: list[int]) -> list[str]:
    """Make ``config`` describe only the ``kept`` layers (original indices); returns the keys changed."""
    old_count = num_layers_in_config(config)
    changed = ["num_hidden_layers"]
    _sparse_step_as_index_list(config)
    new_index = {old: new for new, old in enumerate(kept)}
    for key, value in list(vars(config).items()):
        if key in NOT_PER_LAYER or key.startswith("_"):
            continue
        if key in LAYER_INDEX_LISTS and isinstance(value, (list, tuple)):
            setattr(config, key, [new_index[i] for i in value if i in new_index])
            changed.append(key)
        elif key in LEADING_LAYER_COUNTS and isinstance(value, int):
            setattr(config, key, sum(1 for i in kept if i < value))
            changed.append(key)
        elif isinstance(value, (list, tuple)) and len(value) == old_count:
            setattr(config, key, type(value)(value[i] for i in kept))
            changed.append(key)
    config.num_hidden_layers = len(kept)
    return changed


def _structure(model: nn.Module) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_config_consistent(model: nn.Module, config=None, source: str = "the pruned config") -> None:
    """Raise unless ``type(model)(config)`` builds exactly ``model``'s parameters and per-layer lists.

    ``config`` defaults to ``model.config``; ``source`` names it in the error (e.g. a written config.json).
    """
    config = model.config if config is None else config
    count = num_layers_in_config(config)
    for key, value in vars(config).items():
        if key.endswith("layer_types") and isinstance(value, (list, tuple)) and len(value) != count:
            raise SimdiffError(f"{source}: {key} has {len(value)} entries for {count} layers")
    with torch.device("meta"):
        rebuilt = type(model)(copy.deepcopy(config))
    expected, actual = _structure(rebuilt), _structure(model)
    if expected != actual:
        missing = sorted(set(actual) ^ set(expected))[:3]
        shapes = [k for k in set(actual) & set(expected) if actual[k] != expected[k]][:3]
        raise SimdiffError(
            f"{source} (model_type {config.model_type!r}) would not rebuild the pruned model "
            f"(differing parameters: {missing or shapes}); this architecture needs a config rule in "
            "simdiff.surgery.layers (LAYER_INDEX_LISTS / LEADING_LAYER_COUNTS)"
        )


def remove_layers(model: nn.Module, indices: Sequence[int]) -> list[int]:
    """Remove decoder layers ``indices`` (original numbering) from ``model`` in place; return the kept ones.

    The model is modified in place (load a fresh copy if you need the dense one too); its on-disk
    checkpoint is never touched.
    """
    decoder = find_decoder_layers(model)
    removed = validate_layer_indices(indices, len(decoder))
    kept = [i for i in range(len(decoder)) if i not in set(removed)]
    new_layers = nn.ModuleList([decoder.modules[i] for i in kept])
    renumber_layer_indices(new_layers)
    decoder.replace(new_layers)
    changed = update_config_for_kept_layers(model.config, kept)
    log.info("removed layers %s; config keys updated: %s", removed, ", ".join(changed))
    check_config_consistent(model)
    return kept
