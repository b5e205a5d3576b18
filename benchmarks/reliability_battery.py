"""Bad-input and fault battery: every case a subprocess, on a tiny random model written to a temp folder.

Cases cover the CLI (``python -m simdiff``), the Python API (``python -c`` snippets), ``simdiff run`` recipes,
``torchrun`` with 2 gloo processes (prune, score, compare, run with an evaluation section) and a SIGKILL of one
rank mid-run. None repeats a case of tests/test_inputs.py or docs/reliability.md. For each case it records the
exit status, whether a refusal was one stderr line with exit 2, whether a Python traceback appeared, whether the
model was loaded before a refusal (refusal cases run with the loader replaced by one that fails), and what was
left on disk: leftover ``.tmp-``/``.old-``/lock files, a half-written output, an input changed (every input
file is hashed before and after each case).

    SIMDIFF_DATA_DIR=/path/to/data PYTHONPATH=. python benchmarks/reliability_battery.py [--only TEXT] [--keep]

Prints a markdown table and a summary line; exits 1 when any invariant fails. About 5-10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TIMEOUT = 300
LEFTOVER = re.compile(r"\.tmp-|\.old-|simdiff-lock")
TRACEBACK = "Traceback (most recent call last)"
NOT_KILLED = "BATTERY: rank 1 was never seen alive; nothing was killed"
# The loader guard: refusal cases must be refused before any model is loaded.
GUARD = textwrap.dedent("""
    import os, sys
    if os.environ.get("BATTERY_NO_LOAD"):
        import simdiff.model, simdiff.model.load
        def _loaded(*args, **kwargs):
            raise RuntimeError("BATTERY: the model was loaded before the refusal")
        simdiff.model.load_model = simdiff.model.load.load_model = _loaded
""")
CLI = GUARD + "from simdiff.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
API = GUARD + textwrap.dedent("""
    import simdiff
    from simdiff.core.errors import SimdiffError
    try:
        exec(sys.argv[1])
    except SimdiffError as exc:
        print(f"simdiff: error: {exc}", file=sys.stderr)
        sys.exit(2)
""")


@dataclass
class Case:
    """One subprocess. ``expect``: refuse (exit 2, one stderr line, nothing loaded), ok (exit 0, output complete),
    or killed (non-zero; what it leaves is checked by the next case)."""

    name: str
    kind: str  # cli, api, run, torchrun, kill
    args: list[str] = field(default_factory=list)  # simdiff arguments, or [code] for api
    expect: str = "refuse"
    message: str = ""  # a refusal's line must contain this
    out: str | None = None  # the output (relative to the work folder): absent after a refusal, complete after ok
    note: str = ""  # expected to change with another branch's fix


@dataclass
class Result:
    case: Case
    code: int
    seconds: float
    one_line: bool | None
    traceback: bool
    loaded: bool
    left: list[str]
    problems: list[str]


# -- the workspace -----------------------------------------------------------------------------------------
def build_workspace(root: Path) -> None:
    """Inputs under root/in (hashed around every case), outputs under root/out."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_apply import custom_code_checkpoint
    from test_gguf import write_tiny_gguf
    from tiny import save_tiny, write_calibration_text

    inputs, outputs = root / "in", root / "out"
    inputs.mkdir()
    outputs.mkdir()
    save_tiny("llama", inputs / "llama")
    write_calibration_text(inputs / "calib.txt")
    (inputs / "eval.txt").write_text((inputs / "calib.txt").read_text()[-6000:], encoding="utf-8")
    (inputs / "empty.txt").write_text("", encoding="utf-8")
    os.environ.setdefault("HF_MODULES_CACHE", str(root / "modules"))
    custom_code_checkpoint(inputs / "llama", inputs / "custom")
    write_tiny_gguf(inputs / "tiny.gguf")
    other = inputs / "notes"  # a folder of the user's that no --out may touch
    other.mkdir()
    (other / "notes.txt").write_text("precious", encoding="utf-8")
    simdiff(["-q", "prune", str(inputs / "llama"), "--layers", "1", "--out", str(inputs / "round1")])
    simdiff(["-q", "apply", str(inputs / "round1"), "--layers", "2", "--out", str(inputs / "round2")])
    simdiff(["-q", "apply", str(inputs / "llama"), "--layers", "0,1,2", "--out", str(inputs / "three")])
    recipe = {"removed_layers": [1], "num_layers_before": 6, "model_type": "qwen2"}
    (inputs / "qwen2-recipe.json").write_text(json.dumps(recipe), encoding="utf-8")
    (inputs / "list.json").write_text("[1, 2]", encoding="utf-8")
    write_recipes(inputs, outputs)


def simdiff(args: list[str]) -> None:
    subprocess.run([PY, "-m", "simdiff", *args], check=True, cwd=REPO, capture_output=True, timeout=TIMEOUT)


CALIB_SMALL = {"samples": 4, "seq_len": 32, "batch_size": 2, "heldout_samples": 4}


def write_recipes(inputs: Path, outputs: Path) -> None:
    base = {"model": {"name": str(inputs / "llama")},
            "calibration": {"source": str(inputs / "calib.txt"), **CALIB_SMALL},
            "selection": {"num_layers": 2}}
    evaluation = {"ppl": [str(inputs / "eval.txt")], "tasks": [], "seq_len": 64, "max_tokens": 1024}
    recipes = {
        "heldout1": {**base, "calibration": {**base["calibration"], "heldout_samples": 1}},
        "nothing-to-eval": {**base, "evaluation": {"ppl": [], "tasks": []}},
        "eval-seq1": {**base, "evaluation": {**evaluation, "seq_len": 1}},
        "no-name": {**base, "model": {"name": ""}},
        "two-counts": {**base, "selection": {"num_layers": 2, "layers": [1]}},
        "empty-pool": {**base, "search": {"pool": []}},
        "ratio2": {**base, "selection": {"ratio": 2.0}},
        "no-out": base,
        "comparison-no-eval": {**base, "selection": {"criterion": "simdiff,mssd", "num_layers": 2}},
        "export-local": {**base, "export": "gguf"},
        "offload-iterative": {**base, "model": {**base["model"], "offload": "layerwise"},
                              "selection": {"num_layers": 2, "iterative": True}},
        "calib-missing": {**base, "calibration": {**base["calibration"], "source": str(inputs / "nope.txt")}},
        "eval": {**base, "evaluation": evaluation},
        "eval-dist": {**base, "evaluation": evaluation},
        "compare-eval": {**base, "selection": {"criterion": "simdiff,mssd", "num_layers": 2},
                         "evaluation": evaluation},
    }
    for name, recipe in recipes.items():
        (inputs / f"recipe-{name}.json").write_text(json.dumps(recipe), encoding="utf-8")


# -- the cases ---------------------------------------------------------------------------------------------
def cases(root: Path) -> list[Case]:
    i, o = root / "in", root / "out"
    m, calib = str(i / "llama"), ["--calib", str(i / "calib.txt"), "--samples", "4", "--calib-seq-len", "32",
                                  "--calib-batch-size", "2", "--heldout-samples", "4"]
    cpu = ["--device", "cpu"]

    def prune(name, extra, message="", expect="refuse", out="p"):
        return Case(name, "cli", ["-q", "prune", m, *calib, *extra, "--out", str(o / out)], expect, message, out)

    def api(name, code, message="", expect="refuse", out="a"):
        code = code.replace("{m}", m).replace("{o}", str(o / (out or "unused"))).replace("{i}", str(i))
        return Case(name, "api", [code],
                    expect, message, out)

    def run(name, recipe, message="", expect="refuse", out="r", extra=()):
        return Case(name, "run", ["-q", "run", str(i / f"recipe-{recipe}.json"), *extra,
                                  *(["--out", str(o / out)] if out else [])], expect, message, out)

    def apply(name, model, extra, message="", expect="refuse", out="ap"):
        return Case(name, "cli", ["-q", "apply", model, *extra, "--out", str(o / out)], expect, message, out)

    def torchrun(name, args, expect="ok", out=None, note=""):
        return Case(name, "torchrun", args, expect, "", out, note)

    return [
        # prune: held-out search and counts (issue 15 item 11), refused before loading
        prune("prune --alpha auto --heldout-samples 1", ["--num-layers", "2", "--alpha", "auto", "--heldout-samples",
                                                          "1"], "--heldout-samples must be >= 2"),
        prune("prune best-of --heldout-samples 0", ["--num-layers", "2", "--criterion", "best-of",
                                                     "--heldout-samples", "0"], "--heldout-samples must be >= 2"),
        prune("prune --ratio 1.5", ["--ratio", "1.5"], "--ratio must lie strictly between 0 and 1"),
        prune("prune --ratio 0", ["--ratio", "0"], "--ratio must lie strictly between 0 and 1"),
        prune("prune --num-layers -1", ["--num-layers", "-1"], "remove at least 1"),
        prune("prune --max-candidates 1", ["--num-layers", "2", "--alpha", "auto", "--max-candidates", "1"],
              "--max-candidates must be >= 2"),
        prune("prune --pool ''", ["--num-layers", "2", "--criterion", "best-of", "--pool", ""],
              "--pool must name at least one"),
        prune("prune --margin nan", ["--num-layers", "2", "--alpha", "auto", "--margin", "nan"], "--margin"),
        prune("prune --objective bogus", ["--num-layers", "2", "--objective", "bogus"], "invalid choice"),
        prune("prune --dtype float64", ["--num-layers", "2", "--dtype", "float64"], "invalid choice"),
        prune("prune --calib-seq-len 1", ["--num-layers", "2", "--calib-seq-len", "1"], "--calib-seq-len must be >= 2"),
        prune("prune --calib-batch-size 0", ["--num-layers", "2", "--calib-batch-size", "0"],
              "--calib-batch-size must be >= 1"),
        prune("prune --layers ''", ["--layers", ""], "layer indices"),
        prune("prune --num-layers 2 --layers 1", ["--num-layers", "2", "--layers", "1"], "exactly one of"),
        prune("prune --criterion all", ["--num-layers", "2", "--criterion", "all"], "one criterion"),
        prune("prune --num-layers 2,3", ["--num-layers", "2,3"], "compare"),
        prune("prune --offload layerwise best-of", ["--num-layers", "2", "--criterion", "best-of", "--offload",
                                                    "layerwise"], "drop --offload"),
        prune("prune --offload layerwise --iterative", ["--num-layers", "2", "--iterative", "--offload",
                                                        "layerwise"], "--offload layerwise"),
        prune("prune --offload layerwise taylor", ["--num-layers", "2", "--criterion", "taylor", "--offload",
                                                   "layerwise"], "--offload layerwise"),
        prune("prune --calib missing file", ["--num-layers", "2", "--calib", str(i / "nope.txt")], "nope.txt"),
        prune("prune --iterative best-of", ["--num-layers", "2", "--criterion", "best-of", "--iterative"],
              "drop --iterative"),
        prune("prune --criterion mssd:alpha=0.5 (alpha unused by mssd)", ["--num-layers", "2", "--criterion",
                                                                          "mssd:alpha=0.5"], "does not use alpha", out="p-mssd"),
        prune("prune --out onto a user folder --overwrite", ["--num-layers", "2", "--overwrite"],
              "not a simdiff output", out="../in/notes"),
        prune("prune --revision on a local dir", ["--num-layers", "2", "--revision", "main"], "applies to hub ids"),
        prune("prune --export gguf on a local dir", ["--num-layers", "2", "--export", "gguf"], "--export gguf"),
        # score
        Case("score --criterion simdiff:alpha=auto", "cli", ["-q", "score", m, *calib, "--criterion",
                                                             "simdiff:alpha=auto"], message="--alpha auto"),
        Case("score --heldout-samples 1", "cli", ["-q", "score", m, *calib, "--heldout-samples", "1"],
             message="--heldout-samples must be >= 2"),
        Case("score --block-size 0", "cli", ["-q", "score", m, *calib, "--block-size", "0"],
             message="--block-size"),
        Case("score --criterion best-of", "cli", ["-q", "score", m, *calib, "--criterion", "best-of"],
             message="best-of"),
        Case("score --json OUT/simdiff.json --overwrite (another output's marker)", "cli",
             ["-q", "score", m, *calib, "--json", str(i / "round1" / "simdiff.json"), "--overwrite"],
             message="simdiff.json", out="../in/round1/simdiff.json"),
        # compare / eval / recover / bench
        Case("compare best-of --pool simdif", "cli", ["-q", "compare", m, *calib, "--criterion", "simdiff,best-of",
                                                      "--num-layers", "2", "--pool", "simdif", "--tasks", "",
                                                      "--ppl", str(i / "eval.txt"), "--out", str(o / "c")],
             message="unknown criterion 'simdif'", out="c"),
        Case("compare --heldout-samples 1", "cli", ["-q", "compare", m, *calib, "--num-layers", "2",
                                                    "--heldout-samples", "1", "--out", str(o / "c")],
             message="--heldout-samples must be >= 2", out="c"),
        Case("compare nothing to evaluate", "cli", ["-q", "compare", m, *calib, "--num-layers", "2", "--ppl", "",
                                                    "--tasks", "", "--out", str(o / "c")],
             message="nothing to evaluate", out="c"),
        Case("eval --eval-seq-len 1", "cli", ["-q", "eval", m, "--ppl", str(i / "eval.txt"), "--tasks", "",
                                              "--eval-seq-len", "1"], message="--eval-seq-len must be >= 2"),
        Case("eval --json into the model folder", "cli", ["-q", "eval", m, "--ppl", str(i / "eval.txt"), "--tasks",
                                                          "", "--json", str(i / "llama" / "eval.json")],
             message="overlaps the input"),
        Case("recover --lora-rank 0", "cli", ["-q", "recover", m, "--lora-rank", "0", "--out", str(o / "rec")],
             message="--lora-rank", out="rec"),
        Case("recover --steps 0", "cli", ["-q", "recover", m, "--steps", "0", "--out", str(o / "rec")],
             message="--steps", out="rec"),
        Case("bench --repeats 0", "cli", ["-q", "bench", m, "--repeats", "0"], message="--repeats"),
        # apply (issue 15 item 9)
        apply("apply custom code without --trust-remote-code", str(i / "custom"), ["--layers", "1"],
              "--trust-remote-code"),
        apply("apply custom code with --trust-remote-code", str(i / "custom"), ["--layers", "1",
                                                                                "--trust-remote-code"], expect="ok",
              out="ap-custom"),
        apply("apply 2-round recipe to the original", m, ["--recipe", str(i / "round2")], expect="ok",
              out="ap-2round"),
        apply("apply 2-round recipe to a 3-layer model", str(i / "three"), ["--recipe", str(i / "round2")],
              "records 5 layers (its last round's input; the original model had 6), the model has 3"),
        apply("apply qwen2 recipe to a llama GGUF", str(i / "tiny.gguf"), ["--recipe", str(i / "qwen2-recipe.json")],
              "architecture is 'llama'", out="g.gguf"),
        apply("apply 2-round recipe to the original GGUF", str(i / "tiny.gguf"), ["--recipe", str(i / "round2")],
              expect="ok", out="g2.gguf"),
        apply("apply --recipe of a folder without simdiff.json", m, ["--recipe", str(i / "notes")], "not found"),
        apply("apply --recipe of a run recipe", m, ["--recipe", str(i / "recipe-eval.json")], "lacks removed_layers"),
        apply("apply --recipe of a JSON list", m, ["--recipe", str(i / "list.json")], "not a JSON object"),
        apply("apply --layers and --recipe", m, ["--layers", "1", "--recipe", str(i / "round1")], "exactly one of"),
        Case("apply without --out", "cli", ["-q", "apply", m, "--layers", "1"], message="give --out"),
        apply("apply onto a user folder --overwrite", m, ["--layers", "1", "--overwrite"], "not a simdiff output",
              out="../in/notes"),
        apply("apply a text file as the model", str(i / "calib.txt"), ["--layers", "1"], "holds no config.json"),
        apply("apply a missing model", str(i / "missing"), ["--layers", "1"], "not found"),
        apply("apply onto an earlier simdiff output --overwrite", m, ["--layers", "2", "--overwrite"], expect="ok",
              out="ap-custom"),
        # run recipes (issue 15 item 10)
        run("run calibration.heldout_samples 1", "heldout1", "--heldout-samples must be >= 2"),
        run("run evaluation with nothing to evaluate", "nothing-to-eval", "nothing to evaluate"),
        run("run evaluation.seq_len 1", "eval-seq1", "--eval-seq-len must be >= 2"),
        run("run model.name empty", "no-name", "model.name is empty"),
        run("run num_layers and layers", "two-counts", "exactly one of"),
        run("run search.pool []", "empty-pool", "--pool must name at least one"),
        run("run selection.ratio 2", "ratio2", "--ratio must lie strictly between 0 and 1"),
        run("run without out", "no-out", "give --out", out=None),
        run("run a comparison without evaluation", "comparison-no-eval", "add an evaluation section"),
        run("run export gguf of a local model", "export-local", "--export gguf"),
        run("run offload layerwise + iterative", "offload-iterative", "--offload layerwise"),
        run("run calibration file missing", "calib-missing", "nope.txt"),
        run("run --samples 0 override", "eval", "--samples must be >= 1", extra=["--samples", "0"]),
        run("run with a local-text evaluation", "eval", expect="ok", out="r-eval"),
        # Python API (issue 15 item 10)
        api("api prune samples=0", "simdiff.prune('{m}', out='{o}', num_layers=2, samples=0)", "--samples must be"),
        api("api prune heldout_samples=1", "simdiff.prune('{m}', out='{o}', num_layers=2, heldout_samples=1)",
            "--heldout-samples must be >= 2"),
        api("api prune ratio=1.5", "simdiff.prune('{m}', out='{o}', ratio=1.5)", "--ratio must lie"),
        api("api prune alpha=2", "simdiff.prune('{m}', out='{o}', num_layers=2, alpha=2.0)", "--alpha must lie"),
        api("api prune seed=-1", "simdiff.prune('{m}', out='{o}', num_layers=2, seed=-1)", "--seed must be >= 0"),
        api("api prune calibration as a dict", "simdiff.prune('{m}', out='{o}', num_layers=2, "
                                               "calibration={'samples': 4})", "must be a Calibration"),
        api("api prune unknown setting", "simdiff.prune('{m}', out='{o}', num_layers=2, samplez=4)",
            "unknown setting 'samplez'"),
        api("api prune recipe plus settings", "r = simdiff.recipe_from_settings('{m}', '{o}', num_layers=2)\n"
                                              "simdiff.prune(r, ratio=0.5)", "takes no other settings"),
        api("api prune recipe edited after construction",
            "r = simdiff.recipe_from_settings('{m}', '{o}', num_layers=2)\nr.calibration.samples = 0\n"
            "simdiff.prune(r)", "--samples must be >= 1"),
        api("api prune without out", "simdiff.prune('{m}', num_layers=2)", "give --out", out=None),
        api("api prune pool typo", "simdiff.prune('{m}', out='{o}', num_layers=2, criterion='best-of', "
                                   "pool=['simdif'])", "unknown criterion 'simdif'"),
        api("api apply_to_path of a GGUF", "from simdiff.surgery.apply import apply_to_path\n"
                                           "apply_to_path('{i}/tiny.gguf', [1], '{o}')", "prune_gguf"),
        api("api prune_gguf with a qwen2 recipe", "from simdiff.surgery.apply import load_removal_record\n"
                                                  "from simdiff.surgery.gguf import prune_gguf\n"
                                                  "prune_gguf('{i}/tiny.gguf', None, '{o}.gguf', "
                                                  "recipe=load_removal_record('{i}/qwen2-recipe.json'))",
            "architecture is 'llama'", out="a.gguf"),
        api("api apply_to_path ok", "from simdiff.surgery.apply import apply_to_path\napply_to_path('{m}', [0, 5], '{o}')",
            expect="ok", out="a-ok"),
        api("api prune --layers ok", "simdiff.prune('{m}', out='{o}', layers=[2, 3])", expect="ok", out="a-layers"),
        # torchrun, 2 gloo processes
        torchrun("torchrun prune", ["-q", "prune", m, *calib, *cpu, "--num-layers", "2", "--out", str(o / "t-prune")],
                 out="t-prune"),
        torchrun("torchrun score --json", ["-q", "score", m, *calib, *cpu, "--json", str(o / "t-score.json")],
                 out="t-score.json"),
        torchrun("torchrun compare (local ppl)", ["-q", "compare", m, *calib, *cpu, "--criterion", "simdiff,mssd",
                                                  "--num-layers", "2", "--tasks", "", "--ppl", str(i / "eval.txt"),
                                                  "--eval-seq-len", "64", "--max-tokens", "1024",
                                                  "--out", str(o / "t-compare")], expect="refuse"),
        torchrun("torchrun run with evaluation", ["-q", "run", str(i / "recipe-eval-dist.json"), *cpu,
                                                  "--out", str(o / "t-run")], out="t-run"),
        torchrun("torchrun prune refused (--ratio 1.5)", ["-q", "prune", m, *calib, *cpu, "--ratio", "1.5",
                                                          "--out", str(o / "t-bad")], expect="refuse", out="t-bad"),
        Case("torchrun prune, SIGKILL of rank 1 mid-run", "kill",
             ["-q", "prune", m, *calib, *cpu, "--samples", "256", "--calib-seq-len", "128", "--num-layers", "3",
              "--criterion", "ppl_skip", "--iterative", "--out", str(o / "t-kill")], "killed", out="t-kill"),
        # --overwrite: replaces the killed run's output if it did commit one (complete, ours), else a new one
        Case("rerun after the kill (same --out)", "cli",
             ["-q", "prune", m, *calib, "--num-layers", "2", "--out", str(o / "t-kill"), "--overwrite"], "ok",
             out="t-kill"),
    ]


# -- running and checking ----------------------------------------------------------------------------------
def tree_hashes(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def leftovers(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if LEFTOVER.search(p.name)}


def env_for(case: Case) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if case.expect == "refuse" and case.kind != "torchrun":
        env["BATTERY_NO_LOAD"] = "1"
    return env


def torchrun_command(case: Case, logs: Path) -> list[str]:
    launcher = Path(PY).with_name("torchrun")
    return [str(launcher), "--standalone", "--nproc-per-node", "2", "--log-dir", str(logs), "--redirects", "3",
            "-m", "simdiff", *case.args]


def rank_stderr(logs: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(logs.rglob("stderr.log")))


def execute(case: Case, root: Path, number: int) -> tuple[int, str, float]:
    """Run the case; return (exit status, the stderr that simdiff wrote, seconds)."""
    start = time.perf_counter()
    env = env_for(case)
    if case.kind in ("cli", "run"):
        proc = subprocess.run([PY, "-c", CLI, *case.args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT)
        return proc.returncode, proc.stderr, time.perf_counter() - start
    if case.kind == "api":
        proc = subprocess.run([PY, "-c", API, *case.args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT)
        return proc.returncode, proc.stderr, time.perf_counter() - start
    logs = root / "logs" / f"{number:02d}"
    if case.kind == "torchrun":
        proc = subprocess.run(torchrun_command(case, logs), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT)
        return proc.returncode, rank_stderr(logs), time.perf_counter() - start
    return kill_one_rank(case, root, logs, env, start)


def kill_one_rank(case: Case, root: Path, logs: Path, env: dict, start: float) -> tuple[int, str, float]:
    """Start the torchrun case, SIGKILL rank 1 once rank 0 has claimed --out (the lock file exists)."""
    out = root / "out" / case.out
    lock = out.with_name(f".{out.name}.simdiff-lock")
    proc = subprocess.Popen(torchrun_command(case, logs), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    killed = None
    deadline = time.time() + TIMEOUT
    while proc.poll() is None and time.time() < deadline and killed is None:
        time.sleep(0.2)
        rank1 = [pid for pid in descendants(proc.pid) if environ_of(pid).get("RANK") == "1"]
        if lock.exists() and rank1:
            time.sleep(0.5)  # into the calibration passes
            os.kill(rank1[0], signal.SIGKILL)
            killed = rank1[0]
    try:
        proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    note = "" if killed else NOT_KILLED + "\n"
    return proc.returncode, note + rank_stderr(logs), time.perf_counter() - start


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        found += [int(c) for c in children]
        todo += [int(c) for c in children]
    return found


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def complete(path: Path) -> bool:
    """A committed output: a model folder that loads its weights' headers, results, or a readable file."""
    if path.is_dir():
        if (path / "results.json").is_file():
            return bool(json.loads((path / "results.json").read_text()))
        if not ((path / "config.json").is_file() and (path / "simdiff.json").is_file()):
            return False
        from safetensors import safe_open

        files = sorted(path.glob("*.safetensors"))
        for file in files:
            with safe_open(str(file), framework="pt") as reader:
                list(reader.keys())
        return bool(files)
    if path.suffix == ".json":
        return bool(json.loads(path.read_text()))
    if path.suffix == ".gguf":
        import gguf

        return len(gguf.GGUFReader(path).tensors) > 0
    return path.is_file() and path.stat().st_size > 0


def check(case: Case, root: Path, number: int, before_inputs: dict, before_left: set,
          before_out: dict | None) -> Result:
    code, err, seconds = execute(case, root, number)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    problems = []
    traceback = TRACEBACK in err
    loaded = "BATTERY: the model was loaded" in err
    one_line = None
    out = (root / "out" / case.out).resolve() if case.out else None
    if traceback:
        problems.append("traceback")
    if case.expect == "refuse":
        per_rank = 2 if case.kind == "torchrun" else 1
        one_line = len(lines) == per_rank and all(line.startswith("simdiff: error:") for line in lines)
        if code == 0 or (case.kind != "torchrun" and code != 2) or not one_line:
            problems.append(f"refusal not one line + exit 2 (exit {code}, {len(lines)} stderr lines)")
        if loaded:
            problems.append("refused only after loading the model")
        if case.message and not any(case.message in line for line in lines):
            problems.append(f"message lacks {case.message!r}")
    elif case.expect == "ok" and code != 0:
        problems.append(f"exit {code}")
    elif case.expect == "killed" and (code == 0 or NOT_KILLED in err):
        problems.append("nothing was killed" if NOT_KILLED in err else "the killed run exited 0")
    if out is not None:
        existed = before_out is not None
        if case.expect == "ok" and not out.exists():
            problems.append("output missing")
        elif case.expect == "ok" and not complete(out):
            problems.append("half-written output (incomplete)")
        elif case.expect != "ok" and existed and tree_hashes_of(out) != before_out:
            problems.append("an existing output was changed by a failed run")
        elif case.expect != "ok" and not existed and out.exists() and not (case.expect == "killed" and complete(out)):
            problems.append("half-written output left")  # a killed run may have committed first: complete is fine
    if tree_hashes(root / "in") != before_inputs:
        problems.append("an input changed (data lost)")
    now_left = leftovers(root)
    left = sorted(now_left - before_left)
    beside_out = [p for p in now_left if out is not None and Path(p).name.startswith(f".{out.name}.")]
    if case.expect != "killed" and (left or beside_out):  # a rerun must also clean what a killed run left
        problems.append("leftovers")
        left = sorted(set(left) | set(beside_out))
    return Result(case, code, seconds, one_line, traceback, loaded, left, problems)


def tree_hashes_of(path: Path) -> dict:
    if path.is_dir():
        return tree_hashes(path)
    return {"": hashlib.sha256(path.read_bytes()).hexdigest()} if path.is_file() else {}


def run_all(root: Path, selected: list[Case]) -> list[Result]:
    results = []
    for number, case in enumerate(selected, 1):
        out = (root / "out" / case.out).resolve() if case.out else None
        before_out = tree_hashes_of(out) if out is not None and out.exists() else None
        result = check(case, root, number, tree_hashes(root / "in"), leftovers(root), before_out)
        results.append(result)
        status = "ok" if not result.problems else "FAIL: " + "; ".join(result.problems)
        print(f"[{number:02d}] {case.name}: exit {result.code} ({result.seconds:.1f}s) {status}", file=sys.stderr,
              flush=True)
    return results


# -- report ------------------------------------------------------------------------------------------------
def table(results: list[Result]) -> str:
    rows = ["| # | case | kind | expect | exit | one line | traceback | left on disk | verdict |",
            "|---|---|---|---|---|---|---|---|---|"]
    for n, r in enumerate(results, 1):
        one = "-" if r.one_line is None else ("yes" if r.one_line else "**no**")
        left = ", ".join(r.left) or "nothing"
        verdict = "ok" if not r.problems else "**" + "; ".join(r.problems) + "**"
        if r.case.note:
            verdict += f" (expected to change: {r.case.note})"
        rows.append(f"| {n} | {r.case.name} | {r.case.kind} | {r.case.expect} | {r.code} | {one} | "
                    f"{'**yes**' if r.traceback else 'no'} | {left} | {verdict} |")
    return "\n".join(rows)


def summary(results: list[Result]) -> tuple[str, bool]:
    def count(text: str) -> int:
        return sum(any(text in p for p in r.problems) for r in results)

    failed = [r for r in results if r.problems]
    marked = [r for r in failed if r.case.note]
    kinds = {k: sum(r.case.kind == k for r in results) for k in ("cli", "api", "run", "torchrun", "kill")}
    line = (f"{len(results)} cases ({', '.join(f'{v} {k}' for k, v in kinds.items())}): "
            f"{count('traceback')} tracebacks, {count('data lost') + count('existing output was changed')} data lost, "
            f"{count('half-written')} half-written outputs, {count('output missing')} outputs missing, "
            f"{count('refusal not one line')} refusals not one line + exit 2, "
            f"{count('after loading')} refused after loading, {count('leftovers')} with leftovers, "
            f"{len(failed)} failing ({len(marked)} marked as expected to change with other branches)")
    return line, not failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only the cases whose name contains this text")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="simdiff-battery-"))
    try:
        start = time.perf_counter()
        build_workspace(root)
        selected = [c for c in cases(root) if args.only in c.name]
        results = run_all(root, selected)
        print(table(results))
        line, ok = summary(results)
        print(f"\n{line}; {time.perf_counter() - start:.0f} s")
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
