"""Data-parallel scoring: two processes under torchrun (gloo, CPU) give the single-process scores and selection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny import tiny_workspace

import simdiff
from simdiff.cli.main import main
from simdiff.store.save import METADATA_FILE

CALIB = ["--samples", "8", "--calib-seq-len", "24", "--calib-batch-size", "2", "--seed", "3"]  # 4 batches
SCORE = ["--criterion", "simdiff,block_influence,angular_block,mssd,masd,ppl_skip", "--block-size", "2"]
PRUNE = ["--num-layers", "2", "--criterion", "ppl_skip", "--iterative"]  # SLEB: loss passes, re-scored per step
# Runs under torchrun: score and prune, counting this rank's calibration forwards.
LAUNCHED = """
import os, sys
import simdiff.collect.hooks as hooks
from simdiff.cli.main import main

calls = []
run_decoder = hooks.run_decoder
hooks.run_decoder = lambda model, batch: (calls.append(1), run_decoder(model, batch))
args = sys.argv[1:]
split = args.index("--then")
assert main(args[:split]) == 0
assert main(args[split + 1:]) == 0
with open(os.path.join(os.environ["FORWARDS_DIR"], os.environ["RANK"]), "w") as f:
    f.write(str(len(calls)))
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dp")
    return tiny_workspace(root)


def command(ws, name: str, *extra: str) -> list[str]:
    return ["-q", name, str(ws["model"]), "--calib", str(ws["calib"]), *CALIB, *extra]


def launch_two_processes(ws, score_args: list[str], prune_args: list[str]) -> dict[int, int]:
    """torchrun --nproc-per-node 2 of LAUNCHED; returns the calibration forwards each rank ran."""
    script, forwards = ws["root"] / "launched.py", ws["root"] / "forwards"
    script.write_text(LAUNCHED, encoding="utf-8")
    forwards.mkdir()
    source = str(Path(simdiff.__file__).resolve().parents[1])  # the simdiff under test, also in the children
    env = {**os.environ, "FORWARDS_DIR": str(forwards), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), *score_args, "--then", *prune_args],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return {int(p.name): int(p.read_text()) for p in forwards.iterdir()}


def relative_difference(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def test_two_processes_score_and_prune_like_one(workspace) -> None:
    root = workspace["root"]
    assert main(command(workspace, "score", *SCORE, "--json", str(root / "one.json"))) == 0
    assert main(command(workspace, "prune", *PRUNE, "--out", str(root / "one"))) == 0
    forwards = launch_two_processes(
        workspace, command(workspace, "score", *SCORE, "--json", str(root / "two.json")),
        command(workspace, "prune", *PRUNE, "--out", str(root / "two")))
    # each rank ran its half of the 4 batches in the statistics pass of score and of prune
    assert forwards == {0: 4, 1: 4}
    one, two = (json.loads((root / f"{n}.json").read_text(encoding="utf-8")) for n in ("one", "two"))
    for name, values in one["scores"].items():
        assert relative_difference(two["scores"][name], values) < 1e-9, name
    layer_one, layer_two = one["statistics"]["layer"], two["statistics"]["layer"]
    assert layer_two["tokens"] == layer_one["tokens"]
    for name, values in layer_one["sums"].items():
        assert relative_difference(layer_two["sums"][name], values) < 1e-9, name
    assert relative_difference(layer_two["angular"]["2"], layer_one["angular"]["2"]) < 1e-9
    pruned_one, pruned_two = (json.loads((root / n / METADATA_FILE).read_text(encoding="utf-8"))
                              for n in ("one", "two"))
    assert pruned_two["removed_layers"] == pruned_one["removed_layers"]
    for step_one, step_two in zip(pruned_one["selection_steps"], pruned_two["selection_steps"], strict=True):
        assert step_two["removed"] == step_one["removed"]
        known = ~np.isnan(np.asarray(step_one["importance"], dtype=np.float64))
        assert relative_difference(np.asarray(step_two["importance"])[known],
                                   np.asarray(step_one["importance"])[known]) < 1e-9
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".two")) == []  # no temp folder left


@pytest.mark.parametrize("args, message", [
    (["score", "--criterion", "simdiff,taylor"], "criteria needing taylor must run in one process"),
    (["prune", "--num-layers", "1", "--criterion", "taylor"], "criteria needing taylor must run in one process"),
    (["score", "--device-map", "auto"], "drop --device-map"),
])
def test_data_parallel_refuses_what_it_cannot_split(workspace, monkeypatch, capsys, args, message) -> None:
    """Refused from the launcher's environment alone, before any process group or model is set up."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = ["--out", str(workspace["root"] / "refused")] if args[0] == "prune" else []
    assert main(["-q", args[0], str(workspace["model"]), *args[1:], *out]) == 2
    assert message in capsys.readouterr().err


# Runs `simdiff run` under torchrun, recording which ranks evaluate (and the model each one evaluates).
LAUNCHED_RUN = """
import os, sys
import simdiff.cli.evaluate as evaluation
from simdiff.cli.main import main

evaluate_against = evaluation.evaluate_against

def recorded(name, *args, **kwargs):
    with open(os.path.join(os.environ["EVALUATED_DIR"], os.environ["RANK"]), "a") as f:
        f.write(f"{name}\\n")
    return evaluate_against(name, *args, **kwargs)

evaluation.evaluate_against = recorded
sys.exit(main(sys.argv[1:]))
"""
RUN_RECIPE = """selection:
  criterion: simdiff
  num_layers: 2
evaluation:
  ppl: [wikitext2]
  tasks: []
  seq_len: 32
  max_tokens: 200
"""


def test_run_with_evaluation_under_torchrun_evaluates_on_rank_0_after_the_commit(workspace, tmp_path) -> None:
    """Issue 15 item 4: rank 1 evaluated `out` too, before rank 0 had committed it (exit 2 there made torchrun
    kill rank 0 mid-save), or wrote evaluation.json beside rank 0's."""
    script, evaluated, work = tmp_path / "launched_run.py", tmp_path / "evaluated", tmp_path / "work"
    for folder in (evaluated, work):
        folder.mkdir()
    script.write_text(LAUNCHED_RUN, encoding="utf-8")
    recipe, out = tmp_path / "recipe.yaml", work / "out"
    recipe.write_text(RUN_RECIPE, encoding="utf-8")
    source = str(Path(simdiff.__file__).resolve().parents[1])
    env = {**os.environ, "EVALUATED_DIR": str(evaluated), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), "-q", "run", str(recipe), "--model", str(workspace["model"]), "--calib",
                          str(workspace["calib"]), *CALIB, "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert {p.name: p.read_text() for p in evaluated.iterdir()} == {"0": f"{out}\n"}  # rank 0 alone, once
    document = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))
    assert document["simdiff"]["retained"]["ppl_ratio"]
    record = json.loads((out / METADATA_FILE).read_text(encoding="utf-8"))["simdiff_output"]["files"]
    assert record["evaluation.json"] == (out / "evaluation.json").stat().st_size  # added under the contract
    assert sorted(p.name for p in work.iterdir()) == ["out"]  # no temporary file or lock left



@pytest.mark.parametrize("command", ["compare", "run"])
def test_comparison_under_a_launcher_is_refused_by_every_rank_before_work(workspace, monkeypatch, capsys,
                                                                           command) -> None:
    """Every rank claimed the same --out: rank 1's 'another simdiff run is writing' (exit 2) made torchrun kill
    rank 0 in the middle of its work. Now every rank refuses alike, before loading anything."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("simdiff.model.load.load_model", refuse)
    recipe = [str(Path(__file__).resolve().parents[1] / "docs" / "recipes" / "compare-results.yaml"), "--model"]
    for rank in ("0", "1"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        out = workspace["root"] / f"compared-{command}-{rank}"
        args = ["-q", command, *(recipe if command == "run" else []), str(workspace["model"]), "--num-layers", "1",
                "--out", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "a comparison runs in one process" in err and "Traceback" not in err, err
        assert not out.exists()
