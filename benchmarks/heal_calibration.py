"""What ``--heal linear`` fits to: one removed set healed on different calibration texts and ridges, every
variant evaluated on the same texts, paired against the plain (unhealed) prune window by window.

Each variant is ``CALIB@RIDGE[@RUNS][@NxLEN][@WEIGHTING]``: ``CALIB`` a calibration source as ``--calib`` takes
it (a dataset name, a file, or a folder whose text files are read in sorted order: put several domains in one
folder to mix them), ``RIDGE`` the ``--heal-ridge``, ``RUNS`` (optional) the removed layers whose runs are healed
(the others are removed plainly; default: all), ``NxLEN`` (optional) the calibration draw, ``--samples`` windows
of ``--calib-seq-len`` tokens (default: the ``Calibration`` default, 32 x 256, seed 0), ``WEIGHTING`` (optional)
the ``--heal-weighting`` (default: the tool's).

    python benchmarks/heal_calibration.py --removed 3,12,13,14,16,17,25,26 \\
        --ppl wikitext2,/usr/share/doc/python3.11/html/_sources/tutorial,wikitext2-tok --eval-tokens 16384 \\
        --variants wikitext2@1e-4 wikitext2@1e-2 wikitext2@1e-1 wikitext2@1 wikitext2@1e-4@3,12,13,14 \\
                   /usr/share/doc/python3.11/html/_sources/howto@1e-4 mixed-folder/@1e-4 --json heal_calibration.json
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

from curve_report import paired

from simdiff.config.settings import DEFAULT_HEAL_WEIGHTING, HEAL_WEIGHTINGS
from simdiff.data import calibration_batches
from simdiff.evaluate.suite import EvalSettings, Evaluator
from simdiff.model import load_model
from simdiff.model.layers import bypass_layers
from simdiff.store.save import provenance
from simdiff.surgery.heal import heal_layers
from simdiff.workflows.api import Calibration

log = logging.getLogger("heal_calibration")


def parse_variant(text: str, removed: list[int]) -> tuple[Calibration, float, list[int], str]:
    """``CALIB@RIDGE[@RUNS][@NxLEN][@WEIGHTING]`` -> (calibration, ridge, healed layers, weighting)."""
    source, ridge, *extra = text.split("@")
    weightings = [part for part in extra if part in HEAL_WEIGHTINGS]
    draws = [part for part in extra if "x" in part]
    runs = [part for part in extra if "x" not in part and part not in HEAL_WEIGHTINGS]
    healed = [int(x) for x in runs[0].split(",")] if runs else list(removed)
    if len(runs) > 1 or len(draws) > 1 or len(weightings) > 1 or not set(healed) <= set(removed):
        raise SystemExit(f"{text}: expected CALIB@RIDGE[@RUNS][@NxLEN][@WEIGHTING] with RUNS among --removed "
                         f"{removed}")
    calibration = Calibration(source=source)
    if draws:
        samples, seq_len = (int(x) for x in draws[0].split("x"))
        calibration = replace(calibration, samples=samples, seq_len=seq_len)
    return calibration, float(ridge), healed, weightings[0] if weightings else DEFAULT_HEAL_WEIGHTING


def evaluate(evaluators: dict, name: str) -> dict:
    return {source: evaluator(name)["perplexity"][source] for source, evaluator in evaluators.items()}


def evaluate_tasks(evaluator: Evaluator | None, name: str) -> dict:
    """``{task: {"acc": .., "correct": [0/1 per question, by doc_id]}}`` (lm-eval's per-question records)."""
    if evaluator is None:
        return {}
    result = evaluator(name)["tasks"]
    out = {}
    for task, scores in result.items():
        records = sorted(evaluator.lm_eval_output["samples"][scores["lm_eval_task"]], key=lambda r: r["doc_id"])
        out[task] = {"acc": scores["acc"], "correct": [int(r["acc"]) for r in records]}
    return out


def paired_accuracy(mine: dict, plain: dict) -> str:
    """Accuracy change against the plain prune on the same questions, ± the paired standard error."""
    from simdiff.collect.nll import standard_error

    diffs = [a - b for a, b in zip(mine["correct"], plain["correct"])]
    mean = sum(diffs) / len(diffs)
    se = standard_error([float(d) for d in diffs])
    return f"{mine['acc']:.3f} ({mean:+.3f} ± {se:.3f}{' *' if abs(mean) >= 2 * se else ''})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--removed", required=True, help="the removed layers (input numbering)")
    parser.add_argument("--variants", nargs="+", required=True, help="CALIB@RIDGE[@RUNS] each")
    parser.add_argument("--ppl", default="wikitext2", help="comma-separated evaluation sources")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--tasks", default="", help="lm-eval tasks (comma list), paired question by question")
    parser.add_argument("--limit", type=int, default=0, help="questions per task (0: all)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    removed = [int(x) for x in args.removed.split(",")]
    variants = [parse_variant(v, removed) for v in args.variants]
    model, tokenizer = load_model(args.model)
    evaluators = {source: Evaluator(model, tokenizer, EvalSettings(
        ppl=[source], seq_len=args.eval_seq_len, max_tokens=args.eval_tokens, batch_size=4, data_dir=args.data_dir))
        for source in args.ppl.split(",")}
    tasks = Evaluator(model, tokenizer, EvalSettings(ppl=[], tasks=args.tasks.split(","), limit=args.limit or None,
                                                     data_dir=args.data_dir, log_samples=True)) if args.tasks else None
    doc = {"model": args.model, "removed": removed, "evaluation": {"ppl": args.ppl.split(","),
           "eval_tokens": args.eval_tokens, "eval_seq_len": args.eval_seq_len, "tasks": args.tasks,
           "limit": args.limit or None}, "variants": [], **provenance()}
    with bypass_layers(model, removed):
        doc["plain"] = evaluate(evaluators, "plain")
        doc["plain_tasks"] = evaluate_tasks(tasks, "plain")
    for text, (calibration, ridge, healed, weighting) in zip(args.variants, variants):
        original = {name: p.detach().clone() for name, p in model.named_parameters()}
        try:
            record = heal_layers(model, calibration_batches(calibration, tokenizer), healed, ridge,
                                 weighting=weighting)
            with bypass_layers(model, removed):
                result = evaluate(evaluators, text)
                task_result = evaluate_tasks(tasks, text)
        finally:
            params = dict(model.named_parameters())
            for name, tensor in original.items():
                params[name].data.copy_(tensor)
        doc["variants"].append({"variant": text, "calibration": calibration.source, "ridge": ridge, "healed": healed,
                                "weighting": weighting,
                                "windows": [calibration.samples, calibration.seq_len],
                                "heal": record.to_dict(), "perplexity": result, "tasks": task_result})
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(report(doc))


def report(doc: dict) -> str:
    """Markdown: plain, then each variant's perplexity per text with the paired Δ NLL against plain, and its
    task accuracy with the paired change against plain."""
    sources = doc["evaluation"]["ppl"]
    tasks = list(doc.get("plain_tasks", {}))
    lines = ["| heal fitted on | windows | ridge | weighting | runs healed | " + " | ".join(sources + tasks) + " |",
             "|---|---|---|---|---|" + "---|" * len(sources + tasks),
             "| (plain prune) | – | – | – | – | " + " | ".join(
                 [f"{doc['plain'][s]['perplexity']:.2f}" for s in sources]
                 + [f"{doc['plain_tasks'][t]['acc']:.3f}" for t in tasks]) + " |"]
    for v in doc["variants"]:
        cells = [f"{v['perplexity'][s]['perplexity']:.2f} ({paired(v['perplexity'][s], doc['plain'][s])})"
                 for s in sources]
        cells += [paired_accuracy(v["tasks"][t], doc["plain_tasks"][t]) for t in tasks]
        runs = "all" if v["healed"] == doc["removed"] else ",".join(map(str, v["healed"]))
        windows = "x".join(map(str, v.get("windows", [32, 256])))
        lines.append(f"| {v['calibration']} | {windows} | {v['ridge']:g} | {v.get('weighting', 'uniform')} | {runs} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
