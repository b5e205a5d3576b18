"""``simdiff bench``: throughput, latency, peak memory and parameter counts, optionally against another model."""

from __future__ import annotations

import argparse
import json
import logging

from simdiff.cli.options import (
    add_command_flags,
    add_fields,
    add_model_options,
    add_output_options,
    section_from,
)
from simdiff.config.settings import BenchSettings
from simdiff.core.errors import SimdiffError

log = logging.getLogger("simdiff")


def add_bench_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure prefill/decode throughput, latency, peak memory (and speedup against another model)")
    add_model_options(parser, only=["name", "dtype", "device"], defaults={"name": None},
                      shown={"name": "none, with --random-weights", "device": "cuda if available, else cpu",
                             "dtype": "auto, a checkpoint's own; float32 with --random-weights"})
    what = parser.add_argument_group("what to compare")
    other = what.add_mutually_exclusive_group()
    other.add_argument("--against", default=None,
                       help="second model (or, with --random-weights, second config) benchmarked side by side "
                            "(default: none)")
    other.add_argument("--remove", type=int, default=None,
                       help="compare against a copy with this many decoder layers removed (the ones before the "
                            "last) (default: none)")
    what.add_argument("--random-weights", metavar="CONFIG", default=None,
                      help="benchmark an architecture with random weights: a shape name (llama-3.1-8b), "
                           "a config.json or a model folder (default: none)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; 1 is steadier on a shared machine (default: torch's choice)")
    add_fields(parser, BenchSettings, "shapes and repeats")
    add_command_flags(parser, "json")
    add_output_options(parser, only=["overwrite"])
    parser.set_defaults(run=run_bench)


def default_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_models(args: argparse.Namespace) -> dict:
    """The models to benchmark, reference first, as ``{label: model}``."""
    from simdiff.bench.models import pruned_copy, random_model
    from simdiff.model.load import load_model

    device = default_device(args.device)
    if args.random_weights and args.model:
        raise SimdiffError(f"give either MODEL ({args.model!r}) or --random-weights, not both")
    if not args.random_weights and not args.model:
        raise SimdiffError("give a MODEL to benchmark, or --random-weights CONFIG (e.g. llama-3.1-8b)")
    if args.random_weights:
        label = f"{args.random_weights} (random weights)"
        models = {label: random_model(args.random_weights, args.dtype, device)}
        if args.against:
            models[f"{args.against} (random weights)"] = random_model(args.against, args.dtype, device)
    else:
        label = args.model
        models = {label: load_model(args.model, args.dtype, device)[0]}
        if args.against:
            models[args.against] = load_model(args.against, args.dtype, device)[0]
    if args.remove:
        pruned, removed = pruned_copy(models[label], args.remove)
        models[f"{label} minus layers {removed[0]}-{removed[-1]}"] = pruned
    return models


def format_bench(result: dict) -> str:
    """Human-readable tables: one column per model, then speedups and fractions of the ceiling."""
    from simdiff.report.tables import markdown_table

    names = list(result["models"])
    first = result["models"][names[0]]
    rows = [["parameters", *(f"{result['models'][n]['params']['total']:,}" for n in names)],
            ["per-token weight work", *(f"{result['models'][n]['params']['per_token']:,.0f}" for n in names)],
            ["decoder layers", *(str(result["models"][n]["params"]["num_layers"]) for n in names)]]
    for key in first["figures"]:
        values = [result["models"][n]["figures"][key] for n in names]
        if isinstance(values[0], str):
            continue
        text = [f"{v / 2**20:,.1f} MiB" if key.endswith("bytes") else f"{v:,.2f}" for v in values]
        rows.append([key, *text])
    lines = [markdown_table(["figure", *names], rows)]
    comparison = result.get("comparison")
    if comparison:
        lines.append("")
        lines.append(f"ceiling (per-token weight work ratio): {comparison['ceiling']:.4f}x")
        crow = [[k, f"{v:.3f}x", f"{comparison['fraction_of_ceiling'][k]:.3f}" if k in
                 comparison["fraction_of_ceiling"] else ""] for k, v in comparison["speedup"].items()]
        lines.append(markdown_table(["figure", "speedup (memory: reference / other)", "fraction of ceiling"], crow))
    lines.append(f"memory measured with {first['figures'].get('memory_method', '?')} on {result['device']}")
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> None:
    import torch

    from simdiff.bench.run import bench_models
    from simdiff.core.outputs import check_output_file, write_text_file
    from simdiff.store.save import provenance

    settings = section_from(BenchSettings, args)
    settings.check()
    inputs = [args.model, args.against, args.random_weights]
    if args.json:  # validated before any work
        check_output_file(args.json, args.overwrite, inputs)
    if args.threads is not None:
        if args.threads < 1:
            raise SimdiffError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    models = load_models(args)
    result = bench_models(models, settings)
    print(format_bench(result))
    if args.json:
        write_text_file(args.json, json.dumps({**result, **provenance()}, indent=2) + "\n", args.overwrite, inputs)
        log.info("wrote %s", args.json)
