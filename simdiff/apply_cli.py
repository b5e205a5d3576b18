"""``simdiff apply``: remove a given selection of decoder layers from a checkpoint on disk."""

from __future__ import annotations

import argparse

from simdiff.cli_options import layer_list


def add_apply_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "apply", help="remove given layers from a checkpoint on disk, shard by shard (no model in memory)")
    parser.add_argument("model", help="checkpoint directory (safetensors), built-in name (smollm2-135m), "
                                      "or a .gguf file (docs/gguf.md)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--layers", type=layer_list, help="layers to remove, e.g. 3,12,13 (the input model's numbering)")
    which.add_argument("--recipe", help="the simdiff.json of a prune (or its folder): apply its selection")
    parser.add_argument("--out", required=True, help="output directory, or .gguf file for a GGUF input "
                                                     "(written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output (a previous simdiff output)")
    parser.set_defaults(run=run_apply)


def run_apply(args: argparse.Namespace) -> None:
    from simdiff.apply import apply_to_path, load_recipe
    from simdiff.export.cli import is_gguf, run_apply_gguf

    if is_gguf(args.model):
        run_apply_gguf(args)
        return
    recipe = load_recipe(args.recipe) if args.recipe else None
    result = apply_to_path(args.model, args.layers, args.out, overwrite=args.overwrite, recipe=recipe)
    before, after = result.metadata["num_layers_before"], result.metadata["num_layers_after"]
    print(f"removed layers {result.removed} ({before} -> {after} layers) on disk")
    print(f"saved to {result.out} ({len(result.shards)} shard{'s' if len(result.shards) > 1 else ''})")
