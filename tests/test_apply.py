"""``simdiff apply`` (surgery on disk) gives exactly what in-memory removal saves, shard by shard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from simdiff.cli.main import main
from simdiff.model.checks import SAFETENSORS_INDEX
from simdiff.model.layers import bypass_layers
from simdiff.store.save import METADATA_FILE
from simdiff.surgery.layers import remove_layers

REMOVED = [1, 3, 4]


def tensors_of(folder: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]:
    """Every tensor of a safetensors checkpoint: name -> (dtype, shape, raw bytes)."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as reader:
            for name in reader.keys():  # noqa: SIM118 - safe_open is not iterable
                t = reader.get_tensor(name)
                assert name not in out, f"{name} stored twice"
                out[name] = (t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return out


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def save_checkpoint(folder: Path, model_type: str = "llama", dtype=torch.bfloat16, max_shard_size=None) -> Path:
    model = tiny_model(model_type).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def in_memory_removal(checkpoint: Path, out: Path, removed: list[int]) -> Path:
    """The reference: ``prune --layers`` (load in the checkpoint's dtype, remove, save verified)."""
    assert main(["-q", "prune", str(checkpoint), "--layers", ",".join(map(str, removed)), "--dtype", "auto",
                 "--out", str(out)]) == 0
    return out


def apply(checkpoint: Path, out: Path, *selection: str) -> None:
    assert main(["-q", "apply", str(checkpoint), *selection, "--out", str(out)]) == 0


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("apply") / "llama-bf16")


def test_apply_equals_in_memory_removal_bitwise(bf16_checkpoint, tmp_path) -> None:
    reference = in_memory_removal(bf16_checkpoint, tmp_path / "memory", REMOVED)
    apply(bf16_checkpoint, tmp_path / "disk", "--layers", "1,3,4")
    on_disk, in_memory = tensors_of(tmp_path / "disk"), tensors_of(reference)
    assert sorted(on_disk) == sorted(in_memory)
    assert on_disk == in_memory
    assert {dtype for dtype, _, _ in on_disk.values()} == {torch.bfloat16}
    assert config_of(tmp_path / "disk") == config_of(reference)
    assert config_of(tmp_path / "disk")["num_hidden_layers"] == 3


def test_apply_sharded_checkpoint(tmp_path) -> None:
    checkpoint = save_checkpoint(tmp_path / "sharded", max_shard_size="30KB")
    input_shards = sorted(checkpoint.glob("*.safetensors"))
    assert len(input_shards) > 3
    apply(checkpoint, tmp_path / "disk", "--layers", "1,3,4")
    reference = in_memory_removal(checkpoint, tmp_path / "memory", REMOVED)
    out = tmp_path / "disk"
    assert tensors_of(out) == tensors_of(reference)
    assert config_of(out) == config_of(reference)
    index = json.loads((out / SAFETENSORS_INDEX).read_text(encoding="utf-8"))
    shards = sorted(out.glob("*.safetensors"))
    assert 1 < len(shards) <= len(input_shards)
    largest_input = max(p.stat().st_size for p in input_shards)
    assert max(p.stat().st_size for p in shards) <= largest_input
    for file in shards:
        with safe_open(file, framework="pt") as reader:
            assert {name: file.name for name in reader.keys()} == {  # noqa: SIM118
                name: shard for name, shard in index["weight_map"].items() if shard == file.name}
    assert sorted(index["weight_map"]) == sorted(tensors_of(reference))
    sizes = tensors_of(out)
    assert index["metadata"]["total_size"] == sum(len(raw) for _, _, raw in sizes.values())


@torch.no_grad()
def test_applied_model_loads_and_equals_bypassed_original(bf16_checkpoint, tmp_path) -> None:
    apply(bf16_checkpoint, tmp_path / "disk", "--layers", "1,3,4")
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "disk", dtype="auto").eval()
    original = AutoModelForCausalLM.from_pretrained(bf16_checkpoint, dtype="auto").eval()
    assert pruned.dtype == torch.bfloat16
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with bypass_layers(original, REMOVED):
        expected = original(ids).logits
    assert torch.equal(pruned(ids).logits, expected)
    metadata = json.loads((tmp_path / "disk" / METADATA_FILE).read_text(encoding="utf-8"))
    assert metadata["removed_layers"] == REMOVED and metadata["kept_layers"] == [0, 2, 5]
    assert metadata["layer_map"] == {"0": 0, "1": 2, "2": 5}
    assert (tmp_path / "disk" / "tokenizer.json").read_bytes() == (bf16_checkpoint / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text", "qwen3_moe"])
def test_apply_other_families_match_in_memory_surgery(model_type, tmp_path) -> None:
    """Other layer paths (transformer.h), per-layer config lists (layer_types, mlp_only_layers)."""
    checkpoint = save_checkpoint(tmp_path / model_type, model_type, dtype=torch.float32, max_shard_size="60KB")
    apply(checkpoint, tmp_path / "disk", "--layers", "0,1,4")
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    remove_layers(model, [0, 1, 4])
    model.save_pretrained(tmp_path / "memory")
    assert tensors_of(tmp_path / "disk") == tensors_of(tmp_path / "memory")
    assert config_of(tmp_path / "disk") == config_of(tmp_path / "memory")


def test_recipe_from_prune_replays_its_selection(bf16_checkpoint, tmp_path) -> None:
    reference = in_memory_removal(bf16_checkpoint, tmp_path / "memory", [0, 5])
    apply(bf16_checkpoint, tmp_path / "disk", "--recipe", str(reference / METADATA_FILE))
    assert tensors_of(tmp_path / "disk") == tensors_of(reference)


def recipe_with(tmp_path: Path, source: Path, **changes) -> Path:
    document = {**json.loads((source / METADATA_FILE).read_text(encoding="utf-8")), **changes}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


@pytest.mark.parametrize("change, message", [
    ({"num_layers_before": 8}, "records 8 layers, the model has 6"),
    ({"model_type": "mistral"}, "model_type 'mistral', the model is 'llama'"),
    ({"architectures": ["MistralForCausalLM"]}, "architectures"),
])
def test_recipe_for_another_model_is_refused(bf16_checkpoint, tmp_path, capsys, change, message) -> None:
    reference = in_memory_removal(bf16_checkpoint, tmp_path / "memory", [2])
    recipe = recipe_with(tmp_path, reference, **change)
    before = tensors_of(bf16_checkpoint)
    capsys.readouterr()
    code = main(["-q", "apply", str(bf16_checkpoint), "--recipe", str(recipe), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("simdiff: error:") and message in err[0], err
    assert not (tmp_path / "o").exists()
    assert tensors_of(bf16_checkpoint) == before


@pytest.mark.parametrize("args, message", [
    (["--layers", "1,9"], "out of range"),
    (["--layers", "0,1,2,3,4,5"], "keep at least one"),
    (["--layers", "1,x"], "comma-separated layer indices"),
    (["--recipe", "/nonexistent/simdiff.json"], "not found"),
    (["--recipe", "{bad}"], "malformed layer fields"),
])
def test_bad_selection_is_refused(bf16_checkpoint, tmp_path, capsys, args, message) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"removed_layers": ["x"], "num_layers_before": 6}), encoding="utf-8")
    args = [str(bad) if a == "{bad}" else a for a in args]
    try:
        code = main(["-q", "apply", str(bf16_checkpoint), *args, "--out", str(tmp_path / "o")])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_output_inside_the_input_is_refused(bf16_checkpoint, capsys) -> None:
    before = sorted(p.name for p in bf16_checkpoint.iterdir())
    assert main(["-q", "apply", str(bf16_checkpoint), "--layers", "1", "--out", str(bf16_checkpoint / "x")]) == 2
    assert "overlaps the input" in capsys.readouterr().err
    assert main(["-q", "apply", str(bf16_checkpoint), "--layers", "1", "--out", str(bf16_checkpoint),
                 "--overwrite"]) == 2
    assert sorted(p.name for p in bf16_checkpoint.iterdir()) == before


def test_prune_layers_out_of_range_is_refused(bf16_checkpoint, tmp_path, capsys) -> None:
    assert main(["-q", "prune", str(bf16_checkpoint), "--layers", "2,6", "--out", str(tmp_path / "o")]) == 2
    assert "layer indices [6] out of range: the model has layers 0..5" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@torch.no_grad()
def test_checkpoint_without_base_model_prefix(tmp_path) -> None:
    """Old GPT-2 checkpoints name layers ``h.0.`` instead of ``transformer.h.0.``; apply finds them too."""
    from safetensors.torch import load_file, save_file

    checkpoint = save_checkpoint(tmp_path / "gpt2", "gpt2", dtype=torch.float32)
    file = checkpoint / "model.safetensors"
    tensors = load_file(file)
    save_file({name.removeprefix("transformer."): t for name, t in tensors.items()}, file, metadata={"format": "pt"})
    apply(checkpoint, tmp_path / "disk", "--layers", "2,3")
    assert any(name.startswith("h.3.") for name in tensors_of(tmp_path / "disk"))
    assert not any(name.startswith("h.4.") for name in tensors_of(tmp_path / "disk"))
    original = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "disk").eval()
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    with bypass_layers(original, [2, 3]):
        assert torch.equal(pruned(ids).logits, original(ids).logits)


def test_second_round_keeps_original_numbering_and_replays(bf16_checkpoint, tmp_path) -> None:
    """Applying to a pruned model records layers in the original numbering; its recipe replays the round."""
    first = in_memory_removal(bf16_checkpoint, tmp_path / "first", [1])  # original 0,2,3,4,5 remain
    apply(first, tmp_path / "second", "--layers", "2")  # the input's layer 2 is the original layer 3
    metadata = json.loads((tmp_path / "second" / METADATA_FILE).read_text(encoding="utf-8"))
    assert metadata["removed_layers"] == [1, 3] and metadata["kept_layers"] == [0, 2, 4, 5]
    assert metadata["history"][-1]["removed_layers"] == [2]
    apply(first, tmp_path / "replayed", "--recipe", str(tmp_path / "second"))
    assert tensors_of(tmp_path / "replayed") == tensors_of(tmp_path / "second")
    apply(bf16_checkpoint, tmp_path / "direct", "--layers", "1,3")
    assert tensors_of(tmp_path / "direct") == tensors_of(tmp_path / "second")


def test_unknown_layer_count_list_is_refused_before_loading_and_sliced_when_named(tmp_path, capsys,
                                                                                   monkeypatch) -> None:
    """prune and apply on a checkpoint whose config holds an unrelated list of 6 entries (6 layers): one line and
    exit 2 before any weight is loaded or written; --slice-config-key slices it in both, to the same config."""
    checkpoint = save_checkpoint(tmp_path / "llama", dtype=torch.float32)
    config = config_of(checkpoint)
    config["label_weights"] = [1, 2, 3, 4, 5, 6]
    (checkpoint / "config.json").write_text(json.dumps(config), encoding="utf-8")
    capsys.readouterr()
    loads = []
    real = AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k)))
    for command in ("prune", "apply"):
        assert main(["-q", command, str(checkpoint), "--layers", "1,4", "--out", str(tmp_path / command)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines() == [err] and "config key 'label_weights' is a list of 6 entries" in err
        assert "--slice-config-key label_weights" in err and not (tmp_path / command).exists()
    assert loads == []  # refused before the weights were loaded
    for command in ("prune", "apply"):
        assert main(["-q", command, str(checkpoint), "--layers", "1,4", "--out", str(tmp_path / command),
                     "--slice-config-key", "label_weights"]) == 0
        assert config_of(tmp_path / command)["label_weights"] == [1, 3, 4, 6]
    assert json.loads((tmp_path / "prune" / METADATA_FILE).read_text())["recipe"]["selection"][
        "slice_config_keys"] == ["label_weights"]
CUSTOM_CONFIG = '''from transformers import LlamaConfig


class TinyConfig(LlamaConfig):
    model_type = "tinycustom"
'''
CUSTOM_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_tiny import TinyConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
'''


def custom_code_checkpoint(source: Path, folder: Path) -> Path:
    """``source`` as a model with its own Python code (``auto_map``), a LLaMA underneath."""
    import shutil

    shutil.copytree(source, folder)
    (folder / "configuration_tiny.py").write_text(CUSTOM_CONFIG, encoding="utf-8")
    (folder / "modeling_tiny.py").write_text(CUSTOM_MODEL, encoding="utf-8")
    config = config_of(folder)
    config.update(model_type="tinycustom", architectures=["TinyCustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny.TinyConfig",
                            "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_apply_trust_remote_code(bf16_checkpoint, tmp_path, capsys, monkeypatch) -> None:
    """A model with ``auto_map``: one line naming --trust-remote-code without it, the same surgery with it."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    custom = custom_code_checkpoint(bf16_checkpoint, tmp_path / "custom")
    capsys.readouterr()
    assert main(["-q", "apply", str(custom), "--layers", "1,3", "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trust-remote-code" in err[0], err
    assert not (tmp_path / "refused").exists()
    apply(custom, tmp_path / "disk", "--layers", "1,3", "--trust-remote-code")
    apply(bf16_checkpoint, tmp_path / "plain", "--layers", "1,3")
    assert tensors_of(tmp_path / "disk") == tensors_of(tmp_path / "plain")
    assert (tmp_path / "disk" / "modeling_tiny.py").is_file()
    assert config_of(tmp_path / "disk")["num_hidden_layers"] == 4


def test_apply_reads_back_what_it_wrote(bf16_checkpoint, tmp_path, capsys, monkeypatch) -> None:
    """A shard written wrong (here: one flipped byte, as a faulty disk would) is caught by reading every tensor
    back; nothing is committed and the input is untouched."""
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def corrupting_save(tensors, path, metadata=None):
        name = sorted(tensors)[-1]
        bad = tensors[name].clone()
        bad.view(-1).view(torch.uint8)[0] ^= 1
        real_save({**tensors, name: bad}, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", corrupting_save)
    before = tensors_of(bf16_checkpoint)
    capsys.readouterr()
    assert main(["-q", "apply", str(bf16_checkpoint), "--layers", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "when read back" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert tensors_of(bf16_checkpoint) == before


def test_multi_round_recipe_on_the_original_model_applies_every_round(bf16_checkpoint, tmp_path) -> None:
    """A two-round simdiff.json (6 -> 5 -> 4) applied to the 6-layer original removes both rounds' layers (original
    numbering); applied to the first round's output it replays the last round."""
    first = in_memory_removal(bf16_checkpoint, tmp_path / "first", [1])
    apply(first, tmp_path / "second", "--layers", "2")  # the original layer 3
    apply(bf16_checkpoint, tmp_path / "composed", "--recipe", str(tmp_path / "second"))
    apply(bf16_checkpoint, tmp_path / "direct", "--layers", "1,3")
    assert tensors_of(tmp_path / "composed") == tensors_of(tmp_path / "direct")
    metadata = json.loads((tmp_path / "composed" / METADATA_FILE).read_text(encoding="utf-8"))
    assert metadata["removed_layers"] == [1, 3] and metadata["num_layers_before"] == 6


def test_recipe_of_another_depth_names_both_depths(bf16_checkpoint, tmp_path, capsys) -> None:
    first = in_memory_removal(bf16_checkpoint, tmp_path / "first", [1])
    apply(first, tmp_path / "second", "--layers", "2")
    third = tmp_path / "third-input"
    apply(bf16_checkpoint, third, "--layers", "0,1,2")  # 3 layers: neither 5 (last input) nor 6 (original)
    capsys.readouterr()
    assert main(["-q", "apply", str(third), "--recipe", str(tmp_path / "second"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "records 5 layers (its last round's input; the original model had 6), the model has 3" in err, err
