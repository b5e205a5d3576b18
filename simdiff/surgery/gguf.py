"""Prune a GGUF file itself: the layers removed from the model are removed from the file llama.cpp runs.

The file is read with ``gguf.GGUFReader`` and written with ``gguf.GGUFWriter`` (no GGUF parsing here):

- the removed blocks' tensors (``blk.N.*``) are dropped and the kept blocks renumbered 0..n-1;
- every kept tensor is copied byte for byte (same quantization type, same raw data, same shape);
- ``<arch>.block_count`` is set, the per-layer metadata arrays (by name: :data:`simdiff.surgery.layers.GGUF_KEYS`, the
  one definition shared with the safetensors path, plus keys named by ``--slice-config-key``) are sliced, and
  ``<arch>.leading_dense_block_count`` is recounted over the kept blocks; any other array with one entry per
  block is refused (it may be per-layer);
- all other metadata (tokenizer, chat template, licence, ...) is copied unchanged.

Architectures whose metadata places layers by position (a period, "the last N layers", ...) cannot be
sliced and are refused: :data:`POSITIONAL_KEYS`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from simdiff.core.errors import SimdiffError
from simdiff.core.outputs import atomic_file, check_output_file
from simdiff.model.config_keys import GGUF_KEYS, per_layer_action
from simdiff.model.layers import validate_layer_indices

if TYPE_CHECKING:
    from simdiff.surgery.apply import RemovalRecord

log = logging.getLogger(__name__)

BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")
GGUF_SUFFIXES = (".gguf",)

# Metadata that places layers by position. Each key is refused when its value is above the threshold (a value at
# or below it means "every layer alike", which survives removal). {arch} is the file's architecture.
POSITIONAL_KEYS: dict[str, tuple[int, str]] = {
    "{arch}.attention.sliding_window_pattern": (1, "every n-th layer uses full attention"),
    "{arch}.moe_every_n_layers": (1, "every n-th layer is a mixture of experts"),
    "{arch}.interleave_moe_layer_step": (1, "every n-th layer is a mixture of experts"),
    "{arch}.full_attention_interval": (1, "every n-th layer uses full attention"),
    "{arch}.rescale_every_n_layers": (0, "activations are rescaled every n layers"),
    "{arch}.attention.shared_kv_layers": (0, "the last n layers reuse earlier layers' KV cache"),
    "{arch}.nextn_predict_layers": (0, "the last n blocks are multi-token-prediction layers"),
    "{arch}.n_deepstack_layers": (0, "the first n layers receive visual deepstack features"),
    "{arch}.embedding_length_per_layer_input": (0, "one tensor holds per-layer embeddings of every layer"),
    "{arch}.decoder_block_count": (-1, "an encoder-decoder model: block_count is not the decoder's"),
}
# Integers counting the first k blocks of a kind: recounted over the kept blocks (as in simdiff.surgery.layers).
LEADING_BLOCK_COUNTS = ("{arch}.leading_dense_block_count",)


@dataclass(frozen=True)
class GGUFPruneResult:
    """What :func:`prune_gguf` wrote: the kept blocks (original numbering) and the sizes in bytes."""

    out: Path
    block_count_before: int
    kept: list[int]
    removed: list[int]
    removed_tensor_bytes: int
    size_before: int
    size_after: int


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` on ``path``, or one clear error line if it is not a readable GGUF file."""
    import gguf

    path = Path(path).expanduser()
    if not path.is_file():
        raise SimdiffError(f"GGUF file {str(path)!r} not found")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise SimdiffError(f"{str(path)!r} is not a readable GGUF file: {exc}") from exc


def architecture(reader) -> str:
    field = reader.get_field("general.architecture")
    if field is None:
        raise SimdiffError("the GGUF file has no general.architecture; it is not a model file")
    return field.contents()


def block_count(reader) -> int:
    """``<arch>.block_count``: the number of decoder blocks in the file."""
    key = f"{architecture(reader)}.block_count"
    field = reader.get_field(key)
    if field is None:
        raise SimdiffError(f"the GGUF file has no {key}; simdiff prunes files whose layers are blk.N tensors")
    return int(field.contents())


def check_prunable(reader, sliced: Collection[str] = ()) -> int:
    """Refuse files whose layers cannot be removed by dropping ``blk.N`` tensors, or that hold an array of one
    entry per block that is not known as per-layer nor named in ``sliced``; return the block count."""
    arch = architecture(reader)
    count = block_count(reader)
    split = reader.get_field("split.count")
    if split is not None and int(split.contents()) > 1:
        raise SimdiffError("the GGUF file is one shard of a split model; merge it first with llama-gguf-split --merge")
    for template, (threshold, meaning) in POSITIONAL_KEYS.items():
        key = template.format(arch=arch)
        field = reader.get_field(key)
        if field is None or _is_array(field):
            continue  # absent, or a per-layer array (sliced like the others)
        value = field.contents()
        if isinstance(value, (int, float)) and value > threshold:
            raise SimdiffError(f"cannot prune this {arch} GGUF file: {key} = {value} ({meaning}), which does not "
                               "survive removing layers; prune the safetensors checkpoint instead")
    blocks = {int(m.group(1)) for t in reader.tensors if (m := BLOCK_TENSOR.match(t.name))}
    if blocks != set(range(count)):
        extra = sorted(blocks - set(range(count)))[:5]
        missing = sorted(set(range(count)) - blocks)[:5]
        raise SimdiffError(f"the GGUF file's blk.N tensors do not match {arch}.block_count = {count} "
                           f"(extra blocks {extra}, missing blocks {missing})")
    for key, field in reader.fields.items():
        is_per_layer(key, field, arch, count, sliced)  # refuses an unknown array of one entry per block
    return count


def _is_array(field) -> bool:
    import gguf

    return field.types[0] == gguf.GGUFValueType.ARRAY


def _field_value(field):
    """The field's value as the writer takes it; strings as their raw bytes, so they are copied exactly."""
    import gguf

    if field.types[-1] == gguf.GGUFValueType.STRING:
        values = [field.parts[i].tobytes() for i in field.data]
        return values if _is_array(field) else values[0]
    return field.contents()


def is_per_layer(key: str, field, arch: str, count: int, sliced: Collection[str] = ()) -> bool:
    """An array with one entry per block, by name (head counts, feed-forward sizes, SWA flags of each layer, ...;
    :data:`simdiff.surgery.layers.GGUF_KEYS`) or named in ``sliced`` (the full key, or without its ``<arch>.``)."""
    if not _is_array(field):
        return False
    named = {*sliced, *(f"{arch}.{k}" for k in sliced)}
    return per_layer_action(key, len(field.data), count, GGUF_KEYS, named, arch, "GGUF metadata") == "slice"


def pruned_metadata(reader, kept: list[int], sliced: Collection[str] = ()) -> list[tuple[str, object, object, object]]:
    """``(key, value, type, sub_type)`` of every field for the pruned file, in the original order."""
    arch = architecture(reader)
    count = block_count(reader)
    leading = {k.format(arch=arch) for k in LEADING_BLOCK_COUNTS}
    out = []
    for key, field in reader.fields.items():
        if key == "general.architecture" or key.startswith("GGUF."):
            continue  # the writer writes these itself
        value = _field_value(field)
        if key == f"{arch}.block_count":
            value = len(kept)
        elif key in leading:
            value = sum(1 for i in kept if i < value)
        elif is_per_layer(key, field, arch, count, sliced):
            value = [value[i] for i in kept]
            log.debug("sliced per-layer metadata %s", key)
        sub_type = field.types[-1] if _is_array(field) else None
        out.append((key, value, field.types[0], sub_type))
    return out


@dataclass(frozen=True)
class ReplacedTensor:
    """A tensor written with new raw data in its original type (a healed weight, :mod:`simdiff.surgery.heal`)."""

    data: object
    tensor_type: object


def renamed_tensors(reader, kept: list[int]) -> list[tuple[str, object]]:
    """``(new name, reader tensor)`` for every kept tensor, in the original order, blocks renumbered."""
    new_index = {old: new for new, old in enumerate(kept)}
    out = []
    for tensor in reader.tensors:
        match = BLOCK_TENSOR.match(tensor.name)
        if match is None:
            out.append((tensor.name, tensor))
        elif int(match.group(1)) in new_index:
            out.append((f"blk.{new_index[int(match.group(1))]}.{match.group(2)}", tensor))
    return out


def write_gguf(reader, metadata: list[tuple], tensors: list[tuple[str, object]], path: Path) -> None:
    """Write ``metadata`` and ``tensors`` (raw bytes, quantization kept) to a new GGUF file at ``path``."""
    import gguf

    writer = gguf.GGUFWriter(path, arch=architecture(reader), endianess=reader.endianess)
    alignment = reader.get_field("general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    for key, value, vtype, sub_type in metadata:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for name, tensor in tensors:
        writer.add_tensor_info(name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, tensor in tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()


# HF model_type -> llama.cpp architecture where they differ beyond "_"/"-" (convert_hf_to_gguf.py writes Mistral
# and Mixtral as llama; transformers' GGUF loader maps the rest the same way).
GGUF_ARCHITECTURE_OF = {"mistral": "llama", "mixtral": "llama", "cohere": "commandr", "phi": "phi2",
                        "gemma3_text": "gemma3", "gemma4_text": "gemma4"}


def _arch_key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def check_recipe_architecture(recipe: RemovalRecord, arch: str, src: Path) -> None:
    """Refuse a recipe made on a model of another architecture than the GGUF file's ``general.architecture``
    (a recipe without ``model_type`` is checked on depth only)."""
    if recipe.model_type is None:
        return
    expected = GGUF_ARCHITECTURE_OF.get(recipe.model_type, recipe.model_type)
    if _arch_key(expected) != _arch_key(arch) and _arch_key(recipe.model_type) != _arch_key(arch):
        made_on = f" (made on {recipe.base_model})" if recipe.base_model else ""
        raise SimdiffError(f"the recipe does not match {str(src)!r}{made_on}: it records model_type "
                           f"{recipe.model_type!r}, the GGUF file's architecture is {arch!r}")


def check_gguf_output(out: str | os.PathLike, overwrite: bool, src: str | os.PathLike) -> Path:
    """Validate the output file before any work (simdiff.core.outputs: a .gguf name, never over the input)."""
    return check_output_file(out, overwrite, inputs=(src,), suffixes=GGUF_SUFFIXES, flag="--out")


def prune_gguf(src: str | os.PathLike, removed: Sequence[int] | None, out: str | os.PathLike,
               overwrite: bool = False, recipe: RemovalRecord | None = None,
               sliced: Collection[str] = (), replaced: dict[str, object] | None = None) -> GGUFPruneResult:
    """Write a copy of the GGUF file ``src`` without the decoder blocks ``removed`` (original numbering) to ``out``.

    ``recipe`` (a prune's ``simdiff.json``, :func:`simdiff.surgery.apply.load_removal_record`) supplies ``removed`` when it is
    None, and is refused when it was made on a model of another depth. Kept tensors are byte-identical to the
    input's, except those in ``replaced`` (input name -> new raw data in the tensor's own type: the weights
    ``--heal linear`` changed); ``out`` appears by one rename when complete (simdiff.core.outputs); ``src`` is only
    read. ``sliced``: metadata arrays beyond :data:`simdiff.model.config_keys.GGUF_KEYS` holding one entry per
    block (``--slice-config-key``).
    """
    src = Path(src).expanduser()
    check_gguf_output(out, overwrite, src)
    with atomic_file(out, overwrite, inputs=(src,), suffixes=GGUF_SUFFIXES, flag="--out") as tmp:
        result = write_pruned_gguf(src, removed, tmp, recipe, sliced, replaced)
    out = Path(out).expanduser()
    return replace(result, out=out)


def write_pruned_gguf(src: str | os.PathLike, removed: Sequence[int] | None, path: Path,
                      recipe: RemovalRecord | None = None, sliced: Collection[str] = (),
                      replaced: dict[str, object] | None = None) -> GGUFPruneResult:
    """:func:`prune_gguf` into ``path`` itself: the caller stages it (:mod:`simdiff.core.outputs`)."""
    src = Path(src).expanduser()
    reader = open_gguf(src)
    count = check_prunable(reader, sliced)
    if recipe is not None:
        check_recipe_architecture(recipe, architecture(reader), src)
        recipe_layers = recipe.for_depth(count, repr(str(src)))
        removed = recipe_layers if removed is None else removed
    if removed is None:
        raise SimdiffError("give the layers to remove: --layers 3,12,13 or --recipe simdiff.json")
    removed = validate_layer_indices(removed, count)
    kept = [i for i in range(count) if i not in removed]
    metadata = pruned_metadata(reader, kept, sliced)
    tensors = [(name, ReplacedTensor(replaced[t.name], t.tensor_type) if replaced and t.name in replaced else t)
               for name, t in renamed_tensors(reader, kept)]
    removed_bytes = sum(t.n_bytes for t in reader.tensors
                        if (m := BLOCK_TENSOR.match(t.name)) and int(m.group(1)) not in kept)
    write_gguf(reader, metadata, tensors, path)
    log.info("wrote %s: %d of %d blocks", path, len(kept), count)
    return GGUFPruneResult(path, count, kept, removed, removed_bytes, src.stat().st_size, path.stat().st_size)
