"""Command-line glue for GGUF: ``simdiff apply FILE.gguf`` and ``simdiff prune ... --export gguf``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from simdiff.core.errors import SimdiffError

GGUF_EXPORT_NAME = "pruned.gguf"  # written into prune's output folder by --export gguf


def is_gguf(model: str) -> bool:
    return Path(model).suffix.lower() == ".gguf"


def run_apply_gguf(args: argparse.Namespace) -> None:
    """``simdiff apply FILE.gguf``: prune the GGUF file by ``--layers`` or ``--recipe`` into the file ``--out``."""
    from simdiff.surgery.apply import load_removal_record
    from simdiff.surgery.gguf import check_gguf_output, prune_gguf

    check_gguf_output(args.out, args.overwrite, args.model)
    recipe = load_removal_record(args.recipe) if args.recipe else None
    result = prune_gguf(args.model, args.layers, args.out, overwrite=args.overwrite, recipe=recipe,
                        sliced=args.slice_config_key)
    print(f"removed blocks {result.removed} ({result.block_count_before} -> {len(result.kept)} blocks) "
          "from the GGUF file")
    print(f"saved to {result.out}: {megabytes(result.size_before)} -> {megabytes(result.size_after)} "
          f"(removed tensors: {megabytes(result.removed_tensor_bytes)}; kept tensors byte-identical)")


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


# -- simdiff prune ... --export gguf ------------------------------------------------------------------
def check_export(model: str, export: str | None, sliced: list[str] | None = None,
                 heal: str = "none") -> Path | None:
    """Before any work: the GGUF file that ``--export gguf`` prunes (None without ``--export``; the flag is
    the recipe field ``export``, :class:`simdiff.config.recipe.Recipe`)."""
    from simdiff.core.cache import BUILTIN_MODELS, builtin_gguf_file
    from simdiff.surgery.gguf import check_prunable, open_gguf

    if export is None:
        return None
    source = builtin_gguf_file(model)
    if source is None:
        raise SimdiffError(f"--export gguf needs a model that comes as a GGUF file (built-in: "
                           f"{', '.join(BUILTIN_MODELS)}); {model!r} is not one. For a safetensors "
                           "checkpoint, convert the pruned output with llama.cpp's convert_hf_to_gguf.py")
    reader = open_gguf(source)
    check_prunable(reader, sliced or ())
    if heal != "none":
        from simdiff.surgery.heal import check_gguf_healable

        check_gguf_healable(reader)
    return source


def gguf_export(source: Path, removed: list[int], saved: Path, sliced: list[str] | None = None,
                heal: dict | None = None) -> tuple[str, Callable[[Path], None]]:
    """The extra file ``pruned.gguf`` of ``prune --export gguf``: ``source`` without the ``removed`` blocks
    (:func:`simdiff.core.outputs.add_extras` puts it into the saved folder). ``heal`` (simdiff.json's record):
    the healed tensors are re-quantized in their own type from the weights saved in ``saved``."""
    from simdiff.surgery.gguf import open_gguf, write_pruned_gguf

    def write(path: Path) -> None:
        replaced = None
        if heal and heal.get("runs"):
            from simdiff.surgery.heal import healed_gguf_tensors

            replaced = healed_gguf_tensors(open_gguf(source), saved, heal)
        result = write_pruned_gguf(source, removed, path, sliced=sliced or (), replaced=replaced)
        print(f"wrote {GGUF_EXPORT_NAME}: {megabytes(result.size_before)} -> {megabytes(result.size_after)} "
              f"({len(result.kept)} of {result.block_count_before} blocks; kept tensors byte-identical"
              + (f" except the {len(replaced)} healed ffn_down tensors, re-quantized in their own type)" if replaced
                 else ")"))

    return GGUF_EXPORT_NAME, write
