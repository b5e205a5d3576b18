"""Markdown table and perplexity-vs-layers-removed plots from a ``benchmarks/pruning_curve.py`` JSON.

    python benchmarks/curve_report.py runs/curve.json --img docs/img/curve   # prints the table, writes PNGs
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pruning_curve import selection_key, set_key

from simdiff.evaluate.suite import percent_retained
from simdiff.report.comparison import plot_perplexity_vs_removed
from simdiff.report.tables import markdown_table


def _short(source: str) -> str:
    return "python-docs" if "python3" in source else source


def _tasks(curve: dict) -> list[str]:
    return [t for t in curve["evaluation"].get("tasks", "").split(",") if t]


def compare_document(curve: dict, source: str) -> dict:
    """The curve's rows measured on ``source`` as a ``simdiff compare`` document, for the shared plot function:
    perplexity and, where the tasks were measured, % of the dense accuracy retained."""
    sets = curve["sets"]
    dense = sets["dense"]
    tasks = [t for t in _tasks(curve) if t in dense.get("tasks", {})]
    rows = [{"label": "dense", "criterion": "dense", "count": 0, "removed_layers": [],
             "perplexity": dense.get("perplexity", {}), "tasks": dense.get("tasks", {})}]
    for selection in curve["selections"]:
        entry = sets.get(selection_key(selection), {})
        if source in entry.get("perplexity", {}):
            row = {"label": selection["method"], "criterion": selection["method"].split(":")[0],
                   "count": selection["count"], "removed_layers": selection["removed"],
                   "perplexity": entry["perplexity"], "tasks": entry.get("tasks", {})}
            if all(t in row["tasks"] for t in tasks):
                row["retained"] = percent_retained(rows[0], row)
            rows.append(row)
    methods = list(dict.fromkeys(r["label"] for r in rows[1:]))
    return {"model": curve["model"], "rows": rows, "criteria": methods, "counts": curve["counts"],
            "evaluation": {"ppl": [source], "tasks": tasks}}


def _cell(report: dict | None) -> str:
    if not report or not math.isfinite(report.get("perplexity", math.nan)):
        return "–"
    return f"{report['perplexity']:.2f} ± {report['perplexity_stderr']:.2f}"


def _accuracy(scores: dict | None, dense: dict | None) -> list[str]:
    """``acc ± SE`` and % of the dense accuracy, or dashes when not measured."""
    if not scores:
        return ["–", "–"]
    retained = f"{100 * scores['acc'] / dense['acc']:.1f}" if dense else "–"
    return [f"{scores['acc']:.3f} ± {scores['acc_stderr']:.3f}", retained]


def paired(report: dict | None, rival: dict | None) -> str:
    """Mean per-window NLL difference against ``rival`` on the same windows, ± its standard error."""
    from simdiff.collect.nll import standard_error

    if not report or not rival:
        return "–"
    diffs = [a - b for a, b in zip(report["window_nll"], rival["window_nll"])]
    if not any(diffs):
        return "same set"
    mean, se = sum(diffs) / len(diffs), standard_error(diffs)
    return f"{mean:+.3f} ± {se:.3f}" + (" *" if abs(mean) >= 2 * se else "")


def table(curve: dict, rival_method: str = "block_influence") -> str:
    """Every method at every count: perplexity ± SE per text, the paired Δ NLL against ``rival_method``, task
    accuracy ± SE with % of dense retained, and the held-out passes a search spent."""
    sources = curve["evaluation"]["ppl"]
    tasks = _tasks(curve)
    header = ["removed", "method", "layers", *(f"{_short(s)} ppl ± SE" for s in sources),
              *(f"{_short(s)} Δ NLL vs {rival_method}" for s in sources),
              *(h for t in tasks for h in (f"{t} acc ± SE", f"{t} % retained")), "held-out passes"]
    dense = curve["sets"]["dense"]
    dense_tasks = dense.get("tasks", {})
    rows = [["0", "dense", "–", *(_cell(dense.get("perplexity", {}).get(s)) for s in sources),
             *("–" for _ in sources), *(c for t in tasks for c in _accuracy(dense_tasks.get(t), dense_tasks.get(t))),
             "–"]]
    for count in sorted({s["count"] for s in curve["selections"]}):
        rival = next((s for s in curve["selections"] if s["count"] == count and s["method"] == rival_method), None)
        rival_ppl = curve["sets"].get(selection_key(rival), {}).get("perplexity", {}) if rival else {}
        for selection in (s for s in curve["selections"] if s["count"] == count):
            entry = curve["sets"].get(selection_key(selection), {})
            ppl, scores = entry.get("perplexity", {}), entry.get("tasks", {})
            search = selection.get("search", {})
            rows.append([str(count), selection["method"], ", ".join(map(str, selection["removed"])),
                         *(_cell(ppl.get(s)) for s in sources),
                         *(paired(ppl.get(s), rival_ppl.get(s)) for s in sources),
                         *(c for t in tasks for c in _accuracy(scores.get(t), dense_tasks.get(t))),
                         str(search.get("heldout_passes", "–"))])
    return markdown_table(header, rows)


def search_table(curve: dict) -> str:
    """Every held-out candidate of every search, one row per count and set: who proposed it, its alpha range,
    its held-out score under each objective (healed searches apart) with the paired difference from the
    search's reference (the default alpha's set; since issue 17 the set plain ``prune`` saves)
    (± SE, in nats per token), and which methods chose it."""
    def label(search: dict) -> str:
        return search["objective"] + (" healed" if search.get("healed") else "")

    objectives = sorted({label(s["search"]) for s in curve["selections"] if "search" in s})
    header = ["removed", "candidate set", "proposed by", "α range",
              *(h for o in objectives for h in (f"held-out {o}", f"{o} vs reference (z)", "NLL vs reference (z)")),
              "chosen by"]
    table: dict[tuple[int, str], dict] = {}
    for selection in curve["selections"]:
        search = selection.get("search")
        if not search:
            continue
        for c in search["candidates"]:
            row = table.setdefault((selection["count"], set_key(c["removed"])), {"sources": [], "range": None,
                                                                                "scores": {}, "chosen": []})
            row["sources"] += [x.replace("simdiff alpha=", "simdiff α=") for x in c["sources"]
                               if x.replace("simdiff alpha=", "simdiff α=") not in row["sources"]]
            row["range"] = row["range"] or c.get("alpha_range")
            row["scores"][label(search)] = (c["score"], c.get("vs_default"),
                                            c.get("vs_default_nll") or row["scores"].get(label(search), (0, 0, None))[2])
            if c["removed"] == search["removed"] and selection["method"] not in row["chosen"]:
                row["chosen"].append(selection["method"])
    rows = []
    for (count, key), row in sorted(table.items(), key=lambda kv: (kv[0][0], kv[1]["scores"].get("kl", (0,))[0])):
        span = "–" if row["range"] is None else f"{row['range'][0]:.3f}–{row['range'][1]:.3f}"
        cells = []
        for objective in objectives:
            score, *diffs = row["scores"].get(objective, (None, None, None))
            cells.append("–" if score is None else f"{score:.4f}")
            for vs in diffs:
                z = "" if not vs or not vs[1] else f" ({vs[0] / vs[1]:+.1f})"
                cells.append("–" if not vs else ("reference" if vs == [0.0, 0.0] else
                                                 f"{vs[0]:+.4f} ± {vs[1]:.4f}{z}"))
        rows.append([str(count), key.replace(",", ", "), " / ".join(row["sources"]), span, *cells,
                     ", ".join(row["chosen"]) or "–"])
    return markdown_table(header, rows)


def _selection(curve: dict, method: str, count: int) -> dict | None:
    return next((s for s in curve["selections"] if s["method"] == method and s["count"] == count), None)


def _ppl_change(entry: dict, base: dict, source: str) -> str:
    """``base → entry`` perplexity on ``source`` with the % change and the paired Δ NLL (± SE, * beyond 2 SE)."""
    new, old = entry.get("perplexity", {}).get(source), base.get("perplexity", {}).get(source)
    if not new or not old:
        return "–"
    change = 100 * (new["perplexity"] / old["perplexity"] - 1)
    return f"{old['perplexity']:.2f} → {new['perplexity']:.2f} ({change:+.1f}%, {paired(new, old)})"


def _acc_change(entry: dict, base: dict, task: str) -> str:
    new, old = entry.get("tasks", {}).get(task), base.get("tasks", {}).get(task)
    if not new or not old:
        return "–"
    return f"{old['acc']:.3f} → {new['acc']:.3f} ({new['acc'] - old['acc']:+.3f})"


def versus_table(curve: dict, pairs: list[tuple[str, str]]) -> str:
    """Per count and ``(method, base)`` pair: ``base``'s and ``method``'s perplexity on every text with the change
    and the paired Δ NLL of ``method`` minus ``base`` (same windows), and task accuracy, both sets by name."""
    sources, tasks = curve["evaluation"]["ppl"], _tasks(curve)
    header = ["removed", "method vs base", "sets", *(f"{_short(s)}: base → method (change, Δ NLL)" for s in sources),
              *(f"{t} acc: base → method" for t in tasks)]
    rows = []
    for count in sorted({s["count"] for s in curve["selections"]}):
        for method, base in pairs:
            mine, theirs = _selection(curve, method, count), _selection(curve, base, count)
            if not mine or not theirs:
                continue
            entry, ref = curve["sets"].get(selection_key(mine), {}), curve["sets"].get(selection_key(theirs), {})
            names = "same set" if selection_key(mine) == selection_key(theirs) else \
                f"{selection_key(theirs)} / {selection_key(mine)}"
            rows.append([str(count), f"{method} vs {base}", names, *(_ppl_change(entry, ref, s) for s in sources),
                         *(_acc_change(entry, ref, t) for t in tasks)])
    return markdown_table(header, rows)


def against_table(curve: dict, other: dict, label: str) -> str:
    """Every set both curves measured (same key, e.g. the same healed set fitted two ways): ``other``'s and
    ``curve``'s perplexity per text with the paired Δ NLL (``curve`` minus ``other``, same windows), and tasks."""
    sources, tasks = curve["evaluation"]["ppl"], _tasks(curve)
    header = ["set", *(f"{_short(s)}: {label} → this (change, Δ NLL)" for s in sources),
              *(f"{t} acc: {label} → this" for t in tasks)]
    rows = []
    for key, entry in curve["sets"].items():
        theirs = other.get("sets", {}).get(key)
        if theirs is None or key == "dense" or "reused_from" in entry:
            continue
        rows.append([key, *(_ppl_change(entry, theirs, s) for s in sources), *(_acc_change(entry, theirs, t) for t in tasks)])
    return markdown_table(header, rows)


def draws_table(curve: dict, source: str = "wikitext2") -> str:
    """Per count, each criterion over its calibration draws (``METHOD`` is seed 0, ``METHOD:seed=K`` the
    others): the distinct sets it chose with how often, and the mean perplexity over draws."""
    by: dict[tuple[str, int], list[list[int]]] = {}
    for s in curve["selections"]:
        base, _, seed = s["method"].partition(":seed=")
        if seed or any(x["method"] == f"{s['method']}:seed=1" for x in curve["selections"]):
            by.setdefault((base, s["count"]), []).append(s["removed"])
    header = ["removed", "criterion", "draws", "sets chosen (times): perplexity", f"mean {source} ppl over draws"]
    rows = []
    for (base, count), sets in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ppl = [curve["sets"].get(set_key(r), {}).get("perplexity", {}).get(source, {}).get("perplexity") for r in sets]
        chosen = {}
        for removed, value in zip(sets, ppl):
            chosen.setdefault(set_key(removed), [0, value])[0] += 1
        cells = "; ".join(f"[{k.replace(',', ', ')}] ({n}): {'–' if v is None else f'{v:.2f}'}"
                          for k, (n, v) in sorted(chosen.items(), key=lambda kv: -kv[1][0]))
        mean = "–" if None in ppl else f"{sum(ppl) / len(ppl):.2f}"
        rows.append([str(count), base, str(len(sets)), cells, mean])
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json")
    parser.add_argument("--img", default=None, help="PNG prefix: one plot per perplexity source")
    parser.add_argument("--methods", default=None, help="comma-separated methods to show (default: all)")
    parser.add_argument("--versus", default=None,
                        help="comma-separated METHOD/BASE pairs: a table of METHOD against BASE at every count, "
                             "e.g. simdiff+heal/simdiff,alpha-auto:kl/simdiff")
    parser.add_argument("--against", default=None,
                        help="OTHER.json[:LABEL]: the sets this curve measured itself that OTHER also has, paired "
                             "(e.g. the same healed sets fitted another way)")
    parser.add_argument("--draws", action="store_true",
                        help="also print the calibration-draw table (methods named METHOD:seed=K)")
    args = parser.parse_args()
    curve = json.loads(Path(args.json).read_text(encoding="utf-8"))
    if args.draws:
        print(draws_table(curve))
        print()
    if args.against:
        path, _, label = args.against.partition(":")
        print(against_table(curve, json.loads(Path(path).read_text(encoding="utf-8")), label or "other"))
        print()
    if args.methods:
        keep = args.methods.split(",")
        curve["selections"] = [s for s in curve["selections"] if s["method"] in keep]
    if args.versus:
        print(versus_table(curve, [tuple(pair.split("/")) for pair in args.versus.split(",")]))
        print()
    print(table(curve))
    print()
    print(search_table(curve))
    if args.img:
        for source in curve["evaluation"]["ppl"]:
            if source in curve["sets"]["dense"].get("perplexity", {}):
                plot_perplexity_vs_removed(compare_document(curve, source), f"{args.img}_{_short(source)}.png", source)


if __name__ == "__main__":
    main()
