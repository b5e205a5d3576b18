"""The real SmolLM2-135M: prune 25% with SimDiff, reload, generate, and beat random removal on perplexity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import simdiff
from simdiff.collect.nll import nll_over
from simdiff.criteria import get_criterion
from simdiff.data import bos_token_id, contiguous_windows, load_text, tokenize_text
from simdiff.data.windows import batches
from simdiff.store.save import METADATA_FILE

MODEL = "smollm2-135m"
EVAL_TOKENS = 4096
EVAL_SEQ_LEN = 256
EVAL_CHARS = 40_000  # ~9k tokens: tokenize only a prefix of the test split (> EVAL_TOKENS)
CALIB_CHARS = 300_000  # the calibration slice of the validation split


def perplexity(model, tokenizer, data_dir) -> float:
    """Perplexity on the first ~4096 tokens of the WikiText-2 test split (contiguous windows of 256)."""
    ids = tokenize_text(tokenizer, load_text("wikitext2", "test", root=data_dir)[:EVAL_CHARS])
    assert len(ids) > EVAL_TOKENS
    windows = contiguous_windows(ids, EVAL_SEQ_LEN, bos_token_id(tokenizer), max_tokens=EVAL_TOKENS)
    return nll_over(model, batches(windows, 4), desc=None).perplexity


@pytest.mark.slow
def test_smollm2_simdiff_beats_random(tmp_path, shared_data) -> None:
    calib_file = tmp_path / "wikitext2-valid-slice.txt"
    valid = load_text("wikitext2", "valid", root=shared_data)
    calib_file.write_text(valid[:CALIB_CHARS], encoding="utf-8")
    calibration = simdiff.Calibration(source=str(calib_file), samples=8, seq_len=128, batch_size=4, seed=0)
    out = tmp_path / "smollm2-simdiff"
    result = simdiff.prune(MODEL, out, ratio=0.25, criterion="simdiff", calibration=calibration)
    assert len(result.selection.removed) == 8  # round(0.25 * 30)
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["removed_layers"] == result.selection.removed and len(meta["kept_layers"]) == 22
    assert meta["criterion"] == "simdiff" and len(meta["scores"]["simdiff"]) == 30

    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert pruned.config.num_hidden_layers == 22 and len(pruned.model.layers) == 22
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        generated = pruned.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True)
    assert generated.shape[1] == prompt.input_ids.shape[1] + 8
    ppl_simdiff = perplexity(pruned, tokenizer, shared_data)
    del pruned

    # the same number of layers removed at random (seed 0), in memory (no second save)
    model, tokenizer = simdiff.load_model(MODEL)
    importance = get_criterion("random").score(simdiff.criteria.Evidence(30), simdiff.Options(seed=0))
    random_layers = simdiff.select_layers(np.asarray(importance), 8)
    assert random_layers != result.selection.removed
    simdiff.remove_layers(model, random_layers)
    ppl_random = perplexity(model, tokenizer, shared_data)

    print(f"\nsmollm2-135m -8 layers: simdiff {result.selection.removed} ppl {ppl_simdiff:.1f}; "
          f"random {random_layers} ppl {ppl_random:.1f}")
    assert math.isfinite(ppl_simdiff) and ppl_simdiff > 1
    assert ppl_simdiff < ppl_random
