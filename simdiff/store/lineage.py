"""Provenance across pruning rounds: layer indices in the original model's numbering, and each round's history.

Pruning a simdiff output (or a recovered one) composes the maps: ``removed_layers``, ``kept_layers`` and
``layer_map`` of the new ``simdiff.json`` always refer to the layers of the model that was first pruned.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from simdiff.core.errors import SimdiffError
from simdiff.core.outputs import MARKER

log = logging.getLogger(__name__)


def input_metadata(model_name: str) -> dict:
    """The input model's ``simdiff.json`` (e.g. from ``simdiff prune``), or an empty dict."""
    from simdiff.model.load import resolve_model_path

    try:
        path = Path(resolve_model_path(model_name)) / MARKER
    except SimdiffError:
        return {}
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    return document if isinstance(document, dict) else {}


def original_numbering(previous: dict, num_layers: int) -> list[int] | None:
    """Original index of each of the input's ``num_layers`` layers, from its ``layer_map`` (None: not pruned)."""
    layer_map = previous.get("layer_map")
    if not layer_map:
        return None
    try:
        numbering = [int(layer_map[str(i)]) for i in range(num_layers)]
    except (KeyError, TypeError, ValueError):
        numbering = None
    if numbering is None or len(layer_map) != num_layers:
        log.warning("the input's %s layer_map does not describe its %d layers; numbering restarts here",
                    MARKER, num_layers)
        return None
    return numbering


def _first_round(previous: dict) -> list[dict]:
    """History of an input pruned by a simdiff version that wrote no ``history``: its one recorded round."""
    if "removed_layers" not in previous:
        return []
    return [{"model": previous.get("base_model"), "criterion": previous.get("criterion"),
             "removed_layers": previous["removed_layers"], "removed_layers_original": previous["removed_layers"],
             "num_layers_before": previous.get("num_layers_before"),
             "num_layers_after": previous.get("num_layers_after"), "command": previous.get("command"),
             "created": previous.get("created")}]


def compose_rounds(previous: dict, model_name: str, criterion: str, removed: list[int], kept: list[int],
                   num_layers: int, command: str, created: str) -> dict:
    """The layer bookkeeping of ``simdiff.json`` after removing ``removed`` (input numbering) from the input.

    ``previous`` is the input's ``simdiff.json`` (empty for a model never pruned by simdiff).
    """
    numbering = original_numbering(previous, num_layers)
    earlier = (previous.get("history") or _first_round(previous)) if numbering is not None else []
    if numbering is None:
        numbering, previous = list(range(num_layers)), {}
    original_total = int(previous.get("num_layers_original", previous.get("num_layers_before", num_layers)))
    kept_original = [numbering[i] for i in kept]
    this_round = {"model": model_name, "criterion": criterion, "removed_layers": list(removed),
                  "removed_layers_original": [numbering[i] for i in removed], "num_layers_before": num_layers,
                  "num_layers_after": len(kept), "command": command, "created": created}
    return {
        "removed_layers": [i for i in range(original_total) if i not in set(kept_original)],
        "kept_layers": kept_original,
        "layer_map": {str(new): old for new, old in enumerate(kept_original)},
        "original_model": previous.get("original_model", previous.get("base_model", model_name)),
        "num_layers_original": original_total,
        "history": [*earlier, this_round],
    }
