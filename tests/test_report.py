"""The comparison report: bold only when standard errors separate, plots people read (PNG + SVG)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simdiff.report.comparison import comparison_markdown, perplexity_figure, plot_perplexity_vs_removed
from simdiff.report.plots import layer_rank_figure, plot_layer_ranks, removal_ranks
from simdiff.workflows.compare import removal_counts


def _row(label: str, count: int, removed: list[int], ppl: float, acc: float | None = None,
         ppl_se: float | None = None, acc_se: float | None = None, criterion: str | None = None, **extra) -> dict:
    report = {"perplexity": ppl, **({"perplexity_stderr": ppl_se} if ppl_se is not None else {})}
    tasks = {} if acc is None else {"piqa": {"acc": acc, **({"acc_stderr": acc_se} if acc_se is not None else {})}}
    return {"label": label, "criterion": criterion or label, "count": count, "removed_layers": removed,
            "perplexity": {"wikitext2": report}, "tasks": tasks, "mean_acc": acc, **extra}


def _document(rows: list[dict], tasks: bool = True) -> dict:
    labels = list(dict.fromkeys(r["label"] for r in rows if r["count"]))
    dense = rows[0]
    for row in rows[1:]:
        retained = {"ppl_ratio": {"wikitext2": row["perplexity"]["wikitext2"]["perplexity"]
                                  / dense["perplexity"]["wikitext2"]["perplexity"]}, "average": {}, "tasks": {}}
        if tasks:
            retained["average"]["acc"] = 100 * row["mean_acc"] / dense["mean_acc"]
        row["retained"] = retained
    return {"model": "m", "num_layers": 12, "counts": sorted({r["count"] for r in rows[1:]}), "criteria": labels,
            "rows": rows, "profiles": {},
            "evaluation": {"ppl": ["wikitext2"], "tasks": ["piqa"] if tasks else [], "seq_len": 64,
                           "max_tokens": None, "limit": None, "metric_for_retained": "acc"},
            "calibration": {"samples": 4, "seq_len": 32, "source": "wikitext2", "seed": 0, "seconds": 1.0}}


def _bold_cells(markdown: str, label: str) -> list[str]:
    line = next(ln for ln in markdown.splitlines() if ln.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.split("|") if "**" in cell]


@pytest.mark.parametrize("ppl_se, expect_bold", [(None, False), (3.0, False), (0.2, True)])
def test_best_is_bold_only_when_standard_errors_separate_it(ppl_se, expect_bold):
    rows = [_row("dense", 0, [], 10.0, ppl_se=ppl_se), _row("a", 2, [1, 2], 12.0, ppl_se=ppl_se),
            _row("b", 2, [3, 4], 14.0, ppl_se=ppl_se)]
    markdown = comparison_markdown(_document(rows, tasks=False))
    assert ("**12.00**" in _bold_cells(markdown, "a")) is expect_bold
    assert not _bold_cells(markdown, "b")


def test_accuracy_within_noise_is_not_bold():
    # 0.62 vs 0.60 on 200 questions (stderr ~0.034 each): not separated
    rows = [_row("dense", 0, [], 10.0, 0.64, 0.1, 0.034), _row("a", 2, [1, 2], 12.0, 0.62, 0.1, 0.034),
            _row("b", 2, [3, 4], 12.5, 0.60, 0.1, 0.035)]
    markdown = comparison_markdown(_document(rows))
    assert not any("0.620" in cell for cell in _bold_cells(markdown, "a"))
    assert "**12.00**" in _bold_cells(markdown, "a")  # perplexity 12.0 vs 12.5 with stderr 0.1 is separated


def test_removal_ranks_order_and_ties():
    ranks = removal_ranks(np.array([0.5, 0.1, np.nan, 0.1, 0.9]))
    assert ranks[3] == 1 and ranks[1] == 2  # tie: the deeper layer first, as select_layers removes
    assert ranks[0] == 3 and ranks[4] == 4 and math.isnan(ranks[2])


def test_rank_heatmap_marks_removed_cells(tmp_path):
    document = _document([_row("dense", 0, [], 10.0), _row("a", 2, [1, 3], 12.0), _row("a", 4, [0, 1, 2, 3], 20.0),
                          _row("b", 2, [4, 5], 15.0)], tasks=False)
    removed = removal_counts(document)
    assert removed == {"a": {0: 4, 1: 2, 2: 4, 3: 2}, "b": {4: 2, 5: 2}}
    scores = {"a": np.arange(6.0), "b": np.array([5.0, 4, 3, 2, 1, np.nan])}
    fig = layer_rank_figure(scores, removed=removed)
    ax = fig.axes[0]
    assert len(ax.patches) == 6  # one outline per removed (criterion, layer)
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in ax.texts
             if t.get_text().isdigit()}
    assert texts == {(0, 0): "4", (1, 0): "2", (2, 0): "4", (3, 0): "2", (4, 1): "2", (5, 1): "2"}
    out = plot_layer_ranks(scores, tmp_path / "ranks.png", removed=removed)
    assert out.read_bytes()[:4] == b"\x89PNG" and (tmp_path / "ranks.svg").read_text().lstrip().startswith("<?xml")


def test_perplexity_plot_clips_controls_and_draws_no_line_from_zero(tmp_path):
    rows = [_row("dense", 0, [], 10.0, 0.64, 0.2, 0.03), _row("simdiff", 4, [1, 2, 3, 4], 34.0, 0.60, 0.5, 0.03),
            _row("block_influence", 4, [1, 2, 3, 4], 34.0, 0.60, 0.5, 0.03, same_layers_as="simdiff -4"),
            _row("reverse", 4, [8, 9, 10, 11], 7600.0, 0.55, 90.0, 0.03)]
    fig = perplexity_figure(_document(rows))
    ppl_axis, retained_axis = fig.axes[:2]
    low, high = ppl_axis.get_ylim()
    assert low < 10.0 and 34.5 < high < 7600.0  # the dense reference is shown; the control does not stretch it
    dense_line, *drawn = ppl_axis.lines
    assert dense_line.get_linestyle() == ":" and dense_line.get_ydata()[0] == 10.0  # a reference, not a point
    for line in drawn:  # nothing is drawn at 0 removed layers (a single count has no line)
        assert min(np.asarray(line.get_xdata(), dtype=float)) > 3
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "block_influence = simdiff at 4" in labels and "reverse (control)" in labels
    off_scale = [t.get_text() for t in ppl_axis.get_legend().get_texts()]
    assert off_scale == ["reverse at 4: 7.6e+03"]
    assert retained_axis.get_ylabel().startswith("% of dense acc retained")
    # identical results are drawn side by side, not on top of each other
    centers = sorted(float(np.mean(line.get_xdata())) for line in ppl_axis.lines if len(line.get_xdata()) == 1
                     and line.get_marker() == "o")
    assert len(set(centers)) == len(centers)


def test_perplexity_plot_tolerates_missing_optional_fields(tmp_path):
    rows = [_row("dense", 0, [], 20.0), _row("a", 2, [1, 2], 30.0), _row("a", 4, [1, 2, 3, 4], 45.0)]
    out = plot_perplexity_vs_removed(_document(rows, tasks=False), tmp_path / "ppl.png")
    assert out.read_bytes()[:4] == b"\x89PNG" and (tmp_path / "ppl.svg").is_file()
