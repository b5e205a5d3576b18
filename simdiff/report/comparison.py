"""The comparison report: a paper-style Markdown table (best per column marked) and a perplexity plot."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simdiff.report.plots import _pyplot, save_figure
from simdiff.report.tables import markdown_table


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


Column = tuple[str, Callable[[dict], float | None], bool, int, Callable[[dict], float | None]]
SEPARATION = 1.96  # a best value is bold when it beats the runner-up by this many combined standard errors


def _get(mapping: dict, *keys):
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _mean_stderr(row: dict, tasks: list[str], metric: str) -> float | None:
    """Standard error of the mean accuracy over tasks (tasks independent); None when one is missing."""
    errors = [_get(row, "tasks", t, f"{metric}_stderr") for t in tasks]
    if not errors or any(e is None for e in errors):
        return None
    return math.sqrt(sum(e * e for e in errors)) / len(errors)


def _scaled(value: float | None, reference: float | None, scale: float = 1.0) -> float | None:
    """``value`` relative to a reference taken as exact (the dense model's figure), for ratio columns."""
    return scale * value / reference if value is not None and reference else None


def comparison_columns(document: dict) -> list[Column]:
    """(header, getter, higher_is_better, digits, standard-error getter) for each numeric column."""
    metric = document["evaluation"].get("metric_for_retained", "acc")
    dense = next((r for r in document["rows"] if r["count"] == 0), {})
    columns: list = []
    for source in document["evaluation"]["ppl"]:
        columns.append((f"{source} ppl ↓", lambda r, s=source: _get(r, "perplexity", s, "perplexity"), False, 2,
                        lambda r, s=source: _get(r, "perplexity", s, "perplexity_stderr")))
    tasks = document["evaluation"]["tasks"]
    for task in tasks:
        columns.append((f"{task} {metric} ↑", lambda r, t=task: _get(r, "tasks", t, metric), True, 3,
                        lambda r, t=task: _get(r, "tasks", t, f"{metric}_stderr")))
    if tasks:
        dense_mean = sum(_get(dense, "tasks", t, metric) or 0.0 for t in tasks) / len(tasks)
        columns.append((f"avg {metric} ↑", lambda r: r.get(f"mean_{metric}"), True, 3,
                        lambda r: _mean_stderr(r, tasks, metric)))
        columns.append(("% retained ↑", lambda r: _get(r, "retained", "average", metric), True, 1,
                        lambda r: _scaled(_mean_stderr(r, tasks, metric), dense_mean, 100.0)))
    for source in document["evaluation"]["ppl"]:
        dense_ppl = _get(dense, "perplexity", source, "perplexity")
        columns.append((f"{source} ppl ratio ↓", lambda r, s=source: _get(r, "retained", "ppl_ratio", s), False, 2,
                        lambda r, s=source, d=dense_ppl: _scaled(_get(r, "perplexity", s, "perplexity_stderr"), d)))
    return columns


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _best(rows: list[dict], getter, higher: bool, stderr) -> float | None:
    """The best value when standard errors separate it from the runner-up (by ``SEPARATION``), else None.

    Rows that evaluated the same layers (``same_layers_as``) count once.
    """
    ranked = sorted(((getter(r), stderr(r)) for r in rows if _finite(getter(r)) and not r.get("same_layers_as")),
                    key=lambda pair: pair[0], reverse=higher)
    if len(ranked) < 2:
        return None
    (best, best_se), (second, second_se) = ranked[0], ranked[1]
    if not (_finite(best_se) and _finite(second_se)):
        return None
    return best if abs(best - second) > SEPARATION * math.hypot(best_se, second_se) else None


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
        best = [_best(group, getter, higher, stderr) for _, getter, higher, _, stderr in columns]
        for row in group:
            cells = [row["label"], str(count), ", ".join(map(str, row["removed_layers"])) or "–"]
            for (_, getter, _, digits, _), top in zip(columns, best):
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
        f"- Bold: best among the candidates removing the same number of layers, only when it beats the runner-up "
        f"by more than {SEPARATION} combined standard errors (accuracy: lm-eval's; perplexity: over windows; "
        "ratios take the dense figure as exact). Without standard errors nothing is bold.",
        "",
        markdown_table(header, rows),
        "",
        f"Command: `{document.get('command', '')}`",
        "",
    ]
    return "\n".join(lines)


CONTROLS = ("random", "reverse")  # criteria that bound the range, not candidates


@dataclass
class Panel:
    """One measure against layers removed: value and standard error of a row, the dense reference."""

    ylabel: str
    value: Callable[[dict], float | None]
    stderr: Callable[[dict], float | None]
    dense: float
    log: bool


def _panels(document: dict, source: str | None) -> list[Panel]:
    ev = document["evaluation"]
    metric = ev.get("metric_for_retained", "acc")
    dense = next(r for r in document["rows"] if r["count"] == 0)
    panels = []
    if source is not None:
        panels.append(Panel(f"{source} perplexity (log scale)", lambda r: _get(r, "perplexity", source, "perplexity"),
                            lambda r: _get(r, "perplexity", source, "perplexity_stderr"),
                            dense["perplexity"][source]["perplexity"], True))
    tasks = ev["tasks"]
    if tasks:
        dense_mean = sum(_get(dense, "tasks", t, metric) or 0.0 for t in tasks) / len(tasks)
        panels.append(Panel(f"% of dense {metric} retained (mean over {', '.join(tasks)})",
                            lambda r: _get(r, "retained", "average", metric),
                            lambda r: _scaled(_mean_stderr(r, tasks, metric), dense_mean, 100.0), 100.0, False))
    return panels


def _useful_range(values: list[tuple[float, float]], dense: float, log: bool) -> tuple[float, float]:
    """Axis limits spanning the candidates' values ± errors and the dense reference, with a margin."""
    low = min([dense] + [max(v - e, v / 2) if log else v - e for v, e in values])
    high = max([dense] + [v + e for v, e in values])
    if log:
        return low / 1.12, high * 1.25
    pad = 0.08 * (high - low or 1.0)
    return low - pad, high + pad


def _error_or_zero(stderr: float | None) -> float:
    """A standard error to draw: 0 (no bar) where the results carry none or a non-finite one."""
    return stderr if _finite(stderr) else 0.0


def _candidate_rows(document: dict, label: str) -> list[dict]:
    return sorted((r for r in document["rows"] if r["label"] == label and r["count"] > 0), key=lambda r: r["count"])


def _draw_panel(ax, document: dict, panel: Panel, offsets: dict[str, float]) -> dict:
    """Draw every criterion on ``ax``; returns {legend label: handle}. Controls dashed, off-scale at the edge."""
    labels = document["criteria"]
    controls = {lb for lb in labels if any(r["criterion"] in CONTROLS for r in _candidate_rows(document, lb))}
    points = {lb: [(r["count"], panel.value(r), _error_or_zero(panel.stderr(r)), r.get("same_layers_as"))
                   for r in _candidate_rows(document, lb) if _finite(panel.value(r))] for lb in labels}
    kept = [(v, e) for lb in labels if lb not in controls for _, v, e, _ in points[lb]]
    if not kept:
        kept = [(v, e) for lb in labels for _, v, e, _ in points[lb]]
    low, high = _useful_range(kept, panel.dense, panel.log)
    if panel.log:
        ax.set_yscale("log")
    ax.set_ylim(low, high)
    ax.axhline(panel.dense, color="black", linestyle=":", linewidth=1)
    handles = {"dense (no layer removed)": ax.lines[-1]}
    colors = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    control_styles = iter([("#555555", "s"), ("#999999", "D"), ("#bbbbbb", "^")] * len(labels))
    off_scale = []
    for index, label in enumerate(labels):
        series = points[label]
        if not series:
            continue
        control = label in controls
        color, marker = next(control_styles) if control else (colors[index % len(colors)], "o")
        style = {"color": color, "linestyle": "--" if control else "-", "marker": marker,
                 "markerfacecolor": "none" if control else color, "markersize": 5, "linewidth": 1.2}
        inside = [(c + offsets[label], v, e) for c, v, e, _ in series if low <= v <= high]
        outside = [(c, c + offsets[label], v) for c, v, _, _ in series if not low <= v <= high]
        if len(series) > 1:
            ax.plot([c + offsets[label] for c, *_ in series], [min(max(v, low), high) for _, v, _, _ in series],
                    **{**style, "marker": None}, alpha=0.6)
        handle = None
        if inside:
            xs, ys, es = zip(*inside)
            lower = [min(e, 0.9 * y) if panel.log else e for y, e in zip(ys, es)]
            handle = ax.errorbar(xs, ys, yerr=[lower, es], capsize=2, **{**style, "linestyle": "none"})
        for count, x, value in outside:
            edge = high if value > high else low
            drawn = ax.plot([x], [edge], marker="^" if value > high else "v", color=color, markersize=7,
                            clip_on=False, linestyle="none")[0]
            handle = handle or drawn
            off_scale.append((drawn, f"{label} at {count}: {value:.3g}"))
        same = sorted({s.replace(" -", " at ") for *_, s in series if s})
        name = label + (" (control)" if control else "") + (f" = {', '.join(same)}" if same else "")
        handles[name] = handle
    ax.set_xticks(document["counts"])
    if len(document["counts"]) == 1:
        ax.set_xlim(document["counts"][0] - 1, document["counts"][0] + 1)
    ax.set_xlabel("decoder layers removed")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3, which="both")
    if panel.log:
        from matplotlib.ticker import FuncFormatter

        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    if off_scale:  # placed where it hides the fewest points
        ax.legend([h for h, _ in off_scale], [t for _, t in off_scale], title="off-scale, marked at the edge",
                  title_fontsize=7, fontsize=7, loc="best", framealpha=0.9)
    return handles


def plot_perplexity_vs_removed(document: dict, path: str | Path, source: str | None = None) -> Path | None:
    """Write :func:`perplexity_figure` as PNG and SVG; None when nothing was measured."""
    fig = perplexity_figure(document, source)
    return save_figure(fig, path) if fig is not None else None


def perplexity_figure(document: dict, source: str | None = None):
    """Perplexity (log) and % retained against layers removed, ± one standard error where the results carry
    them; criteria offset sideways so identical results stay visible; controls dashed and, beyond the
    candidates' range, marked at the edge with their value. None when nothing was measured."""
    sources = document["evaluation"]["ppl"]
    panels = _panels(document, source or (sources[0] if sources else None))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.8), squeeze=False)
    labels = document["criteria"]
    gaps = np.diff(sorted(set(document["counts"]))) if len(set(document["counts"])) > 1 else np.array([4.0])
    width = min(0.12, 0.7 * float(gaps.min()) / max(len(labels), 1))
    offsets = {lb: (i - (len(labels) - 1) / 2) * width for i, lb in enumerate(labels)}
    handles: dict = {}
    for ax, panel in zip(axes[0], panels):
        handles.update({k: v for k, v in _draw_panel(ax, document, panel, offsets).items() if v is not None})
    fig.suptitle(f"after removing layers: {document['model']} (± 1 standard error where measured)")
    fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(4, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig
