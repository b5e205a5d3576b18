"""Remove decoder layers for real, or bypass them temporarily in place.

Removal rebuilds the layer list, renumbers every ``layer_idx`` inside the kept layers, sets the config's
layer count and slices (or remaps) every per-layer config entry, then checks that the config now builds
exactly the pruned model's structure. Bypassing swaps chosen layers for identity modules and restores
them on exit; layer positions do not move, so per-position config (``layer_types``) stays right.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence

from torch import nn

from simdiff.model.checks import check_config_consistent
from simdiff.model.config_keys import (
    CONFIG_KEYS,
    LEADING_LAYER_COUNTS,
    check_config_sliceable,
    per_layer_action,
)
from simdiff.model.layers import find_decoder_layers, num_layers_in_config, validate_layer_indices

log = logging.getLogger(__name__)


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


def update_config_for_kept_layers(config, kept: list[int], sliced: Collection[str] = ()) -> list[str]:
    """Make ``config`` describe only the ``kept`` layers (original indices); returns the keys changed.

    ``sliced``: further keys holding one entry per layer (``--slice-config-key``); see :data:`CONFIG_KEYS`."""
    check_config_sliceable(config, sliced)
    old_count = num_layers_in_config(config)
    changed = ["num_hidden_layers"]
    _sparse_step_as_index_list(config)
    new_index = {old: new for new, old in enumerate(kept)}
    for key, value in list(vars(config).items()):
        if key.startswith("_"):
            continue
        if key in LEADING_LAYER_COUNTS and isinstance(value, int):
            setattr(config, key, sum(1 for i in kept if i < value))
            changed.append(key)
        elif isinstance(value, (list, tuple)):
            action = per_layer_action(key, len(value), old_count, CONFIG_KEYS, sliced)
            if action == "remap":
                setattr(config, key, type(value)(new_index[i] for i in value if i in new_index))
            elif action == "slice":
                setattr(config, key, type(value)(value[i] for i in kept))
            if action is not None:
                changed.append(key)
    config.num_hidden_layers = len(kept)
    return changed


def renumber_device_map(model: nn.Module, layers_path: str, kept: list[int]) -> None:
    """Keep accelerate's ``hf_device_map`` (``--device-map``) naming the model's modules: entries of removed layers
    dropped, kept layers renamed to their new index. (Each layer keeps its hooks, whose offloaded weights stay
    addressed by the original names.)"""
    device_map = getattr(model, "hf_device_map", None)
    if not isinstance(device_map, dict):
        return
    new_index = {old: new for new, old in enumerate(kept)}
    prefix = layers_path + "."
    renamed = {}
    for name, device in device_map.items():
        index, dot, rest = name.removeprefix(prefix).partition(".")
        if not name.startswith(prefix) or not index.isdigit():
            renamed[name] = device
        elif int(index) in new_index:
            renamed[f"{prefix}{new_index[int(index)]}{dot}{rest}"] = device
    model.hf_device_map = renamed


def remove_layers(model: nn.Module, indices: Sequence[int], sliced: Collection[str] = ()) -> list[int]:
    """Remove decoder layers ``indices`` (original numbering) from ``model`` in place; return the kept ones.

    ``sliced``: config keys beyond :data:`CONFIG_KEYS` that hold one entry per layer (``--slice-config-key``).

    The model is modified in place (load a fresh copy if you need the dense one too); its on-disk
    checkpoint is never touched.
    """
    decoder = find_decoder_layers(model)
    removed = validate_layer_indices(indices, len(decoder))
    check_config_sliceable(model.config, sliced)  # before the model is touched
    kept = [i for i in range(len(decoder)) if i not in set(removed)]
    new_layers = nn.ModuleList([decoder.modules[i] for i in kept])
    renumber_layer_indices(new_layers)
    decoder.replace(new_layers)
    renumber_device_map(model, decoder.path, kept)
    changed = update_config_for_kept_layers(model.config, kept, sliced)
    log.info("removed layers %s; config keys updated: %s", removed, ", ".join(changed))
    check_config_consistent(model)
    return kept
