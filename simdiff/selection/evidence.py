"""Orchestration: gather the evidence requested criteria need (one pass per kind), score, choose layers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from simdiff.collect.distributed import (
    active_world,
    all_reduce_statistics,
    launched_world,
    shard_batches,
)
from simdiff.collect.hooks import collect_layer_statistics
from simdiff.collect.model_passes import skip_loss_increase, taylor_importance
from simdiff.collect.offload import collect_layer_statistics_offloaded
from simdiff.core.errors import SimdiffError
from simdiff.criteria import LAYER_STATS, SKIP_LOSS, TAYLOR, Evidence, Options, get_criterion
from simdiff.data.windows import Batch
from simdiff.model.layers import bypass_layers, find_decoder_layers
from simdiff.selection.rank import select_block, select_layers

log = logging.getLogger(__name__)


def gather_evidence(model: nn.Module, batches: Sequence[Batch], needs: set[str], block_sizes: Sequence[int] = (),
                    removed: Sequence[int] = (), offload_device: str | None = None,
                    max_device_bytes: int | None = None) -> Evidence:
    """Run each needed collector once; layers in ``removed`` are bypassed and get no evidence.

    With ``offload_device`` the statistics are collected one decoder layer at a time on that device
    (:mod:`simdiff.collect.offload`), refused before the pass when it needs more than ``max_device_bytes``;
    only the statistic-based criteria support that. In a data-parallel
    process group (:mod:`simdiff.collect.distributed`) each process takes its share of ``batches``.
    """
    n = len(find_decoder_layers(model))
    active = [i for i in range(n) if i not in set(removed)]
    log.info("scoring %d layers on %d calibration windows: %s", len(active),
             sum(int(b.input_ids.shape[0]) for b in batches), "; ".join(evidence_passes(needs, len(active))))
    evidence = Evidence(num_layers=n)
    world = active_world()  # data parallel: this process's share of the batches, sums all-reduced below
    if world is not None:
        check_data_parallel_support(needs)
        batches = shard_batches(batches, world)
    if offload_device is not None and needs - {LAYER_STATS}:
        raise SimdiffError(f"--offload layerwise collects hidden-state statistics only; criteria needing "
                           f"{', '.join(sorted(needs - {LAYER_STATS}))} need the model in memory (drop --offload)")
    with bypass_layers(model, list(removed)):
        if LAYER_STATS in needs and offload_device is not None:
            evidence.layer_stats, _ = collect_layer_statistics_offloaded(
                model, batches, block_sizes, active_layers=None if not removed else active, device=offload_device,
                max_device_bytes=max_device_bytes)
        elif LAYER_STATS in needs:
            evidence.layer_stats = collect_layer_statistics(
                model, batches, block_sizes, active_layers=None if not removed else active
            )
        if world is not None and evidence.layer_stats is not None:
            all_reduce_statistics(evidence.layer_stats)
        if TAYLOR in needs:
            evidence.taylor = taylor_importance(model, batches)
    if SKIP_LOSS in needs:
        evidence.skip_loss_increase = skip_loss_increase(model, batches, already_removed=removed)
    return evidence


def evidence_passes(needs: set[str], active_layers: int) -> list[str]:
    """What collecting ``needs`` costs, in passes over the calibration windows (stated before it starts)."""
    passes = []
    if LAYER_STATS in needs:
        passes.append("1 forward pass with hooks (statistics)")
    if TAYLOR in needs:
        passes.append("1 forward+backward pass (taylor)")
    if SKIP_LOSS in needs:
        passes.append(f"{active_layers + 1} loss passes (ppl_skip: dense, then each layer skipped)")
    return passes


def needs_of(criteria: Sequence[str]) -> set[str]:
    return set().union(*(get_criterion(name).needs for name in criteria))


def block_sizes_for(criteria: Sequence[str], counts: Sequence[int]) -> list[int]:
    """Block lengths to collect: 1 (per-layer profile) and each count, when a block criterion is asked for."""
    if not any(get_criterion(name).is_block for name in criteria):
        return []
    return sorted({1, *counts})


def importance(criterion: str, evidence: Evidence, options: Options) -> np.ndarray:
    """Per-layer importance of ``criterion`` (higher = keep)."""
    return np.asarray(get_criterion(criterion).score(evidence, options), dtype=np.float64)


@dataclass
class ScoreResult:
    """Per-layer importances of several criteria from one set of evidence."""

    evidence: Evidence
    options: Options
    scores: dict[str, np.ndarray] = field(default_factory=dict)

    def to_dict(self) -> dict:
        stats = self.evidence.layer_stats
        return {
            "num_layers": self.evidence.num_layers,
            "scores": {k: v.tolist() for k, v in self.scores.items()},
            "statistics": {
                **({"layer": stats.to_dict()} if stats is not None else {}),
                **({"skip_loss_increase": self.evidence.skip_loss_increase.tolist()}
                   if self.evidence.skip_loss_increase is not None else {}),
                **({"taylor": self.evidence.taylor.tolist()} if self.evidence.taylor is not None else {}),
            },
        }


def score_layers(model: nn.Module, batches: Sequence[Batch], criteria: Sequence[str],
                 options: Options | None = None, block_sizes: Sequence[int] = (),
                 offload_device: str | None = None, max_device_bytes: int | None = None) -> ScoreResult:
    """Score every decoder layer with each criterion, collecting each kind of evidence once."""
    options = options or Options()
    sizes = sorted(set(block_sizes) | set(block_sizes_for(criteria, [])))
    evidence = gather_evidence(model, batches, needs_of(criteria), sizes, offload_device=offload_device,
                               max_device_bytes=max_device_bytes)
    result = ScoreResult(evidence, options)
    for name in criteria:
        result.scores[name] = importance(name, evidence, options)
    return result


@dataclass
class Selection:
    """Which layers a criterion removes, with the importances it saw (per step when iterative)."""

    criterion: str
    removed: list[int]
    steps: list[dict] = field(default_factory=list)


def _subset_evidence(evidence: Evidence, active: list[int]) -> Evidence:
    return Evidence(
        num_layers=len(active),
        layer_stats=None if evidence.layer_stats is None else evidence.layer_stats.subset(active),
        skip_loss_increase=None if evidence.skip_loss_increase is None else evidence.skip_loss_increase[active],
        taylor=None if evidence.taylor is None else evidence.taylor[active],
    )


def choose_one_shot(criterion: str, evidence: Evidence, count: int, options: Options,
                    keep_first: int = 0, keep_last: int = 0) -> Selection:
    """Rank once and remove the ``count`` least important layers (or the best block)."""
    spec = get_criterion(criterion)
    if spec.is_block:
        block = np.asarray(spec.block_score(evidence, count), dtype=np.float64)
        removed = select_block(block, count, keep_first, keep_last)
        return Selection(criterion, removed, [{"block_importance": block.tolist()}])
    scores = importance(criterion, evidence, options)
    removed = select_layers(scores, count, keep_first, keep_last)
    return Selection(criterion, removed, [{"importance": scores.tolist()}])


def choose_iterative(model: nn.Module, batches: Sequence[Batch], criterion: str, count: int, options: Options,
                     keep_first: int = 0, keep_last: int = 0, initial: Evidence | None = None) -> Selection:
    """Remove one layer at a time, re-collecting evidence with the removed layers bypassed.

    ``initial`` is evidence already collected on the full model (reused for the first step).
    """
    spec = get_criterion(criterion)
    if spec.is_block:
        raise SimdiffError(f"--iterative does not apply to the block criterion {criterion!r}")
    n = len(find_decoder_layers(model))
    removed: list[int] = []
    steps = []
    for step in range(count):
        reuse = step == 0 and initial is not None
        evidence = initial if reuse else gather_evidence(model, batches, spec.needs, removed=removed)
        active = [i for i in range(n) if i not in removed]
        sub_scores = importance(criterion, _subset_evidence(evidence, active), options)
        scores = np.full(n, np.nan)
        scores[active] = sub_scores
        (layer,) = select_layers(scores, 1, keep_first, keep_last)
        removed.append(layer)
        steps.append({"step": step, "removed": layer, "importance": scores.tolist()})
        log.info("iterative %s step %d: remove layer %d", criterion, step + 1, layer)
    return Selection(criterion, sorted(removed), steps)


def check_data_parallel_support(needs: set[str], device_map: str | None = None) -> None:
    """Refuse, before any work, what data-parallel scoring cannot do."""
    if launched_world() is None and active_world() is None:
        return
    other = sorted(needs - {LAYER_STATS, SKIP_LOSS})
    if other:
        raise SimdiffError(f"data-parallel scoring (torchrun/accelerate) reduces hidden-state statistics and "
                           f"calibration losses only; criteria needing {', '.join(other)} must run in one "
                           "process (without the launcher)")
    if device_map is not None:
        raise SimdiffError("--device-map spreads one model over several devices, but under torchrun each process "
                           "holds its own copy on cuda:LOCAL_RANK; drop --device-map (or the launcher)")
