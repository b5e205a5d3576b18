"""Healing against LoRA, side by side in one run: does ``--heal linear`` replace training, or help it?

Prunes the same layers twice (plain and ``--heal linear``), then LoRA-recovers both with identical settings
(same windows in the same order: the training order is a pure function of ``--seed`` and the step), and prints:

- the held-out loss curve of both runs (the recover command's held-out windows; step 0 is before training),
- how many LoRA steps the plain prune needs to reach the healed prune's held-out loss before any training
  (linear interpolation between evaluations),
- test perplexity (the recover command's before/after measurement) of plain, healed, LoRA and heal + LoRA.

    python benchmarks/heal_lora.py --work /tmp/heal-lora --json heal_lora.json \\
        --prune "--num-layers 8" --recover "--steps 40 --lr 5e-4 --eval-every 5 --max-tokens 16384 --eval-seq-len 512"
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


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
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", required=True, help="a new folder for the four outputs")
    parser.add_argument("--prune", default="--num-layers 8", help="extra `simdiff prune` arguments")
    parser.add_argument("--recover", default="--steps 40 --lr 5e-4 --eval-every 5 --max-tokens 16384 "
                                             "--eval-seq-len 512", help="extra `simdiff recover` arguments")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    work = Path(args.work)
    seconds = {}
    for name, heal in (("plain", []), ("healed", ["--heal", "linear"])):
        seconds[f"prune {name}"] = run(["prune", args.model, *shlex.split(args.prune), *heal,
                                        "--out", str(work / name)])
    for name in ("plain", "healed"):
        seconds[f"recover {name}"] = run(["recover", str(work / name), *shlex.split(args.recover),
                                          "--out", str(work / f"{name}-lora")])
    records = {name: json.loads((work / f"{name}-lora" / "simdiff.json").read_text(encoding="utf-8"))
               for name in ("plain", "healed")}
    summary = {**summarize(records["plain"], records["healed"]), "wall_seconds": seconds,
               "commands": {"prune": args.prune, "recover": args.recover}, "model": args.model}
    Path(args.json).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(report(summary))


if __name__ == "__main__":
    main()
