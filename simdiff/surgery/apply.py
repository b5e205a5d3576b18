"""Surgery on disk: remove decoder layers from a checkpoint without loading its weights.

``apply_to_path`` is the one entry point (it dispatches on the input's kind). For a safetensors checkpoint
it reads the shards one at a time, drops the removed layers' tensors, renumbers the rest (``<layers>.<i>.``
in tensor names, where ``<layers>`` is the decoder-layer path found on a meta-device skeleton of the
model), and writes one output shard per input shard with the kept tensors' bytes unchanged. The config
goes through the same rules as in-memory surgery (:func:`simdiff.surgery.layers.remove_layers` on the skeleton,
with its consistency check). Peak memory is about the largest shard.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from simdiff.core.errors import SimdiffError
from simdiff.core.outputs import claim_output_dir
from simdiff.core.progress import progress
from simdiff.model.checks import (
    PYTORCH_INDEX,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    check_weights_match,
    checkpoint_shapes,
    meta_model,
)
from simdiff.model.layers import find_decoder_layers, validate_layer_indices
from simdiff.store.card import drop_stale_config_name, write_model_card
from simdiff.store.lineage import compose_rounds, input_metadata
from simdiff.store.save import METADATA_FILE, provenance
from simdiff.surgery.layers import remove_layers

log = logging.getLogger(__name__)

# Top-level files that are not copied: weights (any format) and what apply writes itself.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
REWRITTEN = {"config.json", SAFETENSORS_INDEX, PYTORCH_INDEX, METADATA_FILE, "README.md"}


@dataclass(frozen=True)
class RemovalRecord:
    """The layer selection of a ``simdiff.json`` written by ``prune`` (or ``apply``), and what it was made on."""

    removed_layers: list[int]
    num_layers_before: int
    base_model: str | None = None
    model_type: str | None = None
    architectures: list[str] | None = None
    criterion: str | None = None
    # a multi-round recipe: every round's removals in the original model's numbering, and that model's depth
    removed_original: list[int] | None = None
    num_layers_original: int | None = None
    heal: str = "none"  # a healed prune (--heal linear): apply cannot reproduce its weights

    def for_depth(self, num_layers: int, model: str) -> list[int]:
        """The layers to remove from a model of ``num_layers`` layers: the last round's (the model is that
        round's input) or, for a multi-round recipe on the original model, every round's composed removal."""
        if num_layers == self.num_layers_before:
            return self.removed_layers
        if num_layers == self.num_layers_original:
            log.info("the recipe records several rounds; %s has the original %d layers, so every round's "
                     "removal is applied at once: %s", model, num_layers, self.removed_original)
            return self.removed_original
        depths = f"{self.num_layers_before} layers"
        if self.num_layers_original is not None:
            depths += f" (its last round's input; the original model had {self.num_layers_original})"
        made_on = f" (made on {self.base_model})" if self.base_model else ""
        raise SimdiffError(f"the recipe does not match {model}{made_on}: it records {depths}, the model has "
                           f"{num_layers}")




def load_removal_record(path: str | os.PathLike) -> RemovalRecord:
    """Read the selection recorded in a ``simdiff.json``."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / METADATA_FILE
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SimdiffError(f"recipe {str(file)!r} not found; pass the simdiff.json written by prune") from None
    except json.JSONDecodeError as exc:
        raise SimdiffError(f"recipe {str(file)!r} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(document, dict):
        raise SimdiffError(f"recipe {str(file)!r} is not a JSON object; pass the simdiff.json written by prune")
    missing = [key for key in ("removed_layers", "num_layers_before") if key not in document]
    if missing:
        raise SimdiffError(f"recipe {str(file)!r} lacks {', '.join(missing)}; pass the simdiff.json written by prune")
    history = document.get("history") or [{}]
    try:
        before, original = int(document["num_layers_before"]), document.get("num_layers_original")
        several_rounds = len(history) > 1 and original is not None and int(original) > before
        return RemovalRecord(
            # the last round's layers in its input's numbering (removed_layers: every round, original numbering)
            removed_layers=[int(i) for i in history[-1].get("removed_layers", document["removed_layers"])],
            num_layers_before=before,
            base_model=document.get("base_model"),
            model_type=document.get("model_type"),
            architectures=document.get("architectures"),
            criterion=document.get("criterion"),
            removed_original=[int(i) for i in document["removed_layers"]] if several_rounds else None,
            num_layers_original=int(original) if several_rounds else None,
            heal=(document.get("heal") or {}).get("method", "none"),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise SimdiffError(f"recipe {str(file)!r} has malformed layer fields ({exc}); pass the simdiff.json "
                           "written by prune") from None


def check_recipe_matches(recipe: RemovalRecord, config, model: str) -> list[int]:
    """The recipe's layers to remove from ``model`` (:meth:`RemovalRecord.for_depth`); refuse a recipe made on a
    model of another depth, type or architecture."""
    problems = []
    if recipe.model_type is not None and recipe.model_type != config.model_type:
        problems.append(f"model_type {recipe.model_type!r}, the model is {config.model_type!r}")
    architectures = getattr(config, "architectures", None)
    if recipe.architectures is not None and architectures is not None and recipe.architectures != architectures:
        problems.append(f"architectures {recipe.architectures}, the model has {architectures}")
    if problems:
        made_on = f" (made on {recipe.base_model})" if recipe.base_model else ""
        raise SimdiffError(f"the recipe does not match {model}{made_on}: it records {'; '.join(problems)}")
    return recipe.for_depth(config.num_hidden_layers, model)


# -- the plan: which tensors go where under which name ---------------------------------------------------
def input_shards(folder: Path) -> list[str]:
    """The safetensors shard file names of a checkpoint folder, in order."""
    from simdiff.store.verify import safetensors_files

    if not any((folder / name).is_file() for name in (SAFETENSORS, SAFETENSORS_INDEX)):
        raise SimdiffError(f"{folder} holds no {SAFETENSORS} or {SAFETENSORS_INDEX}; apply reads safetensors "
                           "checkpoints (re-save the model with save_pretrained, or prune it in memory with "
                           "simdiff prune)")
    return [path.name for path in safetensors_files(folder)]


def layer_name_pattern(names: list[str], layer_path: str, base_prefix: str) -> re.Pattern:
    """The regex ``<path>.(i).(rest)`` matching the decoder-layer tensors in ``names``.

    Some checkpoints store names without the base-model prefix (``h.0.`` for ``transformer.h.0.``).
    """
    candidates = [layer_path]
    if base_prefix and layer_path.startswith(base_prefix + "."):
        candidates.append(layer_path[len(base_prefix) + 1:])
    for path in candidates:
        pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.(.+)$")
        if any(map(pattern.match, names)):
            return pattern
    raise SimdiffError(f"no tensor name in the checkpoint starts with {layer_path}.<i>.; cannot find its layers")


def renamed(name: str, pattern: re.Pattern, new_index: dict[int, int]) -> str | None:
    """The tensor's name in the pruned checkpoint, or None when it belongs to a removed layer."""
    match = pattern.match(name)
    if match is None:
        return name
    old = int(match.group(1))
    if old not in new_index:
        return None
    start, end = match.span(1)
    return f"{name[:start]}{new_index[old]}{name[end:]}"


def shard_names(shards: list[list[str]]) -> list[str]:
    if len(shards) == 1:
        return [SAFETENSORS]
    return [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]


# -- writing -----------------------------------------------------------------------------------------------
def copy_shard(src: Path, dst: Path, names: dict[str, str]) -> tuple[int, int]:
    """Write the tensors ``names`` (old -> new name) of shard ``src`` into ``dst``; return (bytes, parameters)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src, framework="pt") as reader:
        metadata = reader.metadata()
        tensors = {new: reader.get_tensor(old) for old, new in names.items()}
    save_file(tensors, dst, metadata=metadata)
    return sum(t.numel() * t.element_size() for t in tensors.values()), sum(t.numel() for t in tensors.values())


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer files, generation config and the like (top-level files other than weights)."""
    copied = []
    for file in sorted(src.iterdir()):
        if file.is_file() and file.name not in REWRITTEN and not file.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(file, dst / file.name)
            copied.append(file.name)
    return copied


@dataclass
class ApplyResult:
    """What ``apply`` wrote."""

    out: Path
    removed: list[int]
    kept: list[int]
    shards: list[str]
    metadata: dict


def apply_to_path(model: str | os.PathLike, removed: list[int] | None = None, out: str | os.PathLike = "",
                  overwrite: bool = False, recipe: RemovalRecord | None = None,
                  trust_remote_code: bool = False, sliced: list[str] | tuple[str, ...] = ()) -> ApplyResult:
    """Remove decoder layers ``removed`` (or the recipe's) from the checkpoint ``model`` on disk into ``out``.

    ``trust_remote_code``: the model's own Python code (``auto_map`` in config.json) builds its skeleton.
    ``sliced``: config keys beyond the known per-layer ones holding one entry per layer (``--slice-config-key``).
    Every written tensor is read back and compared with its source before the output is committed.
    """
    if Path(model).suffix.lower() == ".gguf":
        raise SimdiffError(f"{model}: apply_to_path reads safetensors checkpoints; for a GGUF file use "
                           "simdiff.surgery.gguf.prune_gguf (or `simdiff apply FILE.gguf`)")
    return apply_to_safetensors(str(model), removed, out, overwrite, recipe, trust_remote_code, sliced)


def apply_to_safetensors(model: str, removed: list[int] | None, out: str | os.PathLike, overwrite: bool,
                         recipe: RemovalRecord | None, trust_remote_code: bool = False,
                         sliced: list[str] | tuple[str, ...] = ()) -> ApplyResult:
    from simdiff.model.load import _load_config, resolve_model_path

    folder = Path(resolve_model_path(model))
    if not folder.is_dir():
        raise SimdiffError(f"{model!r} is not a local checkpoint; apply needs one (download it first, e.g. "
                           f"`hf download {model} --local-dir DIR`)")
    with claim_output_dir(out, overwrite, inputs=[model]) as claim:  # validated and claimed before work
        config = _load_config(model, str(folder), {"trust_remote_code": trust_remote_code})
        if recipe is not None:
            recipe_layers = check_recipe_matches(recipe, config, model)
            removed = recipe_layers if removed is None else removed
        if removed is None:
            raise SimdiffError("give the layers to remove: --layers 3,12,13 or --recipe simdiff.json")
        removed = validate_layer_indices(removed, config.num_hidden_layers)
        shard_files = input_shards(folder)
        pruned = meta_model(config, trust_remote_code)
        check_weights_match(pruned, checkpoint_shapes(folder), str(folder))  # the weights are what the config says
        total = len(find_decoder_layers(pruned))
        layer_path = find_decoder_layers(pruned).path
        kept = remove_layers(pruned, removed, sliced)  # the in-memory rules for the config, checked on the meta device
        kept_shards = plan_shards(folder, shard_files, layer_path, pruned.base_model_prefix, kept)
        metadata = apply_metadata(model, removed, kept, total, pruned.config, recipe)
        with claim.staging() as tmp:
            outputs = write_shards(folder, kept_shards, tmp)
            copy_side_files(folder, tmp)
            pruned.config.save_pretrained(tmp)
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
            write_model_card(tmp, metadata)
            drop_stale_config_name(tmp)
            check_written_shards(folder, kept_shards, tmp)
    log.info("wrote %s (%d shards)", claim.path, len(outputs))
    return ApplyResult(claim.path, removed, kept, outputs, metadata)


def check_written_shards(folder: Path, kept_shards: list[tuple[str, dict[str, str]]], tmp: Path) -> None:
    """Read back every tensor written to ``tmp`` (one at a time, :func:`simdiff.store.verify.written_tensors`) and
    compare it with its source tensor: the planned names only, each once, same dtype, shape and bytes."""
    from safetensors import safe_open

    from simdiff.store.verify import same_bytes, written_tensors

    source = {new: (src, old) for src, names in kept_shards for old, new in names.items()}
    seen: set[str] = set()
    for name, actual in written_tensors(tmp):
        if name not in source or name in seen:
            raise SimdiffError(f"the written checkpoint holds {name!r} {'twice' if name in seen else 'unplanned'}; "
                               "nothing was saved")
        src, old = source[name]
        with safe_open(str(folder / src), framework="pt") as reader:
            want = reader.get_tensor(old)
        if actual.dtype != want.dtype or actual.shape != want.shape or not same_bytes(actual, want):
            raise SimdiffError(f"written tensor {name!r} differs from {old!r} of {src} when read back; nothing was "
                               "saved (check the disk)")
        seen.add(name)
    missing = sorted(set(source) - seen)
    if missing:
        raise SimdiffError(f"the written checkpoint lacks {len(missing)} planned tensors, e.g. {missing[0]!r}; "
                           "nothing was saved")


def write_shards(folder: Path, kept_shards: list[tuple[str, dict[str, str]]], tmp: Path) -> list[str]:
    """Write the planned shards (and their index when there are several) into ``tmp``; return their names."""
    outputs = shard_names([names for _, names in kept_shards])
    weight_map, total_size, total_parameters = {}, 0, 0
    for (src, names), dst in progress(list(zip(kept_shards, outputs)), desc="writing shards"):
        size, parameters = copy_shard(folder / src, tmp / dst, names)
        total_size, total_parameters = total_size + size, total_parameters + parameters
        weight_map.update(dict.fromkeys(names.values(), dst))
    if len(outputs) > 1:
        write_index(tmp, folder, weight_map, total_size, total_parameters)
    return outputs


def plan_shards(folder: Path, shard_files: list[str], layer_path: str, base_prefix: str,
                kept: list[int]) -> list[tuple[str, dict[str, str]]]:
    """Per input shard that keeps any tensor: (file, {old name: new name}) of the tensors it keeps."""
    names_by_shard = shard_tensor_names(folder, shard_files)
    pattern = layer_name_pattern([n for names in names_by_shard for n in names], layer_path, base_prefix)
    new_index = {old: new for new, old in enumerate(kept)}
    plan = [{old: new for old in names if (new := renamed(old, pattern, new_index)) is not None}
            for names in names_by_shard]
    return [(src, names) for src, names in zip(shard_files, plan) if names]


def shard_tensor_names(folder: Path, shard_files: list[str]) -> list[list[str]]:
    from safetensors import safe_open

    names = []
    for file in shard_files:
        with safe_open(folder / file, framework="pt") as reader:
            names.append(list(reader.keys()))
    return names


def write_index(tmp: Path, folder: Path, weight_map: dict[str, str], total_size: int, total_parameters: int) -> None:
    """``model.safetensors.index.json`` for the written shards (the input's metadata, sizes updated)."""
    source = folder / SAFETENSORS_INDEX
    metadata = json.loads(source.read_text(encoding="utf-8")).get("metadata", {}) if source.is_file() else {}
    metadata = {**metadata, "total_size": total_size, "total_parameters": total_parameters}
    document = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / SAFETENSORS_INDEX).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def apply_metadata(model: str, removed: list[int], kept: list[int], total: int, config,
                   recipe: RemovalRecord | None) -> dict:
    """The ``simdiff.json`` of an applied selection (itself a recipe for ``apply --recipe``).

    As for ``prune``, layer indices are in the original model's numbering when the input is itself a simdiff
    output (:mod:`simdiff.store.lineage`); ``history[-1].removed_layers`` indexes the input's layers.
    """
    criterion = recipe.criterion if recipe is not None else "manual"
    run = provenance()
    lineage = compose_rounds(input_metadata(model), model, criterion, removed, kept, total, run["command"],
                             run["created"])
    return {
        "removed_layers": lineage.pop("removed_layers"),
        "kept_layers": lineage.pop("kept_layers"),
        "criterion": criterion,
        "layer_map": lineage.pop("layer_map"),
        "base_model": model,
        "num_layers_before": total,
        "num_layers_after": len(kept),
        **lineage,
        "model_type": config.model_type,
        "architectures": getattr(config, "architectures", None),
        "applied_on_disk": True,
        **run,
    }
