"""The ``simdiff`` command line: one subcommand per step of the pruning workflow."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace

from simdiff.cli.apply import add_apply_command
from simdiff.cli.bench import add_bench_command
from simdiff.cli.describe import describe_prune, describe_run, describe_score
from simdiff.cli.evaluate import add_compare_command, add_demo_command, add_eval_command
from simdiff.cli.options import (
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
from simdiff.cli.recover import add_recover_command
from simdiff.core.errors import SimdiffError, one_line
from simdiff.core.progress import set_progress

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
    parser.set_defaults(run=run_score, describe=describe_score)


def run_score(args: argparse.Namespace) -> None:
    from simdiff.collect.distributed import is_main_process, start_data_parallel
    from simdiff.core.outputs import (
        JSON_SUFFIXES,
        PLOT_SUFFIXES,
        atomic_file,
        check_output_file,
        write_text_file,
    )
    from simdiff.model.checks import check_device
    from simdiff.model.load import load_from_settings
    from simdiff.report.tables import format_score_table
    from simdiff.selection.evidence import check_data_parallel_support, needs_of
    from simdiff.selection.search import reject_auto
    from simdiff.selection.spec import parse_candidates
    from simdiff.store.save import provenance
    from simdiff.workflows.api import score

    specs = parse_candidates(args.criterion)  # names and variants such as simdiff:beta=0.5, checked
    recipe = recipe_from_args(args).check_settings()  # validated before loading
    for spec in specs:
        reject_auto(spec.options(recipe.options))
    if args.block_size is not None and args.block_size < 1:
        raise SimdiffError(f"--block-size must be >= 1, got {args.block_size}")
    spec = recipe.model
    check_device(spec.device)
    check_data_parallel_support(needs_of([s.criterion for s in specs]), spec.device_map)
    inputs = [spec.name]
    if args.json:  # validated before any work
        check_output_file(args.json, args.overwrite, inputs, JSON_SUFFIXES, "--json")
    if args.plot:
        check_output_file(args.plot, args.overwrite, inputs, PLOT_SUFFIXES, "--plot")
    spec = replace(spec, device=start_data_parallel(spec.device))
    offload_device = spec.offload_device()
    model, tokenizer = load_from_settings(spec, offloaded=offload_device is not None)
    sizes = (args.block_size,) if args.block_size else ()
    result = score(model, tokenizer, [s.label for s in specs], recipe.calibration, recipe.options, sizes,
                   offload_device=offload_device, max_device_bytes=spec.max_device_memory)
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
    parser.set_defaults(run=run_prune, describe=describe_prune)


def run_prune(args: argparse.Namespace) -> None:
    print_prune(recipe_from_args(args))


def print_prune(recipe, evaluate: bool = False) -> None:
    """Prune as ``recipe`` says and print what was removed and where it went.

    ``--export gguf`` and (``evaluate``) the evaluation are added to the saved folder under its claim, by rank 0
    alone under a launcher (the other ranks end after the selection); a failure there exits 3
    (:func:`simdiff.core.outputs.add_extras`).
    """
    from simdiff.cli.export import check_export, gguf_export
    from simdiff.core.outputs import add_extras
    from simdiff.workflows.api import prune_recipe

    gguf_source = check_export(recipe.model.name, recipe.export, recipe.selection.slice_config_keys,
                               recipe.selection.heal)
    settings = recipe.evaluation.check() if evaluate else None  # before any work

    def after_save(result, claim) -> None:
        before, after = result.metadata["num_layers_before"], result.metadata["num_layers_after"]
        chosen_by = result.selection.criterion if recipe.selection.layers else recipe.selection.criterion
        print(f"removed layers {result.selection.removed} ({before} -> {after} layers) with {chosen_by}")
        print(f"saved to {result.out} (written bytes, config, layer indices and KV-cache decoding verified)")
        extras = []
        if gguf_source is not None:
            extras.append(gguf_export(gguf_source, result.selection.removed, result.out, recipe.selection.slice_config_keys,
                                      result.metadata.get("heal")))
        if settings is not None:
            from simdiff.cli.evaluate import pruned_evaluation

            extras.append(pruned_evaluation(recipe, settings))
        add_extras(claim, extras, "the pruned model, verified")

    prune_recipe(recipe, after_save=after_save)


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
    parser.set_defaults(run=run_recipe, describe=describe_run)


def run_recipe(args: argparse.Namespace) -> None:
    from simdiff.config.recipe import load_recipe

    recipe = recipe_from_args(args, load_recipe(args.recipe)).check()
    if recipe.is_comparison():
        from simdiff.cli.evaluate import print_summary, run_comparison_recipe

        document = run_comparison_recipe(recipe)
        print_summary(document, recipe.evaluation.metric)
        print(f"wrote {recipe.out}/results.json, results.md and plots")
        return
    print_prune(recipe, evaluate=recipe.evaluation is not None)


# -- entry point ---------------------------------------------------------------------------------------
COMMANDS = [add_score_command, add_prune_command, add_run_command, add_recover_command, add_eval_command,
            add_compare_command, add_demo_command, add_bench_command, add_apply_command]


class Parser(argparse.ArgumentParser):
    """argparse with its errors (unknown flag, bad choice, missing value) as one line, exit 2, no usage block."""

    def error(self, message: str):
        self.exit(2, f"simdiff: error: {one_line(message)}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    from simdiff import __version__

    parser = Parser(prog="simdiff", description=__doc__, allow_abbrev=False)
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


def configure_transformers(quiet: bool) -> None:
    """transformers' own progress bars (model loading) follow -q; imports transformers, so after the first line."""
    from transformers.utils import logging as hf_logging

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
        if getattr(args, "describe", None) is not None:
            log.info(args.describe(args))  # what it will do, before torch loads
        configure_transformers(args.quiet)
        args.run(args)
    except SimdiffError as exc:  # exit 2; PartialOutputError (saved, an extra file failed) exits 3
        print(f"simdiff: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
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
