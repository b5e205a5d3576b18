"""Choosing layers: counts from --num-layers/--ratio, ranking, ties, protected layers, blocks, iterative."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import tiny_model

from simdiff.criteria import Evidence, Options
from simdiff.data.windows import batches
from simdiff.errors import SimdiffError
from simdiff.pipeline import choose_iterative, choose_one_shot, gather_evidence, importance
from simdiff.select import protected_mask, resolve_count, select_block, select_layers


@pytest.mark.parametrize("total,ratio,expected", [(30, 0.25, 8), (30, 0.1, 3), (6, 0.5, 3), (8, 0.3, 2)])
def test_ratio_rounds(total: int, ratio: float, expected: int) -> None:
    assert resolve_count(total, ratio=ratio) == expected == round(ratio * total)


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


def test_iterative_removes_one_layer_at_a_time() -> None:
    model = tiny_model("llama", 5)
    calib = batches(torch.randint(4, 256, (2, 8), generator=torch.Generator().manual_seed(0)), 2)
    selection = choose_iterative(model, calib, "block_influence", 2, Options(), keep_first=1)
    assert len(selection.removed) == 2 and 0 not in selection.removed
    first, second = selection.steps
    assert first["removed"] == select_layers(np.array(first["importance"]), 1, keep_first=1)[0]
    assert np.isnan(second["importance"][first["removed"]])  # the removed layer is no longer scored
    assert sorted([first["removed"], second["removed"]]) == selection.removed
    with pytest.raises(SimdiffError, match="--iterative does not apply"):
        choose_iterative(model, calib, "angular_block", 2, Options())


def test_iterative_reuses_initial_evidence_for_its_first_step(monkeypatch) -> None:
    import simdiff.pipeline as pipeline

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
