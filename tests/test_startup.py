"""`simdiff --version` and `simdiff COMMAND --help` start without the heavy libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "lm_eval", "peft", "numpy")
PROBE = ("import json, sys\nfrom simdiff.cli.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
         "    pass\nprint(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy})), file=sys.stderr)")


def heavy_modules(*argv: str) -> list[str]:
    """The heavy modules loaded by running ``simdiff argv`` in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=set(HEAVY)), *argv], capture_output=True,
                          text=True, env=env, cwd=REPO, check=True)
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--version"], ["prune", "--help"], ["compare", "--help"], ["run", "--help"],
                                  ["recover", "--help"], ["bench", "--help"]])
def test_version_and_help_import_no_heavy_library(argv) -> None:
    assert heavy_modules(*argv) == []


def test_package_import_is_lazy_but_complete() -> None:
    import simdiff

    assert {"prune", "score", "Recipe", "remove_layers"} <= set(dir(simdiff))
    assert callable(simdiff.prune) and simdiff.Recipe.__name__ == "Recipe"


def first_message(tmp_path: Path, *argv: str) -> tuple[str, bool]:
    """The first message ``simdiff argv`` logs, and whether torch was loaded when it was logged."""
    probe = ("import logging, sys\nseen = []\nclass Probe(logging.Handler):\n"
             "    def emit(self, record):\n        seen.append((record.getMessage(), 'torch' in sys.modules))\n"
             "logging.getLogger('simdiff').addHandler(Probe())\nfrom simdiff.cli.main import main\n"
             "main(sys.argv[1:])\nprint(repr(seen[0]), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    return eval(done.stderr.strip().splitlines()[-1])  # noqa: S307 - our own repr


def test_prune_says_what_it_will_do_before_torch_loads(tmp_path) -> None:
    model, out = tmp_path / "no-such-model", tmp_path / "out"
    message, torch_loaded = first_message(tmp_path, "prune", str(model), "--num-layers", "2", "--out", str(out))
    assert message == f"pruning {model}: removing 2 layers by simdiff, saving to {out}"
    assert not torch_loaded


@pytest.mark.parametrize("command, expected", [
    (["score", "M", "--criterion", "simdiff,mssd", "--samples", "4", "--calib-seq-len", "64"],
     "scoring M with simdiff,mssd over 4 calibration windows of 64 tokens (wikitext2)"),
    (["compare", "M", "--criterion", "simdiff,block_influence", "--num-layers", "4,8", "--out", "cmp"],
     "comparing on M: removing 4,8 layers by simdiff,block_influence, saving to cmp"),
    (["run", "recipe.yaml"], "recipe.yaml: pruning M: removing 0.25 of the layers by simdiff, healed (linear), "
                             "saving to out, then evaluating it"),
])
def test_long_commands_say_what_they_will_do_before_torch_loads(tmp_path, command, expected) -> None:
    (tmp_path / "recipe.yaml").write_text("model: {name: M}\nselection: {ratio: [0.25], heal: linear}\n"
                                          "evaluation: {ppl: [wikitext2], tasks: []}\nout: out\n", encoding="utf-8")
    message, torch_loaded = first_message(tmp_path, *command)
    assert message == expected
    assert not torch_loaded
