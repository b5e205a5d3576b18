"""simdiff bench: parameter counts and the ceiling against hand arithmetic, decode paths, peak memory (no timing asserts)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from simdiff.bench import BenchSettings, bench_models, ceiling, track_peak, weight_counts
from simdiff.bench.measure import Decoder
from simdiff.bench.models import layers_to_remove, pruned_copy
from simdiff.bench.run import describe_models, prefill_figures
from simdiff.cli.main import main

TINY = BenchSettings(batch_size=2, seq_len=8, prompt_len=4, new_tokens=3, decode_batch=2, warmup=0, repeats=1)

# Hand arithmetic for the tiny llama (hidden 32, 4 heads of 8, 2 KV heads, MLP 64, vocab 256, untied head):
# q 32*32 + k 32*16 + v 32*16 + o 32*32 + MLP 3*32*64 + two RMSNorms 2*32 = 9280 per decoder layer.
LAYER = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32
HEAD = EMBED = 256 * 32
FINAL_NORM = 32



def test_weight_counts_by_hand():
    counts = weight_counts(tiny_model("llama", num_layers=6))
    assert counts.decoder_layers == 6 * LAYER
    assert counts.total == EMBED + 6 * LAYER + FINAL_NORM + HEAD
    assert counts.embedding_lookup == EMBED
    assert counts.per_token == 6 * LAYER + FINAL_NORM + HEAD  # lookup excluded, LM head counted


def test_ceiling_of_a_hand_made_pair_of_configs():
    dense = weight_counts(tiny_model("llama", num_layers=6))
    pruned = weight_counts(tiny_model("llama", num_layers=4))
    expected = (6 * LAYER + FINAL_NORM + HEAD) / (4 * LAYER + FINAL_NORM + HEAD)
    assert ceiling(dense, pruned) == pytest.approx(expected, rel=1e-12)
    # A head tied to the input embeddings is still a per-token matmul; nothing is a pure lookup then.
    config = tiny_config("llama", 6)
    config.tie_word_embeddings = True
    tied = weight_counts(AutoModelForCausalLM.from_config(config))
    assert tied.total == 6 * LAYER + FINAL_NORM + HEAD
    assert tied.embedding_lookup == 0 and tied.per_token == 6 * LAYER + FINAL_NORM + HEAD


def test_moe_experts_count_at_top_k_fraction():
    model = tiny_model("qwen3_moe", num_layers=2)
    counts = weight_counts(model)
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert routed > 0
    others = counts.total - counts.embedding_lookup - routed
    assert counts.per_token == pytest.approx(others + routed * 2 / 4)  # 2 of 4 experts per token


def test_bench_pair_describes_hand_counted_models_and_their_ceiling(one_thread):
    dense = tiny_model("llama", num_layers=6)
    pruned, removed = pruned_copy(dense, 2)
    assert removed == [3, 4] and len(dense.model.layers) == 6  # the reference is left whole
    result = bench_models({"dense": dense, "pruned": pruned}, TINY)
    models = result["models"]
    assert models["dense"]["params"]["total"] == EMBED + 6 * LAYER + FINAL_NORM + HEAD
    assert models["pruned"]["params"]["total"] == EMBED + 4 * LAYER + FINAL_NORM + HEAD
    assert models["dense"]["weight_bytes"] - models["pruned"]["weight_bytes"] == 2 * LAYER * 4  # float32
    assert result["comparison"]["ceiling"] == pytest.approx(
        (6 * LAYER + FINAL_NORM + HEAD) / (4 * LAYER + FINAL_NORM + HEAD), rel=1e-12)
    figures = ("prefill_tokens_per_s", "decode_b1_tokens_per_s", "decode_b2_tokens_per_s")
    assert set(result["comparison"]["fraction_of_ceiling"]) == set(figures)


def test_prefill_memory_growth_covers_the_logits_it_must_hold(one_thread):
    """A full prefill materialises [batch, seq, vocab] float32 logits: the measured growth cannot be smaller."""
    config = tiny_config("llama", 2)
    config.vocab_size = 8192
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    settings = BenchSettings(batch_size=4, seq_len=256, warmup=0, repeats=1)
    result = describe_models({"m": model}, settings)
    prefill_figures({"m": model}, settings, result)
    logits_bytes = 4 * 256 * 8192 * 4  # 32 MiB
    assert result["models"]["m"]["figures"]["prefill_memory_growth_bytes"] >= logits_bytes


def test_static_cache_decoding_matches_dynamic_cache_and_generate(one_thread):
    model = tiny_model("llama", num_layers=3)
    dynamic, _ = Decoder(model, 2, 5, 6).tokens()
    static, _ = Decoder(model, 2, 5, 6, compile=True, compile_backend="none").tokens()
    assert torch.equal(dynamic, static)
    prompt = Decoder(model, 2, 5, 6).prompt
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=7, min_new_tokens=7,
                               do_sample=False)
    assert torch.equal(generated[:, 6:], dynamic)  # the first new token comes from the untimed prefill


def test_track_peak_sees_a_large_cpu_allocation():
    with track_peak("cpu") as peak:
        block = torch.ones(16 * 2**20)  # 64 MiB, touched
        del block
    assert peak.delta >= 48 * 2**20, peak
    assert peak.peak >= peak.start


def test_cli_random_weights_config_with_layers_removed(tmp_path, one_thread):
    config = tmp_path / "config.json"
    config.write_text(tiny_config("llama", 6).to_json_string(), encoding="utf-8")
    out = tmp_path / "bench.json"
    args = ["-q", "bench", "--random-weights", str(config), "--remove", "2", "--device", "cpu", "--prefill-batch-size", "2",
            "--prefill-seq-len", "8", "--prompt-len", "4", "--new-tokens", "2", "--decode-batch", "1", "--warmup", "0",
            "--repeats", "1", "--json", str(out)]
    assert main(args) == 0
    document = json.loads(out.read_text())
    assert document["comparison"]["ceiling"] == pytest.approx(
        (6 * LAYER + FINAL_NORM + HEAD) / (4 * LAYER + FINAL_NORM + HEAD))
    assert [m["params"]["num_layers"] for m in document["models"].values()] == [6, 4]
    assert "versions" in document and "command" in document


@pytest.mark.parametrize("argv, message", [
    (["bench"], "give a MODEL"),
    (["bench", "--random-weights", "llama-3.1-8x"], "llama-3.1-8b"),
])
def test_cli_bench_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_layers_to_remove_checks_the_count():
    assert layers_to_remove(32, 12) == list(range(19, 31))
    with pytest.raises(Exception, match="--remove 31"):
        layers_to_remove(32, 31)
