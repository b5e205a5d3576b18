"""Layer surgery: bypassing restores everything, removal keeps config and modules consistent."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_config, tiny_model, tiny_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM

from simdiff.core.errors import SimdiffError
from simdiff.model.checks import check_config_consistent
from simdiff.model.layers import bypass_layers, find_decoder_layers
from simdiff.store.save import save_model
from simdiff.surgery.layers import remove_layers, update_config_for_kept_layers


def ids(length: int = 10) -> torch.Tensor:
    return torch.randint(4, 256, (2, length), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=ids(), use_cache=False).logits


def test_bypass_restores_on_error() -> None:
    model = tiny_model("llama", 4)
    layers = list(find_decoder_layers(model).modules)
    dense = logits(model)
    with pytest.raises(RuntimeError, match="boom"), bypass_layers(model, [0, 2]):
        assert [type(m).__name__ for m in find_decoder_layers(model).modules].count("SkippedLayer") == 2
        raise RuntimeError("boom")
    assert list(find_decoder_layers(model).modules) == layers
    torch.testing.assert_close(logits(model), dense)
    with bypass_layers(model, []):  # nothing bypassed
        torch.testing.assert_close(logits(model), dense)


def test_bypass_and_remove_validate_indices() -> None:
    model = tiny_model("llama", 4)
    layers = list(find_decoder_layers(model).modules)
    with pytest.raises(SimdiffError, match=r"\[4\] out of range.*0\.\.3"), bypass_layers(model, [1, 4]):
        pass
    with pytest.raises(SimdiffError, match="cannot remove all 4 layers"):
        remove_layers(model, [0, 1, 2, 3])
    with pytest.raises(SimdiffError, match=r"\[-1\] out of range"):
        remove_layers(model, [-1])
    assert list(find_decoder_layers(model).modules) == layers and model.config.num_hidden_layers == 4


def test_remove_renumbers_layer_idx_and_kv_cache_works() -> None:
    model = tiny_model("llama", 5)
    kept = remove_layers(model, [1, 2])
    assert kept == [0, 3, 4]
    for new, layer in enumerate(find_decoder_layers(model).modules):
        assert layer.self_attn.layer_idx == new
    prompt = ids(6)[:1]
    with torch.no_grad():
        a = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=True,
                           pad_token_id=0, attention_mask=torch.ones_like(prompt))
        b = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=False,
                           pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert torch.equal(a, b)


def test_config_update_rules() -> None:
    config = SimpleNamespace(
        num_hidden_layers=6,
        layer_types=["s", "f", "s", "f", "s", "f"],
        rope_per_layer=(10, 11, 12, 13, 14, 15),  # per-layer because the user names it (--slice-config-key)
        eos_token_id=[7, 8, 9, 10, 11, 12],  # never per-layer
        mlp_only_layers=[0, 3, 5],
        first_k_dense_replace=3,
        hidden_size=32,
    )
    changed = update_config_for_kept_layers(config, [1, 2, 4, 5], sliced=["rope_per_layer"])
    assert config.num_hidden_layers == 4
    assert config.layer_types == ["f", "s", "s", "f"]
    assert config.rope_per_layer == (11, 12, 14, 15)
    assert config.eos_token_id == [7, 8, 9, 10, 11, 12]
    assert config.mlp_only_layers == [3]  # old 0, 3 removed; old 5 -> new 3
    assert config.first_k_dense_replace == 2  # old layers 1, 2 were dense and are the new 0, 1
    assert {"num_hidden_layers", "layer_types", "rope_per_layer", "mlp_only_layers"} <= set(changed)


def test_sparse_step_pattern_becomes_explicit() -> None:
    """qwen3_moe with decoder_sparse_step=2 (odd layers sparse): removal keeps each layer's MLP kind."""
    config = tiny_config("qwen3_moe", 6)
    config.decoder_sparse_step, config.mlp_only_layers = 2, []
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    with bypass_layers(model, [0, 3]):
        bypassed = logits(model)
    kept = remove_layers(model, [0, 3])  # also checks that the config rebuilds the same structure
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == [kinds[i] for i in kept]
    assert model.config.decoder_sparse_step == 1 and model.config.mlp_only_layers == [1, 2]
    torch.testing.assert_close(logits(model), bypassed, atol=1e-5, rtol=1e-5)


def test_inconsistent_config_is_refused(tmp_path) -> None:
    model = tiny_model("gemma3_text", 6)
    remove_layers(model, [2])
    model.config.layer_types = model.config.layer_types + ["full_attention"]
    with pytest.raises(SimdiffError, match="layer_types has 6 entries for 5 layers"):
        check_config_consistent(model)

    model = tiny_model("llama", 6)
    decoder = find_decoder_layers(model)
    decoder.replace(nn.ModuleList(list(decoder.modules)[:4]))  # layers dropped, config not updated
    with pytest.raises(SimdiffError, match="would not rebuild the pruned model"):
        check_config_consistent(model)
    with pytest.raises(SimdiffError, match="would not rebuild"):
        save_model(model, tiny_tokenizer(), tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary directory left


def test_save_refuses_existing_output_and_overwrites_on_request(tmp_path) -> None:
    model = tiny_model("llama", 4)
    remove_layers(model, [1])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SimdiffError, match="already exists; pass --overwrite"):
        save_model(model, tiny_tokenizer(), out, {})
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(SimdiffError, match="not a simdiff output"):  # --overwrite replaces only our own outputs
        save_model(model, tiny_tokenizer(), out, {}, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()  # an empty folder may be replaced
    save_model(model, tiny_tokenizer(), out, {"removed_layers": [1]}, overwrite=True)
    save_model(model, tiny_tokenizer(), out, {"removed_layers": [2]}, overwrite=True)  # and an earlier output
    assert json.loads((out / "simdiff.json").read_text())["removed_layers"] == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_unrelated_list_as_long_as_the_layer_count_is_refused_unless_named() -> None:
    """A config list that merely has as many entries as there are layers (here six label weights of a 6-layer
    model) used to be sliced silently; now removal refuses it, untouched, until --slice-config-key names it."""
    model = tiny_model("llama", 6)
    model.config.label_weights = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    with pytest.raises(SimdiffError, match=r"^config key 'label_weights' is a list of 6 entries, one per layer or "
                                           r"not: .* pass --slice-config-key label_weights$"):
        remove_layers(model, [1])
    assert len(find_decoder_layers(model)) == 6 and model.config.label_weights == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    with pytest.raises(SimdiffError, match=r"--slice-config-key label_weight: the model's config has no such list"):
        remove_layers(model, [1], sliced=["label_weight"])
    remove_layers(model, [1], sliced=["label_weights"])
    assert model.config.label_weights == [0.1, 0.3, 0.4, 0.5, 0.6]


def test_documented_per_layer_keys_are_handled_by_name() -> None:
    config = SimpleNamespace(num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0], moe_layers=[1, 3],
                             mlp_layer_types=["dense", "sparse", "sparse", "sparse"], moe_intermediate_size=[8, 4],
                             architectures=["A", "B", "C", "D"])
    update_config_for_kept_layers(config, [0, 1, 3])
    assert config.no_rope_layers == [1, 1, 0] and config.moe_layers == [1, 2]
    assert config.mlp_layer_types == ["dense", "sparse", "sparse"]
    assert config.moe_intermediate_size == [8, 4] and config.architectures == ["A", "B", "C", "D"]


def test_consistency_check_compares_each_layers_settings_not_only_shapes() -> None:
    """Sliding and full attention layers have the same parameters: a wrongly sliced layer_types passed a check of
    parameter shapes. The check now compares each rebuilt layer's settings (sliding window, ...) too."""
    model = tiny_model("gemma3_text", 6)
    remove_layers(model, [2])
    check_config_consistent(model)
    model.config.layer_types = list(reversed(model.config.layer_types))  # right length, wrong layers
    assert model.config.layer_types != list(reversed(model.config.layer_types))
    with pytest.raises(SimdiffError, match=r"builds decoder layer \d with .*sliding.* a per-layer config entry was "
                                           r"not sliced right"):
        check_config_consistent(model)
