"""Healing against LoRA, side by side in one run: does ``--heal linear`` replace training, or help it?

Prunes the same layers twice (plain and ``--heal linear``), then LoRA-recovers both with identical settings
(same windows in the same order: the training order is a pure function of ``--seed`` and the step), and prints:

- the held-out loss curve of both runs (the recover command's held-out windows; step 0 is before training),
- how many LoRA steps the plain prune needs to reach the healed prune's held-out loss before any training
  (linear interpolation between evaluations),
- test perplexity (the recover command's before/after measurement) of plain, healed, LoRA and heal + LoRA,
- with ``--tasks``, task accuracy of all four (``simdiff eval --log-samples`` on each saved folder), each change
  paired question by question (lm-eval's per-question records): does either repair move the task at all?

    python benchmarks/heal_lora.py --work /tmp/heal-lora --json heal_lora.json \\
        --prune "--num-layers 8" --recover "--steps 40 --lr 5e-4 --eval-every 5 --max-tokens 16384 --eval-seq-len 512" \\
        --tasks piqa --limit 0 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("plain", "healed", "plain-lora", "healed-lora")
PAIRS = (("healed", "plain"), ("plain-lora", "plain"), ("healed-lora", "plain"), ("healed-lora", "plain-lora"))


def run(command: list[str]) -> float:
    """Run a ``simdiff`` command (this interpreter's), failing loudly; its wall seconds."""
    start = time.perf_counter()
    print("$ simdiff " + shlex.join(command), flush=True)
    subprocess.run([sys.executable, "-m", "simdiff", *command], check=True)
    return time.perf_counter() - start


def steps_to_reach(curve: list[dict], target: float) -> float | None:
    """The first step where the held-out ``curve`` reaches ``target`` loss, interpolated linearly between
    evaluations; None when it never does."""
    for before, after in zip(curve, curve[1:]):
        if after["loss"] <= target:
            if before["loss"] <= target:
                return float(before["step"])
            share = (before["loss"] - target) / (before["loss"] - after["loss"])
            return before["step"] + share * (after["step"] - before["step"])
    return float(curve[0]["step"]) if curve and curve[0]["loss"] <= target else None


def saved(folder: Path) -> bool:
    """Whether ``folder`` holds a finished simdiff output (its record is written last)."""
    return (folder / "simdiff.json").is_file()


def question_scores(folder: Path, task: str) -> dict[str, list[int]]:
    """0/1 per question, by lm-eval ``doc_id``, for each accuracy metric (``acc``, ``acc_norm``) the task reports,
    from the one ``samples_<task>_*.jsonl`` in ``folder``."""
    files = sorted(folder.glob(f"samples_{task}_*.jsonl"))
    if len(files) != 1:
        raise SystemExit(f"expected one samples_{task}_*.jsonl in {folder}, found {len(files)}")
    records = [json.loads(line) for line in files[0].read_text(encoding="utf-8").splitlines() if line.strip()]
    records.sort(key=lambda r: r["doc_id"])
    return {metric: [int(r[metric]) for r in records] for metric in ("acc", "acc_norm") if metric in records[0]}


def paired_change(mine: list[int], other: list[int]) -> dict:
    """Mean accuracy change on the same questions and its paired standard error."""
    from simdiff.collect.nll import standard_error

    diffs = [float(a - b) for a, b in zip(mine, other, strict=True)]
    return {"change": sum(diffs) / len(diffs), "se": standard_error(diffs), "questions": len(diffs)}


def task_accuracy(work: Path, tasks: list[str], limit: int, data_dir: str | None, seconds: dict) -> dict:
    """Every task's accuracies (``"piqa acc"``, ``"piqa acc_norm"``) on the four saved models, and the paired
    changes of ``PAIRS``; each evaluation's wall seconds go into ``seconds`` ("kept" where an earlier run's is)."""
    out: dict = {}
    for name in MODELS:
        folder = work / "evals" / name
        seconds[f"eval {name}"] = "kept" if folder.is_dir() else run(
            ["eval", str(work / name), "--ppl", "", "--tasks", ",".join(tasks), "--log-samples", "--quiet",
             "--json", str(folder / "eval.json"), *(["--limit", str(limit)] if limit else []),
             *(["--data-dir", data_dir] if data_dir else [])])
    for task in tasks:
        scores = {name: question_scores(work / "evals" / name, task) for name in MODELS}
        for metric in scores["plain"]:
            correct = {name: by_metric[metric] for name, by_metric in scores.items()}
            out[f"{task} {metric}"] = {"acc": {name: sum(c) / len(c) for name, c in correct.items()},
                                       "paired": {f"{a} vs {b}": paired_change(correct[a], correct[b])
                                                  for a, b in PAIRS}}
    return out


def summarize(plain: dict, healed: dict) -> dict:
    """Both runs' recovery records reduced to the comparison."""
    p, h = plain["recovery"], healed["recovery"]
    start = h["heldout_curve"][0]
    return {
        "removed_layers": plain["removed_layers"],
        "heal": {k: healed["heal"][k] for k in ("method", "ridge", "passes", "seconds", "changed_layers")},
        "test_perplexity": {"plain": p["perplexity"]["before"], "healed": h["perplexity"]["before"],
                            "lora": p["perplexity"]["after"], "heal_then_lora": h["perplexity"]["after"],
                            "tokens": p["perplexity"]["tokens"], "seq_len": p["perplexity"]["seq_len"]},
        "heldout": {"plain_then_lora": p["heldout_curve"], "heal_then_lora": h["heldout_curve"]},
        "lora_steps_to_reach_healed_heldout_loss": steps_to_reach(p["heldout_curve"], start["loss"]),
        "healed_heldout_loss_before_training": start["loss"],
        "train_seconds": {"plain": p["train_seconds"], "healed": h["train_seconds"]},
        "settings": p["settings"],
    }


def report(summary: dict) -> str:
    ppl = summary["test_perplexity"]
    lines = [f"removed layers: {summary['removed_layers']}",
             f"test perplexity ({ppl['tokens']} tokens, windows of {ppl['seq_len']}): plain {ppl['plain']:.2f}, "
             f"healed {ppl['healed']:.2f}, LoRA {ppl['lora']:.2f}, heal + LoRA {ppl['heal_then_lora']:.2f}",
             "", "| step | held-out loss, LoRA on the plain prune | held-out loss, LoRA on the healed prune |",
             "|---:|---:|---:|"]
    healed = {row["step"]: row["loss"] for row in summary["heldout"]["heal_then_lora"]}
    for row in summary["heldout"]["plain_then_lora"]:
        other = healed.get(row["step"])
        lines.append(f"| {row['step']} | {row['loss']:.4f} | {'–' if other is None else f'{other:.4f}'} |")
    reach = summary["lora_steps_to_reach_healed_heldout_loss"]
    lines += ["", f"LoRA steps for the plain prune to reach the healed prune's held-out loss "
                  f"({summary['healed_heldout_loss_before_training']:.4f}): "
                  f"{'never, within the run' if reach is None else f'{reach:.1f}'}",
              f"heal: {summary['heal']['passes']} partial calibration passes in {summary['heal']['seconds']:.1f} s; "
              f"LoRA training {summary['train_seconds']['plain']:.0f} s (plain) and "
              f"{summary['train_seconds']['healed']:.0f} s (healed)"]
    for task, scores in summary.get("tasks", {}).items():
        lines += ["", f"{task}: " + ", ".join(f"{name} {acc:.3f}" for name, acc in scores["acc"].items())]
        lines += [f"  {pair}: {p['change']:+.3f} ± {p['se']:.3f}{' *' if abs(p['change']) >= 2 * p['se'] else ''} "
                  f"({p['questions']} questions)" for pair, p in scores["paired"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", required=True,
                        help="a folder for the four outputs; outputs and task evaluations already saved there are kept, "
                             "not redone (use a new folder for other --prune, --recover, --tasks or --limit)")
    parser.add_argument("--prune", default="--num-layers 8", help="extra `simdiff prune` arguments")
    parser.add_argument("--recover", default="--steps 40 --lr 5e-4 --eval-every 5 --max-tokens 16384 "
                                             "--eval-seq-len 512", help="extra `simdiff recover` arguments")
    parser.add_argument("--tasks", default="", help="lm-eval tasks scored on all four models (default: none)")
    parser.add_argument("--limit", type=int, default=0, help="questions per task (0: all)")
    parser.add_argument("--data-dir", default=None, help="as `simdiff eval --data-dir`")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    work = Path(args.work)
    seconds = {}
    for name, heal in (("plain", []), ("healed", ["--heal", "linear"])):
        seconds[f"prune {name}"] = "kept" if saved(work / name) else run(
            ["prune", args.model, *shlex.split(args.prune), *heal, "--out", str(work / name)])
    for name in ("plain", "healed"):
        seconds[f"recover {name}"] = "kept" if saved(work / f"{name}-lora") else run(
            ["recover", str(work / name), *shlex.split(args.recover), "--out", str(work / f"{name}-lora")])
    records = {name: json.loads((work / f"{name}-lora" / "simdiff.json").read_text(encoding="utf-8"))
               for name in ("plain", "healed")}
    summary = {**summarize(records["plain"], records["healed"]), "wall_seconds": seconds,
               "commands": {"prune": args.prune, "recover": args.recover}, "model": args.model}
    if args.tasks:
        summary["tasks"] = task_accuracy(work, args.tasks.split(","), args.limit, args.data_dir, seconds)
    Path(args.json).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(report(summary))


if __name__ == "__main__":
    main()
