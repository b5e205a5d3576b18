"""Peak memory of pruning in memory (``prune --layers``) and on disk (``apply``) against the checkpoint's size.

    nice -n 10 python benchmarks/memory_scale.py            # Llama-3.2-1B shape, bfloat16, 200 MB shards
    python benchmarks/memory_scale.py --tiny                # a seconds-long dry run of the same steps

A random-weights model of Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads / 8 KV heads, intermediate
8192, vocabulary 128,256, tied embeddings) is written in bfloat16 to a temporary folder in shards of at most
200 MB (tensor by tensor: no float32 copy, no model in memory). Each measurement runs the real command line in
its own child process and reads that process's peak resident set (``VmHWM``). The same commands on a
tiny model of the same architecture give the fixed cost of Python, torch and transformers (a few hundred MB,
independent of the model); the ratios are the peak above that baseline, over the checkpoint's bytes for
``prune`` and over the largest shard for ``apply`` (targets <= 1.15 and <= 1.3). The raw ratios (whole peak
over the same bytes) are printed too. Needs about 3 GB of disk and a few GB of RAM.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

LLAMA_3_2_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True}
TINY = {"hidden_size": 64, "num_hidden_layers": 16, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 512, "tie_word_embeddings": True}
REMOVED = "3,7,11"
TARGETS = {"prune": 1.15, "apply": 1.3}

# Run in a child process: the simdiff command line, then this process's peak RSS (VmHWM: the high-water mark
# of this program's own address space; ru_maxrss would carry over the parent's RSS at fork across exec).
CHILD = """
import json, sys
from simdiff.cli.main import main
code = main(sys.argv[1:])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"code": code, "peak": int(hwm.split()[1]) * 1024}))
"""


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over ``vocab_size`` ids (the benchmark never reads text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def write_random_checkpoint(folder: Path, shape: dict, shard_bytes: int) -> list[int]:
    """A random bfloat16 LLaMA checkpoint written tensor by tensor into shards; returns the shard sizes."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    unique = dict(skeleton.named_parameters())  # tied lm_head.weight is listed once, as embed_tokens
    groups: list[list[str]] = [[]]
    size = 0
    for name, param in unique.items():
        nbytes = param.numel() * 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    files = [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    weight_map, total = {}, 0
    for file, names in zip(files, groups):
        shard = {name: (torch.randn(unique[name].shape, generator=generator, dtype=torch.bfloat16) * 0.02)
                 for name in names}
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        total += sum(t.numel() * 2 for t in shard.values())
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    config.save_pretrained(folder)
    write_tokenizer(folder, shape["vocab_size"])
    return [(folder / file).stat().st_size for file in files]


def peak_rss(argv: list[str]) -> int:
    """Peak resident set of ``simdiff ARGV`` run in a fresh child process."""
    run = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=False)
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"simdiff {' '.join(argv)} failed:\n{run.stderr[-2000:]}")
    result = json.loads(lines[-1])
    if result["code"] != 0:
        raise RuntimeError(f"simdiff {' '.join(argv)} exited {result['code']}:\n{run.stderr[-2000:]}")
    return int(result["peak"])


def measure(model: Path, work: Path, tag: str) -> dict[str, int]:
    """Peak RSS of in-memory prune and of on-disk apply of the same layers."""
    return {
        "prune": peak_rss(["-q", "prune", str(model), "--layers", REMOVED, "--dtype", "auto",
                           "--out", str(work / f"prune-{tag}")]),
        "apply": peak_rss(["-q", "apply", str(model), "--layers", REMOVED, "--out", str(work / f"apply-{tag}")]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape with 20 kB shards (dry run)")
    parser.add_argument("--shard-mb", type=float, default=200.0, help="maximum shard size in MB")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp folder)")
    args = parser.parse_args()
    shape, shard_bytes = (TINY, 20_000) if args.tiny else (LLAMA_3_2_1B, int(args.shard_mb * 1e6))
    with tempfile.TemporaryDirectory(prefix="simdiff-memory-", dir=args.workdir) as tmp:
        work = Path(tmp)
        (work / "model").mkdir()
        (work / "baseline").mkdir()
        shards = write_random_checkpoint(work / "model", shape, shard_bytes)
        write_random_checkpoint(work / "baseline", TINY, 20_000)
        baseline = measure(work / "baseline", work, "baseline")
        peaks = measure(work / "model", work, "model")
    bytes_over = {"prune": sum(shards), "apply": max(shards)}
    result = {
        "shape": shape, "checkpoint_bytes": sum(shards), "largest_shard_bytes": max(shards), "shards": len(shards),
        "removed": REMOVED, "peak_rss": peaks, "baseline_peak_rss": baseline,
        "ratio": {k: (peaks[k] - baseline[k]) / bytes_over[k] for k in peaks},
        "raw_ratio": {k: peaks[k] / bytes_over[k] for k in peaks},
        "targets": TARGETS, "versions": {"torch": torch.__version__},
    }
    mb = 1e6
    print(f"checkpoint {sum(shards) / mb:.0f} MB in {len(shards)} shards (largest {max(shards) / mb:.0f} MB)")
    for k, over in (("prune", "checkpoint"), ("apply", "largest shard")):
        print(f"{k:5s}: peak RSS {peaks[k] / mb:.0f} MB, baseline (same command, tiny model) "
              f"{baseline[k] / mb:.0f} MB; (peak - baseline) / {over} = {result['ratio'][k]:.3f} "
              f"(target <= {TARGETS[k]}), peak / {over} = {result['raw_ratio'][k]:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
