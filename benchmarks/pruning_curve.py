"""The pruning curve on a real model: every method at every layer count, each distinct removed set evaluated once.

Methods (all on the same calibration: the ``Calibration`` default, WikiText-2 validation):

- ``simdiff`` (defaults), ``simdiff:skip-first`` (the same, position 0 of each window left out of the
  statistics), ``block_influence``, ``angular_block``, ``taylor``, ``ppl_skip`` (one-shot): one-shot
  selections on all calibration windows, as ``simdiff prune`` makes them;
- ``alpha-auto:kl``, ``alpha-auto:ppl``: the exact alpha path on the scoring windows, chosen on the disjoint
  held-out windows by each objective; ``best-of:kl``: the path pooled with the one-pass criteria
  (``simdiff prune --alpha auto --objective kl|ppl`` and ``--criterion best-of``).

Each distinct set is evaluated by bypassing its layers in the loaded model: perplexity on every ``--ppl``
source (first ``--eval-tokens`` tokens, windows of ``--eval-seq-len``, with per-window standard errors),
then, in a second phase, lm-eval PIQA on ``--limit`` questions. The JSON is rewritten after every
evaluation, so a stopped run keeps what it measured.

    python benchmarks/pruning_curve.py --counts 2,4,6,8,10,12 --json runs/curve.json \\
        --ppl wikitext2,/usr/share/doc/python3.11/html/_sources/tutorial --eval-tokens 16384 --limit 200
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from simdiff.api import Calibration
from simdiff.criteria import LAYER_STATS, SKIP_LOSS, TAYLOR, Options
from simdiff.data import batches, calibration_windows
from simdiff.evaluate.suite import EvalSettings, Evaluator
from simdiff.model import load_model
from simdiff.pipeline import block_sizes_for, choose_one_shot, gather_evidence
from simdiff.save import provenance
from simdiff.surgery import bypass_layers
from simdiff.tune import BEST_OF, Searcher, SearchSettings

ONE_SHOT = ("simdiff", "block_influence", "angular_block", "taylor", "ppl_skip")
log = logging.getLogger("pruning_curve")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--counts", default="2,4,6,8,10,12", help="evaluated in this order")
    parser.add_argument("--methods", default="simdiff,simdiff:skip-first,block_influence,angular_block,taylor,ppl_skip,"
                                             "alpha-auto:kl,alpha-auto:ppl,best-of:kl")
    parser.add_argument("--heldout-samples", type=int, default=Calibration().heldout_samples)
    parser.add_argument("--ppl", default="wikitext2", help="comma-separated sources, evaluated one after the other")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--tasks", default="piqa")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--one-pass", action="store_true",
                        help="score the one-shot methods on the search's scoring windows too (one statistics pass "
                             "for everything; they differ from `prune`'s windows, which also cover the held-out span)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the selections already in --json and only evaluate the sets of --methods")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "lm_eval", "lm-eval", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    counts = [int(c) for c in args.counts.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    model, tokenizer = load_model(args.model)
    calibration = Calibration(data_dir=args.data_dir, heldout_samples=args.heldout_samples)
    options = Options()
    doc: dict = {"model": args.model, "counts": counts, "methods": methods, "calibration": asdict(calibration),
                 "options": asdict(options), "search": asdict(SearchSettings()),
                 "evaluation": {"ppl": args.ppl.split(","), "eval_tokens": args.eval_tokens,
                                "eval_seq_len": args.eval_seq_len, "tasks": args.tasks, "limit": args.limit},
                 "selections": [], "sets": {}, "costs": {}, **provenance()}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")

    if args.resume:
        doc = json.loads(out.read_text(encoding="utf-8"))
        evaluate_all(model, tokenizer, doc, args, save, counts, methods)
        return

    def select(method: str, evidence) -> None:
        criterion = method.split(":")[0]
        for count in counts:
            doc["selections"].append({"method": method, "count": count,
                                      "removed": choose_one_shot(criterion, evidence, count, options).removed})

    windows = calibration_windows(tokenizer, calibration.source, calibration.samples, calibration.seq_len,
                                  calibration.seed, calibration.data_dir)
    plain = [m for m in methods if m in ("simdiff", "block_influence", "angular_block", "taylor")]
    for label, skip, wanted in (("all", False, plain), ("skip-first", True, ["simdiff:skip-first"])):
        wanted = [m for m in wanted if m in methods]
        if not wanted or (args.one_pass and label == "all"):
            continue
        needs = {LAYER_STATS} | ({TAYLOR} if "taylor" in wanted else set())
        start = time.perf_counter()
        evidence = gather_evidence(model, batches(windows, calibration.batch_size, skip), needs,
                                   block_sizes_for(["angular_block"], counts))
        doc["costs"][f"evidence {label}"] = time.perf_counter() - start
        for method in wanted:
            select(method, evidence)
    save()
    for objective in ("kl", "ppl"):
        kinds = [k for k in ("alpha", BEST_OF) if f"{'alpha-auto' if k == 'alpha' else k}:{objective}" in methods]
        if not kinds:
            continue
        settings = SearchSettings(objective=objective)
        start = time.perf_counter()
        searcher = Searcher(model, tokenizer, calibration, settings, counts, settings.pool)
        if args.one_pass and objective == "kl":
            doc["costs"]["evidence scoring windows"] = searcher.calibration_seconds
            for method in plain:
                select(method, searcher.evidence)
        for count in counts:
            for kind in kinds:
                search = searcher.search(kind, count, options)
                doc["selections"].append({"method": f"{'alpha-auto' if kind == 'alpha' else kind}:{objective}",
                                          "count": count, "removed": search.removed, "search": search.to_dict()})
                save()
        doc["costs"][f"searches {objective}"] = time.perf_counter() - start
    if "ppl_skip" in methods:
        start = time.perf_counter()
        select("ppl_skip", gather_evidence(model, batches(windows, calibration.batch_size), {SKIP_LOSS}))
        doc["costs"]["evidence ppl_skip"] = time.perf_counter() - start
        save()
    evaluate_all(model, tokenizer, doc, args, save, counts, methods)


def evaluate_all(model, tokenizer, doc: dict, args, save, counts: list[int], methods: list[str]) -> None:
    for source in args.ppl.split(","):
        settings = EvalSettings(ppl=[source], seq_len=args.eval_seq_len, max_tokens=args.eval_tokens, batch_size=4,
                                data_dir=args.data_dir)
        evaluate_sets(model, Evaluator(model, tokenizer, settings), doc, "perplexity", save, counts, methods)
    if args.tasks:
        settings = EvalSettings(ppl=[], tasks=args.tasks.split(","), limit=args.limit, data_dir=args.data_dir)
        evaluate_sets(model, Evaluator(model, tokenizer, settings), doc, "tasks", save, counts, methods)


def evaluate_sets(model, evaluator, doc: dict, part: str, save, counts: list[int], methods: list[str]) -> None:
    """Evaluate (``part`` of) every distinct removed set of ``methods`` not yet measured: dense first, then by
    count order."""
    wanted = [[]] + [s["removed"] for c in counts for s in doc["selections"] if s["count"] == c
                     and s["method"] in methods]
    for removed in wanted:
        key = ",".join(map(str, removed)) or "dense"
        entry = doc["sets"].setdefault(key, {"removed": removed})
        if set(evaluator.settings.ppl if part == "perplexity" else evaluator.settings.tasks) <= set(entry.get(part, {})):
            continue
        log.info("%s of %s", part, key)
        with bypass_layers(model, removed):
            result = evaluator(key)
        entry.setdefault(part, {}).update(result[part])
        entry.setdefault("seconds", []).append(result["eval_seconds"])
        save()


if __name__ == "__main__":
    main()
