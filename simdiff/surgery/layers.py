"""Remove decoder layers for real, or bypass them temporarily in place.

Removal rebuilds the layer list, renumbers every ``layer_idx`` inside the kept layers, sets the config's
layer count and slices (or remaps) every per-layer config entry, then checks that the config now builds
exactly the pruned model's structure. Bypassing swaps chosen layers for identity modules and restores
them on exit; layer positions do not move, so per-position config (``layer_types``) stays right.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from simdiff.model.checks import _structure, check_config_consistent  # noqa: F401  (re-exported)
from simdiff.model.layers import (  # noqa: F401  (re-exported)
    SkippedLayer,
    bypass_layers,
    find_decoder_layers,
    num_layers_in_config,
    validate_layer_indices,
)

log = logging.getLogger(__name__)

# Config lists that are never per-layer even if their length happens to equal the layer count.
NOT_PER_LAYER = {"architectures", "eos_token_id", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens"}
# Config lists holding layer *indices* (remapped to the new numbering, dropping removed layers).
LAYER_INDEX_LISTS = ("mlp_only_layers",)
# Config integers counting the first k layers of a special kind (recounted over the kept layers).
LEADING_LAYER_COUNTS = ("first_k_dense_replace",)


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
