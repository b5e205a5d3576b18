"""Prune a GGUF file itself: the layers removed from the model are removed from the file llama.cpp runs.

The file is read with ``gguf.GGUFReader`` and written with ``gguf.GGUFWriter`` (no GGUF parsing here):

- the removed blocks' tensors (``blk.N.*``) are dropped and the kept blocks renumbered 0..n-1;
- every kept tensor is copied byte for byte (same quantization type, same raw data, same shape);
- ``<arch>.block_count`` is set, every per-layer metadata array (length = block count) is sliced, and
  ``<arch>.leading_dense_block_count`` is recounted over the kept blocks;
- all other metadata (tokenizer, chat template, licence, ...) is copied unchanged.

Architectures whose metadata places layers by position (a period, "the last N layers", ...) cannot be
sliced and are refused: :data:`POSITIONAL_KEYS`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from simdiff.errors import SimdiffError
from simdiff.outputs import atomic_file, check_output_file
from simdiff.surgery import validate_layer_indices

if TYPE_CHECKING:
    from simdiff.apply import RemovalRecord

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
# Integers counting the first k blocks of a kind: recounted over the kept blocks (as in simdiff.surgery).
LEADING_BLOCK_COUNTS = ("{arch}.leading_dense_block_count",)
# Arrays that are never per-layer, even when their length happens to equal the block count.
NOT_PER_LAYER_PREFIXES = ("general.", "tokenizer.", "split.", "clip.", "GGUF.")
NOT_PER_LAYER = ("{arch}.rope.dimension_sections", "{arch}.classifier.output_labels")


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


def check_prunable(reader) -> int:
    """Refuse files whose layers cannot be removed by dropping ``blk.N`` tensors; return the block count."""
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


def is_per_layer(key: str, field, arch: str, count: int) -> bool:
    """An array with one entry per block (head counts, feed-forward sizes, SWA flags of each layer, ...)."""
    if key.startswith(NOT_PER_LAYER_PREFIXES) or key in {k.format(arch=arch) for k in NOT_PER_LAYER}:
        return False
    return _is_array(field) and len(field.data) == count


def pruned_metadata(reader, kept: list[int]) -> list[tuple[str, object, object, object]]:
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
        elif is_per_layer(key, field, arch, count):
            value = [value[i] for i in kept]
            log.debug("sliced per-layer metadata %s", key)
        sub_type = field.types[-1] if _is_array(field) else None
        out.append((key, value, field.types[0], sub_type))
    return out


@dataclass(frozen=True)
class ReplacedTensor:
    """A tensor written with new raw data in its original type (a healed weight, :mod:`simdiff.heal`)."""

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


def check_gguf_output(out: str | os.PathLike, overwrite: bool, src: str | os.PathLike) -> Path:
    """Validate the output file before any work (simdiff.outputs: a .gguf name, never over the input)."""
    return check_output_file(out, overwrite, inputs=(src,), suffixes=GGUF_SUFFIXES, flag="--out")


def prune_gguf(src: str | os.PathLike, removed: Sequence[int] | None, out: str | os.PathLike,
               overwrite: bool = False, recipe: RemovalRecord | None = None,
               replaced: dict[str, object] | None = None) -> GGUFPruneResult:
    """Write a copy of the GGUF file ``src`` without the decoder blocks ``removed`` (original numbering) to ``out``.

    ``recipe`` (a prune's ``simdiff.json``, :func:`simdiff.apply.load_removal_record`) supplies ``removed`` when it is
    None, and is refused when it was made on a model of another depth. Kept tensors are byte-identical to the
    input's, except those in ``replaced`` (input name -> new raw data in the tensor's own type: the weights
    ``--heal linear`` changed); ``out`` appears by one rename when complete (simdiff.outputs); ``src`` is only read.
    """
    src = Path(src).expanduser()
    check_gguf_output(out, overwrite, src)
    reader = open_gguf(src)
    count = check_prunable(reader)
    if recipe is not None:
        if recipe.num_layers_before != count:
            made_on = f" ({recipe.base_model})" if recipe.base_model else ""
            raise SimdiffError(f"the recipe was made on a model of {recipe.num_layers_before} layers{made_on}; "
                               f"{str(src)!r} has {count} blocks")
        removed = recipe.removed_layers if removed is None else removed
    if removed is None:
        raise SimdiffError("give the layers to remove: --layers 3,12,13 or --recipe simdiff.json")
    removed = validate_layer_indices(removed, count)
    kept = [i for i in range(count) if i not in removed]
    metadata = pruned_metadata(reader, kept)
    tensors = [(name, ReplacedTensor(replaced[t.name], t.tensor_type) if replaced and t.name in replaced else t)
               for name, t in renamed_tensors(reader, kept)]
    removed_bytes = sum(t.n_bytes for t in reader.tensors
                        if (m := BLOCK_TENSOR.match(t.name)) and int(m.group(1)) not in kept)
    with atomic_file(out, overwrite, inputs=(src,), suffixes=GGUF_SUFFIXES, flag="--out") as tmp:
        write_gguf(reader, metadata, tensors, tmp)
    out = Path(out).expanduser()
    log.info("wrote %s: %d of %d blocks", out, len(kept), count)
    return GGUFPruneResult(out, count, kept, removed, removed_bytes, src.stat().st_size, out.stat().st_size)
