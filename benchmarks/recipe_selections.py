"""Re-derive the selections of docs/recipes/compare-results.yaml and compare them with the documented ones.

One statistics pass plus the ``ppl_skip`` and ``taylor`` passes on the recipe's calibration, no evaluation;
prints each one-shot criterion's removed layers at 4 and 8 beside those in docs/data/compare_smollm2.json.
``simdiff:alpha=auto`` is left out: the exact alpha path replaced the ternary search that made that file.

    python benchmarks/recipe_selections.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from simdiff.config.recipe import load_recipe
from simdiff.data import calibration_batches
from simdiff.model import load_model
from simdiff.selection.choose import choose
from simdiff.selection.evidence import block_sizes_for, gather_evidence, needs_of
from simdiff.selection.spec import CandidateSpec

ROOT = Path(__file__).resolve().parents[1]
CRITERIA = ["simdiff", "block_influence", "angular_block", "ppl_skip", "taylor", "reverse", "random"]


def main() -> None:
    recipe = load_recipe(ROOT / "docs" / "recipes" / "compare-results.yaml")
    document = json.loads((ROOT / "docs" / "data" / "compare_smollm2.json").read_text(encoding="utf-8"))
    documented = {(row["label"], row["count"]): row["removed_layers"] for row in document["rows"] if row["count"]}
    counts = sorted({count for _, count in documented})
    model, tokenizer = load_model(recipe.model.name)
    start = time.perf_counter()
    evidence = gather_evidence(model, calibration_batches(recipe.calibration, tokenizer), needs_of(CRITERIA),
                               block_sizes_for(CRITERIA, counts))
    print(f"evidence collected in {time.perf_counter() - start:.0f} s")
    same = 0
    for name in CRITERIA:
        options = CandidateSpec.parse(name).options(recipe.options)
        for count in counts:
            removed = choose(name, count, options, evidence).selection.removed
            same += removed == documented[(name, count)]
            verdict = "same" if removed == documented[(name, count)] else "DIFFERENT"
            print(f"{name:16s} {count}: {removed} documented {documented[(name, count)]} {verdict}")
    print(f"{same} of {len(CRITERIA) * len(counts)} selections reproduced")


if __name__ == "__main__":
    main()
