"""Every tiny model family: find layers, prune, compare with bypassing, save, reload, generate."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import FAMILIES, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from simdiff.model.layers import bypass_layers, find_decoder_layers, num_layers_in_config
from simdiff.store.save import METADATA_FILE, save_model
from simdiff.surgery.layers import remove_layers

NUM_LAYERS = 6
# Removing layer 0 moves every later layer down, so index remapping (mlp_only_layers [1] -> [0]) and
# per-position layer_types (gemma: the kept pattern differs from the unsliced prefix) are both exercised.
REMOVED = [0, 3]
KEPT = [1, 2, 4, 5]
ATOL = 1e-4


def input_ids(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    """Random token ids avoiding the special tokens 0..3; longer than the gemma sliding window (4)."""
    return torch.randint(4, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def layer_indices(layer: torch.nn.Module) -> set[int]:
    """Every integer ``layer_idx`` found inside one decoder layer."""
    return {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)}


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_prune_save_reload(family: str, tokenizer, tmp_path) -> None:
    model = tiny_model(family, NUM_LAYERS)
    original_config = model.config.to_dict()
    decoder = find_decoder_layers(model)
    assert len(decoder) == NUM_LAYERS == num_layers_in_config(model.config)
    assert all(layer_indices(layer) <= {i} for i, layer in enumerate(decoder.modules))
    originals = list(decoder.modules)
    ids = input_ids()

    dense = logits(model, ids)
    with bypass_layers(model, REMOVED):
        bypassed = logits(model, ids)
    assert list(find_decoder_layers(model).modules) == originals  # bypass restored every layer
    torch.testing.assert_close(logits(model, ids), dense)  # ... and the dense behaviour

    kept = remove_layers(model, REMOVED)
    assert kept == KEPT
    pruned_layers = find_decoder_layers(model).modules
    assert len(pruned_layers) == len(KEPT)
    assert [id(m) for m in pruned_layers] == [id(originals[i]) for i in KEPT]  # no copies, in order
    pruned = logits(model, ids)
    torch.testing.assert_close(pruned, bypassed, atol=ATOL, rtol=1e-4)
    assert (pruned - dense).abs().max() > 1e-3, "removing two layers must change the logits"

    # every layer_idx renumbered 0..k-1 (KV-cache slots, per-layer config lookups)
    for new, layer in enumerate(pruned_layers):
        assert layer_indices(layer) <= {new}, f"layer {new} holds layer_idx {layer_indices(layer)}"

    metadata = {"removed_layers": REMOVED, "kept_layers": kept, "criterion": "manual", "scores": {}}
    out = save_model(model, tokenizer, tmp_path / "pruned", metadata)
    assert json.loads((out / METADATA_FILE).read_text())["removed_layers"] == REMOVED
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left"

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert set(reloaded.state_dict()) == set(model.state_dict())
    torch.testing.assert_close(logits(reloaded, ids), pruned, atol=ATOL, rtol=1e-4)
    check_reloaded_config(family, reloaded, original_config)
    reloaded_layers = find_decoder_layers(reloaded).modules
    for new, layer in enumerate(reloaded_layers):
        assert layer_indices(layer) <= {new}

    prompt = ids[:1, :6]
    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(prompt)}
    with torch.no_grad():
        cached = reloaded.generate(prompt, use_cache=True, **kwargs)
        uncached = reloaded.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (1, 11)
    assert torch.equal(cached, uncached), "generation with the KV cache must match generation without it"


def check_reloaded_config(family: str, reloaded, original: dict) -> None:
    """The reloaded config describes the kept layers only."""
    config = reloaded.config
    assert config.num_hidden_layers == len(KEPT)
    if family == "gpt2":
        assert config.n_layer == len(KEPT)
    if original.get("layer_types") is not None:
        assert list(config.layer_types) == [original["layer_types"][i] for i in KEPT]
    if family == "qwen3_moe":
        assert original["mlp_only_layers"] == [1]
        assert list(config.mlp_only_layers) == [KEPT.index(1)] == [0]
        mlp_kinds = [type(layer.mlp).__name__ for layer in reloaded.model.layers]
        assert "Sparse" not in mlp_kinds[0] and all("Sparse" in kind for kind in mlp_kinds[1:]), mlp_kinds
    for key, value in config.to_dict().items():
        if isinstance(value, list) and key.endswith("layer_types"):
            assert len(value) == len(KEPT), key


@pytest.mark.parametrize("family", ["gemma3_text", "gemma2"])
def test_unsliced_layer_types_change_logits(family: str) -> None:
    """Negative control: forward picks masks by ``config.layer_types[i]``, so the slice matters."""
    model = tiny_model(family, NUM_LAYERS)
    full_types = list(model.config.layer_types)
    ids = input_ids(length=16)
    remove_layers(model, REMOVED)
    assert list(model.config.layer_types) == [full_types[i] for i in KEPT]
    assert list(model.config.layer_types) != full_types[: len(KEPT)]  # the test would be vacuous otherwise
    sliced = logits(model, ids)
    model.config.layer_types = full_types  # what a surgery that forgets the slice would leave behind
    unsliced = logits(model, ids)
    assert (sliced - unsliced).abs().max() > 1e-4, "layer_types did not affect the forward pass"
