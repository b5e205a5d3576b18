"""Command-line glue for GGUF: ``simdiff apply FILE.gguf`` and ``simdiff prune ... --export gguf``."""

from __future__ import annotations

import argparse
from pathlib import Path

from simdiff.errors import SimdiffError

GGUF_EXPORT_NAME = "pruned.gguf"  # written into prune's output folder by --export gguf


def is_gguf(model: str) -> bool:
    return Path(model).suffix.lower() == ".gguf"


def run_apply_gguf(args: argparse.Namespace) -> None:
    """``simdiff apply FILE.gguf``: prune the GGUF file by ``--layers`` or ``--recipe`` into the file ``--out``."""
    from simdiff.apply import load_removal_record
    from simdiff.export.gguf import check_gguf_output, prune_gguf

    check_gguf_output(args.out, args.overwrite, args.model)
    recipe = load_removal_record(args.recipe) if args.recipe else None
    result = prune_gguf(args.model, args.layers, args.out, overwrite=args.overwrite, recipe=recipe)
    print(f"removed blocks {result.removed} ({result.block_count_before} -> {len(result.kept)} blocks) "
          "from the GGUF file")
    print(f"saved to {result.out}: {megabytes(result.size_before)} -> {megabytes(result.size_after)} "
          f"(removed tensors: {megabytes(result.removed_tensor_bytes)}; kept tensors byte-identical)")


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


# -- simdiff prune ... --export gguf ------------------------------------------------------------------
def check_export(model: str, export: str | None, heal: str = "none") -> Path | None:
    """Before any work: the GGUF file that ``--export gguf`` prunes (None without ``--export``; the flag is
    the recipe field ``export``, :class:`simdiff.recipe.Recipe`)."""
    from simdiff.export.gguf import check_prunable, open_gguf
    from simdiff.model.load import BUILTIN_MODELS, builtin_gguf_file

    if export is None:
        return None
    source = builtin_gguf_file(model)
    if source is None:
        raise SimdiffError(f"--export gguf needs a model that comes as a GGUF file (built-in: "
                           f"{', '.join(BUILTIN_MODELS)}); {model!r} is not one. For a safetensors "
                           "checkpoint, convert the pruned output with llama.cpp's convert_hf_to_gguf.py")
    reader = open_gguf(source)
    check_prunable(reader)
    if heal != "none":
        from simdiff.heal import check_gguf_healable

        check_gguf_healable(reader)
    return source


def export_after_prune(source: Path | None, removed: list[int], out: Path, heal: dict | None = None) -> None:
    """Write ``out/pruned.gguf``: ``source`` without the ``removed`` blocks (nothing when ``source`` is None);
    ``heal`` (simdiff.json's record): the healed tensors are re-quantized from ``out``'s weights."""
    from simdiff.export.gguf import open_gguf, prune_gguf

    if source is None:
        return
    replaced = None
    if heal and heal.get("runs"):
        from simdiff.heal import healed_gguf_tensors

        replaced = healed_gguf_tensors(open_gguf(source), out, heal)
    result = prune_gguf(source, removed, out / GGUF_EXPORT_NAME, replaced=replaced)
    print(f"wrote {result.out}: {megabytes(result.size_before)} -> {megabytes(result.size_after)} "
          f"({len(result.kept)} of {result.block_count_before} blocks; kept tensors byte-identical"
          + (f" except the {len(replaced)} healed ffn_down tensors, re-quantized in their own type)" if replaced
             else ")"))
