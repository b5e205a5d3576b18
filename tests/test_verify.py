"""The save check (simdiff.store.verify): each check refuses a save with one thing corrupted, and passes valid saves."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from tiny import tiny_config, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, PreTrainedModel

from simdiff.core.errors import SimdiffError
from simdiff.model.layers import find_decoder_layers
from simdiff.store.save import save_model
from simdiff.store.verify import check_cached_generation, prompt_ids, safetensors_files, verify_saved
from simdiff.surgery.layers import remove_layers

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def pruned(model_type: str = "llama", dtype: torch.dtype = torch.float32):
    model = tiny_model(model_type, num_layers=6).to(dtype)
    remove_layers(model, [1, 3])
    return model


def flip_byte(file: Path, tensor: str) -> None:
    """Flip one bit in the middle of ``tensor``'s data inside a safetensors ``file``."""
    data = bytearray(file.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8:8 + header_len])[tensor]["data_offsets"]
    data[8 + header_len + (begin + end) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **changes}))


def refused_save(model, tmp_path: Path, corrupt, monkeypatch) -> str:
    """Save ``model`` through the real save path with ``corrupt(folder)`` applied right after the weights are
    written; return the refusal (one line), after checking nothing was left behind."""
    write = PreTrainedModel.save_pretrained

    def write_then_corrupt(self, folder, *args, **kwargs):
        write(self, folder, *args, **kwargs)
        corrupt(Path(folder))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", write_then_corrupt)
    with pytest.raises(SimdiffError) as refusal:
        save_model(model, tiny_tokenizer(), tmp_path / "out", {"removed_layers": [1, 3]})
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder
    message = str(refusal.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox", "qwen3_moe", "gemma3_text"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_valid_saves_pass(model_type, dtype, tmp_path):
    """Renamed (gpt_neox embed_out) and converted (qwen3_moe fused experts) weights are compared as written."""
    model = pruned(model_type, dtype)
    model.save_pretrained(tmp_path)
    verify_saved(model, tmp_path, tiny_tokenizer())


def test_tied_and_sharded_checkpoints_pass_and_a_corrupt_shard_is_found(tmp_path):
    config = tiny_config("llama", 6)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    remove_layers(model, [2])
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = safetensors_files(tmp_path)
    assert len(shards) > 2
    verify_saved(model, tmp_path)  # lm_head is tied: not written, not missing
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.3.mlp.up_proj.weight"
    flip_byte(tmp_path / index[name], name)
    with pytest.raises(SimdiffError, match=f"written tensor '{name}' differs .*bytes"):
        verify_saved(model, tmp_path)


def test_corrupt_tensor_bytes_refuse_the_save(tmp_path, monkeypatch):
    name = "model.layers.2.self_attn.v_proj.weight"
    message = refused_save(pruned(dtype=torch.bfloat16), tmp_path,
                           lambda folder: flip_byte(folder / "model.safetensors", name), monkeypatch)
    assert message == f"written tensor '{name}' differs from the in-memory model's (bytes differ)"


@pytest.mark.parametrize("change, expected", [
    ({"intermediate_size": 48}, "would not rebuild the pruned model"),
    ({"num_hidden_layers": 6}, "would not rebuild the pruned model"),
    ({"dtype": "float16"}, "says dtype torch.float16, the weights are torch.float32"),
])
def test_corrupt_config_field_refuses_the_save(change, expected, tmp_path, monkeypatch):
    message = refused_save(pruned(), tmp_path, lambda folder: edit_config(folder, **change), monkeypatch)
    assert "config.json written to" in message and expected in message


def test_wrong_layer_idx_refuses_the_save(tmp_path, monkeypatch):
    model = pruned()
    find_decoder_layers(model).modules[2].self_attn.layer_idx = 3
    message = refused_save(model, tmp_path, lambda folder: None, monkeypatch)
    assert message == "decoder layer 2 has self_attn.layer_idx = 3; the KV cache would mix layers"


def test_kv_cache_check_refuses_a_shared_cache_slot():
    model = pruned()
    find_decoder_layers(model).modules[1].self_attn.layer_idx = 0  # two layers write one cache slot
    with pytest.raises(SimdiffError, match="greedy decoding with the KV cache fails"):
        check_cached_generation(model, prompt_ids(model))


def test_kv_cache_check_refuses_a_cache_path_that_computes_something_else():
    """Decode steps (one new token against the cache) see perturbed attention inputs; the full forward does not."""
    model = pruned()
    check_cached_generation(model, prompt_ids(model))

    def perturb_decode_steps(module, args, kwargs):
        hidden = kwargs["hidden_states"]
        if hidden.shape[1] == 1:
            kwargs["hidden_states"] = hidden + 5 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
        return args, kwargs

    for layer in find_decoder_layers(model).modules:
        layer.self_attn.register_forward_pre_hook(perturb_decode_steps, with_kwargs=True)
    with pytest.raises(SimdiffError, match="greedy decoding with the KV cache picks token .* at step"):
        check_cached_generation(model, prompt_ids(model))


class CachedPathPrefersToken6(torch.nn.Module):
    """A tiny model whose logits for tokens 5 and 6 lead all others: 5 wins by ``gap`` without a cache,
    6 wins by ``gap`` on decode steps that are given the cache."""

    def __init__(self, inner, gap: float) -> None:
        super().__init__()
        self.inner, self.config, self.gap = inner, inner.config, gap

    def forward(self, input_ids, cache=None, use_cache=False):
        out = self.inner(input_ids=input_ids, cache=cache, use_cache=use_cache)
        out.logits[..., 5] = 100.0
        out.logits[..., 6] = 100.0 + (self.gap if cache is not None else -self.gap)
        return out


def test_kv_cache_check_tolerates_rounding_ties_only():
    """At logits of 100 the float32 tolerance is 1e-4 x 100 = 0.01: a 1e-3 gap between the logits of the two
    choices is a rounding tie, a gap of 1 is a different choice."""
    model = pruned()
    ids = prompt_ids(model)
    check_cached_generation(CachedPathPrefersToken6(model, gap=1e-3), ids)
    with pytest.raises(SimdiffError, match=r"picks token 6 at step 1, without it 5 \(logit gap 1, a rounding tie is "
                                           r"within 0\.01\)"):
        check_cached_generation(CachedPathPrefersToken6(model, gap=1.0), ids)


class Bf16CachedPathPicks6(torch.nn.Module):
    """A bfloat16 tiny model whose tokens 5 and 6 lead all others at about logit 20 (bf16 spacing 0.125 there):
    without a cache 5 leads 6 by ``uncached_gap``, on cached decode steps 6 leads 5 by ``cached_gap``."""

    def __init__(self, inner, uncached_gap: float, cached_gap: float) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.uncached_gap, self.cached_gap = uncached_gap, cached_gap

    def forward(self, input_ids, cache=None, use_cache=False):
        out = self.inner(input_ids=input_ids, cache=cache, use_cache=use_cache)
        assert out.logits.dtype == torch.bfloat16
        leader, other = (6, 5) if cache is not None else (5, 6)
        out.logits[..., leader] = 20.0
        out.logits[..., other] = 20.0 - (self.cached_gap if cache is not None else self.uncached_gap)
        return out


def test_kv_cache_check_in_bfloat16_accepts_a_one_ulp_tie_and_refuses_a_two_nat_error():
    """bf16 at logit 20: 16 eps x 20 = 2.5 nats was accepted as a tie; now 10 ulps = 1.25 nats. A swap of the two
    best tokens one bf16 step (0.125) apart on both paths is a tie; a cached token 2 nats below the best is a real
    error, even though the two paths rank the same two tokens first; and a cached path that is sure of itself (its
    own margin 2 nats) is an error even where the uncached margin is one step."""
    model = pruned(dtype=torch.bfloat16)
    ids = prompt_ids(model)
    check_cached_generation(Bf16CachedPathPicks6(model, uncached_gap=0.125, cached_gap=0.125), ids)
    with pytest.raises(SimdiffError, match=r"picks token 6 at step 1, without it 5 \(logit gap 2, a rounding tie "
                                           r"is within 1\.25\)"):
        check_cached_generation(Bf16CachedPathPicks6(model, uncached_gap=2.0, cached_gap=0.125), ids)
    with pytest.raises(SimdiffError, match=r"picks token 6 at step 1, without it 5 \(logit gap 0\.125"):
        check_cached_generation(Bf16CachedPathPicks6(model, uncached_gap=0.125, cached_gap=2.0), ids)
