"""The one way layers are chosen: ``prune``, ``compare``, ``run`` and the benchmarks all call :func:`choose`.

A criterion spec picks the road: a plain criterion ranks once (or re-scores after each removal with
``iterative``); ``simdiff:alpha=auto`` and ``best-of`` are chosen on held-out calibration windows by a
:class:`~simdiff.selection.search.Searcher` built with :func:`make_searcher` (one pool definition).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from simdiff.config.settings import Options, SearchSettings
from simdiff.criteria import Evidence
from simdiff.data.windows import Batch
from simdiff.selection.evidence import Selection, choose_iterative, choose_one_shot
from simdiff.selection.search import Searcher, search_kind, searched_options
from simdiff.selection.spec import BEST_OF


@dataclass
class Choice:
    """What :func:`choose` chose: the selection, the options it was made under (alpha resolved for
    ``alpha=auto``), the search kind (None, ``"alpha"`` or ``"best-of"``) and the search record."""

    selection: Selection
    options: Options
    kind: str | None = None
    search: object = None  # simdiff.selection.search's result (to_dict() goes into the outputs)


def search_pool(kinds: set[str | None], settings: SearchSettings) -> tuple[str, ...] | list[str]:
    """The criteria a held-out search scores: best-of's ``--pool``, else simdiff's alpha path alone."""
    return settings.pool if BEST_OF in kinds else ("simdiff",)


def make_searcher(model: nn.Module, tokenizer, calibration, settings: SearchSettings, counts: list[int],
                  kinds: set[str | None], keep_first: int = 0, keep_last: int = 0,
                  reported: Sequence[str] | None = None, healer=None,
                  reference_evidence: Evidence | None = None, heal_samples: int | None = None) -> Searcher | None:
    """The held-out searcher the search ``kinds`` need (None when every candidate is plain); ``reported``:
    the criteria its evidence is scored for (default: the pool); ``healer``: score every set healed, fitted on
    ``heal_samples`` windows (:class:`~simdiff.selection.search.Searcher`); ``reference_evidence``: statistics
    already gathered on the calibration windows (spares the searcher that pass)."""
    kinds = set(kinds) - {None}
    if not kinds:
        return None
    pool = search_pool(kinds, settings)
    return Searcher(model, tokenizer, calibration, settings, counts, list(reported) if reported is not None
                    else pool, keep_first, keep_last, healer, reference_evidence, heal_samples)


def choose(criterion: str, count: int, options: Options, evidence: Evidence | None = None,
           searcher: Searcher | None = None, keep_first: int = 0, keep_last: int = 0, iterative: bool = False,
           model: nn.Module | None = None, batches: Sequence[Batch] | None = None) -> Choice:
    """Choose ``count`` layers to remove with ``criterion`` (a spec's criterion, ``options`` its options).

    Plain: from ``evidence`` (one-shot) or re-collected on ``model``/``batches`` (``iterative``, starting
    from ``evidence``). ``alpha=auto`` / ``best-of``: by ``searcher`` on held-out windows.
    """
    kind = search_kind(criterion, options, iterative)
    if kind is not None:
        search = searcher.search(kind, count, searched_options(options))
        selection, chosen = searcher.selection(search, searched_options(options))
        return Choice(selection, chosen, kind, search)
    if iterative:
        return Choice(choose_iterative(model, batches, criterion, count, options, keep_first, keep_last,
                                       initial=evidence), options)
    return Choice(choose_one_shot(criterion, evidence, count, options, keep_first, keep_last), options)
