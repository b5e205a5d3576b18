"""Cost of scoring: every statistic-based criterion in one pass vs a plain forward over the same windows.

    python benchmarks/scoring_cost.py --model smollm2-135m --samples 8 --calib-seq-len 128 --repeats 5

The plain pass is the same decoder-stack forward the scoring pass runs (``model.base_model``, no LM head,
no hooks), so the ratio is exactly the price of the hooks and statistics. A full forward with the LM head
is timed too, for context. Time: median of interleaved repeats (after a warm-up of each). Memory: peak
resident set (VmHWM, reset per phase; see simdiff.bench.memory), median over repeats; the weights are part
of both peaks, the growth above the start is shown as well. Targets: time <= 1.10x, peak memory <= 1.05x.
The ratios are printed last.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from simdiff.bench.measure import timed
from simdiff.bench.memory import track_peak
from simdiff.collect.hooks import run_decoder
from simdiff.core.progress import set_progress
from simdiff.criteria import Options
from simdiff.data import calibration_batches
from simdiff.model import load_model
from simdiff.model.layers import find_decoder_layers
from simdiff.selection.evidence import block_sizes_for, score_layers
from simdiff.selection.rank import resolve_count
from simdiff.store.save import provenance
from simdiff.workflows.api import FREE_CRITERIA, Calibration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows")
    parser.add_argument("--calib-seq-len", type=int, default=128)
    parser.add_argument("--calib-batch-size", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.25, help="removal ratio (sets the angular block size)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="auto", help="default: the checkpoint's own (float32 for smollm2-135m)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared, oversubscribed machine every parallel op "
                             "otherwise waits for a preempted thread)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    set_progress(False)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model, args.dtype, args.device)
    device = torch.device(args.device)
    batches = calibration_batches(Calibration(samples=args.samples, seq_len=args.calib_seq_len, batch_size=args.calib_batch_size), tokenizer)
    count = resolve_count(len(find_decoder_layers(model)), None, args.ratio)
    criteria = list(FREE_CRITERIA)
    sizes = block_sizes_for(criteria, [count])

    def plain() -> None:
        for batch in batches:
            run_decoder(model, batch)

    @torch.no_grad()
    def full() -> None:
        for batch in batches:
            b = batch.to(device)
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    def scoring() -> None:
        score_layers(model, batches, criteria, Options(), sizes)

    phases = {"plain decoder forward": plain, "scoring (all statistic criteria)": scoring,
              "full forward with LM head": full}
    times: dict[str, list[float]] = {k: [] for k in phases}
    peaks: dict[str, list[int]] = {k: [] for k in phases}
    growth: dict[str, list[int]] = {k: [] for k in phases}
    for fn in phases.values():
        fn()  # warm-up
    for r in range(args.repeats):
        order = list(phases) if r % 2 == 0 else list(reversed(phases))
        for name in order:
            times[name].append(timed(phases[name], device))
        for name in order:
            with track_peak(device) as peak:
                phases[name]()
            peaks[name].append(peak.peak)
            growth[name].append(peak.delta)
    med = {k: statistics.median(v) for k, v in times.items()}
    mpeak = {k: statistics.median(v) for k, v in peaks.items()}
    mgrowth = {k: statistics.median(v) for k, v in growth.items()}
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    print(f"model {args.model}, {args.samples} windows x {args.calib_seq_len} tokens ({tokens} tokens), "
          f"batch {args.calib_batch_size}, criteria {','.join(criteria)}, block sizes {sizes}, {args.repeats} repeats, "
          f"memory by {peak.method}, {torch.get_num_threads()} thread(s)")
    print(f"{'phase':36s} {'median s':>9s} {'tokens/s':>9s} {'peak MiB':>9s} {'growth MiB':>10s}")
    for k in phases:
        print(f"{k:36s} {med[k]:9.3f} {tokens / med[k]:9.1f} {mpeak[k] / 2**20:9.1f} {mgrowth[k] / 2**20:10.1f}")
    base, score = "plain decoder forward", "scoring (all statistic criteria)"
    ratios = {
        "time_ratio": med[score] / med[base],
        "peak_memory_ratio": mpeak[score] / mpeak[base],
        "memory_growth_ratio": mgrowth[score] / max(mgrowth[base], 1),
        "time_ratio_vs_full_forward": med[score] / med["full forward with LM head"],
        # each repeat runs both phases back to back: the median of those pairs' ratios resists load drift
        "time_ratio_paired_median": statistics.median(s / b for s, b in zip(times[score], times[base])),
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"times_s": times, "peak_bytes": peaks, "growth_bytes": growth, "ratios": ratios,
                       "tokens": tokens, **provenance()}, f, indent=2)
    print(f"scoring / plain forward: time {ratios['time_ratio']:.3f}x (target <= 1.10; median of paired "
          f"ratios {ratios['time_ratio_paired_median']:.3f}x), "
          f"peak memory {ratios['peak_memory_ratio']:.3f}x (target <= 1.05), "
          f"memory growth above the weights {ratios['memory_growth_ratio']:.2f}x; "
          f"vs a full forward with the LM head: time {ratios['time_ratio_vs_full_forward']:.3f}x")


if __name__ == "__main__":
    main()
