"""Markdown table and perplexity-vs-layers-removed plots from a ``benchmarks/pruning_curve.py`` JSON.

    python benchmarks/curve_report.py runs/curve.json --img docs/img/curve   # prints the table, writes PNGs
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from simdiff.report.comparison import plot_perplexity_vs_removed
from simdiff.report.tables import markdown_table


def _short(source: str) -> str:
    return "python-docs" if "python3" in source else source


def compare_document(curve: dict, source: str) -> dict:
    """The curve's rows measured on ``source`` as a ``simdiff compare`` document, for the shared plot function."""
    sets = curve["sets"]
    rows = [{"label": "dense", "count": 0, "removed_layers": [], "perplexity": sets["dense"].get("perplexity", {})}]
    for selection in curve["selections"]:
        key = ",".join(map(str, selection["removed"]))
        if source in sets.get(key, {}).get("perplexity", {}):
            rows.append({"label": selection["method"], "count": selection["count"],
                         "removed_layers": selection["removed"], "perplexity": sets[key]["perplexity"]})
    methods = list(dict.fromkeys(r["label"] for r in rows[1:]))
    return {"model": curve["model"], "rows": rows, "criteria": methods,
            "evaluation": {"ppl": [source]}}


def _cell(report: dict | None) -> str:
    if not report or not math.isfinite(report.get("perplexity", math.nan)):
        return "–"
    return f"{report['perplexity']:.2f} ± {report['perplexity_stderr']:.2f}"


def paired(report: dict | None, rival: dict | None) -> str:
    """Mean per-window NLL difference against ``rival`` on the same windows, ± its standard error."""
    from simdiff.evaluate.perplexity import standard_error

    if not report or not rival:
        return "–"
    diffs = [a - b for a, b in zip(report["window_nll"], rival["window_nll"])]
    if not any(diffs):
        return "same set"
    mean, se = sum(diffs) / len(diffs), standard_error(diffs)
    return f"{mean:+.3f} ± {se:.3f}" + (" *" if abs(mean) >= 2 * se else "")


def table(curve: dict, rival_method: str = "block_influence") -> str:
    sources = curve["evaluation"]["ppl"]
    header = ["removed", "method", "layers", *(f"{_short(s)} ppl ± SE" for s in sources),
              *(f"{_short(s)} Δ NLL vs {rival_method}" for s in sources), "held-out passes"]
    dense = curve["sets"]["dense"].get("perplexity", {})
    rows = [["0", "dense", "–", *(_cell(dense.get(s)) for s in sources), *("–" for _ in sources), "–"]]
    for count in sorted({s["count"] for s in curve["selections"]}):
        rival = next((s for s in curve["selections"] if s["count"] == count and s["method"] == rival_method), None)
        rival_ppl = curve["sets"].get(",".join(map(str, rival["removed"])), {}).get("perplexity", {}) if rival else {}
        for selection in (s for s in curve["selections"] if s["count"] == count):
            entry = curve["sets"].get(",".join(map(str, selection["removed"])), {}).get("perplexity", {})
            search = selection.get("search", {})
            rows.append([str(count), selection["method"], ", ".join(map(str, selection["removed"])),
                         *(_cell(entry.get(s)) for s in sources),
                         *(paired(entry.get(s), rival_ppl.get(s)) for s in sources),
                         str(search.get("heldout_passes", "–"))])
    return markdown_table(header, rows)


def search_table(curve: dict) -> str:
    """Every candidate of each best-of search (the alpha path's sets and the pooled criteria's) with its score."""
    header = ["removed", "candidate set", "proposed by", "α range", "held-out score", "chosen by"]
    rows = []
    for selection in curve["selections"]:
        if not selection["method"].startswith("best-of"):
            continue
        search = selection["search"]
        auto = next((s["removed"] for s in curve["selections"] if s["count"] == selection["count"]
                     and s["method"] == "alpha-auto:" + search["objective"]), None)
        for c in search["candidates"]:
            chosen = [name for name, hit in (("alpha auto", c["removed"] == auto),
                                             ("best-of", c["removed"] == search["removed"])) if hit]
            span = "–" if c["alpha_range"] is None else f"{c['alpha_range'][0]:.3f}–{c['alpha_range'][1]:.3f}"
            rows.append([str(selection["count"]), ", ".join(map(str, c["removed"])),
                         " / ".join(x.replace("simdiff alpha=", "simdiff α=") for x in c["sources"]), span,
                         f"{c['score']:.4f}", ", ".join(chosen) or "–"])
    return markdown_table(header, sorted(rows, key=lambda r: (int(r[0]), float(r[4]))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json")
    parser.add_argument("--img", default=None, help="PNG prefix: one plot per perplexity source")
    args = parser.parse_args()
    curve = json.loads(Path(args.json).read_text(encoding="utf-8"))
    print(table(curve))
    print()
    print(search_table(curve))
    if args.img:
        for source in curve["evaluation"]["ppl"]:
            if source in curve["sets"]["dense"].get("perplexity", {}):
                plot_perplexity_vs_removed(compare_document(curve, source), f"{args.img}_{_short(source)}.png", source)


if __name__ == "__main__":
    main()
