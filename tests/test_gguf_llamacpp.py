"""A real consumer: llama.cpp loads the pruned GGUF file and predicts what transformers' pruned model predicts.

Skipped unless llama-cpp-python is installed (it is not a simdiff dependency: it builds from source).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simdiff.core.cache import builtin_gguf_file
from simdiff.data import load_text
from simdiff.surgery.gguf import prune_gguf

llama_cpp = pytest.importorskip("llama_cpp")

REMOVED = [3, 12, 13, 14, 16, 17, 25, 26]  # SimDiff's 8 of 30 on smollm2-135m (docs/results.md)
OTHER = [3, 4, 5, 12, 13, 14, 17, 26]  # another 8 (ppl_skip's), to show the agreement is specific


def llamacpp_argmax(path, ids: list[int]) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids), n_threads=1, logits_all=True, verbose=False)
    assert int(llm.metadata["llama.block_count"]) == 22
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)]).argmax(-1))


@pytest.mark.slow
@torch.no_grad()
def test_llamacpp_predicts_like_the_dequantized_pruned_model(tmp_path, shared_data) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = builtin_gguf_file("smollm2-135m")
    pruned = prune_gguf(src, REMOVED, tmp_path / "pruned.gguf").out
    other = prune_gguf(src, OTHER, tmp_path / "other.gguf").out
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    text = load_text("wikitext2", "test", root=shared_data)[:2000]
    ids = [tokenizer.bos_token_id, *tokenizer(text).input_ids][:256]
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=pruned.name, dtype=torch.float32).eval()
    expected = model(torch.tensor([ids])).logits[0].argmax(-1)
    same = (llamacpp_argmax(pruned, ids) == expected).float().mean().item()
    other_same = (llamacpp_argmax(other, ids) == expected).float().mean().item()
    # llama.cpp quantizes activations for its Q4_1 kernels, so a few close calls may flip
    assert same > 0.9, same
    assert other_same < same - 0.1, (same, other_same)
