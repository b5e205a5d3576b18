"""--heal linear: the fold reproduces the fitted map exactly, the map is the least-squares solution, an exactly
linear removed layer is recovered exactly, healing brings the pruned model closer to the dense one, the
refusals, and the healed checkpoint on disk."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from tiny import save_tiny, tiny_model, tiny_tokenizer, write_calibration_text
from torch import nn
from transformers import AutoModelForCausalLM

from simdiff.cli.main import main
from simdiff.collect.hooks import layer_output
from simdiff.config.recipe import Calibration
from simdiff.core.errors import SimdiffError
from simdiff.data import calibration_batches
from simdiff.data.windows import batches
from simdiff.model import load_model
from simdiff.model.layers import bypass_layers, find_decoder_layers
from simdiff.surgery.heal import (
    NormalEquations,
    SplitEquations,
    check_healable,
    check_windows,
    checked_transform,
    find_branch,
    heal_layers,
    healed_bypass,
    removed_runs,
    token_weights,
)
from simdiff.surgery.layers import remove_layers

FOLDABLE = ["llama", "qwen2", "phi3", "gpt2", "opt", "gpt_neox", "qwen3_moe", "qwen2_moe"]
REMOVED = [2, 3, 5]  # two runs: [2, 3] folded into layer 1, [5] into layer 4


def model_of(family: str):
    """A tiny model of ``family``; qwen2_moe (experts and a gated shared expert) is built here."""
    if family != "qwen2_moe":
        return tiny_model(family)
    from tiny import SHARED
    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen2_moe", **{**SHARED, "num_experts": 4, "num_experts_per_tok": 2,
                                                  "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40,
                                                  "decoder_sparse_step": 1, "mlp_only_layers": []})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def calib_batches(n: int = 12, seq: int = 24, seed: int = 0, vocab: int = 256) -> list:
    generator = torch.Generator().manual_seed(seed)
    return batches(torch.randint(3, vocab, (n, seq), generator=generator), 4)


def logits(model, batch_list) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits for b in batch_list])


def branch_module(model, record_run):
    layer = find_decoder_layers(model).modules[record_run.folded_into]
    return layer.get_submodule(record_run.branch)


@pytest.mark.parametrize("family", FOLDABLE)
def test_folded_model_equals_the_unfolded_map(family, one_thread) -> None:
    """Folded weights == the original model with each run bypassed and M -> M T applied by a hook."""
    original = model_of(family)
    with torch.no_grad():  # random biases (initialised to zero), so a bias left unfolded shows
        for name, param in original.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    healed = copy.deepcopy(original)
    data = calib_batches()
    record = heal_layers(healed, data, REMOVED, ridge=1e-3, check=False)  # the fold, whatever the check says
    assert [r.folded_into for r in record.runs] == [1, 4]
    assert all(r.r2_calibration > r.r2_calibration_unhealed for r in record.runs)
    if family == "qwen2_moe":  # every expert and the shared expert
        assert record.runs[0].projections == ["mlp.experts.down_proj", "mlp.shared_expert.down_proj"]
    changed = {name for name, p in healed.named_parameters()
               if not torch.equal(p, original.get_parameter(name))}
    assert changed and all(name.split(".")[-1] in ("weight", "bias", "down_proj") for name in changed)

    def apply_map(transform):
        def hook(module, args, output):
            m = layer_output(output)
            mapped = (m.double() @ transform).to(m.dtype)
            return (mapped, *output[1:]) if isinstance(output, tuple) else mapped
        return hook

    handles = [branch_module(original, run).register_forward_hook(apply_map(run.transform)) for run in record.runs]
    try:
        with bypass_layers(original, REMOVED):
            expected = logits(original, data)
    finally:
        for handle in handles:
            handle.remove()
    with bypass_layers(healed, REMOVED):
        actual = logits(healed, data)
    with bypass_layers(original, REMOVED):
        unhealed = logits(original, data)
    assert not torch.allclose(unhealed, expected, atol=1e-3)  # the map does change the output
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def collect(model, data, run: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independently collected (M, L - Y, L) rows for ``run`` on ``model`` as it is (numpy float64)."""
    a, b = run
    decoder = find_decoder_layers(model)
    branch = find_branch(model, a - 1, data[0])
    seen: dict[str, list] = {"m": [], "p": [], "b": []}
    hooks = [branch.module.register_forward_hook(lambda m, i, o: seen["m"].append(layer_output(o))),
             decoder.modules[a - 1].register_forward_hook(lambda m, i, o: seen["p"].append(layer_output(o))),
             decoder.modules[b].register_forward_hook(lambda m, i, o: seen["b"].append(layer_output(o)))]
    with torch.no_grad():
        for batch in data:
            model(input_ids=batch.input_ids)
    for hook in hooks:
        hook.remove()
    rows = {k: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]).double().numpy() for k, v in seen.items()}
    return rows["m"], rows["b"] - (rows["p"] - rows["m"]), rows["b"]


def weighted(rows: np.ndarray, residual: np.ndarray, weighting: str) -> np.ndarray:
    """Rows scaled by sqrt(w_t): relative weights w_t = 1 / ||L_t||^2 turn into dividing each row by ||L_t||."""
    return rows / np.linalg.norm(residual, axis=1, keepdims=True) if weighting == "relative" else rows


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("weighting", ["relative", "uniform"])
def test_transform_is_numpy_least_squares(family, weighting, one_thread) -> None:
    """Dense targets: every run's T equals numpy.linalg.lstsq on independently collected activations, each row
    scaled by 1 / ||L_t|| for relative weights, both plain (ridge 0) and with the ridge towards the identity (an
    augmented least-squares system); the recorded R^2 is that weighted system's."""
    data = calib_batches()
    original = tiny_model(family)
    for ridge in (0.0, 0.05):
        record = heal_layers(copy.deepcopy(original), data, REMOVED, ridge=ridge, targets="dense",
                             weighting=weighting, check=False)
        for run in record.runs:
            m, raw_target, residual = collect(original, data, (run.layers[0], run.layers[-1]))
            m, target = weighted(m, residual, weighting), weighted(raw_target, residual, weighting)
            d = m.shape[1]
            lam = ridge * np.trace(m.T @ m) / d
            a = np.vstack([m, np.sqrt(lam) * np.eye(d)])
            y = np.vstack([target, np.sqrt(lam) * np.eye(d)])
            expected = np.linalg.lstsq(a, y, rcond=None)[0]
            np.testing.assert_allclose(run.transform.numpy(), expected, rtol=1e-6, atol=1e-6)
            assert run.ridge_lambda == pytest.approx(lam)
            w = weighted(np.ones((len(m), 1)), residual, weighting) ** 2
            mean = (w * raw_target).sum(0) / w.sum()
            r2 = 1 - ((target - m @ expected) ** 2).sum() / (w * (raw_target - mean) ** 2).sum()
            assert run.r2_calibration == pytest.approx(r2, rel=1e-6)  # weighted as the fit
        assert record.to_dict()["weighting"] == weighting
    sequential = heal_layers(copy.deepcopy(original), data, REMOVED, ridge=0.0, weighting=weighting, check=False)
    m, target, residual = collect(original, data, (2, 3))  # the first run sees the dense model in both modes
    expected = np.linalg.lstsq(weighted(m, residual, weighting), weighted(target, residual, weighting), rcond=None)[0]
    np.testing.assert_allclose(sequential.runs[0].transform.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_relative_weights_keep_a_huge_token_from_carrying_the_fit(one_thread) -> None:
    """The attention-sink case: one token whose rows are 1000x the others' and which wants a different map.
    Uniform least squares follows that token; relative weights (error / ||L_t||^2) follow the many others."""
    generator = torch.Generator().manual_seed(0)
    d, n = 8, 400
    m = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = torch.randn(n, d, generator=generator, dtype=torch.float64)
    common, odd = torch.randn(d, d, generator=generator, dtype=torch.float64), torch.eye(d, dtype=torch.float64)
    target = m @ common
    m[0] *= 1000.0
    target[0] = m[0] @ odd
    fits = {}
    for weighting in ("relative", "uniform"):
        equations = NormalEquations(d, torch.device("cpu"))
        equations.add(m, target, token_weights(y + target, weighting))
        fits[weighting] = equations.solve(0.0)[0]
    rest = slice(1, None)
    error = {k: float((m[rest] @ t - target[rest]).norm() / target[rest].norm()) for k, t in fits.items()}
    assert error["relative"] < 0.1  # measured 0.05: the one odd token pulls a little
    assert error["uniform"] > 0.25  # measured 0.31: its direction gets the odd token's map


class LinearLayer(nn.Module):
    """A decoder layer that is exactly linear: h -> h + h A."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.matrix = nn.Parameter(matrix)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + hidden_states @ self.matrix


def test_exactly_linear_layer_is_recovered_exactly(one_thread) -> None:
    """Layers 0-2 and the embedding write only into dims S = 0..15, except layer 2's MLP, which writes only into
    the other 16 dims; layer 3 is h -> h + h A with A reading only those dims. Then L - Y = M (I + A) exactly,
    so removing layer 3 with --heal linear gives back the dense model's logits."""
    model = tiny_model("llama")
    half = 16
    with torch.no_grad():
        model.model.embed_tokens.weight[:, half:] = 0
        layers = model.model.layers
        for i in (0, 1, 2):
            layers[i].self_attn.o_proj.weight[half:] = 0
            if i < 2:
                layers[i].mlp.down_proj.weight[half:] = 0
        layers[2].mlp.down_proj.weight[:half] = 0
        matrix = torch.zeros(32, 32)
        matrix[half:] = 0.5 * torch.randn(32 - half, 32, generator=torch.Generator().manual_seed(1))
    layers[3] = LinearLayer(matrix)
    data = calib_batches(n=16)
    dense = logits(model, data)
    record = heal_layers(model, data, [3], ridge=0.0)
    assert record.runs[0].r2_calibration == pytest.approx(1.0, abs=1e-9)
    with bypass_layers(model, [3]):
        healed = logits(model, data)
    torch.testing.assert_close(healed, dense, rtol=1e-4, atol=1e-4)


def kl_to(dense: torch.Tensor, pruned: torch.Tensor) -> float:
    return float(torch.nn.functional.kl_div(pruned.log_softmax(-1), dense.log_softmax(-1), log_target=True,
                                            reduction="batchmean"))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen3_moe"])
def test_healing_brings_the_pruned_model_closer_to_the_dense_one(family, one_thread) -> None:
    """On the calibration windows the healed prune's next-token distributions are closer to the dense model's
    (KL) than the plain prune's, and so is the last hidden state (the fitted objective)."""
    model = tiny_model(family)
    data = calib_batches()
    dense = logits(model, data)
    with bypass_layers(model, REMOVED):
        plain = logits(model, data)
    with healed_bypass(model, data, REMOVED, ridge=1e-3, check=False):  # fitted on these windows, all of them
        healed = logits(model, data)
    assert kl_to(dense, healed) < kl_to(dense, plain)
    torch.testing.assert_close(logits(model, data), dense)  # healed_bypass restored the weights


def test_removed_runs_and_layer_zero_refusal() -> None:
    assert removed_runs([5, 2, 3, 9]) == [(2, 3), (5, 5), (9, 9)]
    check_healable([0, 1], "none")
    with pytest.raises(SimdiffError, match=r"starts at layer 0.*--keep-first 1"):
        check_healable([0, 1, 4])
    with pytest.raises(SimdiffError, match="layer 0"):
        heal_layers(tiny_model("llama"), calib_batches(), [0, 3])


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_post_feedforward_norm_is_refused(family) -> None:
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SimdiffError, match="post_feedforward_layernorm.*no linear projection"):
        heal_layers(model, calib_batches(), [3])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_bad_fold_is_detected_and_undone(monkeypatch) -> None:
    """A fold that does not reproduce M T (here: T applied the wrong way round) is refused, weights restored."""
    import simdiff.surgery.heal as heal

    def transposed(projection, transform):
        weight = getattr(projection.module, projection.weight)
        weight.data.copy_((transform.to(weight.device) @ weight.detach().double()).to(weight.dtype))

    monkeypatch.setattr(heal, "_fold_one", transposed)
    model = tiny_model("llama")
    before = model.model.layers[1].mlp.down_proj.weight.clone()
    with pytest.raises(SimdiffError, match="does not reproduce M"):
        heal_layers(model, calib_batches(), [2])
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, before)


# -- the command line and the checkpoint --------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal")
    return {"model": save_tiny("llama", root / "llama"), "calib": write_calibration_text(root / "calib.txt"),
            "root": root}


def prune_args(ws, out, *extra) -> list[str]:
    return ["prune", str(ws["model"]), "--calib", str(ws["calib"]), "--samples", "8", "--calib-seq-len", "32",
            "--out", str(out), "-q", *extra]


def test_healed_checkpoint_reloads_generates_and_replays(workspace, tmp_path) -> None:
    healed_out, plain_out = tmp_path / "healed", tmp_path / "plain"
    assert main(prune_args(workspace, healed_out, "--layers", "2,3,5", "--heal", "linear")) == 0
    assert main(prune_args(workspace, plain_out, "--layers", "2,3,5")) == 0
    record = json.loads((healed_out / "simdiff.json").read_text())
    heal = record["heal"]
    assert heal["method"] == "linear" and heal["passes"] == 2 and heal["seconds"] > 0
    assert [r["folded_into"] for r in heal["runs"]] == [1, 4]
    assert [r["folded_into_saved_index"] for r in heal["runs"]] == [1, 2]
    assert record["recipe"]["selection"]["heal"] == "linear"
    assert json.loads((plain_out / "simdiff.json").read_text())["heal"] == {"method": "none"}
    card = (healed_out / "README.md").read_text()
    assert "weights of layers [1, 4]" in card
    healed = AutoModelForCausalLM.from_pretrained(healed_out).eval()
    plain = AutoModelForCausalLM.from_pretrained(plain_out).eval()
    assert healed.num_parameters() == plain.num_parameters()
    differing = {n for n, p in healed.named_parameters() if not torch.equal(p, plain.get_parameter(n))}
    assert differing == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    ids = tiny_tokenizer()("The tower is", return_tensors="pt").input_ids
    with torch.no_grad():
        cached = healed.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = healed.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert main(["apply", str(workspace["model"]), "--recipe", str(healed_out), "--out", str(tmp_path / "x")]) == 2
    replay = tmp_path / "replay"
    assert main(["run", str(healed_out / "simdiff.json"), "--out", str(replay), "-q"]) == 0
    again = AutoModelForCausalLM.from_pretrained(replay)
    assert all(torch.equal(p, again.get_parameter(n)) for n, p in healed.named_parameters())


def test_heal_samples_sets_the_windows_the_maps_are_fitted_on(workspace, tmp_path) -> None:
    """--heal-samples N: the maps are fitted on N windows drawn like the calibration windows (same text, length
    and seed), whatever --samples scores on; the saved weights are those heal_layers fits on that draw."""
    saved = {}
    for samples in (8, 24):
        out = tmp_path / f"h{samples}"
        assert main(prune_args(workspace, out, "--layers", "2,3", "--heal", "linear", "--heal-samples",
                               str(samples))) == 0
        heal = json.loads((out / "simdiff.json").read_text())["heal"]
        assert [r["tokens"] for r in heal["runs"]] == [samples * 32] and "--heal-samples" in heal["fitted_on"]
        saved[samples] = AutoModelForCausalLM.from_pretrained(out).model.layers[1].mlp.down_proj.weight
    model, tokenizer = load_model(str(workspace["model"]))
    calibration = Calibration(source=str(workspace["calib"]), samples=8, seq_len=32)
    heal_layers(model, calibration_batches(calibration, tokenizer, 24), [2, 3])
    assert torch.allclose(model.model.layers[1].mlp.down_proj.weight, saved[24], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(saved[8], saved[24], atol=1e-4)


def test_heal_protects_layer_zero_in_selection(workspace, tmp_path, caplog) -> None:
    out = tmp_path / "sel"
    with caplog.at_level(logging.INFO, logger="simdiff"):
        assert main(prune_args(workspace, out, "--num-layers", "2", "--criterion", "block_influence",
                               "--heal", "linear")) == 0
    said = [r.getMessage() for r in caplog.records if "fits the kept layers to the calibration text" in r.getMessage()]
    assert len(said) == 1 and str(workspace["calib"]) in said[0]  # names the text, once, before any fit
    record = json.loads((out / "simdiff.json").read_text())
    assert 0 not in record["removed_layers"] and record["settings"]["keep_first"] == 1
    assert [r["folded_into"] for r in record["heal"]["runs"]] == [a[0] - 1 for a in removed_runs(
        record["removed_layers"])]


def test_cli_refusals(workspace, tmp_path, capsys, monkeypatch) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("simdiff.model.load.load_model", no_loading)
    cases = [
        (prune_args(workspace, tmp_path / "a", "--layers", "0,1", "--heal", "linear"), "starts at layer 0"),
        (prune_args(workspace, tmp_path / "b", "--layers", "2", "--heal", "linear", "--offload", "layerwise"),
         "drop --offload"),
        (prune_args(workspace, tmp_path / "c", "--layers", "2", "--heal", "linear", "--heal-ridge", "-1"),
         "--heal-ridge must be a number >= 0"),
        (prune_args(workspace, tmp_path / "e", "--layers", "2", "--heal", "linear", "--heal-samples", "0"),
         "--heal-samples must be at least 1"),
        (["apply", str(workspace["model"]), "--layers", "2", "--heal", "linear", "--out", str(tmp_path / "d")],
         "--layers 2 --heal linear`"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_cli_refuses_gemma2_before_scoring(tmp_path, capsys, workspace, monkeypatch) -> None:
    import simdiff.workflows.api

    def no_scoring(*args, **kwargs):
        raise AssertionError("the layers were scored")

    monkeypatch.setattr(simdiff.workflows.api, "select_for_model", no_scoring)
    argv = prune_args(workspace, tmp_path / "out", "--num-layers", "2", "--heal", "linear")
    argv[1] = str(save_tiny("gemma2", tmp_path / "gemma2"))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "post_feedforward_layernorm" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_compare_with_heal_evaluates_healed_sets(workspace, tmp_path) -> None:
    """compare --heal linear: every candidate is evaluated healed (the weights restored between candidates),
    so the same layers give a different perplexity than the plain comparison, and the rows record the fit."""
    common = ["-q", "compare", str(workspace["model"]), "--num-layers", "1,2", "--criterion", "block_influence,reverse",
              "--calib", str(workspace["calib"]), "--samples", "8", "--calib-seq-len", "32", "--ppl",
              str(workspace["calib"]), "--eval-seq-len", "32", "--max-tokens", "320", "--eval-batch-size", "5"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--heal", "linear", "--out", str(tmp_path / "healed")]) == 0
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    healed = json.loads((tmp_path / "healed" / "results.json").read_text())
    assert healed["heal"]["method"] == "linear" and healed["recipe"]["selection"]["heal"] == "linear"
    source = str(workspace["calib"])
    assert healed["rows"][0]["perplexity"] == plain["rows"][0]["perplexity"]  # dense: weights restored
    for row in healed["rows"][1:]:
        assert 0 not in row["removed_layers"]
        assert [r["folded_into"] for r in row["heal"]["runs"]] == [a - 1 for a, _ in removed_runs(row["removed_layers"])]
        same = [p for p in plain["rows"][1:] if p["removed_layers"] == row["removed_layers"]]
        if same:
            assert row["perplexity"][source]["perplexity"] != same[0]["perplexity"][source]["perplexity"]


def test_compare_with_heal_searches_on_healed_scores(workspace, tmp_path) -> None:
    """compare --heal linear with simdiff:alpha=auto: the search's candidates are scored healed and say so."""
    assert main(["-q", "compare", str(workspace["model"]), "--num-layers", "2", "--criterion", "simdiff:alpha=auto",
                 "--calib", str(workspace["calib"]), "--samples", "8", "--calib-seq-len", "32", "--heldout-samples",
                 "4", "--ppl", str(workspace["calib"]), "--eval-seq-len", "32", "--max-tokens", "320", "--heal",
                 "linear", "--out", str(tmp_path / "healed")]) == 0
    row = json.loads((tmp_path / "healed" / "results.json").read_text())["rows"][1]
    search = row["alpha_search"]
    assert search["healed"] is True and search["heal_fits"] == len(search["candidates"])
    assert all(c["heal"]["folded_into"] == [a - 1 for a, _ in removed_runs(c["removed"])] for c in search["candidates"])
    assert row["removed_layers"] == search["removed"] and 0 not in row["removed_layers"]


# -- --export gguf with --heal -----------------------------------------------------------------------------
def test_gguf_export_requantizes_exactly_the_healed_tensors(tmp_path) -> None:
    import gguf
    from safetensors.torch import save_file
    from test_gguf import load_gguf_model, write_tiny_gguf

    from simdiff.surgery.gguf import prune_gguf
    from simdiff.surgery.heal import healed_gguf_tensors

    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    model = load_gguf_model(src)
    record = heal_layers(model, calib_batches(vocab=64), [2, 3, 5], check=False).to_dict()
    kept = remove_layers(model, [2, 3, 5])
    for run in record["runs"]:
        run["folded_into_saved_index"] = kept.index(run["folded_into"])
    (tmp_path / "healed").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "healed" / "model.safetensors")
    reader = gguf.GGUFReader(src)
    replaced = healed_gguf_tensors(reader, tmp_path / "healed", record)
    assert sorted(replaced) == ["blk.1.ffn_down.weight", "blk.4.ffn_down.weight"]
    healed = gguf.GGUFReader(prune_gguf(src, [2, 3, 5], tmp_path / "healed.gguf", replaced=replaced).out)
    plain = gguf.GGUFReader(prune_gguf(src, [2, 3, 5], tmp_path / "plain.gguf").out)
    weights = dict(model.named_parameters())
    differing = []
    for a, b in zip(healed.tensors, plain.tensors):
        assert a.name == b.name and a.tensor_type == b.tensor_type
        if a.data.tobytes() != b.data.tobytes():
            differing.append(a.name)
    assert differing == ["blk.1.ffn_down.weight", "blk.2.ffn_down.weight"]  # input blocks 1 and 4, renumbered
    for name, layer in (("blk.1.ffn_down.weight", 1), ("blk.2.ffn_down.weight", 2)):
        tensor = next(t for t in healed.tensors if t.name == name)
        expected = gguf.quants.quantize(weights[f"model.layers.{layer}.mlp.down_proj.weight"].detach().numpy(),
                                        tensor.tensor_type)
        assert tensor.data.tobytes() == expected.tobytes()


def test_gguf_types_without_a_quantizer_are_refused() -> None:
    from types import SimpleNamespace

    from gguf import GGMLQuantizationType as T

    from simdiff.surgery.heal import can_requantize, check_gguf_healable

    assert can_requantize(T.Q4_1) and can_requantize(T.Q8_0) and can_requantize(T.F16)
    assert not can_requantize(T.Q4_K) and not can_requantize(T.Q6_K)
    reader = SimpleNamespace(tensors=[SimpleNamespace(name="blk.0.ffn_down.weight", tensor_type=T.Q8_0),
                                      SimpleNamespace(name="blk.0.attn_q.weight", tensor_type=T.Q6_K)])
    check_gguf_healable(reader)  # only the MLP output projections change
    reader.tensors.append(SimpleNamespace(name="blk.3.ffn_down_exps.weight", tensor_type=T.Q4_K))
    with pytest.raises(SimdiffError, match="no quantizer for Q4_K"):
        check_gguf_healable(reader)


def test_check_windows_are_every_eighth_or_the_last_one() -> None:
    assert check_windows(1) == [False]  # nothing to hold out
    assert check_windows(3) == [False, False, True]
    assert [i for i, c in enumerate(check_windows(17)) if c] == [7, 15]


def _equations(m: torch.Tensor, target: torch.Tensor) -> NormalEquations:
    equations = NormalEquations(m.shape[1], torch.device("cpu"))
    equations.add(m, target)
    return equations


def test_a_map_that_fails_its_check_windows_is_not_folded() -> None:
    """Fit windows where L - Y = M A, check windows where L - Y = M: the fitted A predicts the check tokens worse
    than the plain prune, so T = I; where the check windows agree (L - Y = M A), T is refitted on all windows."""
    generator = torch.Generator().manual_seed(0)
    d = 6
    a = torch.randn(d, d, generator=generator, dtype=torch.float64)
    m_fit, m_check = (torch.randn(n, d, generator=generator, dtype=torch.float64) for n in (60, 20))
    disagreeing = SplitEquations(_equations(m_fit, m_fit @ a), _equations(m_check, m_check))
    transform, lam, check = checked_transform(disagreeing, ridge=0.0)
    assert not check["folded"] and check["r2_check"] < check["r2_check_unhealed"] and lam == 0.0
    torch.testing.assert_close(transform, torch.eye(d, dtype=torch.float64))
    noise = 0.1 * torch.randn(20, d, generator=generator, dtype=torch.float64)
    agreeing = SplitEquations(_equations(m_fit, m_fit @ a), _equations(m_check, m_check @ a + noise))
    transform, _, check = checked_transform(agreeing, ridge=0.0)
    assert check["folded"] and check["check_tokens"] == 20
    every = torch.cat([m_fit, m_check])
    expected = torch.linalg.lstsq(every, torch.cat([m_fit @ a, m_check @ a + noise])).solution
    torch.testing.assert_close(transform, expected)  # refitted on all 80 tokens, not just the 60


def test_a_run_left_unhealed_keeps_its_weights_and_says_so(one_thread, caplog) -> None:
    """Two windows of 24 tokens for a d = 32 map: fitted on one window, the map cannot predict the other, so
    the check leaves every run unhealed: no weight changes, ``changed_layers`` empty, a warning per run."""
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="simdiff"):
        record = heal_layers(model, calib_batches(n=2), REMOVED)
    assert [r.folded for r in record.runs] == [False, False] and record.to_dict()["changed_layers"] == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sum("left unhealed" in r.getMessage() for r in caplog.records) == 2
    assert all(r.check_tokens == 24 and r.r2_check <= r.r2_check_unhealed for r in record.runs)


def test_the_card_names_only_the_folded_runs() -> None:
    from simdiff.store.card import heal_line

    run = {"projections": ["mlp.down_proj"], "r2_calibration": 0.5}
    heal = {"method": "linear", "ridge": 1e-4, "weighting": "relative",
            "runs": [{**run, "layers": [3], "folded_into": 2, "folded_into_saved_index": 2, "folded": True},
                     {**run, "layers": [12, 13], "folded_into": 11, "folded_into_saved_index": 10, "folded": False}]}
    line = heal_line(heal)
    assert "layers [2] (original numbering; [2] in this checkpoint)" in line
    assert "[[12, 13]] were left unhealed" in line and "replacing the removed runs [[3]]" in line
    heal["runs"][0]["folded"] = False
    assert heal_line(heal).startswith("- Healing (`--heal linear`, relative token weights) changed no weights")
