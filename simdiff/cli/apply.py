"""``simdiff apply``: remove a given selection of decoder layers from a checkpoint on disk."""

from __future__ import annotations

import argparse

from simdiff.cli.options import add_model_options, add_output_options, add_selection_options
from simdiff.core.errors import SimdiffError


def add_apply_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "apply", help="remove given layers from a checkpoint on disk, shard by shard (no model in memory)")
    parser.add_argument("model", help="checkpoint directory (safetensors), built-in name (smollm2-135m), "
                                      "or a .gguf file (docs/gguf.md)")
    add_selection_options(parser, only=["layers", "slice_config_keys", "heal"])
    parser.add_argument("--recipe", help="the simdiff.json of a prune (or its folder): apply its selection; a "
                                         "multi-round recipe on the original model applies every round's removal "
                                         "at once, in the original numbering (default: none; give it or --layers)")
    add_model_options(parser, only=["trust_remote_code"])
    add_output_options(parser)
    parser.set_defaults(run=run_apply)


def run_apply(args: argparse.Namespace) -> None:
    from simdiff.cli.export import is_gguf, run_apply_gguf
    from simdiff.surgery.apply import apply_to_path, load_removal_record

    if args.heal != "none":
        layers = ",".join(map(str, args.layers)) if args.layers else "..."
        raise SimdiffError(f"apply removes layers on disk without loading the model, so it cannot heal; use "
                           f"`simdiff prune {args.model} --layers {layers} --heal {args.heal}`")
    if (args.layers is None) == (args.recipe is None):
        raise SimdiffError("give exactly one of --layers 3,12,13 or --recipe simdiff.json: the layers to remove")
    if args.out is None:
        raise SimdiffError("give --out DIR (or FILE.gguf for a GGUF input): where the pruned checkpoint goes")
    recipe = load_removal_record(args.recipe) if args.recipe else None
    if recipe is not None and recipe.heal != "none":
        raise SimdiffError(f"{args.recipe} is a healed prune (--heal {recipe.heal}): apply only removes layers, "
                           f"so it cannot reproduce it; run `simdiff run {args.recipe} --out ...` (or apply "
                           f"--layers {','.join(map(str, recipe.removed_layers))} for the unhealed removal)")
    if is_gguf(args.model):
        run_apply_gguf(args)
        return
    result = apply_to_path(args.model, args.layers, args.out, overwrite=args.overwrite, recipe=recipe,
                           trust_remote_code=args.trust_remote_code, sliced=args.slice_config_key)
    before, after = result.metadata["num_layers_before"], result.metadata["num_layers_after"]
    print(f"removed layers {result.removed} ({before} -> {after} layers) on disk")
    print(f"saved to {result.out} ({len(result.shards)} shard{'s' if len(result.shards) > 1 else ''})")
