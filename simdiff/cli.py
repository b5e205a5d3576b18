"""The ``simdiff`` command line: one subcommand per step of the pruning workflow."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from simdiff.apply_cli import add_apply_command
from simdiff.bench.cli import add_bench_command
from simdiff.cli_options import (
    add_calibration_options,
    add_criterion_options,
    add_model_options,
    add_search_options,
    add_selection_options,
    calibration_from,
    options_from,
    search_from,
    source_from,
)
from simdiff.errors import SimdiffError, one_line
from simdiff.evaluate.cli import add_compare_command, add_demo_command, add_eval_command
from simdiff.export.cli import add_export_option, check_export, export_after_prune
from simdiff.progress import set_progress
from simdiff.recover.cli import add_recover_command

log = logging.getLogger("simdiff")


# -- simdiff score -------------------------------------------------------------------------------------
def add_score_command(subparsers) -> None:
    parser = subparsers.add_parser("score", help="score every decoder layer with one or more criteria")
    add_model_options(parser, offload=True)
    parser.add_argument("--criteria", default="simdiff,block_influence,angular_block,mssd,masd",
                        help="comma-separated criterion names, or 'all'")
    parser.add_argument("--block-size", type=int, default=None,
                        help="also collect angular distances of blocks of this many layers")
    parser.add_argument("--json", default=None, help="write scores and raw statistics to this JSON file")
    parser.add_argument("--plot", default=None,
                        help="write a layer x criterion heatmap of removal ranks to this file (.png/.svg/.pdf)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --json/--plot files")
    add_calibration_options(parser)
    add_criterion_options(parser)
    parser.set_defaults(run=run_score)


def parse_criteria(value: str) -> list[str]:
    from simdiff.criteria import CRITERIA, get_criterion

    names = list(CRITERIA) if value == "all" else [n.strip() for n in value.split(",") if n.strip()]
    for name in names:
        get_criterion(name)
    return names


def run_score(args: argparse.Namespace) -> None:
    from simdiff.api import score
    from simdiff.distributed import check_data_parallel_support, is_main_process, start_data_parallel
    from simdiff.model import load_model
    from simdiff.model.checks import check_device
    from simdiff.outputs import JSON_SUFFIXES, PLOT_SUFFIXES, atomic_file, check_output_file, write_text_file
    from simdiff.pipeline import needs_of
    from simdiff.report.tables import format_score_table
    from simdiff.save import provenance

    criteria = parse_criteria(args.criteria)
    calibration, options = calibration_from(args), options_from(args)  # validated before loading
    check_device(args.device)
    check_data_parallel_support(needs_of(criteria), args.device_map)
    inputs = [args.model]
    if args.json:  # validated before any work
        check_output_file(args.json, args.overwrite, inputs, JSON_SUFFIXES, "--json")
    if args.plot:
        check_output_file(args.plot, args.overwrite, inputs, PLOT_SUFFIXES, "--plot")
    device = start_data_parallel(args.device)
    offload_device = (device or "cpu") if args.offload == "layerwise" else None
    model, tokenizer = load_model(args.model, args.dtype, None if offload_device else device, args.device_map,
                                  **source_from(args))
    sizes = (args.block_size,) if args.block_size else ()
    result = score(model, tokenizer, criteria, calibration, options, sizes, offload_device=offload_device)
    if not is_main_process():  # data parallel: rank 0 reports
        return
    print(format_score_table(result.scores))
    document = {"model": args.model, "options": vars(options_from(args)),
                "calibration": vars(calibration_from(args)), **result.to_dict(), **provenance()}
    if args.json:
        write_text_file(args.json, json.dumps(document, indent=2) + "\n", args.overwrite, inputs)
        log.info("wrote %s", args.json)
    if args.plot:
        from simdiff.report.plots import plot_layer_ranks

        with atomic_file(args.plot, args.overwrite, inputs, PLOT_SUFFIXES, "--plot") as tmp:
            plot_layer_ranks(result.scores, tmp, title=f"layer ranks per criterion: {args.model}", svg_twin=False)
        log.info("wrote %s", args.plot)


# -- simdiff prune -------------------------------------------------------------------------------------
def add_prune_command(subparsers) -> None:
    parser = subparsers.add_parser("prune", help="remove the least important decoder layers and save the model")
    add_model_options(parser, offload=True)
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_selection_options(parser)
    add_calibration_options(parser)
    add_criterion_options(parser)
    add_search_options(parser)
    add_export_option(parser)
    parser.set_defaults(run=run_prune)


def run_prune(args: argparse.Namespace) -> None:
    from simdiff.api import prune

    gguf_source = check_export(args)
    result = prune(args.model, args.out, num_layers=args.num_layers, ratio=args.ratio, criterion=args.criterion,
                   calibration=calibration_from(args), options=options_from(args), iterative=args.iterative,
                   keep_first=args.keep_first, keep_last=args.keep_last, dtype=args.dtype, device=args.device,
                   device_map=args.device_map, overwrite=args.overwrite, offload=args.offload, layers=args.layers,
                   search=search_from(args), **source_from(args))
    if result.out is None:  # a data-parallel rank other than 0
        return
    before, after = result.metadata["num_layers_before"], result.metadata["num_layers_after"]
    print(f"removed layers {result.selection.removed} ({before} -> {after} layers) with {result.selection.criterion}")
    print(f"saved to {result.out} (written bytes, config, layer indices and KV-cache decoding verified)")
    export_after_prune(gguf_source, result.selection.removed, result.out)


# -- entry point ---------------------------------------------------------------------------------------
COMMANDS = [add_score_command, add_prune_command, add_recover_command, add_eval_command, add_compare_command,
            add_demo_command, add_bench_command, add_apply_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simdiff", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "urllib3", "filelock", "matplotlib", "httpx", "gguf"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    set_progress(not quiet)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
