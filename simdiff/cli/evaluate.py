"""CLI commands ``simdiff eval``, ``simdiff compare`` and ``simdiff demo``."""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

from simdiff.cli.describe import describe_compare
from simdiff.cli.options import (
    add_calibration_options,
    add_command_flags,
    add_criterion_options,
    add_evaluation_options,
    add_model_options,
    add_output_options,
    add_search_options,
    add_selection_options,
    recipe_from_args,
)
from simdiff.config.flags import names
from simdiff.core.errors import PartialOutputError, SimdiffError, one_line

log = logging.getLogger("simdiff")

DOC_CRITERIA = "simdiff,simdiff:alpha=auto,block_influence,angular_block,ppl_skip,taylor,reverse,random"
EVAL_JSON = "evaluation.json"


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def recipe_sections(recipe, *sections: str) -> dict:
    """The parts of a recipe a command used (what it writes beside its outputs)."""
    document = recipe.to_dict()
    return {name: document[name] for name in sections}


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


# -- simdiff eval --------------------------------------------------------------------------------------
def add_eval_command(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="perplexity and zero-shot accuracy (lm-eval) of a model")
    add_model_options(parser)
    add_evaluation_options(parser)
    add_command_flags(parser, "baseline", "allow_protocol_mismatch", "json")
    add_output_options(parser, only=["overwrite"])
    parser.set_defaults(run=run_eval)


def evaluate_model(name: str, spec, settings) -> tuple[dict, dict]:
    """(our result, lm-eval's raw output for the tasks) of ``name`` loaded as ``spec``
    (:class:`simdiff.config.recipe.ModelSettings`) says."""
    from simdiff.evaluate.suite import Evaluator
    from simdiff.model.checks import check_seq_len
    from simdiff.model.load import load_from_settings

    model, tokenizer = load_from_settings(spec, None if name == spec.name else name)
    if settings.ppl:
        check_seq_len(model, settings.seq_len, "--eval-seq-len")
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


def evaluate_against(name: str, spec, settings, baseline: str | None,
                     allow_protocol_mismatch: bool = False) -> tuple[dict, dict, dict]:
    """Evaluate ``name``; with ``baseline`` (a model, or an earlier results JSON of the same protocol) add
    % retained. Returns (result, record, lm-eval output) and prints them."""
    from simdiff.evaluate.results import check_same_protocol, read_baseline
    from simdiff.evaluate.suite import percent_retained

    _quiet_lm_eval()
    baseline_path = baseline if baseline and baseline.endswith(".json") else None
    reference = read_baseline(baseline_path) if baseline_path else None
    if reference is not None and not allow_protocol_mismatch:  # before any model is loaded
        check_same_protocol(reference, {"settings": vars(settings)}, baseline_path, settings_only=True)
    result, lm_output = evaluate_model(name, spec, settings)
    record = _record(result, settings, lm_output)
    if reference is not None and not allow_protocol_mismatch:
        check_same_protocol(reference, record, baseline_path)
    if baseline and reference is None:  # a model: evaluated here with the same settings
        dense, dense_output = evaluate_model(baseline, spec, settings)
        reference = _record(dense, settings, dense_output)
    if reference is not None:
        record["baseline"] = reference
        record["retained"] = percent_retained(reference, result)
    _print_result(result, settings)
    if reference is not None:
        _print_result(reference, settings, prefix=f"baseline {reference.get('model', baseline)} ")
        kept = record["retained"]
        for source, ratio in kept["ppl_ratio"].items():
            print(f"{source}: perplexity ratio vs baseline {_fmt(ratio, 3)}")
        for metric, value in kept["average"].items():
            print(f"% retained ({metric}, mean over tasks): {_fmt(value, 1)}")
    return result, record, lm_output


def run_eval(args: argparse.Namespace) -> None:
    from simdiff.core.outputs import check_output_file, write_text_file
    from simdiff.evaluate.results import lm_eval_document, samples_date, write_samples
    from simdiff.store.save import provenance

    recipe = recipe_from_args(args)
    settings = recipe.evaluation.check()
    inputs = [recipe.model.name, args.baseline]
    if args.json:  # validated before any work
        check_output_file(args.json, args.overwrite, inputs)
    if settings.log_samples and not (args.json and settings.tasks):
        raise SimdiffError("--log-samples writes lm-eval's per-question records beside the results: give --json "
                           "FILE and --tasks")
    result, record, lm_output = evaluate_against(recipe.model.name, recipe.model, settings, args.baseline,
                                                 args.allow_protocol_mismatch)
    if args.json:
        extra = {**record, "recipe": recipe_sections(recipe, "model", "evaluation"), **provenance()}
        document = lm_eval_document(recipe.model.name, result, settings, lm_output, extra)
        text = json.dumps(document, indent=2, default=str, ensure_ascii=False) + "\n"
        write_text_file(args.json, text, args.overwrite, inputs)
        log.info("wrote %s", args.json)
        if settings.log_samples:
            try:
                for written in write_samples(Path(args.json), lm_output.get("samples", {}), result["tasks"],
                                             samples_date(), args.overwrite, inputs):
                    log.info("wrote %s", written)
            except Exception as exc:  # noqa: BLE001 - the results file stands: say so, exit 3
                raise PartialOutputError(f"saved {args.json!r} (the results, complete), but NOT written: the "
                                         f"--log-samples records ({one_line(str(exc)) or type(exc).__name__}); "
                                         "exit status 3: saved, an extra file failed") from exc


def pruned_evaluation(recipe, settings) -> tuple[str, Callable[[Path], None]]:
    """``simdiff run`` after a prune: the extra file evaluation.json (lm-eval's results schema), evaluating the
    saved folder against the dense model (:func:`simdiff.core.outputs.add_extras` adds it to the folder)."""
    from simdiff.evaluate.results import lm_eval_document
    from simdiff.store.save import provenance

    def write(path: Path) -> None:
        result, record, lm_output = evaluate_against(recipe.out, recipe.model, settings, recipe.model.name)
        document = lm_eval_document(recipe.out, result, settings, lm_output,
                                    {**record, "recipe": recipe.to_dict(), **provenance()})
        path.write_text(json.dumps(document, indent=2, default=str, ensure_ascii=False) + "\n", encoding="utf-8")

    return EVAL_JSON, write


# -- simdiff compare -----------------------------------------------------------------------------------
def add_compare_parts(parser: argparse.ArgumentParser, criteria: str, out: str | None = None,
                      evaluation: dict | None = None, calibration: dict | None = None,
                      counts: tuple[str, ...] = ("num_layers", "ratio"), selection: dict | None = None) -> None:
    add_selection_options(parser, only=["criterion", *counts, "keep_first", "keep_last", "heal", "heal_ridge",
                                        "heal_samples", "heal_weighting"],
                          defaults={"criterion": criteria, **(selection or {})})
    add_output_options(parser, out)
    add_evaluation_options(parser, defaults=evaluation, exclude=("log_samples",))  # eval --json writes samples
    add_calibration_options(parser, defaults=calibration)
    add_criterion_options(parser)
    add_search_options(parser)


def add_compare_command(subparsers) -> None:
    parser = subparsers.add_parser("compare", help="compare criteria: one calibration pass, every candidate evaluated")
    add_model_options(parser)
    add_compare_parts(parser, DOC_CRITERIA)
    parser.set_defaults(run=run_compare, describe=describe_compare)


def run_comparison_recipe(recipe) -> dict:
    """Load the model, run :func:`simdiff.workflows.compare.compare` as ``recipe`` says, write the folder; returns the
    document (its ``recipe`` key holds the resolved recipe)."""
    from dataclasses import replace

    from simdiff.collect.distributed import launched_world
    from simdiff.core.outputs import check_output_dir, claim_output_dir
    from simdiff.model.layers import find_decoder_layers
    from simdiff.model.load import load_from_settings
    from simdiff.selection.rank import resolve_counts
    from simdiff.selection.spec import parse_candidates
    from simdiff.workflows.api import heal_keep_first
    from simdiff.workflows.compare import CompareSetup, compare, write_results

    _quiet_lm_eval()
    recipe.check()
    if launched_world() is not None:  # every rank stops here alike: none is left to kill rank 0 mid-save
        raise SimdiffError("a comparison runs in one process (every candidate is evaluated on one copy of the "
                           "model): run it without torchrun/accelerate launch; prune, score and `simdiff run` of a "
                           "prune recipe are the data-parallel commands")
    if recipe.out is None:
        raise SimdiffError("give --out DIR: the folder results.json, results.md and the plots go to")
    sel, spec = recipe.selection, recipe.model
    if sel.heal != "none" and sel.layers is not None:
        raise SimdiffError("compare chooses the layers by criterion; --layers with --heal is `simdiff prune`")
    check_output_dir(recipe.out, recipe.overwrite, [spec.name])
    specs = parse_candidates(sel.criterion)
    settings = recipe.evaluation.check()
    with claim_output_dir(recipe.out, recipe.overwrite, [spec.name]) as claim:  # claimed before any model work
        model, tokenizer = load_from_settings(spec)
        total = len(find_decoder_layers(model))
        counts = resolve_counts(total, sel.num_layers, sel.ratio)
        setup = CompareSetup(specs, counts, recipe.calibration, recipe.options, settings, heal_keep_first(sel),
                             sel.keep_last, settings.metric, recipe.search, sel.heal, sel.heal_ridge,
                             sel.heal_samples, sel.heal_weighting)
        document = compare(model, tokenizer, setup, spec.name)
        document["recipe"] = replace(recipe, overwrite=False).to_dict()
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
    recipe = recipe_from_args(args)
    document = run_comparison_recipe(recipe)
    print_summary(document, recipe.evaluation.metric)
    print(f"wrote {recipe.out}/results.json, results.md and plots")


# -- simdiff demo --------------------------------------------------------------------------------------
DEMO_CRITERIA = "simdiff,block_influence,angular_block"
DEMO_RIVAL = "block_influence"


def add_demo_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="prune 25%% of smollm2-135m with SimDiff and baselines; perplexity and PIQA with standard errors")
    add_model_options(parser, defaults={"name": "smollm2-135m"}, shown={"name": "smollm2-135m"})
    # many short windows: 32 windows of 512 tokens give a per-window spread, hence a standard error
    add_compare_parts(parser, DEMO_CRITERIA, out="out/demo", counts=("ratio",), selection={"ratio": [0.25]},
                      evaluation={"tasks": ["piqa"], "limit": 50, "max_tokens": 16384, "seq_len": 512,
                                  "batch_size": 4},
                      calibration={"samples": 8})
    parser.set_defaults(run=run_demo)


def _ppl_text(report: dict) -> str:
    return f"{_fmt(report['perplexity'], 2)} ± {_fmt(report.get('perplexity_stderr'), 2)}"


def _acc_text(scores: dict, metric: str) -> str:
    return f"{_fmt(scores.get(metric))} ± {_fmt(scores.get(metric + '_stderr'))}"


def noise_note(a: dict, b: dict, source: str) -> str:
    """Paired comparison of two candidates' perplexity on the same windows: the difference and whether it is noise."""
    from simdiff.collect.nll import standard_error

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
    recipe = recipe_from_args(args)
    if "simdiff" not in names(recipe.selection.criterion):
        raise SimdiffError(f"the demo prunes with simdiff; keep it in --criterion (got {recipe.selection.criterion!r})")
    if len(recipe.selection.ratio or []) != 1:
        raise SimdiffError(f"the demo prunes one fraction of the layers; give one --ratio (got {recipe.selection.ratio})")
    document = run_comparison_recipe(recipe)
    metric = recipe.evaluation.metric
    count = document["counts"][0]
    rows = {r["label"]: r for r in document["rows"] if r["count"] in (0, count)}
    dense, pruned = rows["dense"], rows["simdiff"]
    print(f"\n{document['model']}: SimDiff removes {count} of {document['num_layers']} layers "
          f"{pruned['removed_layers']}  (± = one standard error)")
    for source, report in dense["perplexity"].items():
        print(f"  {source} perplexity ({report['tokens']} tokens, {report['windows']} windows): dense "
              f"{_ppl_text(report)} -> pruned {_ppl_text(pruned['perplexity'][source])}")
    for task in dense["tasks"]:
        print(f"  {task} {metric} ({dense['tasks'][task]['samples']} questions): dense "
              f"{_acc_text(dense['tasks'][task], metric)} -> pruned {_acc_text(pruned['tasks'][task], metric)} "
              f"({_fmt(pruned['retained']['tasks'].get(task, {}).get(metric), 1)}% retained)")
    if DEMO_RIVAL in rows:
        for source in dense["perplexity"]:
            print(f"  SimDiff vs {DEMO_RIVAL}: {noise_note(pruned, rows[DEMO_RIVAL], source)}")
    print("\nall criteria:")
    print_summary(document, metric)
    print(f"\ncomparison folder: {recipe.out} (results.md, results.json, layer_ranks.png, perplexity_vs_removed.png "
          "and their SVGs); a small smoke test: the measured comparison is in docs/results.md")
