"""The Python API behind each CLI command: score layers, prune a model and save it."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from simdiff.criteria import CRITERIA, LAYER_STATS, Evidence, Options, get_criterion
from simdiff.data import batches, calibration_windows
from simdiff.data.text import text_variant
from simdiff.data.windows import Batch
from simdiff.distributed import check_data_parallel_support, is_main_process, start_data_parallel
from simdiff.errors import SimdiffError
from simdiff.lineage import compose_rounds, input_metadata
from simdiff.model.checks import check_device, check_seq_len
from simdiff.model.layers import find_decoder_layers
from simdiff.model.load import load_model
from simdiff.outputs import OutputDir, claim_output_dir
from simdiff.pipeline import (
    ScoreResult,
    Selection,
    block_sizes_for,
    choose_iterative,
    choose_one_shot,
    gather_evidence,
    importance,
    needs_of,
)
from simdiff.save import provenance, save_model
from simdiff.select import check_removable, resolve_count
from simdiff.surgery import remove_layers, validate_layer_indices
from simdiff.tune import BEST_OF, Searcher, SearchSettings, reject_auto, search_kind, searched_options

log = logging.getLogger(__name__)

FREE_CRITERIA = [name for name, c in CRITERIA.items() if c.needs <= {LAYER_STATS}]


@dataclass
class Calibration:
    """Where calibration windows come from."""

    source: str = "wikitext2"
    samples: int = 32
    seq_len: int = 256
    batch_size: int = 4
    seed: int = 0
    data_dir: str | None = None
    heldout_samples: int = 32  # held-out windows for --alpha auto / best-of (simdiff.tune)
    skip_first_token: bool = False  # leave position 0 of each window out of the statistics

    def __post_init__(self) -> None:
        """Refuse impossible settings when made, before the model is loaded."""
        for flag, value, least in (("--samples", self.samples, 1), ("--seq-len", self.seq_len, 2),
                                   ("--batch-size", self.batch_size, 1), ("--seed", self.seed, 0)):
            if value < least:
                raise SimdiffError(f"{flag} must be >= {least}, got {value}")

    def batches(self, tokenizer) -> list[Batch]:
        windows = calibration_windows(tokenizer, self.source, self.samples, self.seq_len, self.seed, self.data_dir)
        return batches(windows, self.batch_size, self.skip_first_token)


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
          offload_device: str | None = None) -> ScoreResult:
    """Score every decoder layer of an in-memory model with each criterion (one pass per evidence kind).

    ``offload_device``: collect the statistics one decoder layer at a time on that device (layer-wise offload).
    """
    from simdiff.pipeline import score_layers

    calibration = calibration or Calibration()
    reject_auto(options)
    for name in criteria:
        get_criterion(name)
    check_seq_len(model, calibration.seq_len)
    return score_layers(model, calibration.batches(tokenizer), criteria, options or Options(), block_sizes,
                        offload_device=offload_device)


def select_for_model(model, tokenizer, criterion: str, count: int, calibration: Calibration, options: Options,
                     iterative: bool = False, keep_first: int = 0, keep_last: int = 0,
                     offload_device: str | None = None) -> tuple[Selection, ScoreResult]:
    """Choose ``count`` layers with ``criterion``; also score every criterion the same pass gives for free."""
    get_criterion(criterion)
    if iterative and offload_device is not None:
        raise SimdiffError("--offload layerwise supports one-shot selection only; drop --iterative or --offload")
    calib_batches = calibration.batches(tokenizer)
    reported = sorted({criterion, *FREE_CRITERIA}, key=list(CRITERIA).index)
    evidence = gather_evidence(model, calib_batches, needs_of(reported), block_sizes_for(reported, [count]),
                               offload_device=offload_device)
    result = ScoreResult(evidence, options, {name: importance(name, evidence, options) for name in reported})
    if iterative:
        selection = choose_iterative(model, calib_batches, criterion, count, options, keep_first, keep_last,
                                     initial=evidence)
    else:
        selection = choose_one_shot(criterion, evidence, count, options, keep_first, keep_last)
    return selection, result


def prune(model_name: str, out: str | Path, num_layers: int | None = None, ratio: float | None = None,
          criterion: str = "simdiff", calibration: Calibration | None = None, options: Options | None = None,
          iterative: bool = False, keep_first: int = 0, keep_last: int = 0, dtype: str = "auto",
          device: str | None = None, device_map: str | None = None, overwrite: bool = False,
          offload: str | None = None, revision: str | None = None, trust_remote_code: bool = False,
          layers: list[int] | None = None, search: SearchSettings | None = None) -> PruneResult:
    """Load ``model_name``, remove the least important layers, save a reloadable checkpoint to ``out``.

    ``offload="layerwise"`` keeps the model in CPU memory and scores it one layer at a time on ``device``.
    ``layers``: remove exactly these (original indices) without calibration or scoring.
    Under ``torchrun``/``accelerate launch`` the scoring is data parallel (:mod:`simdiff.distributed`) and
    only rank 0 saves (the other ranks return a result with ``out=None``).
    ``criterion="best-of"`` or ``options.alpha="auto"`` choose on held-out calibration windows (``search``).
    """
    calibration = calibration or Calibration()
    options = options or Options()
    search = search or SearchSettings()
    kind = None if layers is not None else search_kind(criterion, options, iterative)
    if kind is None:
        get_criterion(criterion)
    else:
        search.check()
        if offload is not None:
            raise SimdiffError(f"{criterion if kind == BEST_OF else '--alpha auto'} needs the model in memory; "
                               "drop --offload")
    pool = search.pool if kind == BEST_OF else ("simdiff",)
    check_device(device)
    scored = [*FREE_CRITERIA, *(pool if kind is not None else [criterion])]
    check_data_parallel_support(set() if layers is not None else needs_of(scored), device_map)
    # validated and claimed before work (by rank 0 only when data parallel: it alone writes)
    with (claim_output_dir(out, overwrite, inputs=[model_name]) if is_main_process() else nullcontext()) as claim:
        device = start_data_parallel(device)
        offload_device = (device or "cpu") if offload == "layerwise" else None
        model, tokenizer = load_model(model_name, dtype=dtype, device=None if offload_device else device,
                                      device_map=device_map, revision=revision, trust_remote_code=trust_remote_code)
        total = len(find_decoder_layers(model))
        if layers is not None:
            return prune_given_layers(model, tokenizer, model_name, claim, layers, total, dtype)
        count = resolve_count(total, num_layers, ratio)
        check_removable(total, count, keep_first, keep_last)
        check_seq_len(model, calibration.seq_len)
        searched = None
        if kind is None:
            selection, scores = select_for_model(model, tokenizer, criterion, count, calibration, options,
                                                 iterative, keep_first, keep_last, offload_device=offload_device)
        else:  # chosen on held-out calibration windows; the saved layers are exactly the winner's (simdiff.tune)
            reported = sorted(set(scored), key=list(CRITERIA).index)
            searcher = Searcher(model, tokenizer, calibration, search, [count], reported, keep_first, keep_last)
            searched = searcher.search(kind, count, searched_options(options))
            selection, options = searcher.selection(searched, searched_options(options))
            scores = ScoreResult(searcher.evidence, options,
                                 {name: importance(name, searcher.evidence, options) for name in reported})
        log.info("%s removes layers %s of %d", criterion, selection.removed, total)
        if claim is None:  # data parallel: rank 0 saves
            return PruneResult(selection, scores, [i for i in range(total) if i not in selection.removed])
        kept = remove_layers(model, selection.removed)
        metadata = prune_metadata(model_name, selection, scores, kept, total, calibration, options,
                                  iterative=iterative, keep_first=keep_first, keep_last=keep_last, dtype=dtype,
                                  requested_num_layers=num_layers, requested_ratio=ratio, removed_count=count,
                                  model_type=model.config.model_type, architectures=model.config.architectures)
        if searched is not None:
            metadata["alpha_search" if kind == "alpha" else "best_of"] = searched.to_dict()
        saved = save_model(model, tokenizer, claim, metadata)
    return PruneResult(selection, scores, kept, saved, metadata)


def prune_given_layers(model, tokenizer, model_name: str, claim: OutputDir | None, layers: list[int], total: int,
                       dtype: str) -> PruneResult:
    """Remove exactly ``layers`` (``prune --layers``, the input's numbering): no calibration, no scores."""
    selection = Selection("manual", validate_layer_indices(layers, total))
    scores = ScoreResult(Evidence(num_layers=total), Options())
    if claim is None:  # data parallel: rank 0 saves
        return PruneResult(selection, scores, [i for i in range(total) if i not in selection.removed])
    kept = remove_layers(model, selection.removed)
    metadata = prune_metadata(model_name, selection, scores, kept, total, None, None, dtype=dtype,
                              model_type=model.config.model_type, architectures=model.config.architectures)
    saved = save_model(model, tokenizer, claim, metadata)
    return PruneResult(selection, scores, kept, saved, metadata)


def prune_metadata(model_name: str, selection: Selection, scores: ScoreResult, kept: list[int], total: int,
                   calibration: Calibration | None, options: Options | None, model_type: str | None = None,
                   architectures: list[str] | None = None, **settings) -> dict:
    """The ``simdiff.json`` document (stable top-level keys: removed_layers, kept_layers, criterion, scores).

    Layer indices are in the original model's numbering when the input is itself a simdiff output
    (:mod:`simdiff.lineage`); ``scores``, ``statistics`` and ``history[-1].removed_layers`` index the input's layers.
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
