"""The GPU check: score, prune, save, verify, reload and benchmark a random-weights Llama-3.1-8B-shape model.

    python benchmarks/gpu_check.py            # one H200 (or any CUDA GPU with ~40 GB), bfloat16, under 8 minutes
    python benchmarks/gpu_check.py --tiny     # the same code on a tiny shape, on CPU, in seconds (CI runs it)

No downloads: the model is built from the architecture's config with random weights (speed and the code
paths do not depend on the values) and the calibration windows are random token ids. In order:

1. scoring: one statistics pass (every statistic criterion, angular blocks of 1 and 12) over 32 windows of
   2,048 tokens, its time and peak device memory over a plain decoder forward over the same windows;
2. prune 12 of 32 layers (SimDiff's choice) on a copy, keeping the dense model for the benchmarks;
3. save through simdiff's save path (written bytes, config, layer indices and KV-cache decoding verified),
   then reload with plain ``AutoModelForCausalLM`` and compare its logits with the in-memory pruned model's;
4. prefill (batch 1 x 2,048 and batch 8 x 1,024) and decode (batch 1 and batch 16, transformers' static KV
   cache; batch 1 also torch.compile-d with CUDA graphs) of dense vs pruned, side by side, with each speedup
   over the parameter-ratio ceiling;
5. the same selection through ``simdiff apply`` from disk, compared tensor by tensor with step 3's
   checkpoint (if this simdiff has ``apply``).

Progress goes to stderr; the last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from simdiff.bench.measure import timed
from simdiff.bench.memory import track_peak
from simdiff.bench.models import random_model
from simdiff.bench.run import BenchSettings, compare, decode_figures, describe_models, prefill_figures
from simdiff.collect.hooks import run_decoder
from simdiff.core.progress import set_progress
from simdiff.criteria import LAYER_STATS, Options
from simdiff.data import batches as make_batches
from simdiff.model.layers import find_decoder_layers
from simdiff.selection.choose import choose
from simdiff.selection.evidence import block_sizes_for, gather_evidence
from simdiff.store.save import save_model
from simdiff.store.verify import safetensors_files, same_bytes, written_tensors
from simdiff.surgery.layers import remove_layers
from simdiff.workflows.api import FREE_CRITERIA

log = logging.getLogger("gpu_check")

TINY_SHAPE = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 224,
              "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "max_position_embeddings": 4096, "tie_word_embeddings": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny llama shape on CPU: checks every step in seconds")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of batch-1 decoding: inductor (default on CUDA), none (eager)")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temporary folder)")
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> dict:
    """Shapes and sizes of every step: the issue's on a GPU, scaled down with --tiny."""
    if args.tiny:
        return {"shape": TINY_SHAPE, "name": "tiny llama", "remove": 3, "windows": 8, "seq_len": 64, "batch": 4,
                "prefill": [(1, 64), (4, 32)], "decode": (1, 4), "prompt_len": 8, "new_tokens": 8, "repeats": 1,
                "warmup": 0, "device": args.device or "cpu", "compile_backend": args.compile_backend or "none"}
    return {"shape": "llama-3.1-8b", "name": "llama-3.1-8b", "remove": 12, "windows": 32, "seq_len": 2048,
            "batch": 4, "prefill": [(1, 2048), (8, 1024)], "decode": (1, 16), "prompt_len": 128, "new_tokens": 64,
            "repeats": 3, "warmup": 1, "device": args.device or "cuda",
            "compile_backend": args.compile_backend or "inductor"}


def build_model(p: dict, workdir: Path):
    """The random-weights bfloat16 model on the device (a config.json for the tiny shape)."""
    spec = p["shape"]
    if isinstance(spec, dict):
        config = workdir / "tiny_config.json"
        config.write_text(json.dumps(spec), encoding="utf-8")
        spec = str(config)
    return random_model(spec, "bfloat16", p["device"], attn_implementation="sdpa")


def scoring_step(model, p: dict, device: torch.device) -> tuple[list[int], dict]:
    """Time and peak memory of the statistics pass over a plain forward; the layers SimDiff removes."""
    vocab = model.config.vocab_size
    ids = torch.randint(4, vocab, (p["windows"], p["seq_len"]), generator=torch.Generator().manual_seed(0))
    data = make_batches(ids, p["batch"])
    sizes = block_sizes_for(FREE_CRITERIA, [p["remove"]])
    evidence = {}

    def plain() -> None:
        for batch in data:
            run_decoder(model, batch)

    def scoring() -> None:
        evidence["last"] = gather_evidence(model, data, {LAYER_STATS}, sizes)

    figures = {}
    for name, fn in (("plain", plain), ("scoring", scoring)):
        fn()  # warm-up (kernels, allocator)
        figures[f"{name}_s"] = timed(fn, device)
        with track_peak(device) as peak:
            fn()
        figures[f"{name}_peak_bytes"] = peak.peak
        figures[f"{name}_growth_bytes"] = peak.delta
    figures |= {"windows": p["windows"], "seq_len": p["seq_len"], "batch_size": p["batch"],
                "time_ratio": figures["scoring_s"] / figures["plain_s"],
                "peak_memory_ratio": figures["scoring_peak_bytes"] / figures["plain_peak_bytes"],
                "memory_method": peak.method}
    selection = choose("simdiff", p["remove"], Options(), evidence["last"]).selection
    return selection.removed, figures


def save_and_reload(pruned, removed: list[int], out: Path, device: torch.device) -> dict:
    """Save through simdiff's verified save path, reload with plain transformers, compare logits."""
    from transformers import AutoModelForCausalLM

    metadata = {"removed_layers": removed, "criterion": "simdiff", "base_model": "random weights",
                "num_layers_before": len(removed) + len(find_decoder_layers(pruned)),
                "num_layers_after": len(find_decoder_layers(pruned))}
    with track_peak(device) as peak:
        start = time.perf_counter()
        save_model(pruned, None, out, metadata)
        save_s = time.perf_counter() - start
    written = sum(f.stat().st_size for f in safetensors_files(out))
    start = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto", device_map=str(device)).eval()
    reload_s = time.perf_counter() - start
    ids = torch.randint(4, pruned.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        expected = pruned(input_ids=ids).logits
        actual = reloaded(input_ids=ids).logits
    result = {"save_s": save_s, "verified": True, "written_bytes": written,
              "save_device_peak_bytes": peak.peak, "save_device_growth_bytes": peak.delta,
              "reload_s": reload_s, "reloaded_dtype": str(next(reloaded.parameters()).dtype).replace("torch.", ""),
              "reloaded_layers": len(find_decoder_layers(reloaded)),
              "reloaded_logits_equal": bool(torch.equal(expected, actual)),
              "reloaded_logits_max_abs_diff": float((expected.float() - actual.float()).abs().max())}
    del reloaded
    return result


def speed_step(dense, pruned, p: dict) -> dict:
    """Prefill and decode figures of dense vs pruned (interleaved repeats), each speedup over the ceiling."""
    models = {"dense": dense, "pruned": pruned}
    out: dict = {}
    repeats = {"repeats": p["repeats"], "warmup": p["warmup"]}
    runs = [(f"prefill_b{b}x{t}", BenchSettings(batch_size=b, seq_len=t, **repeats), "prefill")
            for b, t in p["prefill"]]
    decode = {"prompt_len": p["prompt_len"], "new_tokens": p["new_tokens"], "compile": True, **repeats}
    small, large = p["decode"]
    runs += [(f"decode_b{small}_static_{p['compile_backend']}",
              BenchSettings(compile_backend=p["compile_backend"], **decode), small),
             (f"decode_b{large}_static", BenchSettings(compile_backend="none", **decode), large)]
    for label, settings, what in runs:
        start = time.perf_counter()
        result = describe_models(models, settings)
        if what == "prefill":
            prefill_figures(models, settings, result)
        else:
            decode_figures(models, what, settings, result, compile=True)
        comparison = compare(result, "dense", "pruned")
        rate = next(k for k in comparison["fraction_of_ceiling"])
        out["ceiling"] = comparison["ceiling"]
        out[label] = {"dense_tokens_per_s": result["models"]["dense"]["figures"][rate],
                      "pruned_tokens_per_s": result["models"]["pruned"]["figures"][rate],
                      "speedup": comparison["speedup"][rate],
                      "fraction_of_ceiling": comparison["fraction_of_ceiling"][rate],
                      "seconds": time.perf_counter() - start}
        log.info("%s: speedup %.3fx (ceiling %.3fx)", label, comparison["speedup"][rate], comparison["ceiling"])
    return out


def apply_step(dense, removed: list[int], pruned_dir: Path, workdir: Path) -> dict | str:
    """``simdiff apply`` of the same layers on the dense checkpoint, compared with the in-memory prune's save."""
    if importlib.util.find_spec("simdiff.surgery.apply") is None:
        return "not available"
    from simdiff.cli.main import main as simdiff_main

    dense_dir, applied = workdir / "dense", workdir / "applied"
    dense.save_pretrained(dense_dir)
    start = time.perf_counter()
    code = simdiff_main(["-q", "apply", str(dense_dir), "--layers", ",".join(map(str, removed)), "--out", str(applied)])
    seconds = time.perf_counter() - start
    if code != 0:
        return {"exit_code": code, "seconds": seconds}
    return {"seconds": seconds, **compare_checkpoints(applied, pruned_dir)}


def compare_checkpoints(a: Path, b: Path) -> dict:
    """Whether two checkpoints hold the same tensor names with the same bytes, and equal configs."""
    from safetensors import safe_open

    reference = {}
    for path in safetensors_files(b):
        with safe_open(str(path), framework="pt") as f:
            reference |= dict.fromkeys(f.keys(), path)  # noqa: SIM118
    differing = []
    names = set()
    for name, tensor in written_tensors(a):
        names.add(name)
        if name not in reference:
            differing.append(name)
            continue
        with safe_open(str(reference[name]), framework="pt") as f:
            other = f.get_tensor(name)
        if other.dtype != tensor.dtype or other.shape != tensor.shape or not same_bytes(other, tensor):
            differing.append(name)
    configs = [json.loads((d / "config.json").read_text(encoding="utf-8")) for d in (a, b)]
    return {"tensors_identical": not differing and names == set(reference), "differing": differing[:5],
            "config_equal": configs[0] == configs[1]}


def run(args: argparse.Namespace, workdir: Path) -> dict:
    p = plan(args)
    device = torch.device(p["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; run on a GPU, or pass --tiny for the CPU dry run")
    started = time.perf_counter()
    times = {}

    def mark(step: str) -> None:
        times[step] = time.perf_counter() - started - sum(times.values())
        log.info("%s done (%.1fs, %.0fs in all)", step, times[step], time.perf_counter() - started)

    dense = build_model(p, workdir)
    mark("build")
    removed, scoring = scoring_step(dense, p, device)
    mark("scoring")
    pruned = copy.deepcopy(dense)
    remove_layers(pruned, removed)
    saved = save_and_reload(pruned, removed, workdir / "pruned", device)
    mark("save_reload")
    speed = speed_step(dense, pruned, p)
    mark("speed")
    applied = apply_step(dense, removed, workdir / "pruned", workdir)
    mark("apply")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    layers = dense.config.num_hidden_layers
    return {"device": name, "shape": p["name"], "dtype": "bfloat16", "num_layers": layers,
            "removed_layers": removed, "num_layers_after": layers - len(removed), "scoring": scoring, **saved,
            **speed, "apply": applied, "step_seconds": times, "elapsed_s": time.perf_counter() - started,
            "torch": torch.__version__}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    set_progress(False)
    if args.tiny:
        torch.set_num_threads(1)
    if args.workdir:
        result = run(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
            result = run(args, Path(tmp))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
