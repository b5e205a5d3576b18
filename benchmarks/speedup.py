"""Dense vs pruned throughput on CPU, as fractions of the ceiling (per-token weight work ratio).

    python benchmarks/speedup.py --model smollm2-135m --ratio 0.25 --repeats 5

The pruned model is a copy with ``round(ratio * layers)`` decoder layers removed for real
(``simdiff.surgery.layers.remove_layers``); which layers does not change the architecture's speed, so the block
before the last layer is taken and no calibration pass is needed. Prefill (full forward, LM head over all
positions) and KV-cache decode at batch 1 and batch N are timed with repeats interleaved between the two
models (median). Target: prefill >= 0.95 of the ceiling. The ratios are printed last.
"""

from __future__ import annotations

import argparse
import json

import torch

from simdiff.bench.models import pruned_copy
from simdiff.bench.run import BenchSettings, bench_models
from simdiff.cli.bench import format_bench
from simdiff.core.progress import set_progress
from simdiff.model import load_model
from simdiff.model.layers import find_decoder_layers
from simdiff.selection.rank import resolve_count
from simdiff.store.save import provenance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.25, help="fraction of decoder layers removed")
    parser.add_argument("--prefill-batch-size", type=int, default=4, help="prefill batch")
    parser.add_argument("--prefill-seq-len", type=int, default=128, help="prefill tokens per sequence")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="auto", help="default: the checkpoint's own (float32 for smollm2-135m)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    set_progress(False)
    if args.threads:
        torch.set_num_threads(args.threads)

    dense, _ = load_model(args.model, args.dtype, args.device)
    total = len(find_decoder_layers(dense))
    count = resolve_count(total, None, args.ratio)
    pruned, removed = pruned_copy(dense, count)
    settings = BenchSettings(batch_size=args.prefill_batch_size, seq_len=args.prefill_seq_len, prompt_len=args.prompt_len,
                             new_tokens=args.new_tokens, decode_batch=args.decode_batch, repeats=args.repeats)
    names = {f"{args.model} ({total} layers)": dense, f"minus {count} layers ({total - count})": pruned}
    result = bench_models(names, settings)
    print(f"{args.model}, {args.dtype} on {args.device}, {torch.get_num_threads()} thread(s); removed layers {removed}")
    print(format_bench(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**result, "removed_layers": removed, **provenance()}, f, indent=2)
    c = result["comparison"]
    s, frac = c["speedup"], c["fraction_of_ceiling"]
    b = args.decode_batch
    print(f"ceiling {c['ceiling']:.3f}x | prefill {s['prefill_tokens_per_s']:.3f}x = "
          f"{frac['prefill_tokens_per_s']:.3f} of ceiling (target >= 0.95) | decode b1 "
          f"{s['decode_b1_tokens_per_s']:.3f}x = {frac['decode_b1_tokens_per_s']:.3f} | decode b{b} "
          f"{s[f'decode_b{b}_tokens_per_s']:.3f}x = {frac[f'decode_b{b}_tokens_per_s']:.3f} of ceiling")


if __name__ == "__main__":
    main()
