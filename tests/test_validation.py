"""One validation of a run's settings before any model is loaded: the Python API, the CLI and ``simdiff run``.

Each case replaces the model loader with one that fails the test, so a setting refused only after loading
(or never) fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import run_bad

import simdiff
from simdiff.cli.main import main
from simdiff.config.recipe import Calibration, Recipe, recipe_from_settings
from simdiff.core.errors import SimdiffError

MODEL = "/nonexistent/never-loaded"


@pytest.fixture(autouse=True)
def no_loading(monkeypatch) -> None:
    """Any model load fails the test: every case must be refused before it."""
    import simdiff.model

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were refused")

    monkeypatch.setattr(simdiff.model, "load_model", loaded)


@pytest.mark.parametrize("settings, message", [
    ({"ratio": 0.25, "samples": 0}, "--samples must be >= 1, got 0"),
    ({"ratio": 0.25, "heldout_samples": 1}, "--heldout-samples must be >= 2"),
    ({"ratio": 1.5}, "--ratio must lie strictly between 0 and 1, got 1.5"),
    ({"num_layers": 0}, "--num-layers asks to remove 0 layers; remove at least 1"),
    ({"num_layers": 2, "keep_first": -1}, "--keep-first/--keep-last must be >= 0"),
    ({"num_layers": 2, "calibration": {"samples": 4}}, "recipe field calibration must be a Calibration, got dict"),
    ({"num_layers": 2, "criterion": "best-of", "pool": ["simdif"]}, "unknown criterion 'simdif'"),
])
def test_api_prune_validates_settings_before_loading(tmp_path, settings, message) -> None:
    with pytest.raises(SimdiffError, match=message.replace("(", r"\(").replace(")", r"\)")):
        simdiff.prune("smollm2-135m", out=tmp_path / "o", **settings)
    assert not (tmp_path / "o").exists()


def test_api_prune_of_a_recipe_edited_after_construction(tmp_path) -> None:
    recipe = recipe_from_settings("smollm2-135m", tmp_path / "o", num_layers=2)
    recipe.calibration.samples = 0  # a dataclass field set after construction bypasses __post_init__
    with pytest.raises(SimdiffError, match="--samples must be >= 1"):
        simdiff.prune(recipe)
    recipe = Recipe(out=str(tmp_path / "o"))
    recipe.model.name, recipe.selection.num_layers = "smollm2-135m", [2]
    recipe.options.alpha = 3.0
    with pytest.raises(SimdiffError, match=r"--alpha must lie in \[0, 1\]"):
        simdiff.prune(recipe)


@pytest.mark.parametrize("args, message", [
    (["prune", MODEL, "--alpha", "auto", "--num-layers", "2", "--heldout-samples", "1"], "--heldout-samples must be >= 2"),
    (["prune", MODEL, "--criterion", "best-of", "--num-layers", "2", "--heldout-samples", "0"],
     "--heldout-samples must be >= 2"),
    (["prune", MODEL, "--ratio", "1.5"], "--ratio must lie strictly between 0 and 1"),
    (["compare", MODEL, "--criterion", "simdiff,best-of", "--num-layers", "2", "--pool", "simdif"],
     "unknown criterion 'simdif'"),
    (["compare", MODEL, "--num-layers", "2", "--heldout-samples", "1"], "--heldout-samples must be >= 2"),
    (["score", MODEL, "--heldout-samples", "1"], "--heldout-samples must be >= 2"),
    # found by benchmarks/reliability_battery.py: refused only after loading the model
    (["prune", MODEL, "--num-layers", "2", "--offload", "layerwise", "--iterative"],
     "--offload layerwise supports one-shot selection only"),
    (["prune", MODEL, "--num-layers", "2", "--offload", "layerwise", "--criterion", "taylor"],
     "taylor needs taylor, with the model in memory"),
    (["prune", MODEL, "--num-layers", "2", "--calib", "/nonexistent/calib.txt"], "'/nonexistent/calib.txt' not found"),
    (["compare", MODEL, "--num-layers", "2", "--ppl", "/nonexistent/eval.txt"], "'/nonexistent/eval.txt' not found"),
    (["prune", "{tmp}", "--num-layers", "2", "--revision", "main"], "applies to hub ids"),
    (["score", MODEL, "--criterion", "simdiff:alpha=auto"], "--alpha auto needs a number of layers"),
    (["score", MODEL, "--block-size", "0"], "--block-size must be >= 1, got 0"),
])
def test_cli_validates_settings_before_loading(tmp_path, capsys, args, message) -> None:
    args = [str(tmp_path) if a == "{tmp}" else a for a in args]
    assert message in run_bad(capsys, ["-q", *args, *(["--out", str(tmp_path / "o")] if args[0] != "score" else [])])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("section, message", [
    ({"calibration": {"heldout_samples": 1}}, "--heldout-samples must be >= 2"),
    ({"evaluation": {"ppl": [], "tasks": []}}, "nothing to evaluate"),
    ({"evaluation": {"ppl": ["wikitext2"], "seq_len": 1}}, "--eval-seq-len must be >= 2"),
    ({"search": {"max_candidates": 1}}, "--max-candidates must be >= 2"),
])
def test_run_validates_the_recipe_before_loading(tmp_path, capsys, section, message) -> None:
    recipe = {"model": {"name": MODEL}, "selection": {"num_layers": 2}, "out": str(tmp_path / "o"), **section}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe), encoding="utf-8")
    assert message in run_bad(capsys, ["-q", "run", str(path)])
    assert not Path(tmp_path / "o").exists()


def test_calibration_refuses_one_heldout_window() -> None:
    with pytest.raises(SimdiffError, match="paired standard error"):
        Calibration(heldout_samples=1)
    assert Calibration(heldout_samples=2).heldout_samples == 2


@pytest.mark.parametrize("args, message", [
    (["prune", MODEL, "--num-layers", "2", "--objective", "bogus"], "argument --objective: invalid choice: 'bogus'"),
    (["prune", MODEL, "--layers", ""], "expected comma-separated layer indices"),
    (["prune", MODEL, "--num-layers", "2", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["apply"], "the following arguments are required: model"),
])
def test_argparse_errors_are_one_line(capsys, args, message) -> None:
    """argparse's own errors: one line naming the flag and pointing at --help (no usage block), exit 2."""
    with pytest.raises(SystemExit) as exc:
        main(["-q", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("simdiff: error:"), err
    assert message in err[0] and "--help" in err[0], err
