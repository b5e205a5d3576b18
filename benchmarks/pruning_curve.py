"""The pruning curve on a real model: every method at every layer count, each distinct removed set evaluated once.

Methods (all on the same calibration: the ``Calibration`` default, WikiText-2 validation):

- ``simdiff`` (defaults), ``simdiff:skip-first`` (the same, position 0 of each window left out of the
  statistics), ``block_influence``, ``angular_block``, ``taylor``: one-shot selections on all calibration
  windows, as ``simdiff prune`` makes them; ``simdiff:seed=K`` (also ``block_influence``, ``mssd``,
  ``masd``): the same on calibration draw K, as ``simdiff prune --seed K``;
- ``ppl_skip`` (one-shot) and ``ppl_skip:iterative`` (SLEB-style: remove one layer, re-score the rest):
  on the first ``--skip-samples`` calibration windows, since each costs one loss pass per remaining layer
  and step; the iterative selections for every count are prefixes of one run to the largest count;
- ``alpha-auto:kl``, ``alpha-auto:ppl``: the exact alpha path on the scoring windows, chosen on the disjoint
  held-out windows by each objective; ``best-of:kl``: the path pooled with the one-pass criteria
  (``simdiff prune --alpha auto --objective kl|ppl`` and ``--criterion best-of``); a ``:margin=M`` suffix
  sets ``--margin`` (default: the tool's).

A ``+heal`` suffix heals (``--heal linear``, default ridge): ``simdiff+heal`` (any one-shot method) is that
method's set healed on ``--heal-samples`` calibration windows, as ``simdiff prune --heal linear`` saves it;
``alpha-auto:kl+heal`` is the search that scores every candidate healed (``--alpha auto --heal linear``), its
winner healed on the calibration windows, as that command saves it. Healed sets are keys ``SET+heal`` in the JSON's
``sets``, each with its heal record (``SET+heal@scoring``, in older curves: the winner healed on the search's own heal
windows, as ``prune`` saved it before it refitted the chosen set's heal). ``--heal-calib SOURCE`` fits the
``+heal`` maps on another calibration text (a folder of files mixes domains; use a JSON of its own).

Each distinct set is evaluated by bypassing its layers in the loaded model (healed first where it says so): perplexity on every ``--ppl``
source (its first ``--eval-tokens`` tokens, windows of ``--eval-seq-len``, with per-window standard
errors), then lm-eval tasks (PIQA) on ``--limit`` questions, set by set (every part of one set before the
next). Methods are selected, then evaluated, in ``--methods`` order, each in ``--counts`` order. The JSON is
rewritten after every selection and evaluation, so a stopped run keeps what it measured, and ``--resume`` adds
methods or measurements to it; ``--reuse OLD.json`` takes the measurements of an earlier curve with the same
evaluation protocol instead of repeating them.

    python benchmarks/pruning_curve.py --counts 2,4,6,8,10,12 --json runs/curve.json \\
        --methods simdiff,block_influence,alpha-auto:kl,alpha-auto:ppl \\
        --ppl wikitext2,/usr/share/doc/python3.11/html/_sources/tutorial --eval-tokens 65536,16384 --limit 500
    python benchmarks/pruning_curve.py --resume ...same options... --methods angular_block,ppl_skip:iterative
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

from simdiff.config.settings import (
    DEFAULT_HEAL_SAMPLES,
    DEFAULT_HEAL_WEIGHTING,
    HEAL_WEIGHTINGS,
    SearchSettings,
)
from simdiff.criteria import LAYER_STATS, SKIP_LOSS, TAYLOR, Options
from simdiff.data import batches, calibration_batches, calibration_windows
from simdiff.evaluate.suite import EvalSettings, Evaluator
from simdiff.model import load_model
from simdiff.model.layers import bypass_layers
from simdiff.selection.choose import choose, make_searcher
from simdiff.selection.evidence import block_sizes_for, gather_evidence
from simdiff.selection.search import split_calibration
from simdiff.selection.spec import BEST_OF
from simdiff.store.save import provenance
from simdiff.surgery.heal import healed_bypass, search_healer
from simdiff.workflows.api import Calibration

ONE_SHOT = ("simdiff", "block_influence", "angular_block", "taylor", "ppl_skip")
log = logging.getLogger("pruning_curve")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--counts", default="2,4,6,8,10,12", help="evaluated in this order")
    parser.add_argument("--methods", default="simdiff,block_influence,alpha-auto:kl,alpha-auto:ppl,simdiff:skip-first,"
                                             "angular_block,taylor,best-of:kl,ppl_skip,ppl_skip:iterative",
                        help="selected, then evaluated, in this order")
    parser.add_argument("--heldout-samples", type=int, default=Calibration().heldout_samples)
    parser.add_argument("--skip-samples", type=int, default=None,
                        help="ppl_skip (one-shot and iterative) scores on the first N calibration windows only "
                             "(default: all); its cost is one loss pass per remaining layer and step")
    parser.add_argument("--ppl", default="wikitext2", help="comma-separated sources, evaluated one after the other")
    parser.add_argument("--eval-tokens", default="16384",
                        help="tokens scored per --ppl source: one number, or one per source (comma-separated)")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--tasks", default="piqa")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--one-pass", action="store_true",
                        help="score the one-shot methods on the search's scoring windows too (one statistics pass "
                             "for everything; they differ from `prune`'s windows, which also cover the held-out span)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the selections and measurements already in --json; select only the methods it "
                             "lacks and evaluate only what is missing")
    parser.add_argument("--heal-calib", default=None,
                        help="fit the +heal methods' maps on this calibration source instead (same draw: samples, "
                             "window length, seed); a folder of text files mixes domains")
    parser.add_argument("--heal-samples", type=int, default=DEFAULT_HEAL_SAMPLES,
                        help="windows (of the calibration's length) every heal is fitted on, as --heal-samples")
    parser.add_argument("--heal-weighting", default=DEFAULT_HEAL_WEIGHTING, choices=HEAL_WEIGHTINGS,
                        help="every heal's token weights, as --heal-weighting")
    parser.add_argument("--reuse", default=None,
                        help="an earlier curve JSON: its measurements of the same sets, on the same sources, "
                             "token counts, window length and --limit, are copied instead of re-measured")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "lm_eval", "lm-eval", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    counts = [int(c) for c in args.counts.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    sources = args.ppl.split(",") if args.ppl else []
    tokens = [int(t) for t in args.eval_tokens.split(",")]
    tokens = tokens * len(sources) if len(tokens) == 1 else tokens
    if len(tokens) != len(sources):
        parser.error(f"--eval-tokens gives {len(tokens)} numbers for {len(sources)} --ppl sources")
    model, tokenizer = load_model(args.model)
    calibration = Calibration(data_dir=args.data_dir, heldout_samples=args.heldout_samples)
    options = Options()
    out = Path(args.json)
    if args.resume:
        doc = json.loads(out.read_text(encoding="utf-8"))
    else:
        doc = {"model": args.model, "counts": counts, "methods": [], "calibration": asdict(calibration),
               "options": asdict(options), "search": asdict(SearchSettings()), "evaluation": {},
               "selections": [], "sets": {}, "costs": {}, **provenance()}
    doc["evaluation"] = {"ppl": sources, "eval_tokens": dict(zip(sources, tokens)), "eval_seq_len": args.eval_seq_len,
                         "tasks": args.tasks, "limit": args.limit}
    doc["methods"] = list(dict.fromkeys([*doc["methods"], *methods]))
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")

    if args.reuse:
        reuse_measurements(doc, json.loads(Path(args.reuse).read_text(encoding="utf-8")))
    selected = {s["method"] for s in doc["selections"]}
    todo = [m for m in methods if m not in selected]
    select_methods(model, tokenizer, calibration, options, doc, save, counts, todo, args)
    evaluate_all(model, tokenizer, calibration, doc, args, save, counts, methods, dict(zip(sources, tokens)))


def reuse_measurements(doc: dict, old: dict) -> None:
    """Copy ``old``'s measurements of plain (unhealed) sets where its protocol matches ``doc``'s: perplexity per
    source with the same token count and window length, tasks with the same ``limit``."""
    mine, theirs = doc["evaluation"], old.get("evaluation", {})
    same_ppl = [s for s in mine["ppl"] if theirs.get("eval_seq_len") == mine["eval_seq_len"]
                and theirs.get("eval_tokens", {}).get(s) == mine["eval_tokens"][s]]
    same_tasks = theirs.get("limit") == mine["limit"]
    for key, entry in old.get("sets", {}).items():
        if "+heal" in key:
            continue
        target = doc["sets"].setdefault(key, {"removed": entry["removed"]})
        for source in same_ppl:
            if source in entry.get("perplexity", {}):
                target.setdefault("perplexity", {}).setdefault(source, entry["perplexity"][source])
        if same_tasks:
            for task, scores in entry.get("tasks", {}).items():
                target.setdefault("tasks", {}).setdefault(task, scores)
        target.setdefault("reused_from", old.get("created"))


def select_methods(model, tokenizer, calibration, options: Options, doc: dict, save, counts: list[int],
                   methods: list[str], args) -> None:
    """Append every (method, count) selection of ``methods`` to ``doc``, with the cost of each pass."""
    if not methods:
        return
    healed_copies = [m for m in methods if m.endswith("+heal") and not m.startswith(("alpha-auto", BEST_OF))]
    methods = list(dict.fromkeys(m.removesuffix("+heal") if m in healed_copies else m for m in methods))
    methods = [m for m in methods if m not in {s["method"] for s in doc["selections"]}]

    def select(method: str, evidence) -> None:
        criterion = method.split(":")[0]
        for count in counts:
            removed = choose(criterion, count, options, evidence).selection.removed
            doc["selections"].append({"method": method, "count": count, "removed": removed, "set": set_key(removed)})

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
    drawn: dict[int, list[str]] = {}  # METHOD:seed=K: a one-pass criterion on calibration draw K
    for method in methods:
        base, _, seed = method.partition(":seed=")
        if seed and base in ("simdiff", "block_influence", "mssd", "masd"):
            drawn.setdefault(int(seed), []).append(method)
    for seed, wanted in drawn.items():
        draw = calibration_windows(tokenizer, calibration.source, calibration.samples, calibration.seq_len, seed,
                                   calibration.data_dir)
        evidence = gather_evidence(model, batches(draw, calibration.batch_size), {LAYER_STATS})
        for method in wanted:
            select(method, evidence)
            for selection in doc["selections"][-len(counts):]:
                selection["calibration_seed"] = seed
        save()
    searches: dict[tuple[str, float | None, bool], list[tuple[str, str]]] = {}
    for method in methods:  # alpha-auto:OBJECTIVE[:margin=M][+heal] and best-of:OBJECTIVE[:margin=M][+heal]
        kind, _, rest = method.partition(":")
        if kind in ("alpha-auto", BEST_OF):
            healed = rest.endswith("+heal")
            objective, _, margin = rest.removesuffix("+heal").partition(":margin=")
            searches.setdefault((objective, float(margin) if margin else None, healed), []).append(
                ("alpha" if kind == "alpha-auto" else BEST_OF, method))
    for (objective, margin, healed), kinds in searches.items():
        settings = SearchSettings(objective=objective)
        settings = replace(settings, margin=settings.margin if margin is None else margin)
        start = time.perf_counter()
        searcher = make_searcher(model, tokenizer, calibration, settings, counts, {BEST_OF},  # the pool
                                 keep_first=int(healed), healer=search_healer("linear", weighting=args.heal_weighting) if healed else None,
                                 heal_samples=args.heal_samples)
        if args.one_pass and objective == "kl":
            doc["costs"]["evidence scoring windows"] = searcher.calibration_seconds
            for method in plain:
                select(method, searcher.evidence)
        for count in counts:
            for kind, method in kinds:
                search = searcher.search(kind, count, options)
                key = set_key(search.removed) + ("+heal" if healed else "")
                doc["selections"].append({"method": method, "count": count, "removed": search.removed, "set": key,
                                          "search": {**search.to_dict(), "margin": settings.margin}})
                save()
        doc["costs"][f"searches {objective} margin {settings.margin:g}{' healed' if healed else ''}"] = \
            time.perf_counter() - start
        save()
    skip_windows = windows[: args.skip_samples] if args.skip_samples else windows
    if "ppl_skip" in methods or "ppl_skip:iterative" in methods:
        doc["costs"]["ppl_skip windows"] = int(skip_windows.shape[0])
        skip_batches = batches(skip_windows, calibration.batch_size)
        start = time.perf_counter()
        evidence = gather_evidence(model, skip_batches, {SKIP_LOSS})
        doc["costs"]["evidence ppl_skip"] = time.perf_counter() - start
        if "ppl_skip" in methods:
            select("ppl_skip", evidence)
            save()
        if "ppl_skip:iterative" in methods:
            start = time.perf_counter()
            steps = choose("ppl_skip", max(counts), options, evidence, iterative=True, model=model,
                           batches=skip_batches).selection.steps
            order = [step["removed"] for step in steps]
            for count in counts:
                doc["selections"].append({"method": "ppl_skip:iterative", "count": count,
                                          "removed": sorted(order[:count]), "order": order[:count]})
            doc["costs"]["iterative ppl_skip"] = time.perf_counter() - start
            save()
    for method in healed_copies:  # the base method's sets, healed on the calibration windows as prune does
        base = method.removesuffix("+heal")
        for selection in [s for s in doc["selections"] if s["method"] == base]:
            if 0 in selection["removed"]:
                raise SystemExit(f"{base} removes layer 0 at {selection['count']} layers: --heal linear keeps it")
            doc["selections"].append({**selection, "method": method, "set": selection["set"] + "+heal"})
        save()


def evaluate_all(model, tokenizer, calibration, doc: dict, args, save, counts: list[int], methods: list[str],
                 tokens: dict[str, int]) -> None:
    """Every distinct set (dense first, then ``methods`` in order, each by ``counts`` order), all its missing
    parts at once: one heal fit per healed set."""
    evaluators = {("perplexity", source): Evaluator(model, tokenizer, EvalSettings(
        ppl=[source], seq_len=args.eval_seq_len, max_tokens=max_tokens, batch_size=4, data_dir=args.data_dir))
        for source, max_tokens in tokens.items()}
    if args.tasks:
        evaluators[("tasks", args.tasks)] = Evaluator(model, tokenizer, EvalSettings(
            ppl=[], tasks=args.tasks.split(","), limit=args.limit, data_dir=args.data_dir))
    heal_calibration = replace(calibration, source=args.heal_calib) if args.heal_calib else calibration
    doc["heal_calibration"], doc["heal_samples"] = heal_calibration.source, args.heal_samples
    doc["heal_weighting"] = args.heal_weighting
    fit_windows = {"+heal": lambda: calibration_batches(heal_calibration, tokenizer, args.heal_samples),
                   "+heal@scoring": lambda: batches(split_calibration(tokenizer, calibration, args.heal_samples).scoring,
                                                    calibration.batch_size)}
    wanted = ["dense"] + [selection_key(s) for m in methods for c in counts for s in doc["selections"]
                          if s["count"] == c and s["method"] == m]
    for key in dict.fromkeys(wanted):
        removed = [int(x) for x in key.partition("+")[0].split(",")] if key != "dense" else []
        entry = doc["sets"].setdefault(key, {"removed": removed})
        missing = [(part, name) for part, name in evaluators if not set(
            evaluators[(part, name)].settings.ppl if part == "perplexity" else evaluators[(part, name)].settings.tasks)
            <= set(entry.get(part, {}))]
        if not missing:
            continue
        heal = "+" + key.partition("+")[2] if "+" in key else None
        with (healed_bypass(model, fit_windows[heal](), removed, weighting=args.heal_weighting) if heal
              else bypass_layers(model, removed)) as record:
            if heal:
                entry["heal"] = record.to_dict()
            for part, name in missing:
                log.info("%s (%s) of %s", part, name, key)
                result = evaluators[(part, name)](key)
                entry.setdefault(part, {}).update(result[part])
                entry.setdefault("seconds", {})[name] = result["eval_seconds"]
                save()


def set_key(removed: list[int]) -> str:
    """The key of a removed set in the JSON's ``sets``: "3,12,13" (ascending), "dense" for none."""
    return ",".join(map(str, removed)) or "dense"


def selection_key(selection: dict) -> str:
    """The ``sets`` key a selection was evaluated under: its set, ``+heal`` (healed on the calibration windows)
    or ``+heal@scoring`` (on a healed search's scoring windows); older JSONs have no ``set``."""
    return selection.get("set") or set_key(selection["removed"])


if __name__ == "__main__":
    main()
