"""Recipes: typed validation, the options object of api.prune, `simdiff run`, bit-for-bit replay."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
from tiny import tiny_workspace

import simdiff
from simdiff.cli.main import build_parser, main
from simdiff.cli.options import recipe_from_args
from simdiff.config.recipe import Calibration, load_recipe, recipe_from_dict, recipe_from_settings
from simdiff.config.settings import DEFAULT_HEAL_SAMPLES, DEFAULT_HEAL_WEIGHTING
from simdiff.core.errors import SimdiffError
from simdiff.store.save import METADATA_FILE

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "docs" / "recipes").glob("*.yaml"))
CALIB = ["--samples", "4", "--calib-seq-len", "32", "--calib-batch-size", "2"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe")
    return tiny_workspace(root)


@pytest.mark.parametrize("data, message", [
    ({"calibration": {"sample": 4}}, "unknown recipe field calibration.sample; allowed: source, samples"),
    ({"model": {"name": "m", "dtype": "float64"}}, "model.dtype: 'float64' is not one of float32, bfloat16"),
    ({"options": {"normalize": "l2"}}, "options.normalize: 'l2' is not one of minmax, zscore, rank"),
    ({"calibration": {"samples": "many"}}, "calibration.samples: expected int, got 'many'"),
    ({"selection": {"num_layers": [2, "x"]}}, "selection.num_layers: expected a list of int"),
    ({"options": {"alpha": "soon"}}, "options.alpha: cannot read 'soon'"),
    ({"outt": "x"}, "unknown recipe field 'outt'; allowed: model, calibration, selection"),
    ({"calibration": [1, 2]}, "recipe field calibration must be a mapping"),
])
def test_validation_names_the_field_and_the_allowed_values(data, message) -> None:
    with pytest.raises(SimdiffError) as exc:
        recipe_from_dict(data)
    assert message in str(exc.value)


def test_recipe_reads_scalars_lists_and_auto() -> None:
    recipe = recipe_from_dict({"model": {"name": "m"}, "selection": {"ratio": 0.25, "criterion": "simdiff"},
                               "options": {"alpha": "auto"}, "evaluation": {"tasks": "piqa", "ppl": []}})
    assert recipe.selection.ratio == [0.25] and recipe.options.alpha == "auto"
    assert recipe.evaluation.tasks == ["piqa"] and recipe.evaluation.ppl == []
    assert recipe_from_dict(recipe.to_dict()) == recipe  # the written form reads back unchanged


def test_a_healed_prune_saved_before_heal_samples_replays_its_heal_on_the_calibration_windows() -> None:
    old = {"model": {"name": "m"}, "selection": {"layers": [2, 3], "heal": "linear"}, "calibration": {"samples": 8}}
    assert recipe_from_dict({"recipe": old}).selection.heal_samples == 8  # a simdiff.json from before the option
    assert recipe_from_dict(old).selection.heal_samples == DEFAULT_HEAL_SAMPLES  # a recipe written by hand
    saved = recipe_from_dict({"recipe": {**old, "selection": {**old["selection"], "heal_samples": 64}}})
    assert saved.selection.heal_samples == 64
    plain = {**old, "selection": {"layers": [2, 3]}}
    assert recipe_from_dict({"recipe": plain}).selection.heal_samples == DEFAULT_HEAL_SAMPLES


def test_a_healed_prune_saved_before_heal_weighting_replays_plain_least_squares() -> None:
    old = {"model": {"name": "m"}, "selection": {"layers": [2, 3], "heal": "linear", "heal_samples": 64}}
    assert recipe_from_dict({"recipe": old}).selection.heal_weighting == "uniform"  # as that simdiff.json was fitted
    assert recipe_from_dict(old).selection.heal_weighting == DEFAULT_HEAL_WEIGHTING  # a recipe written by hand
    saved = {**old, "selection": {**old["selection"], "heal_weighting": "relative"}}
    assert recipe_from_dict({"recipe": saved}).selection.heal_weighting == "relative"
    assert recipe_from_dict({"recipe": {**old, "selection": {"layers": [2, 3]}}}).selection.heal_weighting == \
        DEFAULT_HEAL_WEIGHTING  # no heal: nothing to replay
    with pytest.raises(SimdiffError, match="selection.heal_weighting: 'cosine' is not one of relative, uniform"):
        recipe_from_dict({**old, "selection": {**old["selection"], "heal_weighting": "cosine"}})


def test_bad_recipe_file_is_one_line_exit_2(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: m}\nselection: {num_layers: 2, criterion: simdif}\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown criterion 'simdif'" in err[0], err
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    assert main(["run", str(tmp_path / "broken.yaml")]) == 2
    assert "is not valid YAML" in capsys.readouterr().err


def test_keyword_settings_build_the_same_recipe_as_the_cli() -> None:
    from_kwargs = recipe_from_settings("m", "o", ratio=0.25, criterion="block_influence", dtype="bfloat16",
                                       calibration=Calibration(samples=8), keep_last=1, seed=3)
    args = build_parser().parse_args(["prune", "m", "--out", "o", "--ratio", "0.25", "--criterion",
                                      "block_influence", "--dtype", "bfloat16", "--samples", "8",
                                      "--keep-last", "1", "--seed", "3"])
    assert from_kwargs == recipe_from_args(args)
    with pytest.raises(SimdiffError, match="setting 'seq_len' is ambiguous"):
        recipe_from_settings("m", seq_len=64)
    with pytest.raises(SimdiffError, match="unknown setting 'ratios'"):
        recipe_from_settings("m", ratios=[0.25])


@pytest.mark.parametrize("selection", [["--num-layers", "2", "--criterion", "simdiff:beta=0.5"], ["--layers", "1,3"]])
def test_run_replays_simdiff_json_bit_for_bit(selection, ws, tmp_path, capsys) -> None:
    """`simdiff run out/simdiff.json --out other/` removes the same layers and writes identical weights."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["-q", "prune", str(ws["model"]), *selection, "--calib", str(ws["calib"]), *CALIB,
                 "--out", str(first)]) == 0
    assert main(["-q", "run", str(first / METADATA_FILE), "--out", str(second)]) == 0
    a, b = (json.loads((p / METADATA_FILE).read_text()) for p in (first, second))
    assert a["removed_layers"] == b["removed_layers"] and len(a["removed_layers"]) == 2
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert {**a["recipe"], "out": None} == {**b["recipe"], "out": None}
    assert b["recipe"]["out"] == str(second) and "removed layers" in capsys.readouterr().out
    if "--layers" in selection:
        assert a["removed_layers"] == [1, 3] and a["recipe"]["selection"]["layers"] == [1, 3]
    else:
        assert a["recipe"]["selection"]["criterion"] == "simdiff:beta=0.5" and a["options"]["beta"] == 0.5


def test_prune_takes_a_recipe(ws, tmp_path) -> None:
    recipe = recipe_from_dict({"model": {"name": str(ws["model"])},
                               "calibration": {"source": str(ws["calib"]), "samples": 4, "seq_len": 32},
                               "selection": {"num_layers": 1, "criterion": "block_influence"},
                               "out": str(tmp_path / "a")})
    by_recipe = simdiff.prune(recipe)
    by_keywords = simdiff.prune(str(ws["model"]), out=tmp_path / "b", num_layers=1, criterion="block_influence",
                                calibration=Calibration(source=str(ws["calib"]), samples=4, seq_len=32))
    assert by_recipe.selection.removed == by_keywords.selection.removed
    assert by_recipe.metadata["recipe"] == {**by_keywords.metadata["recipe"], "out": str(tmp_path / "a")}
    several = replace(recipe, selection=replace(recipe.selection, num_layers=[1, 2]), out=str(tmp_path / "c"))
    with pytest.raises(SimdiffError, match="prune takes one criterion and one count"):
        simdiff.prune(several)
    assert not (tmp_path / "c").exists()


def test_criterion_variant_equals_the_global_option(ws, tmp_path) -> None:
    """`--criterion simdiff:beta=0.5` in score and prune is `--criterion simdiff --beta 0.5`."""
    variant, plain = tmp_path / "variant.json", tmp_path / "plain.json"
    base = ["-q", "score", str(ws["model"]), "--calib", str(ws["calib"]), *CALIB]
    assert main([*base, "--criterion", "simdiff,simdiff:beta=0.5", "--json", str(variant)]) == 0
    assert main([*base, "--criterion", "simdiff", "--beta", "0.5", "--json", str(plain)]) == 0
    scores, reference = (json.loads(p.read_text())["scores"] for p in (variant, plain))
    assert scores["simdiff:beta=0.5"] == reference["simdiff"]
    assert scores["simdiff"] != scores["simdiff:beta=0.5"]


# -- the documented recipes -----------------------------------------------------------------------------
DOCUMENTED = {  # recipe -> the documented command line it stands for
    "prune-default.yaml": "prune smollm2-135m --ratio 0.25 --out out/smollm2-135m-pruned",
    "compare-results.yaml": "compare smollm2-135m --num-layers 4,8 --criterion "
                            "simdiff,simdiff:alpha=auto,block_influence,angular_block,ppl_skip,taylor,reverse,random "
                            "--ppl wikitext2 --eval-seq-len 1024 --max-tokens 32768 --tasks piqa --limit 200 "
                            "--out out/compare-smollm2",
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_documented_recipe_is_the_documented_command(name) -> None:
    """Same recipe as the command whose selections docs/results.md reports, so the same selections."""
    command = recipe_from_args(build_parser().parse_args(shlex.split(DOCUMENTED[name])))
    assert load_recipe(REPO / "docs" / "recipes" / name) == command


def test_compare_document_records_the_documented_run() -> None:
    """The raw results of docs/results.md were made with the settings compare-results.yaml holds."""
    recipe = load_recipe(REPO / "docs" / "recipes" / "compare-results.yaml")
    document = json.loads((REPO / "docs" / "data" / "compare_smollm2.json").read_text())
    assert document["criteria"] == recipe.criteria() and document["counts"] == recipe.selection.num_layers
    assert document["options"] == vars(recipe.options)
    for name in ("calibration", "evaluation"):
        section = {k: v for k, v in vars(getattr(recipe, name)).items() if k != "metric"}
        recorded = {k: v for k, v in section.items() if k in document[name]}
        assert {k: document[name][k] for k in recorded} == recorded
        newer = {k: v for k, v in section.items() if k not in recorded}  # settings added since: at their defaults
        assert newer == {k: v for k, v in vars(type(getattr(recipe, name))()).items() if k in newer}


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_documented_recipes_run_on_a_tiny_model(path, ws, tmp_path, capsys) -> None:
    recipe = load_recipe(path)
    counts = ["--num-layers", "1,2" if recipe.is_comparison() else "2"]  # replaces the recipe's count
    evaluation = ["--tasks", "", "--eval-seq-len", "32", "--max-tokens", "200"] if recipe.evaluation else []
    out = tmp_path / "out"
    argv = ["-q", "run", str(path), "--model", str(ws["model"]), "--calib", str(ws["calib"]), *CALIB, *counts,
            *evaluation, "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    written = out / ("recipe.yaml" if recipe.is_comparison() else METADATA_FILE)
    replay = load_recipe(written)
    assert replay.model.name == str(ws["model"]) and replay.selection.criterion == recipe.selection.criterion
    if recipe.evaluation and not recipe.is_comparison():
        assert json.loads((out / "evaluation.json").read_text())["simdiff"]["retained"]["ppl_ratio"]
