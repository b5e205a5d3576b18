"""Compare pruning criteria on one loaded model: one calibration pass, every (criterion, count) bypassed.

All statistic-based criteria share a single hook pass over the calibration windows (``ppl_skip`` and
``taylor`` add their own passes, in the same ``gather_evidence`` call). Each candidate's layers are
bypassed in place (no copies, no reloads) and evaluated; candidates removing the same layers are
evaluated once. ``simdiff:alpha=auto`` (the exact alpha path) and ``best-of`` choose per count on held-out
calibration windows (:mod:`simdiff.selection.search`): one extra statistics pass on the scoring windows, shared by all
counts, and one held-out pass per distinct candidate set.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from simdiff.config.settings import (
    DEFAULT_HEAL_SAMPLES,
    DEFAULT_HEAL_WEIGHTING,
    DEFAULT_RIDGE,
    SearchSettings,
)
from simdiff.core.outputs import MARKER, OutputDir, claimed_dir
from simdiff.criteria import Options
from simdiff.data import batches, calibration_batches, calibration_windows
from simdiff.data.text import text_variant
from simdiff.evaluate.suite import EvalSettings, Evaluator, mean_accuracy, percent_retained
from simdiff.model.checks import check_seq_len
from simdiff.model.layers import bypass_layers, find_decoder_layers
from simdiff.selection.choose import choose, make_searcher
from simdiff.selection.evidence import block_sizes_for, gather_evidence, importance, needs_of
from simdiff.selection.rank import check_removable, resolve_counts
from simdiff.selection.search import Searcher, search_kind
from simdiff.selection.spec import BEST_OF, CandidateSpec
from simdiff.store.save import provenance
from simdiff.surgery.heal import healed_bypass, note_calibration_text, preflight, search_healer

log = logging.getLogger(__name__)

RESULTS_JSON, RESULTS_MD, RECIPE_YAML = "results.json", "results.md", "recipe.yaml"
RANKS_PNG, PPL_PNG = "layer_ranks.png", "perplexity_vs_removed.png"
PLOTS = [RANKS_PNG, PPL_PNG, "layer_ranks.svg", "perplexity_vs_removed.svg"]
@dataclass
class CompareSetup:
    """Everything a comparison needs besides the model."""

    specs: list[CandidateSpec]
    counts: list[int]
    calibration: object  # simdiff.workflows.api.Calibration
    options: Options = field(default_factory=Options)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    keep_first: int = 0
    keep_last: int = 0
    metric: str = "acc"
    search: SearchSettings = field(default_factory=SearchSettings)
    heal: str = "none"
    heal_ridge: float = DEFAULT_RIDGE
    heal_samples: int = DEFAULT_HEAL_SAMPLES
    heal_weighting: str = DEFAULT_HEAL_WEIGHTING


def compare(model: nn.Module, tokenizer, setup: CompareSetup, model_name: str = "") -> dict:
    """Evaluate the dense model and every (criterion, count) candidate; returns the results document."""
    total = len(find_decoder_layers(model))
    counts = resolve_counts(total, setup.counts)
    check_removable(total, max(counts), setup.keep_first, setup.keep_last)
    cal = setup.calibration
    check_seq_len(model, cal.seq_len)
    if setup.evaluation.ppl:
        check_seq_len(model, setup.evaluation.seq_len, "--eval-seq-len")
    windows = calibration_windows(tokenizer, cal.source, cal.samples, cal.seq_len, cal.seed, cal.data_dir)
    calib_batches = batches(windows, cal.batch_size, cal.skip_first_token)
    heal_batches = None
    if setup.heal != "none":  # an architecture that cannot take a folded map is refused before the scoring
        preflight(model, calib_batches[:1])
        note_calibration_text(cal.source)
        heal_batches = calibration_batches(cal, tokenizer, setup.heal_samples)
    criteria = list(dict.fromkeys(s.criterion for s in setup.specs if s.criterion != BEST_OF))
    start = time.perf_counter()
    evidence = gather_evidence(model, calib_batches, needs_of(criteria), block_sizes_for(criteria, counts))
    calibration_seconds = time.perf_counter() - start
    searcher = _searcher(model, tokenizer, setup, counts, evidence if "simdiff" in criteria else None)
    evaluator = Evaluator(model, tokenizer, setup.evaluation)
    log.info("evaluating the dense model")
    dense = evaluator("dense")
    rows = [{"label": "dense", "criterion": "dense", "count": 0, "removed_layers": [], **dense,
             "mean_" + setup.metric: mean_accuracy(dense, setup.metric), "seconds": dense["eval_seconds"]}]
    done: dict[tuple[int, ...], dict] = {}
    profiles: dict[str, np.ndarray] = {}
    for spec in setup.specs:
        for count in counts:
            rows.append(_candidate(model, evaluator, evidence, searcher, spec, count, setup, dense, done, profiles,
                                   heal_batches))
    return {
        "model": model_name,
        "num_layers": total,
        "counts": counts,
        "criteria": [s.label for s in setup.specs],
        "calibration": {**vars(cal), "text": text_variant(cal.source, "valid", cal.data_dir),
                        "windows": int(windows.shape[0]), "seconds": calibration_seconds,
                        "passes": sorted(needs_of(criteria))},
        "search": vars(setup.search) if searcher is not None else None,
        "heal": {"method": setup.heal, "ridge": setup.heal_ridge, "samples": setup.heal_samples,
                 "weighting": setup.heal_weighting},
        "evaluation": {**vars(setup.evaluation), "metric_for_retained": setup.metric},
        "options": vars(setup.options),
        "keep_first": setup.keep_first,
        "keep_last": setup.keep_last,
        "rows": rows,
        "profiles": {k: v.tolist() for k, v in profiles.items()},
        **provenance(),
    }


def _searcher(model, tokenizer, setup: CompareSetup, counts: list[int], calibration_evidence=None) -> Searcher | None:
    """The held-out searcher, when a candidate needs one (simdiff:alpha=auto or best-of); it takes its margin
    reference from ``calibration_evidence`` (this comparison's own pass) when that holds SimDiff's statistics."""
    kinds = {search_kind(s.criterion, s.options(setup.options)) for s in setup.specs}
    return make_searcher(model, tokenizer, setup.calibration, setup.search, counts, kinds, setup.keep_first,
                         setup.keep_last, healer=search_healer(setup.heal, setup.heal_ridge, setup.heal_weighting),
                         reference_evidence=calibration_evidence, heal_samples=setup.heal_samples)


def _candidate(model, evaluator, evidence, searcher: Searcher | None, spec: CandidateSpec, count: int,
               setup: CompareSetup, dense: dict, done: dict, profiles: dict, heal_batches: list | None) -> dict:
    start = time.perf_counter()
    options = spec.options(setup.options)
    row: dict = {"label": spec.label, "criterion": spec.criterion, "count": count}
    choice = choose(spec.criterion, count, options, evidence, searcher, setup.keep_first, setup.keep_last)
    selection, kind = choice.selection, choice.kind
    if kind is not None:
        options = choice.options
        row["alpha_search" if kind == "alpha" else "best_of"] = choice.search.to_dict()
        if kind == "alpha":
            profiles.setdefault(spec.label, importance("simdiff", searcher.evidence, options))
    else:
        profiles.setdefault(spec.label, importance(spec.criterion, evidence, options))
    row["options"] = vars(options)
    key = tuple(selection.removed)
    row["removed_layers"] = selection.removed
    if key in done:
        result, row["same_layers_as"] = done[key]["result"], done[key]["label"]
        if "heal" in done[key]:
            row["heal"] = done[key]["heal"]
    else:
        log.info("%s, %d layers: bypassing %s%s", spec.label, count, selection.removed,
                 " (healed)" if setup.heal != "none" else "")
        done[key] = {"label": f"{spec.label} -{count}"}
        if setup.heal == "none":
            with bypass_layers(model, selection.removed):
                result = evaluator(f"{spec.label} -{count}")
        else:
            with healed_bypass(model, heal_batches, selection.removed, setup.heal_ridge,
                               weighting=setup.heal_weighting) as healed:
                result = evaluator(f"{spec.label} -{count}")
            row["heal"] = done[key]["heal"] = healed.to_dict()
        done[key]["result"] = result
    row.update(result)
    row["retained"] = percent_retained(dense, result)
    row["mean_" + setup.metric] = mean_accuracy(result, setup.metric)
    row["seconds"] = time.perf_counter() - start
    return row


def removal_counts(document: dict) -> dict[str, dict[int, int]]:
    """criterion label -> {layer: the smallest count of removed layers at which the label removes it}."""
    out: dict[str, dict[int, int]] = {}
    for row in sorted(document["rows"], key=lambda r: -r["count"]):
        if row["count"] > 0:
            out.setdefault(row["label"], {}).update({layer: row["count"] for layer in row["removed_layers"]})
    return out


def write_results(document: dict, out: str | os.PathLike | OutputDir, overwrite: bool = False) -> Path:
    """Write results.json, results.md, the plots (PNG and SVG) and the ``simdiff.json`` marker into ``out``
    atomically.

    ``out`` is a path or an :class:`~simdiff.core.outputs.OutputDir` claimed when the comparison started.
    """
    from simdiff.config.recipe import dump_recipe
    from simdiff.report.comparison import comparison_markdown, plot_perplexity_vs_removed
    from simdiff.report.plots import plot_layer_ranks

    with claimed_dir(out, overwrite) as claim, claim.staging() as tmp:
        (tmp / RESULTS_JSON).write_text(json.dumps(_finite(document), indent=2, default=_jsonable) + "\n", encoding="utf-8")
        (tmp / RESULTS_MD).write_text(comparison_markdown(document), encoding="utf-8")
        if "recipe" in document:  # `simdiff run out/recipe.yaml` repeats the comparison
            (tmp / RECIPE_YAML).write_text(dump_recipe(document["recipe"]), encoding="utf-8")
        profiles = {k: np.asarray(v, dtype=np.float64) for k, v in document["profiles"].items()}
        plot_layer_ranks(profiles, tmp / RANKS_PNG, title=f"layer ranks per criterion: {document['model']}",
                         removed=removal_counts(document))
        plot_perplexity_vs_removed(document, tmp / PPL_PNG)
        marker = {"output": "comparison", "files": sorted(p.name for p in tmp.iterdir()),
                  **{key: document.get(key) for key in ("model", "versions", "command", "created")}}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return claim.path


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _finite(value):
    """NaN/inf -> None, so results.json is strict JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
