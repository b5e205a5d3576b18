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


def table(curve: dict) -> str:
    sources = curve["evaluation"]["ppl"]
    header = ["removed", "method", "layers", *(f"{_short(s)} ppl" for s in sources), "held-out passes"]
    rows = [["0", "dense", "–", *(_cell(curve["sets"]["dense"].get("perplexity", {}).get(s)) for s in sources), "–"]]
    for count in sorted({s["count"] for s in curve["selections"]}):
        for selection in (s for s in curve["selections"] if s["count"] == count):
            entry = curve["sets"].get(",".join(map(str, selection["removed"])), {})
            search = selection.get("search", {})
            rows.append([str(count), selection["method"], ", ".join(map(str, selection["removed"])),
                         *(_cell(entry.get("perplexity", {}).get(s)) for s in sources),
                         str(search.get("heldout_passes", "–"))])
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json")
    parser.add_argument("--img", default=None, help="PNG prefix: one plot per perplexity source")
    args = parser.parse_args()
    curve = json.loads(Path(args.json).read_text(encoding="utf-8"))
    print(table(curve))
    if args.img:
        for source in curve["evaluation"]["ppl"]:
            if source in curve["sets"]["dense"].get("perplexity", {}):
                plot_perplexity_vs_removed(compare_document(curve, source), f"{args.img}_{_short(source)}.png", source)


if __name__ == "__main__":
    main()
