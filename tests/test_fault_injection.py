"""Kill a tiny-model prune with SIGKILL at each step of its save, then check what a crash may leave.

``SIMDIFF_FAULT_AT=<step>`` (simdiff.core.outputs.fault_point) makes the process kill itself at that step. After
each kill: ``--out`` is absent or a complete checkpoint that loads with ``AutoModelForCausalLM``, an earlier
output being replaced is never lost, the input is byte-identical, and the same command run again succeeds
and leaves no ``.out.tmp-*``, ``.out.old-*`` or lock file behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_outputs import leftovers, tree_hash
from tiny import REPO, save_tiny, write_calibration_text
from transformers import AutoModelForCausalLM

from simdiff.cli.main import main
from simdiff.core.outputs import claim_output_dir

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_OUTPUT_STEPS = ["claimed", "mid-weights", "weights-written", "staged"]
REPLACE_STEPS = ["staged", "moved-aside", "renamed-in"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    return {"model": save_tiny("llama", root / "model"), "calib": write_calibration_text(root / "calib.txt")}


def command(setup: dict[str, Path], out: Path, criterion: str, overwrite: bool) -> list[str]:
    return ["-q", "prune", str(setup["model"]), "--calib", str(setup["calib"]), "--samples", "4", "--calib-seq-len", "32",
            "--calib-batch-size", "2", "--num-layers", "2", "--criterion", criterion, "--out", str(out),
            *(["--overwrite"] if overwrite else [])]


def run_killed(args: list[str], step: str) -> None:
    env = {**os.environ, "SIMDIFF_FAULT_AT": step, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "simdiff", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -signal.SIGKILL, f"not killed at {step!r}: rc {done.returncode}\n{done.stderr}"


def assert_complete(folder: Path, criterion: str) -> None:
    """A finished prune output: loads with plain transformers, 4 layers, written by ``criterion``."""
    assert json.loads((folder / "simdiff.json").read_text())["criterion"] == criterion
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 4


@pytest.mark.parametrize("step", NEW_OUTPUT_STEPS)
def test_kill_while_writing_a_new_output(step, setup, tmp_path):
    out = tmp_path / "out"
    before = tree_hash(setup["model"])
    run_killed(command(setup, out, "reverse", overwrite=False), step)
    assert not out.exists(), "a killed run left a partial --out"
    assert ".out.simdiff-lock" in leftovers(tmp_path)  # what the crash left, for the next run to clean
    if step != "claimed":
        here = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())  # leftovers name their host and pid
        assert any(re.fullmatch(rf"\.out\.tmp-{re.escape(here)}-\d+-\w+", name) for name in leftovers(tmp_path))
    assert tree_hash(setup["model"]) == before
    assert main(command(setup, out, "reverse", overwrite=False)) == 0  # the same command, run again
    assert_complete(out, "reverse")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("step", REPLACE_STEPS)
def test_kill_while_replacing_an_earlier_output(step, setup, tmp_path):
    out = tmp_path / "out"
    assert main(command(setup, out, "random", overwrite=False)) == 0
    before = tree_hash(setup["model"])
    run_killed(command(setup, out, "reverse", overwrite=True), step)
    if out.exists():  # the earlier output, or (killed after the rename) the new one: never a mix
        assert_complete(out, "reverse" if step == "renamed-in" else "random")
    else:  # killed between the two renames: the earlier output waits aside, complete
        (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
        assert_complete(aside, "random")
    assert tree_hash(setup["model"]) == before
    assert main(command(setup, out, "reverse", overwrite=True)) == 0
    assert_complete(out, "reverse")
    assert leftovers(tmp_path) == []


def test_a_run_in_another_process_is_refused_while_out_is_claimed(setup, tmp_path):
    """The claim is an flock held across processes: a second prune to the same --out stops at once."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with claim_output_dir(out):
        done = subprocess.run([sys.executable, "-m", "simdiff", *command(setup, out, "reverse", overwrite=True)],
                              env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"simdiff: error: another simdiff run (pid {os.getpid()}) is "
                                                   f"writing {str(out)!r}; wait for it to finish or choose another --out")
    assert not out.exists() and leftovers(tmp_path) == []


def test_kill_while_adding_the_evaluation_to_a_saved_output(setup, tmp_path):
    """Issue 15 item 3: `run` adds evaluation.json after the commit; killed once it is recorded but not yet linked
    in, the saved model is complete and still ours (its record lists a file that is absent, never one too many)."""
    out = tmp_path / "out"
    recipe = REPO / "docs" / "recipes" / "prune-evaluate.yaml"
    args = ["-q", "run", str(recipe), "--model", str(setup["model"]), "--criterion", "reverse", "--calib",
            str(setup["calib"]), "--samples", "4", "--calib-seq-len", "32", "--calib-batch-size", "2",
            "--num-layers", "2", "--tasks", "", "--eval-seq-len", "32", "--max-tokens", "200", "--out", str(out)]
    run_killed(args, "extra-recorded")
    assert_complete(out, "reverse")
    assert not (out / "evaluation.json").exists()
    assert "evaluation.json" in json.loads((out / "simdiff.json").read_text())["simdiff_output"]["files"]
    assert any(name.endswith("-evaluation.json") for name in leftovers(tmp_path))  # staged beside, not inside
    assert main([*args, "--overwrite"]) == 0
    assert_complete(out, "reverse")
    assert (out / "evaluation.json").is_file() and leftovers(tmp_path) == []
