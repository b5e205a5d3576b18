"""Adaptive SimDiff weighting: ternary search of alpha on held-out calibration perplexity.

The calibration windows are split into a scoring part (statistics -> importances -> selected layers) and a
held-out part (perplexity of the model with those layers bypassed). Alpha is searched on [0, 1] with both
endpoints probed; the probe with the lowest held-out perplexity wins (ties go to the alpha closest to 0.5).
Only calibration text is used: the evaluation text is never read here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from simdiff.criteria import LAYER_STATS, Evidence, Options
from simdiff.data import batches
from simdiff.errors import SimdiffError
from simdiff.evaluate.perplexity import nll_over
from simdiff.pipeline import choose_one_shot, gather_evidence
from simdiff.surgery import bypass_layers

log = logging.getLogger(__name__)

AUTO = "auto"


def is_auto(alpha: object) -> bool:
    return isinstance(alpha, str) and alpha.strip().lower() == AUTO


@dataclass
class Probe:
    """One evaluated alpha: the layers it removes and their held-out calibration perplexity."""

    alpha: float
    removed: list[int]
    heldout_ppl: float
    reused: bool = False


@dataclass
class AlphaSearch:
    """The chosen alpha, its selection and held-out perplexity, and every probe in search order."""

    alpha: float
    removed: list[int]
    heldout_ppl: float
    count: int
    scoring_windows: int
    heldout_windows: int
    iterations: int
    trace: list[Probe] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "trace"},
                "objective": "held-out calibration perplexity with the selected layers bypassed",
                "trace": [asdict(p) for p in self.trace]}


def split_windows(windows: torch.Tensor, heldout_fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Scoring windows (the first ones) and held-out windows (the last ``heldout_fraction``, at least one)."""
    n = int(windows.shape[0])
    if n < 2:
        raise SimdiffError(f"--alpha auto needs at least 2 calibration windows (got {n}); raise --samples")
    if not 0.0 < heldout_fraction < 1.0:
        raise SimdiffError(f"held-out fraction must lie strictly between 0 and 1, got {heldout_fraction}")
    held = min(n - 1, max(1, round(n * heldout_fraction)))
    return windows[: n - held], windows[n - held :]


class _Objective:
    """Held-out perplexity of the layers SimDiff selects at a given alpha (cached per removed set)."""

    def __init__(self, model: nn.Module, evidence: Evidence, heldout, count: int, options: Options,
                 keep_first: int, keep_last: int) -> None:
        self.model, self.evidence, self.heldout = model, evidence, heldout
        self.count, self.options, self.keep = count, options, (keep_first, keep_last)
        self.cache: dict[tuple[int, ...], float] = {}
        self.trace: list[Probe] = []

    def __call__(self, alpha: float) -> float:
        options = replace(self.options, alpha=float(alpha))
        removed = choose_one_shot("simdiff", self.evidence, self.count, options, *self.keep).removed
        key = tuple(removed)
        reused = key in self.cache
        if not reused:
            with bypass_layers(self.model, removed):
                self.cache[key] = nll_over(self.model, self.heldout, desc=None).perplexity
        ppl = self.cache[key]
        self.trace.append(Probe(float(alpha), removed, ppl, reused))
        log.info("alpha %.4f removes %s: held-out calibration ppl %.4f%s", alpha, removed, ppl,
                 " (same layers as an earlier probe)" if reused else "")
        return ppl


def ternary_search(objective, iterations: int) -> None:
    """Probe both endpoints, then narrow [0, 1] by ternary search for ``iterations`` rounds."""
    objective(0.0)
    objective(1.0)
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if objective(m1) <= objective(m2):
            hi = m2
        else:
            lo = m1


def tune_alpha(model: nn.Module, windows: torch.Tensor, count: int, options: Options | None = None,
               batch_size: int = 4, keep_first: int = 0, keep_last: int = 0, iterations: int = 6,
               heldout_fraction: float = 0.25) -> AlphaSearch:
    """Choose SimDiff's alpha for removing ``count`` layers, from calibration ``windows`` only."""
    if iterations < 0:
        raise SimdiffError(f"iterations must be >= 0, got {iterations}")
    options = replace(options or Options(), alpha=0.5)
    scoring, heldout = split_windows(windows, heldout_fraction)
    evidence = gather_evidence(model, batches(scoring, batch_size), {LAYER_STATS})
    objective = _Objective(model, evidence, batches(heldout, batch_size), count, options, keep_first, keep_last)
    ternary_search(objective, iterations)
    best = min(objective.trace, key=lambda p: (_rank(p.heldout_ppl), abs(p.alpha - 0.5), p.alpha))
    log.info("alpha auto: chose %.4f (held-out calibration ppl %.4f, %d probes)", best.alpha, best.heldout_ppl,
             len(objective.trace))
    return AlphaSearch(best.alpha, best.removed, best.heldout_ppl, count, int(scoring.shape[0]),
                       int(heldout.shape[0]), iterations, objective.trace)


def _rank(ppl: float) -> float:
    return ppl if math.isfinite(ppl) else math.inf


def tune_alpha_for_calibration(model: nn.Module, tokenizer, count: int, calibration, options: Options | None = None,
                               keep_first: int = 0, keep_last: int = 0, iterations: int = 6) -> AlphaSearch:
    """:func:`tune_alpha` on the windows of a :class:`simdiff.api.Calibration` (its validation split)."""
    from simdiff.data import calibration_windows

    windows = calibration_windows(tokenizer, calibration.source, calibration.samples, calibration.seq_len,
                                  calibration.seed, calibration.data_dir)
    return tune_alpha(model, windows, count, options, calibration.batch_size, keep_first, keep_last, iterations)


def resolve_alpha(model: nn.Module, tokenizer, criterion: str, count: int, calibration, options: Options,
                  iterative: bool = False, keep_first: int = 0, keep_last: int = 0) -> tuple[Options, AlphaSearch | None]:
    """``options`` with a numeric alpha: unchanged unless alpha is ``"auto"``, then tuned for ``count`` layers."""
    if not is_auto(options.alpha):
        return options, None
    if criterion != "simdiff":
        raise SimdiffError(f"--alpha auto tunes the simdiff criterion; {criterion!r} has no alpha (drop --alpha)")
    if iterative:
        raise SimdiffError("--alpha auto works with one-shot selection; drop --iterative or give --alpha a number")
    search = tune_alpha_for_calibration(model, tokenizer, count, calibration, options, keep_first, keep_last)
    return replace(options, alpha=search.alpha), search


def reject_auto(options: Options | None, what: str = "scoring") -> None:
    """Raise a clear error where alpha must be a number (auto needs a layer count to tune for)."""
    if options is not None and is_auto(options.alpha):
        raise SimdiffError(f"--alpha auto needs a number of layers to remove, which {what} does not have; "
                           "use it with prune/compare (--num-layers or --ratio) or give --alpha a number in [0, 1]")
