"""prune and compare reach layers through the same selection.choose(): equal removed sets for every criterion."""

from __future__ import annotations

import json

import pytest
from tiny import tiny_workspace

from simdiff.cli.main import main
from simdiff.criteria import CRITERIA

CALIB = ["--samples", "6", "--calib-seq-len", "32", "--calib-batch-size", "2", "--heldout-samples", "4"]
EVAL = ["--ppl", "wikitext2", "--eval-seq-len", "32", "--max-tokens", "160", "--eval-batch-size", "5"]
SPECS = [*CRITERIA, "simdiff:alpha=auto", "simdiff:beta=0.5", "best-of"]
COUNT = 2


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    ws = tiny_workspace(tmp_path_factory.mktemp("choose"))
    common = ["--calib", str(ws["calib"]), *CALIB]
    out = ws["root"] / "compared"
    assert main(["-q", "compare", str(ws["model"]), "--num-layers", str(COUNT), "--criterion", ",".join(SPECS),
                 *common, *EVAL, "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    return ws, common, {row["label"]: row["removed_layers"] for row in rows if row["count"] == COUNT}


@pytest.mark.parametrize("spec", SPECS)
def test_prune_removes_what_compare_reports(compared, spec) -> None:
    ws, common, by_label = compared
    out = ws["root"] / f"pruned-{spec.replace(':', '_').replace('=', '_')}"
    assert main(["-q", "prune", str(ws["model"]), "--num-layers", str(COUNT), "--criterion", spec, *common,
                 "--out", str(out)]) == 0
    removed = json.loads((out / "simdiff.json").read_text())["removed_layers"]
    assert len(removed) == COUNT and removed == by_label[spec], (spec, removed, by_label[spec])
