"""The comparison report: a paper-style Markdown table (best per column marked) and a perplexity plot."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from simdiff.report.plots import _pyplot
from simdiff.report.tables import markdown_table


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def comparison_columns(document: dict) -> list[tuple[str, Callable[[dict], float | None], bool, int]]:
    """(header, getter, higher_is_better, digits) for each numeric column of the table."""
    metric = document["evaluation"].get("metric_for_retained", "acc")
    columns: list = []
    for source in document["evaluation"]["ppl"]:
        columns.append((f"{source} ppl ↓", lambda r, s=source: r["perplexity"].get(s, {}).get("perplexity"),
                        False, 2))
    tasks = document["evaluation"]["tasks"]
    for task in tasks:
        columns.append((f"{task} {metric} ↑", lambda r, t=task: r["tasks"].get(t, {}).get(metric), True, 3))
    if tasks:
        columns.append((f"avg {metric} ↑", lambda r: r.get(f"mean_{metric}"), True, 3))
        columns.append(("% retained ↑", lambda r: r.get("retained", {}).get("average", {}).get(metric), True, 1))
    for source in document["evaluation"]["ppl"]:
        columns.append((f"{source} ppl ratio ↓", lambda r, s=source: r.get("retained", {}).get("ppl_ratio", {})
                        .get(s), False, 2))
    return columns


def _best(rows: list[dict], getter, higher: bool) -> float | None:
    values = [v for v in (getter(r) for r in rows) if v is not None and math.isfinite(v)]
    if len(values) < 2 or min(values) == max(values):
        return None
    return max(values) if higher else min(values)


def comparison_markdown(document: dict) -> str:
    """results.md: settings, then one row per candidate; the best value per column and count is bold."""
    columns = comparison_columns(document)
    header = ["criterion", "removed", "layers", *(c[0] for c in columns), "time (s)"]
    rows = []
    by_count: dict[int, list[dict]] = {}
    for row in document["rows"]:
        by_count.setdefault(row["count"], []).append(row)
    for count in sorted(by_count):
        group = by_count[count]
        best = [_best(group, getter, higher) for _, getter, higher, _ in columns]
        for row in group:
            cells = [row["label"], str(count), ", ".join(map(str, row["removed_layers"])) or "–"]
            for (_, getter, _, digits), top in zip(columns, best):
                value = getter(row)
                text = _fmt(value, digits)
                cells.append(f"**{text}**" if top is not None and value is not None and value == top else text)
            cells.append(_fmt(row.get("seconds"), 0))
            rows.append(cells)
    ev, cal = document["evaluation"], document["calibration"]
    span = f", first {ev['max_tokens']} tokens" if ev["max_tokens"] else ", whole text"
    limit = f", first {ev['limit']} questions each" if ev["limit"] else ""
    lines = [
        f"# Layer-pruning comparison: {document['model']} ({document['num_layers']} layers)",
        "",
        f"- Perplexity: {', '.join(ev['ppl']) or 'none'} (test split), non-overlapping windows of {ev['seq_len']} "
        f"tokens{span}.",
        f"- Tasks (lm-eval, zero-shot): {', '.join(ev['tasks']) or 'none'}"
        f"{limit}; "
        f"% retained = mean {ev['metric_for_retained']} of the pruned model / mean of the dense model.",
        f"- Calibration: {cal['samples']} windows of {cal['seq_len']} tokens from {cal['source']} (validation), "
        f"seed {cal['seed']}; one pass for all statistic criteria ({cal['seconds']:.0f} s).",
        "- Bold: best among the candidates removing the same number of layers (when they differ).",
        "",
        markdown_table(header, rows),
        "",
        f"Command: `{document.get('command', '')}`",
        "",
    ]
    return "\n".join(lines)


def plot_perplexity_vs_removed(document: dict, path: str | Path, source: str | None = None) -> Path | None:
    """Perplexity (log scale) against layers removed, one line per criterion, the dense model at 0."""
    sources = document["evaluation"]["ppl"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    source = source or (sources[0] if sources else None)
    dense = next(r for r in document["rows"] if r["count"] == 0)
    if source is not None:
        dense_ppl = dense["perplexity"][source]["perplexity"]
        for label in document["criteria"]:
            rows = sorted((r for r in document["rows"] if r["label"] == label), key=lambda r: r["count"])
            xs = [0] + [r["count"] for r in rows]
            ys = [dense_ppl] + [r["perplexity"][source]["perplexity"] for r in rows]
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_yscale("log")
        ax.set_ylabel(f"{source} perplexity (log scale)")
    ax.set_xlabel("decoder layers removed")
    ax.set_title(f"perplexity after removing layers: {document['model']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
