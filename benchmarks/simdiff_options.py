"""Measure SimDiff's open options on a real model: WikiText-2 perplexity after removing K layers.

One calibration pass (WikiText-2 validation) gives the statistics for every option combination; each
distinct set of removed layers is evaluated once (WikiText-2 test slice) by bypassing it in the loaded model.
Prints a Markdown table (one row per option combination) and the best combinations; writes JSON with --json.

    python benchmarks/simdiff_options.py --model smollm2-135m --counts 4,8 --eval-tokens 8192
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import numpy as np
import torch

from simdiff.collect.nll import nll_over
from simdiff.criteria import Evidence, Options, get_criterion
from simdiff.data import (
    batches,
    bos_token_id,
    calibration_windows,
    contiguous_windows,
    load_text,
    tokenize_text,
)
from simdiff.model import load_model
from simdiff.model.layers import bypass_layers
from simdiff.report.tables import markdown_table
from simdiff.selection.evidence import gather_evidence
from simdiff.selection.rank import select_layers
from simdiff.store.save import provenance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--counts", default="4,8")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--betas", default="0,0.5,1")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--resume", action="store_true", help="reuse perplexities cached next to --json")
    parser.add_argument("--list-only", action="store_true", help="print the distinct layer sets and stop")
    args = parser.parse_args()
    torch.manual_seed(0)
    counts = [int(c) for c in args.counts.split(",")]
    model, tok = load_model(args.model)
    calib = batches(calibration_windows(tok, "wikitext2", args.samples, args.calib_seq_len, 0, args.data_dir), 4)
    evidence: Evidence = gather_evidence(model, calib, {"layer_stats"})
    test_ids = tokenize_text(tok, load_text("wikitext2", "test", args.data_dir))
    eval_batches = batches(contiguous_windows(test_ids, args.eval_seq_len, bos_token_id(tok), args.eval_tokens), 4)

    cache: dict[tuple[int, ...], float] = {}
    if args.resume and args.json and os.path.exists(args.json + ".cache"):
        with open(args.json + ".cache", encoding="utf-8") as handle:
            cache = {tuple(int(i) for i in k.split()): v for k, v in json.load(handle).items()}

    def ppl(removed: list[int]) -> float:
        key = tuple(removed)
        if key not in cache:
            start = time.perf_counter()
            with bypass_layers(model, removed):
                cache[key] = nll_over(model, eval_batches, desc=None).perplexity
            print(f"  removed {removed}: ppl {cache[key]:.2f} ({time.perf_counter() - start:.0f}s)", flush=True)
            if args.json:
                with open(args.json + ".cache", "w", encoding="utf-8") as handle:
                    json.dump({" ".join(map(str, k)): v for k, v in cache.items()}, handle)
        return cache[key]

    grid = itertools.product(["minmax", "zscore", "rank"], ["absolute", "relative"],
                             [float(a) for a in args.alphas.split(",")], [float(b) for b in args.betas.split(",")])
    rows = []
    for normalize, scale, alpha, beta in grid:
        if alpha == 1.0 and beta != 0.5:
            continue  # alpha = 1 ignores beta
        options = Options(alpha=alpha, beta=beta, normalize=normalize, diff_scale=scale)
        scores = get_criterion("simdiff").score(evidence, options)
        row = {"normalize": normalize, "diff_scale": scale, "alpha": alpha, "beta": beta}
        row.update({f"removed_{k}": select_layers(scores, k) for k in counts})
        rows.append(row)
    bi = get_criterion("block_influence").score(evidence, Options())
    bi_sets = {k: select_layers(bi, k) for k in counts}
    unique = {tuple(r[f"removed_{k}"]) for r in rows for k in counts} | {tuple(v) for v in bi_sets.values()}
    print(f"{len(rows)} option combinations select {len(unique)} distinct layer sets", flush=True)
    if args.list_only:
        for row in rows:
            print(row)
        return
    dense = ppl([])
    baseline = {k: ppl(bi_sets[k]) for k in counts}
    for row in rows:
        for k in counts:
            row[f"ppl_{k}"] = ppl(row[f"removed_{k}"])

    def gmean(row):
        return float(np.exp(np.mean([np.log(row[f"ppl_{k}"]) for k in counts])))

    header = ["normalize", "diff_scale", "alpha", "beta"] + [f"ppl @{k} removed" for k in counts] + ["geo-mean"]
    table = [[r["normalize"], r["diff_scale"], r["alpha"], r["beta"]] + [f"{r[f'ppl_{k}']:.2f}" for k in counts]
             + [f"{gmean(r):.2f}"] for r in sorted(rows, key=gmean)]
    print(f"\ndense perplexity {dense:.2f}; block_influence: " +
          ", ".join(f"{baseline[k]:.2f} @{k}" for k in counts))
    print(markdown_table(header, table))
    at_least_bi = [r for r in rows if all(r[f"ppl_{k}"] <= baseline[k] + 1e-9 for k in counts)]
    print(f"\n{len(at_least_bi)} of {len(rows)} combinations are at least as good as block_influence at every count")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"dense": dense, "block_influence": baseline, "rows": rows, "args": vars(args),
                       **provenance()}, handle, indent=2)


if __name__ == "__main__":
    main()
