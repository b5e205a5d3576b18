"""The first line of a long command: what it will do, logged before torch loads (``-q`` silences it)."""

from __future__ import annotations

import argparse

from simdiff.cli.options import recipe_from_args
from simdiff.config.recipe import Recipe, SelectionSettings


def removal(sel: SelectionSettings) -> str:
    """``layers [3, 12]``, ``8 layers by simdiff``, ``0.25 of the layers by ...``, ``4,8 layers by a,b``."""
    if sel.layers is not None:
        how = f"layers {sel.layers}"
    else:
        counts = sel.num_layers or sel.ratio or ["?"]
        how = f"{','.join(map(str, counts))}{' of the layers' if sel.ratio else ' layers'} by {sel.criterion}"
    return how + (f", healed ({sel.heal})" if sel.heal != "none" else "")


def describe_prune_recipe(recipe: Recipe) -> str:
    text = f"pruning {recipe.model.name}: removing {removal(recipe.selection)}, saving to {recipe.out}"
    return text + (", then evaluating it" if recipe.evaluation is not None else "")


def describe_comparison(recipe: Recipe) -> str:
    return f"comparing on {recipe.model.name}: removing {removal(recipe.selection)}, saving to {recipe.out}"


def describe_prune(args: argparse.Namespace) -> str:
    return describe_prune_recipe(recipe_from_args(args))


def describe_compare(args: argparse.Namespace) -> str:
    return describe_comparison(recipe_from_args(args))


def describe_score(args: argparse.Namespace) -> str:
    recipe = recipe_from_args(args)
    cal = recipe.calibration
    return (f"scoring {recipe.model.name} with {recipe.selection.criterion} over {cal.samples} calibration windows "
            f"of {cal.seq_len} tokens ({cal.source})")


def describe_run(args: argparse.Namespace) -> str:
    from simdiff.config.recipe import load_recipe

    recipe = recipe_from_args(args, load_recipe(args.recipe))
    text = describe_comparison(recipe) if recipe.is_comparison() else describe_prune_recipe(recipe)
    return f"{args.recipe}: {text}"
