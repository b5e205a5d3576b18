"""Choosing layers on held-out calibration text: SimDiff's exact alpha path (``--alpha auto``) and best-of.

**Disjoint windows that represent the text.** The calibration token stream is split before any window is
drawn: the ``heldout_samples`` held-out windows are contiguous, non-overlapping windows in ``heldout_blocks``
blocks of consecutive windows spread evenly over the stream (the first at its start, the last at its end),
and the scoring windows are sampled (seeded) from the gaps between the blocks. No scoring window can reach a
held-out token. The evaluation text (test split) is never read here.

**Exact alpha path.** SimDiff's importance is ``alpha * S + (1 - alpha) * D`` per layer, with S and D the
normalised similarity and difference terms, which do not depend on alpha. So the removed set can change
only where two layers' lines cross. Every crossing in (0, 1) is computed; the selection is taken at 0, 1,
the default alpha, every crossing and every midpoint between consecutive points, which visits every set
the path selects. Each distinct set is scored once on the held-out objective. Above ``max_candidates``
distinct sets, the set of the default alpha and an even spread over the rest (ordered by alpha) are kept,
and the number dropped is recorded.

**Best-of.** Pools the alpha path's sets with the one-shot selections of other criteria (by default the
one-pass ``block_influence``, ``angular_block``, ``mssd``, ``masd``; ``ppl_skip``/``taylor`` when asked for),
scores each distinct set once and keeps the best (see Margin). With ``margin=0`` it is therefore never
worse on the held-out objective than any pooled criterion.

**Objectives.** ``kl``: mean over held-out tokens of KL(dense || candidate) of the next-token
distributions. Batches are the outer loop and candidates the inner one: the dense log-probabilities of one
batch are computed once and every new candidate is compared with them (its layers bypassed in place), so
the cost is one dense pass plus one pass per candidate and memory holds one batch of [B, T, vocab]
log-probabilities (about three such tensors at a time; lower ``--calib-batch-size`` for a huge vocabulary), never
the whole held-out set. ``ppl``: held-out perplexity of each candidate, one pass per candidate.

**Margin, on two measures.** The reference, listed first, is the set plain ``prune`` saves at the default
alpha (for best-of, at the given ``--alpha``): SimDiff's selection on all calibration windows, drawn as
``prune`` draws them (one more statistics pass; they may overlap held-out tokens, which can only favour the
reference). Without ``simdiff`` in the pool it is the first pooled criterion's set. It is kept unless another
candidate beats it by more than
``margin`` standard errors of the paired difference of the held-out objective, over held-out blocks (each
block's windows averaged first: neighbouring windows are correlated; default 3; 0 makes the lowest score
win), **and** by as many of held-out next-token NLL (for ``kl``, read from the same candidate
log-probabilities: a set closer to the dense model's distributions that does not predict the text better
is not taken). Close sets rank differently on different texts, so leaving the default
needs evidence, not a difference within noise. Among the candidates that pass, the lowest score wins.
**Ties** (equal held-out score) go to the candidate listed first: alpha-path sets ordered by the distance
of their alpha to the default alpha, then the other pooled criteria in pool order. The saved selection is
exactly the winner: nothing is re-scored afterwards. Every candidate records ``vs_default`` and
``vs_default_nll``, its paired differences from the reference (objective, NLL) with their standard errors.

**Healed.** With a ``healer`` (``--heal linear``) every candidate set is scored after its heal, fitted once per
distinct set on ``--heal-samples`` windows drawn like the scoring windows (seeded, from the gaps between the
held-out blocks); the margin rule then picks among healed scores. ``prune`` then refits the chosen set's heal
on its ``--heal-samples`` calibration windows (``simdiff.workflows.api.heal_for_prune``), as ``prune --layers SET
--heal linear`` would.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from simdiff.collect.nll import standard_error, window_nlls
from simdiff.config.flags import is_auto
from simdiff.config.settings import OBJECTIVES, SearchSettings
from simdiff.core.errors import SimdiffError
from simdiff.core.progress import progress
from simdiff.criteria import LAYER_STATS, Evidence, Options
from simdiff.data import (
    batches,
    bos_token_id,
    calibration_batches,
    contiguous_windows,
    load_text,
    tokenize_text,
)
from simdiff.data.windows import Batch
from simdiff.model.layers import bypass_layers
from simdiff.model.load import model_device
from simdiff.selection.evidence import (
    Selection,
    block_sizes_for,
    choose_one_shot,
    evidence_passes,
    gather_evidence,
    importance,
    needs_of,
)
from simdiff.selection.rank import select_layers
from simdiff.selection.spec import BEST_OF

log = logging.getLogger(__name__)

DEFAULT_ALPHA = Options().alpha


# -- disjoint scoring / held-out windows --------------------------------------------------------------------
@dataclass
class WindowSplit:
    """Scoring and held-out windows cut from one token stream, and where the held-out blocks lie in it."""

    scoring: torch.Tensor
    heldout: torch.Tensor
    blocks: list[int]  # the held-out block of each held-out window, in order
    spans: list[list[int]]  # [start, end) token offsets of each held-out block in the stream
    stream_tokens: int

    def __iter__(self):  # ``scoring, heldout = split`` keeps working
        return iter((self.scoring, self.heldout))

    def record(self) -> dict:
        """How the held-out windows were drawn (for ``simdiff.json``)."""
        return {"heldout_blocks": len(self.spans), "heldout_block_spans": self.spans,
                "heldout_windows_per_block": np.bincount(self.blocks).tolist(),
                "calibration_stream_tokens": self.stream_tokens, "standard_error_unit": "blocks"}


def heldout_spans(total: int, windows: int, body: int, blocks: int) -> list[tuple[int, int]]:
    """``(start token, windows)`` of each held-out block: ``min(blocks, windows)`` blocks of consecutive windows,
    the first at the stream's start, the last at its end and the others evenly between (one block: the end)."""
    count = max(1, min(blocks, windows))
    sizes = [len(part) for part in np.array_split(np.arange(windows), count)]
    free = total - windows * body
    if count == 1:
        return [(free, sizes[0])]
    spans, used = [], 0
    for j, size in enumerate(sizes):
        spans.append((used + free * j // (count - 1), size))
        used += size * body
    return spans


def split_token_stream(ids: torch.Tensor, samples: int, seq_len: int, seed: int, bos: int | None,
                       heldout_samples: int, heldout_blocks: int = 1) -> WindowSplit:
    """Held-out windows in ``heldout_blocks`` contiguous blocks spread over ``ids`` (first block at its start,
    last at its end); scoring windows sampled (seeded) from the gaps between them, never reaching a held-out
    token."""
    if heldout_samples < 1:
        raise SimdiffError(f"--heldout-samples must be >= 1, got {heldout_samples}")
    if heldout_blocks < 1:
        raise SimdiffError(f"--heldout-blocks must be >= 1, got {heldout_blocks}")
    body = seq_len - (bos is not None)
    held_tokens = heldout_samples * body
    if len(ids) < held_tokens + body + 1:
        raise SimdiffError(f"calibration text too short: {len(ids)} tokens, but {heldout_samples} held-out windows "
                           f"need {held_tokens} and scoring needs {body + 1} more; lower --heldout-samples or "
                           "--calib-seq-len, or use a longer text")
    spans = heldout_spans(len(ids), heldout_samples, body, heldout_blocks)
    bounds = [(start, start + size * body) for start, size in spans]
    gaps = [(end, start) for end, start in zip([0] + [e for _, e in bounds], [s for s, _ in bounds] + [len(ids)])]
    starts = [np.arange(a, b - body + 1) for a, b in gaps if b - a >= body]  # every window start inside a gap
    if not starts:
        raise SimdiffError(f"calibration text too short: {len(ids)} tokens leave no gap of {body} tokens between "
                           f"{len(spans)} held-out blocks for a scoring window; lower --heldout-blocks or "
                           "--heldout-samples, or use a longer text")
    valid = np.concatenate(starts)
    picks = valid[np.random.default_rng(seed).integers(0, len(valid), size=samples)]
    scoring = torch.stack([ids[s:s + body] for s in picks.tolist()])
    scoring = scoring if bos is None else torch.cat([torch.full((samples, 1), bos, dtype=ids.dtype), scoring], 1)
    heldout = torch.cat([contiguous_windows(ids[a:b], seq_len, bos) for a, b in bounds])
    blocks = [j for j, (_, size) in enumerate(spans) for _ in range(size)]
    return WindowSplit(scoring, heldout, blocks, [list(b) for b in bounds], len(ids))


def calibration_ids(tokenizer, calibration) -> torch.Tensor:
    """The token ids of a :class:`simdiff.workflows.api.Calibration`'s text (validation split)."""
    return tokenize_text(tokenizer, load_text(calibration.source, split="valid", root=calibration.data_dir))


def split_calibration(tokenizer, calibration, samples: int | None = None,
                      ids: torch.Tensor | None = None) -> WindowSplit:
    """:func:`split_token_stream` on a :class:`simdiff.workflows.api.Calibration`'s text (validation split).

    ``samples`` draws that many scoring windows instead (same held-out blocks, same gaps, same seed: the heal's
    draw); ``ids``: the text already tokenised (read once for several draws).
    """
    if ids is None:
        ids = calibration_ids(tokenizer, calibration)
    return split_token_stream(ids, samples or calibration.samples, calibration.seq_len, calibration.seed,
                              bos_token_id(tokenizer), calibration.heldout_samples, calibration.heldout_blocks)


# -- candidates ----------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One distinct removed set, who proposed it, and its held-out score (lower is better)."""

    removed: list[int]
    sources: list[str]
    alpha: float | None = None
    alpha_range: list[float] | None = None
    score: float = math.nan
    vs_default: list[float] | None = None  # [mean, standard error] of the paired difference with the reference
    vs_default_nll: list[float] | None = None  # the same for held-out NLL per token (kl objective: its second test)
    heal: dict | None = None  # with --heal: the fit its score was taken on (folded-into layers, R^2, seconds)
    statistics: str = "scoring windows"  # the windows whose statistics proposed it ("calibration windows": reference)


def alpha_breakpoints(similarity: np.ndarray, difference: np.ndarray) -> list[float]:
    """Every alpha in (0, 1) where two layers' importances alpha*S + (1-alpha)*D are equal."""
    slope = similarity - difference
    i, j = np.triu_indices(len(slope), k=1)
    denom = slope[i] - slope[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = (difference[j] - difference[i]) / denom
    cross = cross[(denom != 0) & np.isfinite(cross) & (cross > 0) & (cross < 1)]
    return sorted(set(cross.tolist()))


def alpha_path(evidence: Evidence, count: int, options: Options, keep_first: int = 0, keep_last: int = 0,
               default_alpha: float = DEFAULT_ALPHA) -> list[Candidate]:
    """Every distinct set SimDiff removes as alpha runs over [0, 1], ordered by |alpha - default_alpha|.

    Each set's ``alpha`` is its probed alpha closest to ``default_alpha`` (the smaller one on a tie), and
    ``alpha_range`` the smallest and largest probed alpha that select it.
    """
    similarity = importance("simdiff", evidence, replace(options, alpha=1.0))
    difference = importance("simdiff", evidence, replace(options, alpha=0.0))
    points = sorted({0.0, 1.0, float(default_alpha), *alpha_breakpoints(similarity, difference)})
    probes = points + [(a + b) / 2 for a, b in zip(points, points[1:])]
    found: dict[tuple[int, ...], list[float]] = {}
    for alpha in probes:
        scores = alpha * similarity + (1 - alpha) * difference  # the simdiff criterion's own expression
        found.setdefault(tuple(select_layers(scores, count, keep_first, keep_last)), []).append(alpha)
    candidates = []
    for removed, alphas in found.items():
        best = min(alphas, key=lambda a: (abs(a - default_alpha), a))
        candidates.append(Candidate(list(removed), [f"simdiff alpha={best:.4f}"], best, [min(alphas), max(alphas)]))
    return sorted(candidates, key=lambda c: (abs(c.alpha - default_alpha), c.alpha))


def cap_candidates(candidates: list[Candidate], cap: int) -> tuple[list[Candidate], int]:
    """At most ``cap`` candidates: the first (the default alpha's set) and an even spread over the rest by alpha."""
    if len(candidates) <= cap:
        return candidates, 0
    first, rest = candidates[0], sorted(candidates[1:], key=lambda c: c.alpha)
    picks = sorted({int(round(x)) for x in np.linspace(0, len(rest) - 1, cap - 1)})
    kept = [first, *sorted((rest[i] for i in picks), key=lambda c: (abs(c.alpha - first.alpha), c.alpha))]
    return kept, len(candidates) - len(kept)


def merge_duplicates(candidates: list[Candidate]) -> list[Candidate]:
    """One candidate per removed set (the first listed keeps its place; later sources are added to it)."""
    merged: dict[tuple[int, ...], Candidate] = {}
    for c in candidates:
        key = tuple(c.removed)
        if key in merged:
            merged[key].sources.extend(c.sources)
            merged[key].alpha_range = merged[key].alpha_range or c.alpha_range
        else:
            merged[key] = c
    return list(merged.values())


# -- the held-out objective ------------------------------------------------------------------------------------
Healer = Callable[[list[int]], tuple[object, dict[str, torch.Tensor]]]  # set -> (heal record, folded parameters)


class HeldoutObjective:
    """Scores removed sets on held-out windows (lower is better); each distinct set is evaluated once.

    Per-window values are kept too (mean KL, or mean NLL, per predicted token of each window), so two sets
    can be compared paired (:meth:`paired`): per held-out block (``blocks``: the block of each window; None,
    every window its own block). With ``healer``, each set is scored *healed*: the healer fits its maps once
    (on the scoring windows) and returns the folded parameters, which are swapped in while the set is scored.
    """

    def __init__(self, model: nn.Module, heldout: Sequence[Batch], kind: str = "kl",
                 blocks: Sequence[int] | None = None, healer: Healer | None = None) -> None:
        if kind not in OBJECTIVES:
            raise SimdiffError(f"unknown --objective {kind!r}; choose one of {', '.join(OBJECTIVES)}")
        self.model, self.heldout, self.kind = model, list(heldout), kind
        self.blocks = None if blocks is None else np.asarray(blocks)
        self.healer = healer
        self.heals: dict[tuple[int, ...], object] = {}  # set -> heal record (healer only)
        self.folded: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}
        self.heal_seconds = 0.0
        self.cache: dict[tuple[int, ...], np.ndarray] = {}  # set -> per-window summed KL or NLL
        self.nll_cache: dict[tuple[int, ...], np.ndarray] = {}  # set -> per-window summed next-token NLL
        self.window_tokens: np.ndarray | None = None
        self.nll_tokens: np.ndarray | None = None
        self.passes = 0
        self.seconds = 0.0

    @property
    def tokens(self) -> int:
        return sum(int(b.attention_mask.sum()) for b in self.heldout)

    def scores(self, sets: Sequence[Sequence[int]]) -> list[float]:
        """Held-out score of each set (cached), evaluating the new ones batch by batch."""
        new = [list(k) for k in dict.fromkeys(tuple(s) for s in sets) if k not in self.cache]
        if new:
            self._fit_heals(new)
            start = time.perf_counter()
            if self.kind == "kl":
                totals, self.window_tokens, nlls, self.nll_tokens = self._kl(new)
            else:
                totals, self.window_tokens = self._nll(new)
                nlls, self.nll_tokens = totals, self.window_tokens
            for removed, per_window, nll in zip(new, totals, nlls):
                self.cache[tuple(removed)] = per_window
                self.nll_cache[tuple(removed)] = nll
                self.folded.pop(tuple(removed), None)  # scored: its folded weights are no longer needed
            self.passes += len(new) + (self.kind == "kl")
            self.seconds += time.perf_counter() - start
        return [self._aggregate(self.cache[tuple(s)]) for s in sets]

    def _fit_heals(self, sets: list[list[int]]) -> None:
        """One heal fit per new set (healer only), logged with its cost."""
        if self.healer is None:
            return
        for removed in sets:
            start = time.perf_counter()
            record, folded = self.healer(removed)
            self.heals[tuple(removed)], self.folded[tuple(removed)] = record, folded
            seconds = time.perf_counter() - start
            self.heal_seconds += seconds
            log.info("held-out search: heal fit %d for %s in %.1fs", len(self.heals), removed, seconds)

    @contextmanager
    def _candidate(self, removed: list[int]) -> Iterator[None]:
        """``removed`` bypassed and, with a healer, its folded parameters swapped in (restored on exit)."""
        with _swapped(self.model, self.folded.get(tuple(removed), {})), bypass_layers(self.model, removed):
            yield

    def _aggregate(self, per_window: np.ndarray) -> float:
        mean = float(per_window.sum() / self.window_tokens.sum())
        if not math.isfinite(mean):
            return math.inf
        return mean if self.kind == "kl" else math.exp(mean)

    def window_means(self, removed: Sequence[int]) -> np.ndarray:
        """Mean KL (``kl``) or mean NLL (``ppl``) per predicted token of each held-out window, for a scored set."""
        return self.cache[tuple(removed)] / np.maximum(self.window_tokens, 1)

    def paired(self, removed: Sequence[int], reference: Sequence[int], measure: str = "objective") -> tuple[float, float]:
        """Mean over held-out blocks of (``removed`` − ``reference``) per-token values (each block the mean of
        its windows), and its standard error over blocks (both sets scored); negative means ``removed`` is
        better. ``measure``: ``objective`` (KL or NLL, as ``kind``) or ``nll`` (next-token NLL, either kind)."""
        if measure == "nll":
            def means(key: Sequence[int]) -> np.ndarray:
                return self.nll_cache[tuple(key)] / np.maximum(self.nll_tokens, 1)
        else:
            means = self.window_means
        with np.errstate(invalid="ignore"):  # inf - inf where both sets broke: NaN, reported as such
            diffs = block_means(means(removed) - means(reference), self.blocks)
        if len(diffs) < 2 or not np.isfinite(diffs).all():
            return float(diffs.mean()) if len(diffs) else 0.0, math.inf
        return float(diffs.mean()), standard_error(diffs.tolist())

    @torch.no_grad()
    def _nll(self, sets: list[list[int]]) -> tuple[list[np.ndarray], np.ndarray]:
        nll, tokens = [[] for _ in sets], []
        for batch in progress(self.heldout, desc=f"held-out ppl of {len(sets)} candidates"):
            for k, removed in enumerate(sets):
                with self._candidate(removed):
                    totals, counts = window_nlls(self.model, [batch], desc=None)
                nll[k] += totals
            tokens += counts
        return [np.asarray(v, dtype=np.float64) for v in nll], np.asarray(tokens, dtype=np.float64)

    @torch.no_grad()
    def _kl(self, sets: list[list[int]]) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray], np.ndarray]:
        """Per-window summed KL and token counts, and (from the same candidate log-probabilities) per-window
        summed next-token NLL and predicted-token counts, as :func:`~simdiff.collect.nll.window_nlls` has them."""
        kl, nll, tokens, predicted = [[] for _ in sets], [[] for _ in sets], [], []
        for batch in progress(self.heldout, desc=f"held-out KL of {len(sets)} candidates"):
            batch = batch.to(model_device(self.model))
            mask = batch.attention_mask.bool()
            next_mask = mask[:, 1:] & mask[:, :-1]
            dense = torch.log_softmax(self._logits(batch), dim=-1)
            tokens += mask.sum(1).tolist()
            predicted += next_mask.sum(1).tolist()
            for k, removed in enumerate(sets):
                with self._candidate(removed):
                    candidate = torch.log_softmax(self._logits(batch), dim=-1)
                per_token = nn.functional.kl_div(candidate, dense, log_target=True, reduction="none").sum(-1)
                kl[k] += per_token.double().masked_fill(~mask.to(per_token.device), 0.0).sum(1).tolist()
                targets = batch.input_ids[:, 1:, None].to(candidate.device)  # logits may sit on the last device
                picked = -candidate[:, :-1].gather(-1, targets).squeeze(-1)
                nll[k] += picked.double().masked_fill(~next_mask.to(picked.device), 0.0).sum(1).tolist()
        return ([np.asarray(v, dtype=np.float64) for v in kl], np.asarray(tokens, dtype=np.float64),
                [np.asarray(v, dtype=np.float64) for v in nll], np.asarray(predicted, dtype=np.float64))

    def _logits(self, batch: Batch) -> torch.Tensor:
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits.float()

    def describe(self) -> str:
        healed = " (healed: each set's linear heal fitted outside the held-out blocks)" if self.healer else ""
        if self.kind == "kl":
            return f"mean KL(dense || candidate) of next-token distributions over held-out tokens (nats){healed}"
        return f"held-out calibration perplexity with the candidate's layers bypassed{healed}"


def block_means(values: np.ndarray, blocks: np.ndarray | None) -> np.ndarray:
    """The mean of ``values`` within each block (``blocks[i]``: the block of ``values[i]``; None: as they are)."""
    if blocks is None:
        return values
    return np.asarray([values[blocks == b].mean() for b in np.unique(blocks)])


@contextmanager
def _swapped(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """``model``'s parameters named in ``weights`` replaced by them within the block (copied back on exit)."""
    if not weights:
        yield
        return
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in weights}
    try:
        for name, tensor in weights.items():
            params[name].data.copy_(tensor)
        yield
    finally:
        for name, tensor in saved.items():
            params[name].data.copy_(tensor)


# -- searches --------------------------------------------------------------------------------------------------
@dataclass
class Search:
    """The outcome of a held-out selection: the winner (saved exactly as is), every candidate, and the cost."""

    kind: str  # "alpha" (--alpha auto) or "best-of"
    count: int
    winner: Candidate
    candidates: list[Candidate]
    objective: str
    objective_description: str
    dropped_by_cap: int
    cap: int
    heldout_passes: int
    heldout_seconds: float
    costs: dict = field(default_factory=dict)
    healed: bool = False

    @property
    def removed(self) -> list[int]:
        return self.winner.removed

    @property
    def alpha(self) -> float | None:
        return self.winner.alpha

    def to_dict(self) -> dict:
        return {"kind": self.kind, "count": self.count, "removed": self.winner.removed, "alpha": self.winner.alpha,
                "winner_sources": self.winner.sources, "heldout_score": self.winner.score,
                "objective": self.objective, "objective_description": self.objective_description,
                "distinct_candidates": len(self.candidates), "dropped_by_cap": self.dropped_by_cap,
                "max_candidates": self.cap, "heldout_passes": self.heldout_passes,
                "heldout_seconds": self.heldout_seconds, "healed": self.healed, **self.costs,
                "candidates": [vars(c) for c in self.candidates]}


class Searcher:
    """One scoring pass on the scoring windows, then held-out searches for any count (scores cached by set)."""

    def __init__(self, model: nn.Module, tokenizer, calibration, settings: SearchSettings, counts: Sequence[int],
                 criteria: Sequence[str] = ("simdiff",), keep_first: int = 0, keep_last: int = 0,
                 healer: Callable[[nn.Module, Sequence[Batch], list[int]], tuple] | None = None,
                 reference_evidence: Evidence | None = None, heal_samples: int | None = None) -> None:
        """``healer(model, batches, removed) -> (record, folded parameters)``: score every set healed, the heal
        fitted on ``heal_samples`` windows drawn from the scoring windows' gaps (default: the scoring windows
        themselves; ``simdiff.surgery.heal.fit_healed_weights``). ``reference_evidence``: layer statistics the
        caller already gathered on the calibration windows ``prune`` draws (else one pass collects them, the
        first time a reference is needed)."""
        settings.check()
        self.model, self.settings, self.keep = model, settings, (keep_first, keep_last)
        self.tokenizer, self.calibration = tokenizer, calibration
        self._reference_evidence, self.reference_passes, self.reference_seconds = reference_evidence, 0, 0.0
        ids = calibration_ids(tokenizer, calibration)
        split = split_calibration(tokenizer, calibration, ids=ids)
        own_heal_draw = healer is not None and heal_samples not in (None, calibration.samples)
        heal_split = split_calibration(tokenizer, calibration, heal_samples, ids) if own_heal_draw else split
        scoring, heldout = split.scoring, split.heldout
        self.windows = {"scoring_windows": int(scoring.shape[0]), "heldout_windows": int(heldout.shape[0]),
                        **split.record()}
        self.scoring_batches = batches(scoring, calibration.batch_size)
        self.heal_batches = batches(heal_split.scoring, calibration.batch_size)
        if healer is not None:
            self.windows["heal_windows"] = int(heal_split.scoring.shape[0])
        bound = None if healer is None else (lambda removed: healer(model, self.heal_batches, removed))
        self.objective = HeldoutObjective(model, batches(heldout, calibration.batch_size), settings.objective,
                                          split.blocks, bound)
        criteria = list(dict.fromkeys(["simdiff", *criteria]))
        start = time.perf_counter()
        self.evidence = gather_evidence(model, batches(scoring, calibration.batch_size, calibration.skip_first_token),
                                        needs_of(criteria), block_sizes_for(criteria, counts))
        self.calibration_seconds = time.perf_counter() - start
        self.criteria = criteria

    @property
    def reference_evidence(self) -> Evidence:
        """Layer statistics on the calibration windows as ``prune`` draws them (the margin's reference)."""
        if self._reference_evidence is None:
            start = time.perf_counter()
            self._reference_evidence = gather_evidence(
                self.model, calibration_batches(self.calibration, self.tokenizer), {LAYER_STATS})
            self.reference_passes, self.reference_seconds = 1, time.perf_counter() - start
        return self._reference_evidence

    def search(self, kind: str, count: int, options: Options) -> Search:
        """``kind="alpha"``: the alpha path only; ``kind="best-of"``: the pool's criteria, ``simdiff`` standing for
        its alpha path. The --margin reference (listed first) is the set plain ``prune`` saves at ``options.alpha``
        (a number: the default for --alpha auto, the given --alpha for best-of), chosen on all calibration windows;
        without simdiff in the pool, the first criterion's set on the scoring windows."""
        with_path = kind != BEST_OF or "simdiff" in self.settings.pool
        path, dropped = cap_candidates(alpha_path(self.evidence, count, options, *self.keep,
                                                  default_alpha=float(options.alpha)),
                                       self.settings.max_candidates) if with_path else ([], 0)
        pooled = [self._reference(count, options)] + path if with_path else []
        if kind == BEST_OF:
            for name in self.settings.pool:
                if name != "simdiff":
                    pooled.append(Candidate(choose_one_shot(name, self.evidence, count, options, *self.keep).removed,
                                            [name]))
        candidates = merge_duplicates(pooled)
        passes, seconds = self.objective.passes, self.objective.seconds
        fits, heal_seconds = len(self.objective.heals), self.objective.heal_seconds
        for candidate, value in zip(candidates, self.objective.scores([c.removed for c in candidates])):
            candidate.score = value
            candidate.heal = _heal_summary(self.objective.heals.get(tuple(candidate.removed)))
            log.info("%s removes %s: held-out %s %.5f", " / ".join(candidate.sources), candidate.removed,
                     self.settings.objective, value)
        winner = self._winner(candidates)
        log.info("%s for %d layers: %s wins (held-out %s %.5f, %d distinct candidates)", kind, count,
                 " / ".join(winner.sources), self.settings.objective, winner.score, len(candidates))
        costs = {**self.windows, "heldout_tokens": self.objective.tokens,
                 "calibration_passes": evidence_passes(needs_of(self.criteria), self.evidence.num_layers),
                 "calibration_seconds": self.calibration_seconds,
                 "reference_calibration_passes": self.reference_passes,
                 "reference_calibration_seconds": self.reference_seconds}
        healed = self.objective.healer is not None
        if healed:
            costs.update(heal_fits=len(self.objective.heals) - fits,
                         heal_seconds=self.objective.heal_seconds - heal_seconds,
                         heal_fitted_on=f"{self.windows['heal_windows']} windows drawn like the scoring ones, from "
                                        "the gaps between the held-out blocks (never a held-out token)")
        return Search(kind, count, winner, candidates, self.settings.objective, self.objective.describe(), dropped,
                      self.settings.max_candidates, self.objective.passes - passes,
                      self.objective.seconds - seconds, costs, healed)

    def _reference(self, count: int, options: Options) -> Candidate:
        """The margin's reference: the set plain ``prune`` saves at ``options.alpha`` (the default for
        ``--alpha auto``), chosen on all calibration windows as ``prune`` draws them, so leaving what a user
        gets without the search needs held-out evidence. Those windows may overlap held-out tokens, which can
        only favour this set: the bias is towards keeping it."""
        removed = choose_one_shot("simdiff", self.reference_evidence, count, options, *self.keep).removed
        alpha = float(options.alpha)
        return Candidate(removed, [f"simdiff alpha={alpha:.4f} on the calibration windows (plain prune's set)"],
                         alpha, statistics="calibration windows")

    def _winner(self, candidates: list[Candidate]) -> Candidate:
        """The lowest held-out score among the reference (listed first) and the candidates that beat it by more
        than ``margin`` paired standard errors both on the objective and on held-out next-token NLL (the same
        test twice for ``ppl``; all of them when the reference's own score is not finite); ties to the one
        listed first."""
        reference = candidates[0]
        for candidate in candidates:
            candidate.vs_default = list(self.objective.paired(candidate.removed, reference.removed))
            candidate.vs_default_nll = list(self.objective.paired(candidate.removed, reference.removed, "nll"))
        margin = self.settings.margin

        def beats(diff: list[float]) -> bool:
            return diff[0] < -margin * diff[1]

        eligible = [c for c in candidates if c is reference or margin <= 0 or not math.isfinite(reference.score)
                    or (beats(c.vs_default) and beats(c.vs_default_nll))]
        order = {id(c): i for i, c in enumerate(candidates)}

        def rank(c: Candidate) -> tuple[float, int]:
            return _finite_or_inf(c.score), order[id(c)]

        best, winner = min(candidates, key=rank), min(eligible, key=rank)
        if winner is not best:
            log.info("%s removes %s with a lower held-out score, but it beats the reference by %.4g ± %.4g "
                     "(paired SE) and its held-out NLL by %.4g ± %.4g: not both beyond --margin %g standard "
                     "errors; chose %s", " / ".join(best.sources), best.removed, -best.vs_default[0],
                     best.vs_default[1], -best.vs_default_nll[0], best.vs_default_nll[1], margin, winner.removed)
        return winner

    def selection(self, search: Search, options: Options) -> tuple[Selection, Options]:
        """The winner as a :class:`Selection` (exactly its removed set) and the options it implies."""
        if search.alpha is not None:
            options = replace(options, alpha=search.alpha)
        if search.kind == "alpha":  # the importance that ranks the saved set lowest
            evidence = self.reference_evidence if search.winner.statistics == "calibration windows" else self.evidence
            steps = [{"importance": importance("simdiff", evidence, options).tolist(), "search": "alpha",
                      "statistics": search.winner.statistics}]
            return Selection("simdiff", list(search.removed), steps), options
        return Selection(BEST_OF, list(search.removed), [{"search": BEST_OF, "winner": search.winner.sources}]), options


def _heal_summary(record) -> dict | None:
    """A candidate's heal fit, as its record states it (None without healing)."""
    if record is None:
        return None
    return {"folded_into": [r.folded_into for r in record.runs], "ridge": record.ridge, "weighting": record.weighting,
            "r2_calibration": [r.r2_calibration for r in record.runs], "seconds": record.seconds}


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def reject_auto(options: Options | None, what: str = "scoring") -> None:
    """Raise a clear error where alpha must be a number (auto needs a layer count to tune for)."""
    if options is not None and is_auto(options.alpha):
        raise SimdiffError(f"--alpha auto needs a number of layers to remove, which {what} does not have; "
                           "use it with prune/compare (--num-layers or --ratio) or give --alpha a number in [0, 1]")


def search_kind(criterion: str, options: Options, iterative: bool = False) -> str | None:
    """``"alpha"`` (simdiff with --alpha auto), ``"best-of"``, or None (a plain one-pass selection)."""
    if criterion == BEST_OF:
        kind = BEST_OF
    elif is_auto(options.alpha):
        if criterion != "simdiff":
            raise SimdiffError(f"--alpha auto tunes the simdiff criterion; {criterion!r} has no alpha (drop --alpha)")
        kind = "alpha"
    else:
        return None
    if iterative:
        raise SimdiffError(f"{'--alpha auto' if kind == 'alpha' else '--criterion best-of'} works with one-shot "
                           "selection; drop --iterative")
    return kind


def searched_options(options: Options) -> Options:
    """``options`` with a numeric alpha (the default) where it was ``auto``: the path sweeps alpha itself."""
    return replace(options, alpha=DEFAULT_ALPHA) if is_auto(options.alpha) else options
