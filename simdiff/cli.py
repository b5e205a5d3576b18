"""The ``simdiff`` command line: one subcommand per step of the pruning workflow."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace

from simdiff.apply_cli import add_apply_command
from simdiff.bench.cli import add_bench_command
from simdiff.cli_options import (
    add_calibration_options,
    add_command_flags,
    add_common_flags,
    add_criterion_options,
    add_evaluation_options,
    add_model_options,
    add_output_options,
    add_renamed_hints,
    add_search_options,
    add_selection_options,
    recipe_from_args,
)
from simdiff.errors import SimdiffError, one_line
from simdiff.evaluate.cli import add_compare_command, add_demo_command, add_eval_command
from simdiff.progress import set_progress
from simdiff.recover.cli import add_recover_command

log = logging.getLogger("simdiff")
SCORE_CRITERIA = "simdiff,block_influence,angular_block,mssd,masd"


# -- simdiff score -------------------------------------------------------------------------------------
def add_score_command(subparsers) -> None:
    parser = subparsers.add_parser("score", help="score every decoder layer with one or more criteria")
    add_model_options(parser, offload=True)
    add_selection_options(parser, only=["criterion"], defaults={"criterion": SCORE_CRITERIA})
    add_command_flags(parser, "block_size", "json", "plot")
    add_output_options(parser, only=["overwrite"])
    add_calibration_options(parser)
    add_criterion_options(parser)
    parser.set_defaults(run=run_score)


def run_score(args: argparse.Namespace) -> None:
    from simdiff.api import score
    from simdiff.compare import parse_candidates
    from simdiff.distributed import check_data_parallel_support, is_main_process, start_data_parallel
    from simdiff.model.checks import check_device
    from simdiff.outputs import JSON_SUFFIXES, PLOT_SUFFIXES, atomic_file, check_output_file, write_text_file
    from simdiff.pipeline import needs_of
    from simdiff.report.tables import format_score_table
    from simdiff.save import provenance

    specs = parse_candidates(args.criterion)  # names and variants such as simdiff:beta=0.5, checked
    recipe = recipe_from_args(args)  # validated before loading
    spec = recipe.model
    check_device(spec.device)
    check_data_parallel_support(needs_of([s.criterion for s in specs]), spec.device_map)
    inputs = [spec.name]
    if args.json:  # validated before any work
        check_output_file(args.json, args.overwrite, inputs, JSON_SUFFIXES, "--json")
    if args.plot:
        check_output_file(args.plot, args.overwrite, inputs, PLOT_SUFFIXES, "--plot")
    spec = replace(spec, device=start_data_parallel(spec.device))
    offload_device = (spec.device or "cpu") if spec.offload == "layerwise" else None
    model, tokenizer = spec.load(offloaded=offload_device is not None)
    sizes = (args.block_size,) if args.block_size else ()
    result = score(model, tokenizer, [s.label for s in specs], recipe.calibration, recipe.options, sizes,
                   offload_device=offload_device)
    if not is_main_process():  # data parallel: rank 0 reports
        return
    print(format_score_table(result.scores))
    document = {"model": spec.name, "options": vars(recipe.options), "calibration": vars(recipe.calibration),
                "recipe": recipe.to_dict(), **result.to_dict(), **provenance()}
    if args.json:
        write_text_file(args.json, json.dumps(document, indent=2) + "\n", args.overwrite, inputs)
        log.info("wrote %s", args.json)
    if args.plot:
        from simdiff.report.plots import plot_layer_ranks

        with atomic_file(args.plot, args.overwrite, inputs, PLOT_SUFFIXES, "--plot") as tmp:
            plot_layer_ranks(result.scores, tmp, title=f"layer ranks per criterion: {spec.name}", svg_twin=False)
        log.info("wrote %s", args.plot)


# -- simdiff prune -------------------------------------------------------------------------------------
def add_prune_command(subparsers) -> None:
    parser = subparsers.add_parser("prune", help="remove the least important decoder layers and save the model")
    add_model_options(parser, offload=True)
    add_output_options(parser, only=("out", "overwrite", "export"))
    add_selection_options(parser)
    add_calibration_options(parser)
    add_criterion_options(parser)
    add_search_options(parser)
    parser.set_defaults(run=run_prune)


def run_prune(args: argparse.Namespace) -> None:
    print_prune(recipe_from_args(args))


def print_prune(recipe) -> None:
    """Prune as ``recipe`` says and print what was removed and where it went."""
    from simdiff.api import prune
    from simdiff.export.cli import check_export, export_after_prune

    gguf_source = check_export(recipe.model.name, recipe.export, recipe.selection.heal)
    result = prune(recipe)
    if result.out is None:  # a data-parallel rank other than 0
        return
    before, after = result.metadata["num_layers_before"], result.metadata["num_layers_after"]
    chosen_by = result.selection.criterion if recipe.selection.layers else recipe.selection.criterion
    print(f"removed layers {result.selection.removed} ({before} -> {after} layers) with {chosen_by}")
    print(f"saved to {result.out} (written bytes, config, layer indices and KV-cache decoding verified)")
    export_after_prune(gguf_source, result.selection.removed, result.out, result.metadata.get("heal"))


# -- simdiff run ---------------------------------------------------------------------------------------
def add_run_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="run a recipe (YAML/JSON, or a prune's simdiff.json): prune, or compare, then evaluate",
        description="Run the recipe; flags given here override its fields (e.g. --out, --model, --samples).")
    parser.add_argument("recipe", help="recipe file: .yaml/.yml/.json, or the simdiff.json of a prune")
    parser.add_argument("--model", dest="model", default=argparse.SUPPRESS,
                        help="model directory, hub id or built-in name (default: the recipe's)")
    add_model_options(parser, offload=True, override=True)
    add_output_options(parser, only=("out", "overwrite", "export"), override=True)
    for add in (add_selection_options, add_calibration_options, add_criterion_options, add_search_options):
        add(parser, override=True)
    add_evaluation_options(parser, override=True, exclude=("log_samples",))
    parser.set_defaults(run=run_recipe)


def run_recipe(args: argparse.Namespace) -> None:
    from simdiff.recipe import load_recipe

    recipe = recipe_from_args(args, load_recipe(args.recipe)).check()
    if recipe.is_comparison():
        from simdiff.evaluate.cli import print_summary, run_comparison_recipe

        document = run_comparison_recipe(recipe)
        print_summary(document, recipe.evaluation.metric)
        print(f"wrote {recipe.out}/results.json, results.md and plots")
        return
    print_prune(recipe)
    if recipe.evaluation is not None:
        from simdiff.evaluate.cli import evaluate_pruned

        evaluate_pruned(recipe)


# -- entry point ---------------------------------------------------------------------------------------
COMMANDS = [add_score_command, add_prune_command, add_run_command, add_recover_command, add_eval_command,
            add_compare_command, add_demo_command, add_bench_command, add_apply_command]


def build_parser() -> argparse.ArgumentParser:
    from simdiff import __version__

    parser = argparse.ArgumentParser(prog="simdiff", description=__doc__, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"simdiff {__version__}")
    add_common_flags(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(subparsers)
    for sub in subparsers.choices.values():
        sub.allow_abbrev = False
        add_common_flags(sub)
        add_renamed_hints(sub)
    return parser


def configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "urllib3", "filelock", "matplotlib", "httpx", "gguf"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    set_progress(not quiet)
    from transformers.utils import logging as hf_logging  # its own bars (model loading)

    hf_logging.disable_progress_bar() if quiet else hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SimdiffError as exc:  # a renamed flag
        print(f"simdiff: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    configure_logging(args.verbose, args.quiet)
    try:
        args.run(args)
    except SimdiffError as exc:
        print(f"simdiff: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("simdiff: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for users; -v shows the traceback
        if args.verbose:
            raise
        print(f"simdiff: error: {type(exc).__name__}: {one_line(str(exc))} (run with -v for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
