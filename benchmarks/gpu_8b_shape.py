"""A LLaMA-3.1-8B-shaped model (random bf16 weights) vs the same with 12 of 32 layers removed, on a GPU.

    python benchmarks/gpu_8b_shape.py                       # CUDA, bf16, about 3-4 minutes on one H200
    python benchmarks/gpu_8b_shape.py --tiny --device cpu   # the same code path on a tiny config (a check)

Speed does not depend on weight values, so no checkpoint is needed. Figures, with repeats interleaved
between the two models (median), all synchronised: prefill (batch x seq_len, full forward with the LM head),
decode at batch 16 eager (dynamic KV cache), and decode at batch 1 with a static KV cache and
``torch.compile(mode="reduce-overhead")`` (CUDA graphs) so that it is bound by weight reads, not by Python
and kernel launches. Targets: prefill >= 0.95 of the ceiling; decode batch 16 >= 1.49x; decode batch 1
compiled >= 1.45x. The ratios are printed last.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from simdiff.bench.cli import format_bench
from simdiff.bench.models import SHAPES, pruned_copy, random_model
from simdiff.bench.run import BenchSettings, compare, decode_figures, describe_models, prefill_figures
from simdiff.progress import set_progress
from simdiff.save import provenance

TINY_SHAPE = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 224,
              "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "max_position_embeddings": 512, "tie_word_embeddings": False}
TARGETS = {"prefill fraction of ceiling": 0.95, "decode b16 speedup": 1.49, "decode b1 compiled speedup": 1.45}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.1-8b", choices=list(SHAPES))
    parser.add_argument("--remove", type=int, default=12, help="decoder layers removed (of 32)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prefill-batch-size", type=int, default=4, help="prefill batch")
    parser.add_argument("--prefill-seq-len", type=int, default=1024, help="prefill tokens per sequence")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of batch-1 decoding (eager: dynamo only, for a quick CPU check)")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny llama config, float32, remove 3 of 8, small shapes: checks the code path")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    set_progress(False)
    start = time.perf_counter()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or use --tiny --device cpu to check the code path")

    spec, dtype, remove = args.shape, args.dtype, args.remove
    settings = BenchSettings(batch_size=args.prefill_batch_size, seq_len=args.prefill_seq_len, prompt_len=args.prompt_len,
                             new_tokens=args.new_tokens, decode_batch=args.decode_batch, warmup=args.warmup,
                             repeats=args.repeats, compile_backend=args.compile_backend)
    tmp = None
    if args.tiny:
        tmp = tempfile.TemporaryDirectory()
        spec = str(Path(tmp.name) / "config.json")
        Path(spec).write_text(json.dumps(TINY_SHAPE), encoding="utf-8")
        dtype, remove = ("float32" if args.device == "cpu" else dtype), 3
        settings.batch_size, settings.seq_len, settings.prompt_len, settings.new_tokens = 2, 32, 8, 8
        settings.decode_batch, settings.repeats = 4, 2
    if args.device == "cpu":
        torch.set_num_threads(1)  # steadier on a shared machine

    dense = random_model(spec, dtype, args.device)
    pruned, removed = pruned_copy(dense, remove)
    total = dense.config.num_hidden_layers
    models = {f"{args.shape if not args.tiny else 'tiny'} ({total} layers)": dense,
              f"minus {remove} layers ({total - remove})": pruned}
    print(f"built in {time.perf_counter() - start:.0f}s; removed layers {removed}", flush=True)
    result = describe_models(models, settings)
    prefill_figures(models, settings, result)
    decode_figures(models, settings.decode_batch, settings, result, compile=False)
    decode_figures(models, 1, settings, result, compile=True)
    result["comparison"] = comparison = compare(result, *models)
    elapsed = time.perf_counter() - start
    print(format_bench(result))
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"device {name}, {dtype}; total time {elapsed:.0f}s (budget 300s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**result, "removed_layers": removed, "elapsed_s": elapsed, **provenance()}, f, indent=2)
    if tmp is not None:
        tmp.cleanup()
    s, frac = comparison["speedup"], comparison["fraction_of_ceiling"]
    b = settings.decode_batch
    measured = {"prefill fraction of ceiling": frac["prefill_tokens_per_s"],
                "decode b16 speedup": s[f"decode_b{b}_tokens_per_s"],
                "decode b1 compiled speedup": s["decode_b1_compiled_tokens_per_s"]}
    verdict = ", ".join(f"{k} {v:.3f} ({'ok' if v >= TARGETS[k] else 'below'} {TARGETS[k]})" for k, v in measured.items())
    print(f"ceiling {comparison['ceiling']:.3f}x | prefill {s['prefill_tokens_per_s']:.3f}x | decode b{b} eager "
          f"{s[f'decode_b{b}_tokens_per_s']:.3f}x | decode b1 compiled {s['decode_b1_compiled_tokens_per_s']:.3f}x "
          f"| {verdict}")


if __name__ == "__main__":
    main()
