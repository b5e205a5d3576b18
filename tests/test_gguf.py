"""GGUF in and out: prune the GGUF file itself, quantized tensors byte for byte, checked with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize
from transformers import AutoModelForCausalLM

from simdiff.cli.main import main
from simdiff.core.errors import SimdiffError
from simdiff.surgery.gguf import BLOCK_TENSOR, prune_gguf
from simdiff.surgery.layers import remove_layers

T = gguf.GGMLQuantizationType
V = gguf.GGUFValueType
HIDDEN, KV, FFN, VOCAB = 32, 16, 64, 64
# tensor name -> (numpy shape, storage type); several quantization types, as real files mix them
GLOBAL_TENSORS = {"token_embd.weight": ((VOCAB, HIDDEN), T.Q8_0), "output_norm.weight": ((HIDDEN,), T.F32),
                  "output.weight": ((VOCAB, HIDDEN), T.F16)}
BLOCK_TENSORS = {"attn_norm.weight": ((HIDDEN,), T.F32), "attn_q.weight": ((HIDDEN, HIDDEN), T.Q4_1),
                 "attn_k.weight": ((KV, HIDDEN), T.Q4_1), "attn_v.weight": ((KV, HIDDEN), T.Q8_0),
                 "attn_output.weight": ((HIDDEN, HIDDEN), T.Q4_1), "ffn_norm.weight": ((HIDDEN,), T.F32),
                 "ffn_gate.weight": ((FFN, HIDDEN), T.Q4_1), "ffn_up.weight": ((FFN, HIDDEN), T.BF16),
                 "ffn_down.weight": ((HIDDEN, FFN), T.Q4_1)}


def write_tiny_gguf(path: Path, blocks: int = 6, extra: dict | None = None, seed: int = 0,
                    extra_tensors: tuple[str, ...] = ()) -> Path:
    """A tiny llama GGUF file that transformers loads; ``extra``: key -> (value, type[, sub_type])."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    for key, (value, *types) in (extra or {}).items():
        writer.add_key_value(key, value, *types)
    names = list(GLOBAL_TENSORS)[:1] + [f"blk.{i}.{n}" for i in range(blocks) for n in BLOCK_TENSORS]
    names += list(GLOBAL_TENSORS)[1:] + list(extra_tensors)
    for name in names:
        match = BLOCK_TENSOR.match(name)
        shape, kind = BLOCK_TENSORS[match.group(2)] if match else GLOBAL_TENSORS.get(name, ((HIDDEN,), T.F32))
        values = rng.standard_normal(shape).astype(np.float32) * (1.0 if len(shape) == 1 else 0.2)
        data = values if kind == T.F32 else quantize(values, kind)
        writer.add_tensor(name, data, raw_dtype=None if kind == T.F32 else kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def payload(field) -> tuple:
    """A metadata field's types and raw value bytes (exact comparison, whatever its type)."""
    return tuple(field.types), [field.parts[i].tobytes() for i in field.data]


def load_gguf_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture
def tiny_file(tmp_path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def test_kept_tensors_are_byte_identical_and_renumbered(tiny_file, tmp_path) -> None:
    result = prune_gguf(tiny_file, [4, 1], tmp_path / "out.gguf")
    assert result.kept == [0, 2, 3, 5] and result.removed == [1, 4]
    before, after = gguf.GGUFReader(tiny_file), gguf.GGUFReader(tmp_path / "out.gguf")
    rename = {f"blk.{old}.": f"blk.{new}." for new, old in enumerate(result.kept)}
    expected = {}
    for t in before.tensors:
        match = BLOCK_TENSOR.match(t.name)
        if match is None:
            expected[t.name] = t
        elif int(match.group(1)) in result.kept:
            expected[rename[f"blk.{match.group(1)}."] + match.group(2)] = t
    assert [t.name for t in after.tensors] == list(expected)
    for t in after.tensors:
        old = expected[t.name]
        assert t.tensor_type == old.tensor_type and list(t.shape) == list(old.shape)
        assert t.data.tobytes() == old.data.tobytes(), t.name
    assert {t.tensor_type for t in after.tensors} == {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_1}
    assert after.get_field("llama.block_count").contents() == 4
    keys = [k for k in before.fields if not k.startswith("GGUF.")]
    assert [k for k in after.fields if not k.startswith("GGUF.")] == keys
    for key in (k for k in keys if k != "llama.block_count"):
        assert payload(after.fields[key]) == payload(before.fields[key]), key
    assert result.size_after == (tmp_path / "out.gguf").stat().st_size


def test_size_shrinks_by_the_removed_blocks_bytes(tiny_file, tmp_path) -> None:
    prune_gguf(tiny_file, [0, 2, 5], tmp_path / "out.gguf")
    assert_smaller_by_removed_blocks(tiny_file, tmp_path / "out.gguf", [0, 2, 5])


def assert_smaller_by_removed_blocks(src: Path, out: Path, removed: list[int]) -> None:
    """The tensor-data section shrinks by exactly the removed tensors' (aligned) bytes; the header hardly changes."""
    before, after = gguf.GGUFReader(src), gguf.GGUFReader(out)
    removed_bytes = sum(gguf.GGUFWriter.ggml_pad(t.n_bytes, before.alignment) for t in before.tensors
                        if (m := BLOCK_TENSOR.match(t.name)) and int(m.group(1)) in removed)
    data_before = src.stat().st_size - before.data_offset
    data_after = out.stat().st_size - after.data_offset
    assert data_before - data_after == removed_bytes
    assert 0 <= before.data_offset - after.data_offset <= 100 * len(before.tensors)


def test_transformers_loads_the_pruned_file_with_the_in_memory_pruned_logits(tiny_file, tmp_path) -> None:
    removed = [1, 4]
    prune_gguf(tiny_file, removed, tmp_path / "out.gguf")
    reference = load_gguf_model(tiny_file)
    remove_layers(reference, removed)
    pruned = load_gguf_model(tmp_path / "out.gguf")
    assert pruned.config.num_hidden_layers == 4
    ids = torch.tensor([[1, 5, 9, 33, 60, 2, 17, 40]])
    with torch.no_grad():
        expected, actual = reference(ids).logits, pruned(ids).logits
    assert torch.equal(expected, actual)
    other = load_gguf_model(tiny_file)
    remove_layers(other, [1, 3])  # a different selection gives different logits: the comparison can fail
    with torch.no_grad():
        assert not torch.allclose(other(ids).logits, actual, atol=1e-3)


PER_LAYER_EXTRA = {
    "llama.feed_forward_length": ([10, 11, 12, 13, 14, 15], V.ARRAY, V.UINT32),
    "llama.attention.sliding_window_pattern": ([True, False, True, False, True, False], V.ARRAY, V.BOOL),
    "xielu.alpha_p": ([0.5, 1.5, 2.5, 3.5, 4.5, 5.5], V.ARRAY, V.FLOAT32),
    "llama.leading_dense_block_count": (3, V.UINT32),
    # arrays of six entries that are not per-layer: left alone
    "llama.rope.dimension_sections": ([1, 2, 3, 4, 5, 6], V.ARRAY, V.INT32),
    "general.tags": (["a", "b", "c", "d", "e", "f"], V.ARRAY, V.STRING),
    "tokenizer.ggml.tokens": ([b"<s>", b"\xff\xfe", b"b", b"c", b"d", b"e"], V.ARRAY, V.STRING),
}


def test_per_layer_metadata_is_sliced_and_the_rest_kept(tmp_path) -> None:
    src = write_tiny_gguf(tmp_path / "tiny.gguf", extra=PER_LAYER_EXTRA)
    prune_gguf(src, [1, 4], tmp_path / "out.gguf")
    after = gguf.GGUFReader(tmp_path / "out.gguf")
    assert after.get_field("llama.feed_forward_length").contents() == [10, 12, 13, 15]
    assert after.get_field("llama.attention.sliding_window_pattern").contents() == [True, True, False, False]
    assert after.get_field("xielu.alpha_p").contents() == [0.5, 2.5, 3.5, 5.5]
    assert after.get_field("llama.leading_dense_block_count").contents() == 2  # blocks 0 and 2 of 0, 1, 2
    before = gguf.GGUFReader(src)
    for key in ("llama.rope.dimension_sections", "general.tags", "tokenizer.ggml.tokens"):
        assert payload(after.fields[key]) == payload(before.fields[key]), key
    assert after.fields["tokenizer.ggml.tokens"].parts[after.fields["tokenizer.ggml.tokens"].data[1]].tobytes() \
        == b"\xff\xfe"  # not valid UTF-8: copied as raw bytes


POSITIONAL = {
    "llama.attention.sliding_window_pattern": 6, "llama.moe_every_n_layers": 2,
    "llama.interleave_moe_layer_step": 2, "llama.full_attention_interval": 4, "llama.rescale_every_n_layers": 6,
    "llama.attention.shared_kv_layers": 2, "llama.nextn_predict_layers": 1, "llama.n_deepstack_layers": 3,
    "llama.embedding_length_per_layer_input": 256, "llama.decoder_block_count": 6,
}


@pytest.mark.parametrize("key", list(POSITIONAL))
def test_positional_layer_patterns_are_refused(tmp_path, key) -> None:
    src = write_tiny_gguf(tmp_path / "tiny.gguf", extra={key: (POSITIONAL[key], V.UINT32)})
    content = src.read_bytes()
    with pytest.raises(SimdiffError, match=rf"cannot prune this llama GGUF file: {key} = {POSITIONAL[key]}"):
        prune_gguf(src, [1], tmp_path / "out.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]  # no output, no temporary file
    assert src.read_bytes() == content


@pytest.mark.parametrize("key", ["llama.attention.sliding_window_pattern", "llama.moe_every_n_layers"])
def test_uniform_patterns_are_accepted(tmp_path, key) -> None:
    src = write_tiny_gguf(tmp_path / "tiny.gguf", extra={key: (1, V.UINT32)})
    prune_gguf(src, [1], tmp_path / "out.gguf")
    assert gguf.GGUFReader(tmp_path / "out.gguf").get_field(key).contents() == 1


def test_blocks_beyond_the_block_count_are_refused(tmp_path) -> None:
    src = write_tiny_gguf(tmp_path / "tiny.gguf", extra_tensors=("blk.6.attn_norm.weight",))
    with pytest.raises(SimdiffError, match=r"extra blocks \[6\]"):
        prune_gguf(src, [1], tmp_path / "out.gguf")


def test_split_files_are_refused(tmp_path) -> None:
    src = write_tiny_gguf(tmp_path / "tiny.gguf", extra={"split.count": (2, V.UINT16)})
    with pytest.raises(SimdiffError, match="llama-gguf-split --merge"):
        prune_gguf(src, [1], tmp_path / "out.gguf")


# -- command line -------------------------------------------------------------------------------------
def run_cli(capsys, args: list[str]) -> tuple[int, str, str]:
    code = main(["-q", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_apply_cli_with_layers_and_with_a_recipe(tiny_file, tmp_path, capsys) -> None:
    code, out, err = run_cli(capsys, ["apply", str(tiny_file), "--layers", "1,4", "--out", str(tmp_path / "a.gguf")])
    assert code == 0, err
    assert "(6 -> 4 blocks)" in out
    recipe = tmp_path / "run"
    recipe.mkdir()
    (recipe / "simdiff.json").write_text(json.dumps({"removed_layers": [4, 1], "num_layers_before": 6}))
    code, _, err = run_cli(capsys, ["apply", str(tiny_file), "--recipe", str(recipe), "--out", str(tmp_path / "b.gguf")])
    assert code == 0, err
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def apply_error(capsys, args: list[str]) -> str:
    code, _, err = run_cli(capsys, ["apply", *args])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("simdiff: error:"), err
    return lines[0]


def test_apply_cli_refusals(tiny_file, tmp_path, capsys) -> None:
    recipe = tmp_path / "simdiff.json"
    recipe.write_text(json.dumps({"removed_layers": [1], "num_layers_before": 30}))
    out = str(tmp_path / "out.gguf")
    assert "records 30 layers, the model has 6" in apply_error(capsys, [str(tiny_file), "--recipe", str(recipe), "--out", out])
    assert "out of range" in apply_error(capsys, [str(tiny_file), "--layers", "1,6", "--out", out])
    assert "overlaps the input" in apply_error(
        capsys, [str(tiny_file), "--layers", "1", "--out", str(tiny_file), "--overwrite"])
    assert "unknown extension" in apply_error(capsys, [str(tiny_file), "--layers", "1", "--out", str(tmp_path / "x")])
    (tmp_path / "not.gguf").write_text("not a gguf file")
    assert "not a readable GGUF file" in apply_error(capsys, [str(tmp_path / "not.gguf"), "--layers", "1", "--out", out])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not.gguf", "simdiff.json", "tiny.gguf"]
    (tmp_path / "out.gguf").write_text("precious")
    assert "already exists" in apply_error(capsys, [str(tiny_file), "--layers", "1", "--out", out])
    assert (tmp_path / "out.gguf").read_text() == "precious"


def test_prune_export_gguf_refuses_a_model_without_a_gguf_file_before_work(tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, ["prune", "/nonexistent/model", "--num-layers", "1", "--export", "gguf",
                                    "--out", str(tmp_path / "out")])
    assert code == 2 and "--export gguf needs a model that comes as a GGUF file" in err
    assert not (tmp_path / "out").exists()


# -- the real built-in model --------------------------------------------------------------------------
def builtin_gguf() -> Path:
    from simdiff.core.cache import builtin_gguf_file

    return builtin_gguf_file("smollm2-135m")


@pytest.mark.slow
def test_smollm2_gguf_pruned_logits_equal_the_in_memory_pruned_model(tmp_path) -> None:
    src = builtin_gguf()
    removed = [3, 5, 7, 9, 11, 13, 15, 17]
    result = prune_gguf(src, removed, tmp_path / "pruned.gguf")
    assert_smaller_by_removed_blocks(src, result.out, removed)
    assert 80e6 < result.size_after < 81e6  # 98.4 MB less 8 of 30 Q4_1 blocks
    reference = load_gguf_model(src)
    remove_layers(reference, removed)
    pruned = load_gguf_model(result.out)
    ids = torch.tensor([[1, 504, 3458, 282, 1391, 10576, 28, 253, 6372, 30, 2]])
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, pruned(ids).logits)


@pytest.mark.slow
def test_smollm2_prune_export_gguf(tmp_path, capsys) -> None:
    out = tmp_path / "pruned"
    code, stdout, err = run_cli(capsys, ["prune", "smollm2-135m", "--num-layers", "8", "--samples", "4",
                                         "--calib-seq-len", "64", "--export", "gguf", "--out", str(out)])
    assert code == 0, err
    metadata = json.loads((out / "simdiff.json").read_text())
    reader = gguf.GGUFReader(out / "pruned.gguf")
    assert reader.get_field("llama.block_count").contents() == metadata["num_layers_after"] == 22
    assert_smaller_by_removed_blocks(builtin_gguf(), out / "pruned.gguf", metadata["removed_layers"])
    assert "pruned.gguf" in stdout
    code, _, err = run_cli(capsys, ["apply", str(builtin_gguf()), "--recipe", str(out), "--out", str(tmp_path / "a.gguf")])
    assert code == 0, err
    assert (tmp_path / "a.gguf").read_bytes() == (out / "pruned.gguf").read_bytes()  # the recipe replays it


def test_an_unknown_array_of_one_entry_per_block_is_refused_unless_named(tmp_path) -> None:
    """Arrays are sliced by name (simdiff.surgery.layers.GGUF_KEYS, shared with the safetensors path), not by length: an
    unknown array of block_count entries is refused before anything is written, and sliced once named."""
    src = write_tiny_gguf(tmp_path / "tiny.gguf", extra={"llama.label_weights": ([1.0, 2, 3, 4, 5, 6], V.ARRAY,
                                                                                 V.FLOAT32)})
    with pytest.raises(SimdiffError, match=r"GGUF metadata 'llama.label_weights' is a list of 6 entries, .* pass "
                                           r"--slice-config-key llama.label_weights"):
        prune_gguf(src, [1, 4], tmp_path / "out.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]
    prune_gguf(src, [1, 4], tmp_path / "out.gguf", sliced=["label_weights"])  # named without its arch prefix
    assert gguf.GGUFReader(tmp_path / "out.gguf").get_field("llama.label_weights").contents() == [1, 3, 4, 6]
@pytest.mark.parametrize("model_type, accepted", [("llama", True), ("mistral", True), ("qwen2", False),
                                                  ("gpt2", False)])
def test_apply_recipe_checks_the_architecture(tiny_file, tmp_path, capsys, model_type, accepted) -> None:
    """A recipe made on another architecture with the same depth is refused (Mistral is llama in GGUF)."""
    recipe = tmp_path / "simdiff.json"
    recipe.write_text(json.dumps({"removed_layers": [1], "num_layers_before": 6, "model_type": model_type}))
    out = tmp_path / "out.gguf"
    if accepted:
        code, _, err = run_cli(capsys, ["apply", str(tiny_file), "--recipe", str(recipe), "--out", str(out)])
        assert code == 0 and out.is_file(), err
    else:
        message = apply_error(capsys, [str(tiny_file), "--recipe", str(recipe), "--out", str(out)])
        assert f"model_type '{model_type}', the GGUF file's architecture is 'llama'" in message
        assert not out.exists()


def test_apply_multi_round_recipe_to_the_original_file(tiny_file, tmp_path, capsys) -> None:
    """A two-round recipe (6 -> 5 -> 4: the input's layer 1, then the next input's layer 2 = original 3) on the
    6-block file removes both rounds' blocks; on a 5-block file it removes the last round's."""
    recipe = tmp_path / "simdiff.json"
    recipe.write_text(json.dumps({"removed_layers": [1, 3], "num_layers_before": 5, "num_layers_original": 6,
                                  "history": [{"removed_layers": [1]}, {"removed_layers": [2]}]}))
    code, _, err = run_cli(capsys, ["apply", str(tiny_file), "--recipe", str(recipe), "--out", str(tmp_path / "a.gguf")])
    assert code == 0, err
    code, _, err = run_cli(capsys, ["apply", str(tiny_file), "--layers", "1,3", "--out", str(tmp_path / "b.gguf")])
    assert code == 0, err
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    five = write_tiny_gguf(tmp_path / "five.gguf", blocks=5)
    code, out, err = run_cli(capsys, ["apply", str(five), "--recipe", str(recipe), "--out", str(tmp_path / "c.gguf")])
    assert code == 0 and "removed blocks [2]" in out, err
