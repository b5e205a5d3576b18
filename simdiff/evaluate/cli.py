"""CLI commands ``simdiff eval``, ``simdiff compare`` and ``simdiff demo``."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from simdiff.cli_options import (
    DTYPE_HELP,
    add_calibration_options,
    add_criterion_options,
    add_data_dir_option,
    add_model_options,
    add_search_options,
    calibration_from,
    options_from,
    search_from,
    source_from,
)
from simdiff.errors import SimdiffError
from simdiff.model.load import DTYPES

log = logging.getLogger("simdiff")

DOC_CRITERIA = "simdiff,simdiff:alpha=auto,best-of,block_influence,angular_block,ppl_skip,taylor,reverse,random"


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_evaluation_options(parser: argparse.ArgumentParser, prefix: str = "", ppl: str = "wikitext2",
                           tasks: str = "", limit: int | None = None, max_tokens: int | None = None) -> None:
    """Perplexity and task options; ``prefix='eval-'`` keeps them apart from calibration's --seq-len."""
    group = parser.add_argument_group("evaluation")
    group.add_argument("--ppl", type=_names, default=_names(ppl),
                       help=f"comma-separated perplexity sources: wikitext2 (test split) and/or .txt/.jsonl files "
                            f"(default: {ppl or 'none'}; '' for none)")
    group.add_argument(f"--{prefix}seq-len", dest="eval_seq_len", type=int, default=2048,
                       help="tokens per perplexity window, BOS included (default: 2048)")
    group.add_argument("--max-tokens", type=int, default=max_tokens,
                       help="score only the first N tokens of each text (default: the whole text)")
    group.add_argument(f"--{prefix}batch-size", dest="eval_batch_size", type=int, default=1,
                       help="perplexity windows per forward pass (default: 1)")
    group.add_argument("--tasks", type=_names, default=_names(tasks),
                       help="comma-separated lm-eval tasks, e.g. piqa,hellaswag (piqa runs offline from "
                            f"--data-dir) (default: {tasks or 'none'})")
    group.add_argument("--limit", type=int, default=limit, help="questions per task (default: all)")
    group.add_argument("--num-fewshot", type=int, default=None,
                       help="examples in each lm-eval prompt, as lm-eval's --num_fewshot (default: each task's own, "
                            "0 for most)")
    group.add_argument("--task-batch-size", type=int, default=8, help="lm-eval batch size (default: 8)")
    group.add_argument("--task-max-length", type=int, default=None,
                       help="lm-eval context length (default: the model's max_position_embeddings)")


def settings_from(args: argparse.Namespace):
    from simdiff.evaluate.suite import EvalSettings

    for name in ("eval_seq_len", "eval_batch_size", "max_tokens", "limit", "task_batch_size"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "eval_seq_len" else 1):
            raise SimdiffError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise SimdiffError(f"--num-fewshot must be 0 or more, got {args.num_fewshot}")
    if not args.ppl and not args.tasks:
        raise SimdiffError("nothing to evaluate: give --ppl wikitext2 and/or --tasks piqa")
    return EvalSettings(ppl=args.ppl, seq_len=args.eval_seq_len, max_tokens=args.max_tokens,
                        batch_size=args.eval_batch_size, tasks=args.tasks, limit=args.limit,
                        task_batch_size=args.task_batch_size, max_length=args.task_max_length,
                        data_dir=args.data_dir, num_fewshot=args.num_fewshot,
                        log_samples=getattr(args, "log_samples", False))


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


# -- simdiff eval --------------------------------------------------------------------------------------
def add_eval_command(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="perplexity and zero-shot accuracy (lm-eval) of a model")
    add_model_options(parser)
    add_evaluation_options(parser)
    add_data_dir_option(parser)
    parser.add_argument("--baseline", default=None,
                        help="dense model (name/path) or an earlier `simdiff eval --json` file: adds %% retained")
    parser.add_argument("--allow-protocol-mismatch", action="store_true",
                        help="accept a --baseline file measured with other windows, tokens, limit, shots or task "
                             "versions (default: refuse)")
    parser.add_argument("--json", default=None,
                        help="write the results here, in lm-evaluation-harness's results schema")
    parser.add_argument("--log-samples", action="store_true",
                        help="also write lm-eval's per-question records, samples_<task>_<date>.jsonl, beside --json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.set_defaults(run=run_eval)


def evaluate_model(name: str, args: argparse.Namespace, settings) -> tuple[dict, dict]:
    """(our result, lm-eval's raw output for the tasks) of the model ``name``."""
    from simdiff.evaluate.suite import Evaluator
    from simdiff.model import load_model
    from simdiff.model.checks import check_seq_len

    model, tokenizer = load_model(name, args.dtype, args.device, args.device_map, **source_from(args))
    if settings.ppl:
        check_seq_len(model, settings.seq_len)
    evaluator = Evaluator(model, tokenizer, settings)
    return {"model": name, **evaluator(name)}, evaluator.lm_eval_output


def _record(result: dict, settings, lm_output: dict) -> dict:
    """Our record of one evaluation: the result, its settings and lm-eval's task versions."""
    from simdiff.evaluate.results import task_tables

    versions = task_tables(lm_output, result["tasks"])["versions"]
    return {**result, "settings": vars(settings), "task_versions": versions}


def _print_result(result: dict, settings, prefix: str = "") -> None:
    for source, report in result["perplexity"].items():
        stderr = report.get("perplexity_stderr")
        print(f"{prefix}{source}: perplexity {report['perplexity']:.4f}"
              + (f" ± {_fmt(stderr, 4)}" if stderr is not None else "")
              + f" over {report['tokens']} tokens ({report['windows']} windows of {settings.seq_len}"
              + (f"; {report['protocol']['text']})" if report.get("protocol", {}).get("text") else ")"))
    for task, scores in result["tasks"].items():
        metrics = ", ".join(f"{m} {_fmt(scores.get(m))}" + (f" ± {_fmt(scores[m + '_stderr'])}"
                                                             if m + "_stderr" in scores else "")
                            for m in ("acc", "acc_norm"))
        print(f"{prefix}{task}: {metrics} ({scores['samples']} questions)")


def run_eval(args: argparse.Namespace) -> None:
    from simdiff.evaluate.results import (
        check_same_protocol,
        lm_eval_document,
        read_baseline,
        samples_date,
        write_samples,
    )
    from simdiff.evaluate.suite import percent_retained
    from simdiff.outputs import check_output_file, write_text_file
    from simdiff.save import provenance

    _quiet_lm_eval()
    settings = settings_from(args)
    if args.json:  # validated before any work
        check_output_file(args.json, args.overwrite, [args.model, args.baseline])
    if args.log_samples and not (args.json and settings.tasks):
        raise SimdiffError("--log-samples writes lm-eval's per-question records beside the results: give --json "
                           "FILE and --tasks")
    baseline_path = args.baseline if args.baseline and args.baseline.endswith(".json") else None
    baseline = read_baseline(baseline_path) if baseline_path else None
    if baseline is not None and not args.allow_protocol_mismatch:  # before any model is loaded
        check_same_protocol(baseline, {"settings": vars(settings)}, baseline_path, settings_only=True)
    result, lm_output = evaluate_model(args.model, args, settings)
    record = _record(result, settings, lm_output)
    if baseline is not None and not args.allow_protocol_mismatch:
        check_same_protocol(baseline, record, baseline_path)
    if args.baseline and baseline is None:  # a model: evaluated here with the same settings
        dense, dense_output = evaluate_model(args.baseline, args, settings)
        baseline = _record(dense, settings, dense_output)
    if baseline is not None:
        record["baseline"] = baseline
        record["retained"] = percent_retained(baseline, result)
    _print_result(result, settings)
    if baseline is not None:
        _print_result(baseline, settings, prefix=f"baseline {baseline.get('model', args.baseline)} ")
        kept = record["retained"]
        for source, ratio in kept["ppl_ratio"].items():
            print(f"{source}: perplexity ratio vs baseline {_fmt(ratio, 3)}")
        for metric, value in kept["average"].items():
            print(f"% retained ({metric}, mean over tasks): {_fmt(value, 1)}")
    if args.json:
        document = lm_eval_document(args.model, result, settings, lm_output, {**record, **provenance()})
        text = json.dumps(document, indent=2, default=str, ensure_ascii=False) + "\n"
        write_text_file(args.json, text, args.overwrite, [args.model, args.baseline])
        log.info("wrote %s", args.json)
        if args.log_samples:
            for written in write_samples(Path(args.json), lm_output.get("samples", {}), result["tasks"],
                                         samples_date()):
                log.info("wrote %s", written)


# -- simdiff compare -----------------------------------------------------------------------------------
def add_compare_options(parser: argparse.ArgumentParser, criteria: str, tasks: str = "", limit: int | None = None,
                        max_tokens: int | None = None) -> None:
    parser.add_argument("--criteria", default=criteria,
                        help="comma-separated criteria, 'all', or name:key=value variants such as simdiff:alpha=auto "
                             f"(default: {criteria})")
    parser.add_argument("--keep-first", type=int, default=0, help="never remove the first N layers")
    parser.add_argument("--keep-last", type=int, default=0, help="never remove the last N layers")
    parser.add_argument("--metric", default="acc", choices=["acc", "acc_norm"], help="accuracy used for %% retained")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_evaluation_options(parser, prefix="eval-", tasks=tasks, limit=limit, max_tokens=max_tokens)
    add_calibration_options(parser)
    add_criterion_options(parser)
    add_search_options(parser)


def add_compare_command(subparsers) -> None:
    parser = subparsers.add_parser("compare", help="compare criteria: one calibration pass, every candidate evaluated")
    add_model_options(parser)
    counts = parser.add_argument_group("layers to remove").add_mutually_exclusive_group(required=True)
    counts.add_argument("--num-layers", type=_ints, help="comma-separated layer counts, e.g. 4,8")
    counts.add_argument("--ratios", type=_floats, help="comma-separated fractions of the layers, e.g. 0.125,0.25")
    parser.add_argument("--out", required=True, help="output folder: results.json, results.md, PNG plots")
    add_compare_options(parser, DOC_CRITERIA)
    parser.set_defaults(run=run_compare)


def run_comparison(args: argparse.Namespace, model_name: str, num_layers: list[int] | None,
                   ratios: list[float] | None) -> dict:
    """Load the model, run :func:`simdiff.compare.compare`, write the folder; returns the document."""
    from simdiff.compare import CompareSetup, compare, parse_candidates, write_results
    from simdiff.model import load_model
    from simdiff.model.layers import find_decoder_layers
    from simdiff.outputs import check_output_dir, claim_output_dir
    from simdiff.select import resolve_count

    _quiet_lm_eval()
    check_output_dir(args.out, args.overwrite, [model_name])
    specs = parse_candidates(args.criteria)
    settings = settings_from(args)
    with claim_output_dir(args.out, args.overwrite, [model_name]) as claim:  # claimed before any model work
        model, tokenizer = load_model(model_name, args.dtype, args.device, args.device_map, **source_from(args))
        total = len(find_decoder_layers(model))
        counts = list(num_layers) if num_layers else [resolve_count(total, ratio=r) for r in ratios or []]
        setup = CompareSetup(specs, counts, calibration_from(args), options_from(args), settings, args.keep_first,
                             args.keep_last, args.metric, search_from(args))
        document = compare(model, tokenizer, setup, model_name)
        out = write_results(document, claim)
    log.info("wrote %s", out)
    return document


def print_summary(document: dict, metric: str) -> None:
    """One line per candidate: perplexities, mean accuracy and % retained."""
    for row in document["rows"]:
        ppl = ", ".join(f"{s} ppl {_fmt(r['perplexity'], 2)}" for s, r in row["perplexity"].items())
        acc = ", ".join(f"{t} {metric} {_fmt(s.get(metric))}" for t, s in row["tasks"].items())
        kept = row.get("retained", {}).get("average", {}).get(metric)
        label = "dense" if row["count"] == 0 else f"{row['label']} -{row['count']} {row['removed_layers']}"
        print(f"{label}: {'; '.join(x for x in (ppl, acc) if x)}"
              + (f"; {_fmt(kept, 1)}% retained" if kept is not None else ""))


def run_compare(args: argparse.Namespace) -> None:
    document = run_comparison(args, args.model, args.num_layers, args.ratios)
    print_summary(document, args.metric)
    print(f"wrote {args.out}/results.json, results.md and plots")


# -- simdiff demo --------------------------------------------------------------------------------------
DEMO_CRITERIA = "simdiff,block_influence,angular_block"
DEMO_RIVAL = "block_influence"


def add_demo_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="prune 25%% of smollm2-135m with SimDiff and baselines; perplexity and PIQA with standard errors")
    parser.add_argument("model", nargs="?", default="smollm2-135m", help="model (default: smollm2-135m)")
    group = parser.add_argument_group("model")
    group.add_argument("--dtype", default="auto", choices=list(DTYPES), help=DTYPE_HELP)
    group.add_argument("--device", default=None)
    group.add_argument("--device-map", default=None)
    parser.add_argument("--ratio", type=float, default=0.25, help="fraction of layers to remove (default: 0.25)")
    parser.add_argument("--out", default="out/demo", help="comparison folder (default: out/demo)")
    add_compare_options(parser, DEMO_CRITERIA, tasks="piqa", limit=50, max_tokens=16384)
    # many short windows: 32 windows of 512 tokens give a per-window spread, hence a standard error
    parser.set_defaults(run=run_demo, samples=8, eval_seq_len=512, eval_batch_size=4)


def _ppl_text(report: dict) -> str:
    return f"{_fmt(report['perplexity'], 2)} ± {_fmt(report.get('perplexity_stderr'), 2)}"


def _acc_text(scores: dict, metric: str) -> str:
    return f"{_fmt(scores.get(metric))} ± {_fmt(scores.get(metric + '_stderr'))}"


def noise_note(a: dict, b: dict, source: str) -> str:
    """Paired comparison of two candidates' perplexity on the same windows: the difference and whether it is noise."""
    from simdiff.evaluate.perplexity import standard_error

    if a["removed_layers"] == b["removed_layers"]:
        return "the same layers"
    x, y = a["perplexity"][source]["window_nll"], b["perplexity"][source]["window_nll"]
    diffs = [p - q for p, q in zip(x, y)]
    mean, se = sum(diffs) / len(diffs), standard_error(diffs)
    verdict = ("within noise (less than 2 standard errors)" if abs(mean) < 2 * se
               else f"{a['label'] if mean < 0 else b['label']} is better beyond 2 standard errors")
    return (f"{source} mean NLL difference {mean:+.4f} ± {se:.4f} nats/token over {len(diffs)} paired windows: "
            f"{verdict}")


def run_demo(args: argparse.Namespace) -> None:
    if "simdiff" not in _names(args.criteria):
        raise SimdiffError(f"the demo prunes with simdiff; keep it in --criteria (got {args.criteria!r})")
    document = run_comparison(args, args.model, None, [args.ratio])
    count = document["counts"][0]
    rows = {r["label"]: r for r in document["rows"] if r["count"] in (0, count)}
    dense, pruned = rows["dense"], rows["simdiff"]
    print(f"\n{document['model']}: SimDiff removes {count} of {document['num_layers']} layers "
          f"{pruned['removed_layers']}  (± = one standard error)")
    for source, report in dense["perplexity"].items():
        print(f"  {source} perplexity ({report['tokens']} tokens, {report['windows']} windows): dense "
              f"{_ppl_text(report)} -> pruned {_ppl_text(pruned['perplexity'][source])}")
    for task in dense["tasks"]:
        print(f"  {task} {args.metric} ({dense['tasks'][task]['samples']} questions): dense "
              f"{_acc_text(dense['tasks'][task], args.metric)} -> pruned {_acc_text(pruned['tasks'][task], args.metric)} "
              f"({_fmt(pruned['retained']['tasks'].get(task, {}).get(args.metric), 1)}% retained)")
    if DEMO_RIVAL in rows:
        for source in dense["perplexity"]:
            print(f"  SimDiff vs {DEMO_RIVAL}: {noise_note(pruned, rows[DEMO_RIVAL], source)}")
    print("\nall criteria:")
    print_summary(document, args.metric)
    print(f"\ncomparison folder: {args.out} (results.md, results.json, layer_ranks.png, perplexity_vs_removed.png "
          "and their SVGs); a small smoke test: the measured comparison is in docs/results.md")
