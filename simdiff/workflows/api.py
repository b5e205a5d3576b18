"""The Python API behind each CLI command: score layers, prune a model and save it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

from simdiff.collect.distributed import is_main_process, start_data_parallel
from simdiff.config.recipe import Calibration, Recipe, recipe_from_settings
from simdiff.core.errors import SimdiffError
from simdiff.core.outputs import OutputDir, claim_output_dir
from simdiff.criteria import CRITERIA, LAYER_STATS, Evidence, Options, get_criterion
from simdiff.data import calibration_batches
from simdiff.data.text import text_variant
from simdiff.model.checks import check_device, check_seq_len
from simdiff.model.config_keys import check_config_sliceable
from simdiff.model.layers import find_decoder_layers, validate_layer_indices
from simdiff.model.load import load_from_settings
from simdiff.selection.choose import choose, make_searcher, search_pool
from simdiff.selection.evidence import (
    ScoreResult,
    Selection,
    block_sizes_for,
    check_data_parallel_support,
    gather_evidence,
    importance,
    needs_of,
)
from simdiff.selection.rank import check_removable, resolve_count
from simdiff.selection.search import reject_auto, search_kind
from simdiff.selection.spec import BEST_OF
from simdiff.store.lineage import compose_rounds, input_metadata
from simdiff.store.save import provenance, save_model
from simdiff.surgery.heal import (
    HealRecord,
    check_healable,
    heal_layers,
    note_calibration_text,
    preflight,
    search_healer,
)
from simdiff.surgery.layers import remove_layers

log = logging.getLogger(__name__)

FREE_CRITERIA = [name for name, c in CRITERIA.items() if c.needs <= {LAYER_STATS}]


@dataclass
class PruneResult:
    """What ``prune`` did: the selection, every computed score, the kept layers and the output path."""

    selection: Selection
    scores: ScoreResult
    kept_layers: list[int]
    out: Path | None = None
    metadata: dict = field(default_factory=dict)


def score(model, tokenizer, criteria: list[str], calibration: Calibration | None = None,
          options: Options | None = None, block_sizes: tuple[int, ...] = (),
          offload_device: str | None = None, max_device_bytes: int | None = None) -> ScoreResult:
    """Score every decoder layer of an in-memory model with each criterion (one pass per evidence kind).

    A criterion may be a variant such as ``simdiff:beta=0.5`` (scored under its own options, same evidence).
    ``offload_device``: collect the statistics one decoder layer at a time on that device (layer-wise offload),
    refused before the pass if that needs more than ``max_device_bytes`` of it.
    """
    from simdiff.selection.evidence import score_layers
    from simdiff.selection.spec import CandidateSpec

    calibration, options = calibration or Calibration(), options or Options()
    specs = [CandidateSpec.parse(name) for name in criteria]
    for spec in specs:
        reject_auto(spec.options(options))
    names = list(dict.fromkeys(spec.criterion for spec in specs))
    check_seq_len(model, calibration.seq_len)
    result = score_layers(model, calibration_batches(calibration, tokenizer), names, options, block_sizes,
                          offload_device=offload_device, max_device_bytes=max_device_bytes)
    result.scores = {spec.label: importance(spec.criterion, result.evidence, spec.options(options))
                     for spec in specs}
    return result


def select_for_model(model, tokenizer, criterion: str, count: int, calibration: Calibration, options: Options,
                     iterative: bool = False, keep_first: int = 0, keep_last: int = 0,
                     offload_device: str | None = None,
                     max_device_bytes: int | None = None) -> tuple[Selection, ScoreResult]:
    """Choose ``count`` layers with ``criterion``; also score every criterion the same pass gives for free."""
    get_criterion(criterion)
    if iterative and offload_device is not None:
        raise SimdiffError("--offload layerwise supports one-shot selection only; drop --iterative or --offload")
    calib_batches = calibration_batches(calibration, tokenizer)
    reported = sorted({criterion, *FREE_CRITERIA}, key=list(CRITERIA).index)
    evidence = gather_evidence(model, calib_batches, needs_of(reported), block_sizes_for(reported, [count]),
                               offload_device=offload_device, max_device_bytes=max_device_bytes)
    result = ScoreResult(evidence, options, {name: importance(name, evidence, options) for name in reported})
    choice = choose(criterion, count, options, evidence, keep_first=keep_first, keep_last=keep_last,
                    iterative=iterative, model=model, batches=calib_batches)
    return choice.selection, result


def prune(recipe: Recipe | str, out: str | Path | None = None, **settings) -> PruneResult:
    """Load the model, remove the least important layers, save a reloadable checkpoint: as ``recipe`` says.

    Convenience form: ``prune("smollm2-135m", out="pruned", ratio=0.25, criterion="simdiff",
    calibration=Calibration(samples=32))`` builds the recipe from keyword arguments (whole sections or single
    fields, see :func:`simdiff.config.recipe.recipe_from_settings`). ``out`` also overrides a recipe's output.
    ``model.offload="layerwise"`` keeps the model in CPU memory and scores it one layer at a time on the device.
    """
    if isinstance(recipe, Recipe):
        if settings:
            raise SimdiffError(f"prune(recipe) takes no other settings, got {', '.join(settings)}; edit the recipe")
        recipe = recipe if out is None else replace(recipe, out=str(out))
    else:
        recipe = recipe_from_settings(recipe, out, **settings)
    return prune_recipe(recipe)


def prune_recipe(recipe: Recipe,
                 after_save: Callable[[PruneResult, OutputDir], None] | None = None) -> PruneResult:
    """Prune as ``recipe`` says. ``selection.layers`` removes exactly those layers (no calibration, no scores).

    Under ``torchrun``/``accelerate launch`` the scoring is data parallel (:mod:`simdiff.collect.distributed`) and only
    rank 0 saves (the other ranks return a result with ``out=None``). ``after_save(result, claim)`` runs on the
    saving process after the commit, with ``--out`` still claimed and the model freed (extra files).
    """
    from simdiff.selection.spec import CandidateSpec

    if recipe.is_comparison():
        raise SimdiffError(f"prune takes one criterion and one count, got criterion {recipe.selection.criterion!r}, "
                           f"{recipe.selection.counts_given()}; compare several with `simdiff compare`")
    recipe.check()
    if recipe.out is None:
        raise SimdiffError("give --out DIR: the folder the pruned model is written to")
    spec = CandidateSpec.parse(recipe.selection.criterion)
    criterion, options = spec.criterion, spec.options(recipe.options)
    sel, spec_model, search = recipe.selection, recipe.model, recipe.search
    kind = None if sel.layers is not None else search_kind(criterion, options, sel.iterative)
    if kind is not None:
        search.check()
        if spec_model.offload is not None:
            raise SimdiffError(f"{criterion if kind == BEST_OF else '--alpha auto'} needs the model in memory; "
                               "drop --offload")
    pool = search_pool({kind}, search)
    check_heal_settings(sel, spec_model)
    check_device(spec_model.device)
    scored = [*FREE_CRITERIA, *(pool if kind is not None else [criterion])]
    check_data_parallel_support(set() if sel.layers is not None else needs_of(scored), spec_model.device_map)
    # validated and claimed before work (by rank 0 only when data parallel: it alone writes)
    claiming = claim_output_dir(recipe.out, recipe.overwrite, inputs=[spec_model.name]) if is_main_process() \
        else nullcontext()
    with claiming as claim:
        result = _load_and_prune(recipe, claim, criterion, options, kind, scored)
        if claim is not None and after_save is not None:  # the model is freed: _load_and_prune returned
            after_save(result, claim)
    return result


def _load_and_prune(recipe: Recipe, claim: OutputDir | None, criterion: str, options: Options, kind: str | None,
                    scored: list[str]) -> PruneResult:
    """The work of :func:`prune_recipe` once ``--out`` is claimed (``claim`` None: a rank other than 0)."""
    calibration, sel, spec_model, search = recipe.calibration, recipe.selection, recipe.model, recipe.search
    num_layers, ratio = (sel.num_layers or [None])[0], (sel.ratio or [None])[0]
    spec_model = replace(spec_model, device=start_data_parallel(spec_model.device))
    offload_device = spec_model.offload_device()
    model, tokenizer = load_from_settings(spec_model, offloaded=offload_device is not None,
                                          check_config=partial(check_config_sliceable, sliced=sel.slice_config_keys))
    total = len(find_decoder_layers(model))
    if sel.layers is not None:
        return prune_given_layers(model, tokenizer, recipe, claim, total)
    count = resolve_count(total, num_layers, ratio)
    keep_first = heal_keep_first(sel)
    check_removable(total, count, keep_first, sel.keep_last)
    check_seq_len(model, calibration.seq_len)
    if sel.heal != "none":  # refuses an architecture it cannot fold into before the scoring
        preflight(model, calibration_batches(calibration, tokenizer)[:1])
        note_calibration_text(calibration.source)
    searched = None
    if kind is None:
        selection, scores = select_for_model(model, tokenizer, criterion, count, calibration, options,
                                             sel.iterative, keep_first, sel.keep_last,
                                             offload_device=offload_device,
                                             max_device_bytes=spec_model.max_device_memory)
    else:  # chosen on held-out calibration windows; the saved layers are exactly the winner's (simdiff.selection.search)
        reported = sorted(set(scored), key=list(CRITERIA).index)
        searcher = make_searcher(model, tokenizer, calibration, search, [count], {kind}, keep_first,
                                 sel.keep_last, reported=reported, heal_samples=sel.heal_samples,
                                 healer=search_healer(sel.heal, sel.heal_ridge, sel.heal_weighting))
        choice = choose(criterion, count, options, searcher=searcher)
        searched, selection, options = choice.search, choice.selection, choice.options
        scores = ScoreResult(searcher.evidence, options,
                             {name: importance(name, searcher.evidence, options) for name in reported})
    log.info("%s removes layers %s of %d", criterion, selection.removed, total)
    if claim is None:  # data parallel: rank 0 saves
        return PruneResult(selection, scores, [i for i in range(total) if i not in selection.removed])
    healed = heal_for_prune(model, tokenizer, recipe, selection.removed, searched=searched is not None)
    kept = remove_layers(model, selection.removed, sel.slice_config_keys)
    metadata = prune_metadata(spec_model.name, selection, scores, kept, total, calibration, options,
                              iterative=sel.iterative, keep_first=keep_first, keep_last=sel.keep_last,
                              dtype=spec_model.dtype, requested_num_layers=num_layers, requested_ratio=ratio,
                              removed_count=count, model_type=model.config.model_type,
                              architectures=model.config.architectures)
    metadata["recipe"] = replace(recipe, overwrite=False).to_dict()
    add_heal_record(metadata, healed, kept)
    if searched is not None:
        metadata["alpha_search" if kind == "alpha" else "best_of"] = searched.to_dict()
    saved = save_model(model, tokenizer, claim, metadata)
    return PruneResult(selection, scores, kept, saved, metadata)


def prune_given_layers(model, tokenizer, recipe: Recipe, claim: OutputDir | None, total: int) -> PruneResult:
    """Remove exactly ``recipe.selection.layers`` (``prune --layers``, the input's numbering): no calibration,
    no scores."""
    selection = Selection("manual", validate_layer_indices(recipe.selection.layers, total))
    scores = ScoreResult(Evidence(num_layers=total), Options())
    if claim is None:  # data parallel: rank 0 saves
        return PruneResult(selection, scores, [i for i in range(total) if i not in selection.removed])
    healed = heal_for_prune(model, tokenizer, recipe, selection.removed)
    kept = remove_layers(model, selection.removed, recipe.selection.slice_config_keys)
    calibration = recipe.calibration if healed is not None else None
    metadata = prune_metadata(recipe.model.name, selection, scores, kept, total, calibration, None,
                              dtype=recipe.model.dtype, model_type=model.config.model_type,
                              architectures=model.config.architectures)
    metadata["recipe"] = replace(recipe, overwrite=False).to_dict()
    add_heal_record(metadata, healed, kept)
    saved = save_model(model, tokenizer, claim, metadata)
    return PruneResult(selection, scores, kept, saved, metadata)


def check_heal_settings(sel, spec_model) -> None:
    """Before loading: what ``--heal`` cannot do (a given run starting at layer 0, layer-wise offload)."""
    if sel.heal == "none":
        return
    if spec_model.offload is not None:
        raise SimdiffError("--heal linear needs the model in memory; drop --offload")
    if sel.layers is not None:
        check_healable(sel.layers, sel.heal)


def heal_keep_first(sel) -> int:
    """The protected leading layers: with ``--heal linear`` layer 0 always stays (nothing precedes it)."""
    return max(sel.keep_first, 1) if sel.heal != "none" else sel.keep_first


def heal_for_prune(model, tokenizer, recipe: Recipe, removed: list[int], searched: bool = False) -> HealRecord | None:
    """Fold the healing maps into ``model`` (before the layers are removed), as ``recipe.selection`` says, fitted on
    ``--heal-samples`` windows drawn from the calibration text.

    After a held-out search (``searched``) too: the search scored each candidate healed on windows from the gaps
    between its held-out blocks; once the set is chosen, its heal is refitted on the calibration windows, so the
    checkpoint is the one ``prune --layers SET --heal linear`` saves (and, where the search keeps the plain prune's
    set, the one ``prune --heal linear`` saves). Measured: the gap windows' fit was level or slightly worse.
    """
    sel = recipe.selection
    if sel.heal == "none":
        return None
    check_seq_len(model, recipe.calibration.seq_len)
    if sel.layers is not None:
        note_calibration_text(recipe.calibration.source)
    record = heal_layers(model, calibration_batches(recipe.calibration, tokenizer, sel.heal_samples), removed,
                         sel.heal_ridge, weighting=sel.heal_weighting)
    record.fitted_on = f"{sel.heal_samples} calibration windows (--heal-samples)" + (
        "; refitted after the held-out search, which scored the set healed on its own heal windows outside the "
        "held-out blocks" if searched else "")
    return record


def add_heal_record(metadata: dict, healed: HealRecord | None, kept: list[int]) -> None:
    """``simdiff.json``'s ``heal`` entry (with each changed layer's index in the saved model)."""
    if healed is None:
        metadata["heal"] = {"method": "none"}
        return
    record = healed.to_dict()
    for run in record["runs"]:
        run["folded_into_saved_index"] = kept.index(run["folded_into"])
    metadata["heal"] = record


def prune_metadata(model_name: str, selection: Selection, scores: ScoreResult, kept: list[int], total: int,
                   calibration: Calibration | None, options: Options | None, model_type: str | None = None,
                   architectures: list[str] | None = None, **settings) -> dict:
    """The ``simdiff.json`` document (stable top-level keys: removed_layers, kept_layers, criterion, scores).

    Layer indices are in the original model's numbering when the input is itself a simdiff output
    (:mod:`simdiff.store.lineage`); ``scores``, ``statistics`` and ``history[-1].removed_layers`` index the input's layers.
    """
    run = provenance()
    lineage = compose_rounds(input_metadata(model_name), model_name, selection.criterion, selection.removed, kept,
                             total, run["command"], run["created"])
    return {
        "removed_layers": lineage.pop("removed_layers"),
        "kept_layers": lineage.pop("kept_layers"),
        "criterion": selection.criterion,
        "scores": {k: v.tolist() for k, v in scores.scores.items()},
        "layer_map": lineage.pop("layer_map"),
        "base_model": model_name,
        "num_layers_before": total,
        "num_layers_after": len(kept),
        **lineage,
        "model_type": model_type,
        "architectures": architectures,
        "options": None if options is None else asdict(options),
        "calibration": None if calibration is None else {
            **asdict(calibration), "text": text_variant(calibration.source, "valid", calibration.data_dir)},
        "settings": settings,
        "selection_steps": selection.steps,
        "statistics": scores.to_dict()["statistics"],
        **run,
    }
