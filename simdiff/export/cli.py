"""Command-line glue for GGUF: ``simdiff apply FILE.gguf`` and ``simdiff prune ... --export gguf``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from simdiff.errors import SimdiffError
from simdiff.save import METADATA_FILE, check_output_file

GGUF_EXPORT_NAME = "pruned.gguf"  # written into prune's output folder by --export gguf


def layer_indices(text: str) -> list[int]:
    """``--layers``: comma-separated decoder-layer indices, e.g. ``3,12,13``."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 3,12,13, got {text!r}")
    return [int(part) for part in parts]


def add_apply_command(subparsers) -> None:
    parser = subparsers.add_parser("apply", help="remove given layers from a GGUF file (quantized bytes kept)")
    parser.add_argument("model", help="a .gguf model file (llama.cpp / ollama format)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--layers", type=layer_indices, help="layers to remove, e.g. 3,12,13 (original numbering)")
    which.add_argument("--recipe", help="the simdiff.json of a prune (or its folder): remove its removed_layers")
    parser.add_argument("--out", required=True, help="output .gguf file (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.set_defaults(run=run_apply_gguf)


def recipe_selection(path: str | Path) -> tuple[list[int], int]:
    """``(removed_layers, num_layers_before)`` recorded in a prune's ``simdiff.json`` (or its folder)."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / METADATA_FILE
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SimdiffError(f"recipe {str(file)!r} not found; pass the simdiff.json written by prune") from None
    except json.JSONDecodeError as exc:
        raise SimdiffError(f"recipe {str(file)!r} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    missing = [key for key in ("removed_layers", "num_layers_before") if key not in document]
    if missing:
        raise SimdiffError(f"recipe {str(file)!r} lacks {', '.join(missing)}; pass the simdiff.json written by prune")
    return [int(i) for i in document["removed_layers"]], int(document["num_layers_before"])


def run_apply_gguf(args: argparse.Namespace) -> None:
    """Prune the GGUF file ``args.model`` by ``--layers`` or ``--recipe`` into the file ``--out``."""
    from simdiff.export.gguf import check_prunable, open_gguf, prune_gguf

    if Path(args.model).suffix != ".gguf":
        raise SimdiffError(f"{args.model!r} is not a .gguf file; this apply reads GGUF model files")
    if Path(args.out).suffix != ".gguf":
        raise SimdiffError(f"--out {args.out!r} must be a .gguf file path")
    check_output_file(args.out, args.overwrite)
    removed = args.layers
    if args.recipe is not None:
        removed, recipe_count = recipe_selection(args.recipe)
        count = check_prunable(open_gguf(args.model))
        if recipe_count != count:
            raise SimdiffError(f"the recipe {args.recipe!r} was made on a model of {recipe_count} layers; "
                               f"{args.model!r} has {count} blocks")
    result = prune_gguf(args.model, removed, args.out, overwrite=args.overwrite)
    print(f"removed blocks {result.removed} ({result.block_count_before} -> {len(result.kept)} blocks) from the GGUF file")
    print(f"saved to {result.out}: {megabytes(result.size_before)} -> {megabytes(result.size_after)} "
          f"(removed tensors: {megabytes(result.removed_tensor_bytes)}; kept tensors byte-identical)")


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


# -- simdiff prune ... --export gguf ------------------------------------------------------------------
def add_export_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", choices=["gguf"], default=None,
                        help=f"gguf: also write the model's GGUF file without the removed layers as "
                             f"OUT/{GGUF_EXPORT_NAME} (quantized tensors byte-identical; built-in models only)")


def check_export(args: argparse.Namespace) -> Path | None:
    """Before any work: the GGUF file that ``--export gguf`` prunes (None without ``--export``)."""
    from simdiff.export.gguf import check_prunable, open_gguf
    from simdiff.model.load import BUILTIN_MODELS, builtin_gguf_file

    if args.export is None:
        return None
    source = builtin_gguf_file(args.model)
    if source is None:
        raise SimdiffError(f"--export gguf needs a model that comes as a GGUF file (built-in: "
                           f"{', '.join(BUILTIN_MODELS)}); {args.model!r} is not one. For a safetensors "
                           "checkpoint, convert the pruned output with llama.cpp's convert_hf_to_gguf.py")
    check_prunable(open_gguf(source))
    return source


def export_after_prune(source: Path | None, removed: list[int], out: Path) -> None:
    """Write ``out/pruned.gguf``: ``source`` without the ``removed`` blocks (nothing when ``source`` is None)."""
    from simdiff.export.gguf import prune_gguf

    if source is None:
        return
    result = prune_gguf(source, removed, out / GGUF_EXPORT_NAME)
    print(f"wrote {result.out}: {megabytes(result.size_before)} -> {megabytes(result.size_after)} "
          f"({len(result.kept)} of {result.block_count_before} blocks; kept tensors byte-identical)")
