"""benchmarks/heal_lora.py's arithmetic on hand-made curves (the benchmark itself trains for minutes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from heal_lora import steps_to_reach, summarize  # noqa: E402


def _curve(*points: tuple[int, float]) -> list[dict]:
    return [{"step": s, "loss": x} for s, x in points]


def test_steps_to_reach_interpolates_between_evaluations():
    curve = _curve((0, 5.0), (5, 4.5), (10, 4.0), (15, 3.5))
    assert steps_to_reach(curve, 4.2) == pytest.approx(8.0)  # 4.5 -> 4.0 over steps 5..10: 0.3 / 0.5 of the way
    assert steps_to_reach(curve, 4.0) == pytest.approx(10.0)
    assert steps_to_reach(curve, 5.5) == 0.0  # already there before training
    assert steps_to_reach(curve, 3.0) is None  # never within the run


def test_steps_to_reach_takes_the_first_crossing():
    assert steps_to_reach(_curve((0, 5.0), (5, 3.9), (10, 4.1), (15, 3.8)), 4.0) == pytest.approx(5 * 1.0 / 1.1)


def test_summary_pairs_the_two_runs():
    def record(before: float, after: float, curve: list[dict]) -> dict:
        return {"removed_layers": [3, 4], "recovery": {
            "perplexity": {"before": before, "after": after, "tokens": 100, "seq_len": 50},
            "heldout_curve": curve, "train_seconds": 1.0, "settings": {"steps": 10}}}

    plain = record(120.0, 50.0, _curve((0, 4.8), (5, 4.2), (10, 3.9)))
    healed = {**record(70.0, 45.0, _curve((0, 4.4), (5, 4.0), (10, 3.8))),
              "heal": {"method": "linear", "ridge": 1e-4, "passes": 2, "seconds": 3.0, "changed_layers": [2]}}
    summary = summarize(plain, healed)
    assert summary["test_perplexity"] == {"plain": 120.0, "healed": 70.0, "lora": 50.0, "heal_then_lora": 45.0,
                                          "tokens": 100, "seq_len": 50}
    assert summary["healed_heldout_loss_before_training"] == 4.4
    assert summary["lora_steps_to_reach_healed_heldout_loss"] == pytest.approx(5 * 0.4 / 0.6)
