"""What ``--heal linear`` fits to: one removed set healed on different calibration texts and ridges, every
variant evaluated on the same texts, paired against the plain (unhealed) prune window by window.

Each variant is ``CALIB@RIDGE[@RUNS][@NxLEN]``: ``CALIB`` a calibration source as ``--calib`` takes it (a
dataset name, a file, or a folder whose text files are read in sorted order: put several domains in one folder to
mix them), ``RIDGE`` the ``--heal-ridge``, ``RUNS`` (optional) the removed layers whose runs are healed (the
others are removed plainly; default: all), ``NxLEN`` (optional) the calibration draw, ``--samples`` windows of
``--calib-seq-len`` tokens (default: the ``Calibration`` default, 32 x 256, seed 0).

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

from simdiff.data import calibration_batches
from simdiff.evaluate.suite import EvalSettings, Evaluator
from simdiff.model import load_model
from simdiff.model.layers import bypass_layers
from simdiff.store.save import provenance
from simdiff.surgery.heal import heal_layers
from simdiff.workflows.api import Calibration

log = logging.getLogger("heal_calibration")


def parse_variant(text: str, removed: list[int]) -> tuple[Calibration, float, list[int]]:
    """``CALIB@RIDGE[@RUNS][@NxLEN]`` -> (calibration, ridge, healed layers)."""
    source, ridge, *extra = text.split("@")
    draws = [part for part in extra if "x" in part]
    runs = [part for part in extra if "x" not in part]
    healed = [int(x) for x in runs[0].split(",")] if runs else list(removed)
    if len(runs) > 1 or len(draws) > 1 or not set(healed) <= set(removed):
        raise SystemExit(f"{text}: expected CALIB@RIDGE[@RUNS][@NxLEN] with RUNS among --removed {removed}")
    calibration = Calibration(source=source)
    if draws:
        samples, seq_len = (int(x) for x in draws[0].split("x"))
        calibration = replace(calibration, samples=samples, seq_len=seq_len)
    return calibration, float(ridge), healed


def evaluate(evaluators: dict, name: str) -> dict:
    return {source: evaluator(name)["perplexity"][source] for source, evaluator in evaluators.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--removed", required=True, help="the removed layers (input numbering)")
    parser.add_argument("--variants", nargs="+", required=True, help="CALIB@RIDGE[@RUNS] each")
    parser.add_argument("--ppl", default="wikitext2", help="comma-separated evaluation sources")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    removed = [int(x) for x in args.removed.split(",")]
    variants = [parse_variant(v, removed) for v in args.variants]
    model, tokenizer = load_model(args.model)
    evaluators = {source: Evaluator(model, tokenizer, EvalSettings(
        ppl=[source], seq_len=args.eval_seq_len, max_tokens=args.eval_tokens, batch_size=4))
        for source in args.ppl.split(",")}
    doc = {"model": args.model, "removed": removed, "evaluation": {"ppl": args.ppl.split(","),
           "eval_tokens": args.eval_tokens, "eval_seq_len": args.eval_seq_len}, "variants": [], **provenance()}
    with bypass_layers(model, removed):
        plain = evaluate(evaluators, "plain")
    doc["plain"] = plain
    for text, (calibration, ridge, healed) in zip(args.variants, variants):
        original = {name: p.detach().clone() for name, p in model.named_parameters()}
        try:
            record = heal_layers(model, calibration_batches(calibration, tokenizer), healed, ridge)
            with bypass_layers(model, removed):
                result = evaluate(evaluators, text)
        finally:
            params = dict(model.named_parameters())
            for name, tensor in original.items():
                params[name].data.copy_(tensor)
        doc["variants"].append({"variant": text, "calibration": calibration.source, "ridge": ridge, "healed": healed,
                                "windows": [calibration.samples, calibration.seq_len],
                                "heal": record.to_dict(), "perplexity": result})
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(report(doc))


def report(doc: dict) -> str:
    """Markdown: plain, then each variant's perplexity per text with the paired Δ NLL against plain."""
    sources = doc["evaluation"]["ppl"]
    lines = ["| heal fitted on | windows | ridge | runs healed | " + " | ".join(sources) + " |",
             "|---|---|---|---|" + "---|" * len(sources),
             "| (plain prune) | – | – | – | " + " | ".join(f"{doc['plain'][s]['perplexity']:.2f}" for s in sources) + " |"]
    for v in doc["variants"]:
        cells = [f"{v['perplexity'][s]['perplexity']:.2f} ({paired(v['perplexity'][s], doc['plain'][s])})"
                 for s in sources]
        runs = "all" if v["healed"] == doc["removed"] else ",".join(map(str, v["healed"]))
        windows = "x".join(map(str, v.get("windows", [32, 256])))
        lines.append(f"| {v['calibration']} | {windows} | {v['ridge']:g} | {runs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
