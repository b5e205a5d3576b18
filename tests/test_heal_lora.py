"""benchmarks/heal_lora.py's arithmetic on hand-made curves (the benchmark itself trains for minutes)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from heal_lora import paired_change, question_scores, steps_to_reach, summarize  # noqa: E402


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


def test_question_scores_reads_lm_eval_records_in_doc_order(tmp_path):
    records = [{"doc_id": 2, "acc": 1.0, "acc_norm": 0.0}, {"doc_id": 0, "acc": 0.0, "acc_norm": 1.0},
               {"doc_id": 1, "acc": 1.0, "acc_norm": 1.0}]
    (tmp_path / "samples_piqa_2026-12-05T06-03-11.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert question_scores(tmp_path, "piqa") == {"acc": [0, 1, 1], "acc_norm": [1, 1, 0]}
    (tmp_path / "samples_piqa_2026-12-06T00-00-00.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(SystemExit, match="expected one"):  # two evaluations in one folder: which one?
        question_scores(tmp_path, "piqa")


def test_paired_change_is_the_mean_difference_with_its_standard_error():
    # differences 1, 0, 0, -1, 1: mean 0.2, sample variance 0.7, SE sqrt(0.7 / 5)
    change = paired_change([1, 1, 0, 0, 1], [0, 1, 0, 1, 0])
    assert change["change"] == pytest.approx(0.2) and change["questions"] == 5
    assert change["se"] == pytest.approx(math.sqrt(0.7 / 5))
    with pytest.raises(ValueError):  # different questions cannot be paired
        paired_change([1, 0], [1, 0, 1])
