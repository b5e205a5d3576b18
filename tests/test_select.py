"""Choosing layers: counts from --num-layers/--ratio, ranking, ties, protected layers, blocks, iterative."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import tiny_model

from simdiff.core.errors import SimdiffError
from simdiff.criteria import Evidence, Options
from simdiff.data.windows import batches
from simdiff.selection.evidence import choose_iterative, choose_one_shot, gather_evidence, importance
from simdiff.selection.rank import protected_mask, resolve_count, select_block, select_layers


@pytest.mark.parametrize("total,ratio,expected", [(30, 0.25, 8), (30, 0.1, 3), (6, 0.5, 3), (8, 0.3, 2),
                                                  (26, 0.25, 7), (22, 0.25, 6), (10, 0.25, 3), (18, 0.25, 5)])
def test_ratio_rounds_half_up(total: int, ratio: float, expected: int) -> None:
    assert resolve_count(total, ratio=ratio) == expected  # 6.5 -> 7 and 5.5 -> 6: no banker's rounding


def test_num_layers_passes_through() -> None:
    assert resolve_count(30, num_layers=4) == 4
    assert resolve_count(6, num_layers=5) == 5


@pytest.mark.parametrize("kwargs,message", [
    ({}, "exactly one of"),
    ({"num_layers": 2, "ratio": 0.5}, "exactly one of"),
    ({"num_layers": 0}, "remove 0 layers.*remove at least 1"),
    ({"num_layers": -2}, "remove -2 layers"),
    ({"num_layers": 6}, "remove 6 layers but the model has 6"),
    ({"num_layers": 9}, "remove 9 layers but the model has 6"),
    ({"ratio": 0.99}, "remove 6 layers but the model has 6"),  # rounds to all
    ({"ratio": 0.05}, "remove 0 layers"),  # rounds to none
    ({"ratio": 1.0}, "--ratio must lie strictly between 0 and 1"),
    ({"ratio": -0.5}, "--ratio must lie strictly between 0 and 1"),
])
def test_count_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(SimdiffError, match=message):
        resolve_count(6, **kwargs)


def test_select_lowest_importance() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2])
    assert select_layers(scores, 1) == [1]
    assert select_layers(scores, 3) == [1, 3, 5]  # returned sorted by index


def test_ties_break_towards_the_deeper_layer() -> None:
    scores = np.array([0.5, 0.2, 0.2, 0.9, 0.2])
    assert select_layers(scores, 1) == [4]
    assert select_layers(scores, 2) == [2, 4]
    assert select_block(np.array([0.3, 0.1, 0.1, 0.5]), 2) == [2, 3]


def test_protected_layers_and_exclusions() -> None:
    scores = np.array([0.0, 0.1, 0.9, 0.8, 0.2, 0.05])
    assert select_layers(scores, 2) == [0, 5]
    assert select_layers(scores, 2, keep_first=1, keep_last=1) == [1, 4]
    assert select_layers(scores, 2, keep_first=2, keep_last=1, exclude=[4]) == [2, 3]
    assert select_layers(np.array([np.nan, 0.5, 0.1, np.nan]), 1) == [2]  # NaN = not a candidate
    assert protected_mask(5, 1, 2).tolist() == [False, True, True, False, False]
    with pytest.raises(SimdiffError, match="only 2 are removable with --keep-first 2 --keep-last 2"):
        select_layers(scores, 3, keep_first=2, keep_last=2)
    with pytest.raises(SimdiffError, match=">= 0"):
        select_layers(scores, 1, keep_first=-1)


def test_select_block() -> None:
    block = np.array([0.4, 0.3, 0.1, 0.2])  # starts 0..3 for n=3 in a 6-layer model
    assert select_block(block, 3) == [2, 3, 4]
    assert select_block(block, 3, keep_last=2) == [1, 2, 3]
    assert select_block(block, 3, keep_first=3) == [3, 4, 5]
    with pytest.raises(SimdiffError, match="no block of 3 layers fits"):
        select_block(block, 3, keep_first=2, keep_last=2)


def test_one_shot_matches_ranking_and_is_deterministic() -> None:
    model = tiny_model("llama", 6)
    calib = batches(torch.randint(4, 256, (4, 10), generator=torch.Generator().manual_seed(0)), 2)
    evidence = gather_evidence(model, calib, {"layer_stats"}, block_sizes=[1, 2])
    options = Options()
    for name in ("simdiff", "block_influence", "mssd"):
        scores = importance(name, evidence, options)
        selection = choose_one_shot(name, evidence, 2, options)
        assert selection.removed == sorted(np.argsort(scores)[:2].tolist())
        assert choose_one_shot(name, evidence, 2, options).removed == selection.removed
    block = choose_one_shot("angular_block", evidence, 2, options)
    angles = evidence.layer_stats.angular(2)
    start = int(np.argmin(angles))
    assert block.removed == [start, start + 1]
    assert choose_one_shot("reverse", Evidence(6), 2, options).removed == [3, 4]


@torch.no_grad()
def _block_influence_by_hand(model, windows: torch.Tensor, bypassed: list[int]) -> np.ndarray:
    """1 - mean cos(input, output) of each layer from output_hidden_states, with ``bypassed`` layers skipped.

    hidden_states[l] is the input of layer l; the last entry is after the final norm, so the last layer is
    not covered (NaN)."""
    from simdiff.model.layers import bypass_layers

    with bypass_layers(model, bypassed):
        states = model(windows, output_hidden_states=True).hidden_states
    n = len(states) - 1
    out = np.full(n, np.nan)
    for layer in range(n - 1):
        x, y = states[layer].reshape(-1, states[layer].shape[-1]), states[layer + 1].reshape(-1, states[layer].shape[-1])
        out[layer] = 1 - float(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).mean())
    return out


def test_iterative_step_two_is_block_influence_with_the_first_layer_bypassed() -> None:
    model = tiny_model("llama", 6)
    windows = torch.randint(4, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    selection = choose_iterative(model, batches(windows, 2), "block_influence", 2, Options(), keep_first=1, keep_last=1)
    first, second = selection.steps
    dense = _block_influence_by_hand(model, windows, [])
    np.testing.assert_allclose(first["importance"][:5], dense[:5], rtol=1e-5)
    assert first["removed"] == 1 + int(np.argmin(dense[1:5]))
    after = _block_influence_by_hand(model, windows, [first["removed"]])
    candidates = [i for i in range(1, 5) if i != first["removed"]]
    np.testing.assert_allclose([second["importance"][i] for i in candidates], after[candidates], rtol=1e-5)
    assert second["removed"] == min(candidates, key=lambda i: after[i])
    assert np.isnan(second["importance"][first["removed"]])  # the removed layer is no longer scored
    assert selection.removed == sorted([first["removed"], second["removed"]])
    with pytest.raises(SimdiffError, match="--iterative does not apply"):
        choose_iterative(model, batches(windows, 2), "angular_block", 2, Options())


@pytest.mark.parametrize("criterion,field", [("ppl_skip", "skip_loss_increase"), ("taylor", "taylor")])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_model_scores_are_an_error_not_an_exclusion(criterion: str, field: str, bad: float) -> None:
    values = np.array([0.3, 0.1, bad, 0.2])
    with pytest.raises(SimdiffError, match=f"{criterion} score of layer 2 is {bad}"):
        choose_one_shot(criterion, Evidence(4, **{field: values}), 1, Options())


def test_the_cost_of_scoring_is_stated_before_it_starts(caplog) -> None:
    import logging

    model = tiny_model("llama", 5)
    calib = batches(torch.randint(4, 256, (2, 8), generator=torch.Generator().manual_seed(0)), 2)
    with caplog.at_level(logging.INFO, logger="simdiff.selection.evidence"):
        gather_evidence(model, calib, {"layer_stats", "skip_loss", "taylor"})
    first = caplog.records[0].getMessage()
    assert "6 loss passes (ppl_skip" in first and "forward+backward" in first and "2 calibration windows" in first


def test_iterative_reuses_initial_evidence_for_its_first_step(monkeypatch) -> None:
    import simdiff.selection.evidence as pipeline

    model = tiny_model("llama")
    calib = batches(torch.randint(4, 256, (2, 8), generator=torch.Generator().manual_seed(0)), 2)
    initial = gather_evidence(model, calib, {"layer_stats"})
    fresh = choose_iterative(model, calib, "block_influence", 3, Options())
    calls = []
    real = pipeline.gather_evidence
    monkeypatch.setattr(pipeline, "gather_evidence", lambda *a, **k: calls.append(k.get("removed")) or real(*a, **k))
    reused = choose_iterative(model, calib, "block_influence", 3, Options(), initial=initial)
    assert reused.removed == fresh.removed
    for a, b in zip(reused.steps, fresh.steps):
        np.testing.assert_array_equal(a["importance"], b["importance"])  # NaN (removed layers) compare equal
    assert len(calls) == 2 and all(removed for removed in calls)  # steps 2 and 3 only, with layers bypassed


def test_resolve_counts_merges_counts_and_rounds_ratios_like_resolve_count():
    """compare and `run` of a comparison resolve several counts through the same rule as prune's one count."""
    from simdiff.selection.rank import resolve_counts

    assert resolve_counts(30, [8, 4, 8]) == [4, 8]
    assert resolve_counts(26, ratios=[0.25, 0.5]) == [7, 13]  # floor(R * total + 0.5), as prune rounds
    assert resolve_counts(22, ratios=[0.25]) == [resolve_count(22, ratio=0.25)] == [6]
    with pytest.raises(SimdiffError, match="model has 6; keep at least one"):
        resolve_counts(6, [2, 6])
    with pytest.raises(SimdiffError, match="at least one layer count"):
        resolve_counts(6)
