"""`simdiff compare` (one calibration pass, candidates bypassed in place) and adaptive alpha (`--alpha auto`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tiny import data_dir, save_tiny, tiny_model, tiny_tokenizer

import simdiff.model
import simdiff.selection.evidence
from simdiff.cli.main import main
from simdiff.core.errors import SimdiffError
from simdiff.criteria import Options
from simdiff.evaluate.suite import EvalSettings
from simdiff.selection.spec import CandidateSpec, parse_candidates
from simdiff.workflows.api import Calibration
from simdiff.workflows.compare import CompareSetup, compare

CALIB = ["--samples", "8", "--calib-seq-len", "64", "--calib-batch-size", "4"]
EVAL = ["--eval-seq-len", "64", "--max-tokens", "640", "--eval-batch-size", "5"]


@pytest.fixture
def slices(tmp_path) -> tuple[str, str]:
    """Calibration (validation) and evaluation (test) slices of WikiText-2: fast to tokenise."""
    from simdiff.data import load_text

    calib, test = tmp_path / "valid-slice.txt", tmp_path / "test-slice.txt"
    calib.write_text(load_text("wikitext2", "valid", data_dir())[:30000], encoding="utf-8")
    test.write_text(load_text("wikitext2", "test", data_dir())[:6000], encoding="utf-8")
    return str(calib), str(test)


@pytest.fixture
def no_test_text(monkeypatch):
    """Fail if anything reads the evaluation text (WikiText-2 test split)."""
    original_read, original_open = Path.read_text, Path.open

    def guard(path: Path) -> None:
        if path.name == "test.txt" and path.parent.name in ("wikitext-2", "wikitext-2-raw"):
            raise AssertionError(f"read the evaluation text {path}")

    def read_text(self, *args, **kwargs):
        guard(self)
        return original_read(self, *args, **kwargs)

    def open_(self, *args, **kwargs):
        guard(self)
        return original_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(Path, "open", open_)


def test_candidate_specs_parse_and_reject():
    spec = CandidateSpec.parse("simdiff:alpha=auto:beta=0.25")
    assert spec.criterion == "simdiff" and spec.options(Options()).alpha == "auto"
    assert spec.options(Options()).beta == 0.25
    assert [s.label for s in parse_candidates("simdiff, block_influence")] == ["simdiff", "block_influence"]
    with pytest.raises(SimdiffError, match="gamma"):
        CandidateSpec.parse("simdiff:gamma=1")
    with pytest.raises(SimdiffError, match="simdif"):
        CandidateSpec.parse("simdif")
    with pytest.raises(SimdiffError, match="distinct"):
        parse_candidates("random,random")


@pytest.mark.parametrize("spec", ["mssd:alpha=0.5", "block_influence:diff_scale=absolute", "taylor:seed=3",
                                  "random:beta=0.5"])
def test_a_variant_setting_an_option_its_criterion_never_reads_is_refused(spec):
    """mssd reads no alpha: ``mssd:alpha=0.5`` would be a second name for plain mssd, so it is refused."""
    with pytest.raises(SimdiffError, match=f"does not use {spec.split(':')[1].split('=')[0]}"):
        CandidateSpec.parse(spec)


@pytest.mark.parametrize("spec, field, value", [("mssd:diff_scale=absolute", "diff_scale", "absolute"),
                                                ("random:seed=3", "seed", 3), ("simdiff:normalize=zscore",
                                                                              "normalize", "zscore")])
def test_a_variant_setting_an_option_its_criterion_reads_is_kept(spec, field, value):
    assert getattr(CandidateSpec.parse(spec).options(Options()), field) == value


def test_compare_writes_all_outputs_one_row_per_candidate(tmp_path, monkeypatch, slices):
    calls = []
    real_collect = simdiff.selection.evidence.collect_layer_statistics

    def counting(*args, **kwargs):
        calls.append(1)
        return real_collect(*args, **kwargs)

    monkeypatch.setattr(simdiff.selection.evidence, "collect_layer_statistics", counting)
    loads = []
    real_load = simdiff.model.load.load_model  # what load_from_settings calls
    monkeypatch.setattr(simdiff.model.load, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    folder = save_tiny("llama", tmp_path / "tiny")
    out = tmp_path / "cmp"
    criteria = "simdiff,block_influence,angular_block,mssd,ppl_skip,reverse,random"
    code = main(["-q", "compare", str(folder), "--num-layers", "1,2", "--criterion", criteria, "--out", str(out),
                 *CALIB, "--calib", slices[0], "--ppl", slices[1], *EVAL])
    assert code == 0
    assert len(calls) == 1 and len(loads) == 1  # one statistics pass for all criteria, one model load
    doc = json.loads((out / "results.json").read_text())
    rows = doc["rows"]
    assert len(rows) == 1 + 7 * 2 and rows[0]["label"] == "dense"
    assert {(r["label"], r["count"]) for r in rows[1:]} == {(c, k) for c in criteria.split(",") for k in (1, 2)}
    for row in rows[1:]:
        assert len(row["removed_layers"]) == row["count"]
        assert math.isfinite(row["perplexity"][slices[1]]["perplexity"]) and row["seconds"] >= 0
        assert row["retained"]["ppl_ratio"][slices[1]] > 0
    by = {(r["label"], r["count"]): r for r in rows}
    assert by[("reverse", 2)]["removed_layers"] == [3, 4]  # the last layers before the final one
    md = (out / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and "criterion" not in line]
    assert len(table) == len(rows)
    for png in ("layer_ranks.png", "perplexity_vs_removed.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).with_suffix(".svg").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cmp")]  # no temp folder left behind


def test_compare_api_restores_model_and_reports_tasks(slices):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    layers_before = list(model.model.layers)
    settings = EvalSettings(ppl=[slices[1]], seq_len=64, max_tokens=320, batch_size=5, tasks=["piqa"], limit=4,
                            max_length=1024, data_dir=str(data_dir()))
    setup = CompareSetup(parse_candidates("simdiff,random"), [2], Calibration(slices[0], samples=4, seq_len=64),
                         Options(), settings)
    doc = compare(model, tok, setup, "tiny")
    assert list(model.model.layers) == layers_before  # bypassed in place, then restored
    assert len(doc["rows"]) == 3
    for row in doc["rows"]:
        assert 0.0 <= row["tasks"]["piqa"]["acc"] <= 1.0
    pruned = doc["rows"][1]
    expected = 100 * pruned["tasks"]["piqa"]["acc"] / doc["rows"][0]["tasks"]["piqa"]["acc"]
    assert pruned["retained"]["average"]["acc"] == pytest.approx(expected)


def test_compare_searches_choose_on_calibration_only(tmp_path, slices, no_test_text):
    """simdiff:alpha=auto and best-of rows keep exactly their held-out winner; the test text is never read."""
    folder = save_tiny("llama", tmp_path / "tiny", num_layers=8)
    out = tmp_path / "cmp"
    assert main(["-q", "compare", str(folder), "--num-layers", "2,3", "--criterion", "simdiff:alpha=auto,best-of",
                 "--out", str(out), *CALIB, "--heldout-samples", "6", "--calib", slices[0], "--ppl", slices[1],
                 *EVAL]) == 0
    doc = json.loads((out / "results.json").read_text())
    rows = {(r["label"], r["count"]): r for r in doc["rows"]}
    for count in (2, 3):
        auto, best = rows[("simdiff:alpha=auto", count)], rows[("best-of", count)]
        assert auto["removed_layers"] == auto["alpha_search"]["removed"] and auto["options"]["alpha"] == auto[
            "alpha_search"]["alpha"]
        assert best["removed_layers"] == best["best_of"]["removed"]
        assert best["best_of"]["heldout_score"] <= auto["alpha_search"]["heldout_score"]  # best-of pools the path
    assert doc["calibration"]["text"].endswith("valid-slice.txt")


def test_alpha_auto_user_errors(tmp_path, capsys):
    folder = save_tiny("llama", tmp_path / "tiny")
    assert main(["-q", "score", str(folder), "--alpha", "auto", *CALIB]) == 2
    assert "--alpha auto needs a number of layers" in capsys.readouterr().err
    assert main(["-q", "prune", str(folder), "--num-layers", "1", "--criterion", "random", "--alpha", "auto",
                 "--out", str(tmp_path / "x"), *CALIB]) == 2
    assert "no alpha" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", str(folder), "--num-layers", "1", "--alpha", "lots", "--out", str(tmp_path / "y")])


@pytest.mark.slow
def test_compare_on_smollm2(tmp_path):
    """A short comparison on the real model (every output written; pruning costs perplexity)."""
    out = tmp_path / "cmp"
    code = main(["-q", "compare", "smollm2-135m", "--num-layers", "6", "--criterion", "simdiff,reverse",
                 "--out", str(out), "--samples", "4", "--calib-seq-len", "128", "--ppl", "wikitext2",
                 "--eval-seq-len", "256", "--max-tokens", "1024"])
    assert code == 0
    rows = {r["label"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    ppl = {label: row["perplexity"]["wikitext2"]["perplexity"] for label, row in rows.items()}
    assert 5 < ppl["dense"] < 60, ppl
    assert ppl["dense"] < ppl["simdiff"] < 1e4 and ppl["dense"] < ppl["reverse"], ppl
    assert rows["simdiff"]["retained"]["ppl_ratio"]["wikitext2"] == pytest.approx(ppl["simdiff"] / ppl["dense"])
    assert (out / "results.md").is_file() and (out / "perplexity_vs_removed.png").is_file()
