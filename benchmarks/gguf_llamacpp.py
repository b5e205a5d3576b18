"""llama.cpp runs the pruned GGUF file: perplexity and decode speed, dense vs pruned, against transformers.

    python benchmarks/gguf_llamacpp.py                                  # built-in smollm2-135m, 8 layers
    python benchmarks/gguf_llamacpp.py --layers 13,14,25,26 --tokens 2048

Needs llama-cpp-python, which is not a simdiff dependency (it builds from source in about 8 minutes):
``CMAKE_ARGS="-DGGML_CUDA=OFF" pip install llama-cpp-python``.

The GGUF file is pruned with ``simdiff.surgery.gguf.prune_gguf`` (kept tensors byte-identical). Then, for the
dense and the pruned file: llama.cpp's perplexity over the first ``--tokens`` tokens of the WikiText-2 test
split (one window, llama.cpp's own tokenization), transformers' perplexity of the dequantized GGUF on the
same token ids, the fraction of positions where both predict the same next token, and llama.cpp's greedy
decode speed (repeats interleaved, median). A greedy continuation of each file is printed, then one JSON
line with the pruned/dense ratios; ``ceiling`` is dense/pruned per-token weight work (every weight a token is
multiplied with: all tensors but the embedding lookup, the LM head counted even when tied), as in
``simdiff.bench``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from simdiff.config.flags import DATA_DIR_HELP, layer_list
from simdiff.core.cache import builtin_gguf_file
from simdiff.data import load_text
from simdiff.store.save import provenance
from simdiff.surgery.gguf import prune_gguf

SIMDIFF_8_OF_30 = "3,12,13,14,16,17,25,26"  # SimDiff's 8-layer selection on smollm2-135m (docs/results.md)


def llama(path: Path, n_ctx: int, threads: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_batch=min(n_ctx, 512),
                 logits_all=True, verbose=False)


def llamacpp_logits(llm, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits at every position of ``ids`` (one evaluation from an empty context)."""
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


@torch.no_grad()
def transformers_logits(path: Path, ids: list[int]) -> torch.Tensor:
    """Logits of the GGUF file dequantized by transformers (float32), on the same token ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model(torch.tensor([ids])).logits[0].float()


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    targets = torch.tensor(ids[1:])
    nll = torch.nn.functional.cross_entropy(logits[:-1].double(), targets, reduction="mean")
    return float(torch.exp(nll))


def per_token_weights(path: Path) -> int:
    """Weights each token is multiplied with: all but the embedding lookup; a tied LM head is the embedding."""
    import gguf

    sizes = {t.name: int(t.n_elements) for t in gguf.GGUFReader(path).tensors}
    head = sizes.get("output.weight", sizes["token_embd.weight"])
    return sum(n for name, n in sizes.items() if name not in ("token_embd.weight", "output.weight")) + head


def decode_seconds_per_token(llm, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """Greedy decoding with llama.cpp's KV cache: seconds per new token, and the tokens."""
    llm.reset()
    llm.eval(prompt)
    tokens = []
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        llm.eval([token])
    return (time.perf_counter() - start) / new_tokens, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help="GGUF model file (default: the built-in smollm2-135m's)")
    parser.add_argument("--layers", type=layer_list, default=layer_list(SIMDIFF_8_OF_30),
                        help=f"blocks to remove (default: {SIMDIFF_8_OF_30})")
    parser.add_argument("--tokens", type=int, default=1024, help="WikiText-2 test tokens for perplexity")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per decode repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    args = parser.parse_args()

    dense_file = Path(args.gguf) if args.gguf else builtin_gguf_file("smollm2-135m")
    with tempfile.TemporaryDirectory(prefix="simdiff-gguf-") as tmp:
        pruned = prune_gguf(dense_file, args.layers, Path(tmp) / "pruned.gguf")
        files = {"dense": dense_file, "pruned": pruned.out}
        ceiling = per_token_weights(dense_file) / per_token_weights(pruned.out)
        models = {name: llama(path, args.tokens, args.threads) for name, path in files.items()}
        text = load_text("wikitext2", "test", root=args.data_dir)[: args.tokens * 8]
        ids = models["dense"].tokenize(text.encode("utf-8"), add_bos=True)[: args.tokens]
        prompt = models["dense"].tokenize(args.prompt.encode("utf-8"), add_bos=True)
        result = {"gguf": str(dense_file), "removed": pruned.removed, "tokens": len(ids),
                  "bytes": {"dense": pruned.size_before, "pruned": pruned.size_after}}
        for name, path in files.items():
            cpp = llamacpp_logits(models[name], ids)
            hf = transformers_logits(path, ids)
            result[name] = {"blocks": int(models[name].metadata[f"{models[name].metadata['general.architecture']}.block_count"]),
                            "ppl_llamacpp": round(perplexity(cpp, ids), 3), "ppl_transformers": round(perplexity(hf, ids), 3),
                            "next_token_agreement": round(float((cpp.argmax(-1) == hf.argmax(-1)).float().mean()), 4)}
        times = {name: [] for name in files}
        for _ in range(args.repeats):
            for name in files:
                seconds, tokens = decode_seconds_per_token(models[name], prompt, args.new_tokens)
                times[name].append(seconds)
                result[name]["greedy"] = models[name].detokenize(tokens).decode("utf-8", errors="replace")
        for name in files:
            result[name]["decode_tokens_per_s"] = round(1 / statistics.median(times[name]), 1)
    speedup = statistics.median(times["dense"]) / statistics.median(times["pruned"])
    result["ratios"] = {"bytes": round(pruned.size_after / pruned.size_before, 4),
                        "decode_speedup": round(speedup, 3), "ceiling": round(ceiling, 3),
                        "fraction_of_ceiling": round(speedup / ceiling, 3)}
    for name in files:
        print(f"{name:7s} {result[name]['blocks']} blocks, {result['bytes'][name] / 1e6:.1f} MB: "
              f"ppl llama.cpp {result[name]['ppl_llamacpp']}, transformers {result[name]['ppl_transformers']}, "
              f"same next token {result[name]['next_token_agreement']:.1%}, "
              f"decode {result[name]['decode_tokens_per_s']} tok/s, greedy: {result[name]['greedy']!r}")
    print(json.dumps({**result, **provenance()}))


if __name__ == "__main__":
    main()
