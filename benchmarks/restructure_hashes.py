"""Hashes of a tiny prune, score, compare, apply, eval and recipe `run` (fixed seeds, fixed paths).

Run before and after a refactoring that must not change behaviour; the two lists must be equal:

    PYTHONPATH=. python benchmarks/restructure_hashes.py /tmp/hashes-before.txt

Volatile fields (creation time, wall-clock seconds, package versions) are dropped from JSON files and
from the model card before hashing; every other byte (weights, tokenizer, tables, stdout) is hashed as is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

ROOT = Path("/tmp/simdiff-restructure-hashes")  # fixed: the command lines (recorded in outputs) must match
CALIB = ["--samples", "4", "--calib-seq-len", "32", "--calib-batch-size", "2", "--seed", "3"]
EVAL = ["--eval-seq-len", "32", "--max-tokens", "320", "--eval-batch-size", "4"]
VOLATILE = {"created", "versions", "date"}  # and every key ending in "seconds"


def scrub(value):
    """``value`` without the volatile keys (recursively)."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in VOLATILE and not k.endswith("seconds")}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def digest(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".json":
        with contextlib.suppress(ValueError):
            data = json.dumps(scrub(json.loads(data)), sort_keys=True).encode()
    elif path.suffix in (".md", ".txt"):
        text = re.sub(r"\d{4}-\d\d-\d\dT[\d:+.]+", "<time>", data.decode("utf-8", "replace"))
        text = re.sub(r"\b\d+\.\d+ ?s\b|\(\d+ s\)", "<secs>", text)
        text = re.sub(r"(?m)\| \d+ \|$", "| <secs> |", text)  # results.md: the seconds column
        data = re.sub(r"(?m)^.*(transformers|torch|simdiff) \d+\.\d+.*$", "<versions>", text).encode()
    elif path.suffix in (".png", ".svg", ".pdf"):
        return "(plot, not hashed)"
    return hashlib.sha256(data).hexdigest()[:16]


def simdiff(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run([sys.executable, "-m", "simdiff", "-q", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr}")
    (ROOT / "stdout").mkdir(exist_ok=True)
    (ROOT / "stdout" / f"{name}.txt").write_text(done.stdout, encoding="utf-8")
    return done.stdout


def hashes(root: Path) -> list[str]:
    """One ``digest  path`` line per output file under ``root``."""
    return [f"{digest(p)}  {p.relative_to(root)}" for p in sorted(root.rglob("*")) if p.is_file()
            and p.relative_to(root).parts[0] not in ("llama", "calib.txt", "recipe.yaml")]


def main(report: str) -> None:
    from tiny import save_tiny, write_calibration_text

    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir()
    save_tiny("llama", ROOT / "llama")
    write_calibration_text(ROOT / "calib.txt")
    common = ["--calib", "calib.txt", *CALIB]
    simdiff("score", "score", "llama", *common, "--json", "score.json")
    simdiff("prune", "prune", "llama", "--num-layers", "2", *common, "--out", "pruned")
    simdiff("prune_auto", "prune", "llama", "--num-layers", "2", "--criterion", "simdiff:alpha=auto", *common,
            "--out", "pruned_auto")
    simdiff("compare", "compare", "llama", "--num-layers", "1,2", "--criterion",
            "simdiff,block_influence,reverse,best-of", *common, "--ppl", "wikitext2", *EVAL, "--out", "compared")
    simdiff("apply", "apply", "llama", "--recipe", "pruned/simdiff.json", "--out", "applied")
    simdiff("eval", "eval", "pruned", "--ppl", "wikitext2", *EVAL, "--baseline", "llama", "--json", "eval.json")
    (ROOT / "recipe.yaml").write_text(
        "model:\n  name: llama\ncalibration:\n  source: calib.txt\n  samples: 4\n  seq_len: 32\n"
        "  batch_size: 2\n  seed: 3\nselection:\n  criterion: block_influence\n  num_layers: 1\n"
        "evaluation:\n  ppl: [wikitext2]\n  seq_len: 32\n  max_tokens: 320\n  batch_size: 4\n"
        "out: ran\n", encoding="utf-8")
    simdiff("run", "run", "recipe.yaml")
    lines = hashes(ROOT)
    Path(report).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/dev/stdout")
