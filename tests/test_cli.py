"""The command line: bad inputs give one clean line and leave nothing behind; runs are deterministic."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tiny import save_tiny, tiny_tokenizer, write_calibration_text

from simdiff.cli.main import main
from simdiff.store.save import METADATA_FILE

CALIB = ["--samples", "4", "--calib-seq-len", "32", "--calib-batch-size", "2"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama checkpoint (6 layers), a calibration text, a too-short text, and non-decoder models."""
    root = tmp_path_factory.mktemp("cli")
    write_calibration_text(root / "calib.txt")
    (root / "short.txt").write_text("A very short text.", encoding="utf-8")
    from transformers import BertConfig, BertForMaskedLM, T5Config

    T5Config(vocab_size=256, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8).save_pretrained(root / "t5")
    tiny_tokenizer().save_pretrained(root / "t5")
    bert = BertForMaskedLM(BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(root / "bert")
    tiny_tokenizer().save_pretrained(root / "bert")
    return {"root": root, "model": save_tiny("llama", root / "llama"), "calib": root / "calib.txt",
            "short": root / "short.txt", "t5": root / "t5", "bert": root / "bert"}


def prune_args(ws: dict[str, Path], out: Path, *extra: str, model: str | None = None) -> list[str]:
    return ["-q", "prune", model or str(ws["model"]), "--calib", str(ws["calib"]), *CALIB, "--out", str(out), *extra]


def leftovers(folder: Path, name: str) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(f".{name}.")]


def run_bad(capsys, args: list[str]) -> str:
    """Run the CLI expecting a user error: exit 2, exactly one 'simdiff: error:' line, no traceback."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.strip().splitlines() if line.startswith("simdiff: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    return errors[0]


BAD_INPUTS = {
    # name: (extra args, model key or literal path, expected message pattern)
    "missing model": (["--num-layers", "2"], "/nonexistent/simdiff-model", "model '/nonexistent/simdiff-model' not found"),
    "unknown criterion": (["--num-layers", "2", "--criterion", "simdif"], None,
                          "unknown criterion 'simdif'.*Did you mean 'simdiff'"),
    "ratio removes all": (["--ratio", "0.99"], None, "remove 6 layers but the model has 6; keep at least one"),
    "zero layers": (["--num-layers", "0"], None, "remove 0 layers.*remove at least 1"),
    "negative": (["--num-layers", "-2"], None, "remove -2 layers"),
    "more than exist": (["--num-layers", "9"], None, "remove 9 layers but the model has 6"),
    "text too short": (["--num-layers", "2", "--calib", "{short}"], None, "text too short.*--calib-seq-len"),
    "encoder-decoder": (["--num-layers", "1"], "t5", "encoder-decoder"),
    "encoder only": (["--num-layers", "1"], "bert", "not a causal LM"),
    "keep too many": (["--num-layers", "3", "--keep-first", "2", "--keep-last", "2"], None,
                      "cannot remove 3 layers: only 2 are removable with --keep-first 2 --keep-last 2"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case: str, workspace, tmp_path, capsys) -> None:
    extra, model, pattern = BAD_INPUTS[case]
    extra = [str(workspace["short"]) if a == "{short}" else a for a in extra]
    model_arg = str(workspace[model]) if model in workspace else model
    out = tmp_path / "out"
    message = run_bad(capsys, prune_args(workspace, out, *extra, model=model_arg))
    assert re.search(pattern, message), message
    assert not out.exists(), "no output directory may be left behind"
    assert leftovers(tmp_path, "out") == []


def test_existing_output_without_overwrite(workspace, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    message = run_bad(capsys, prune_args(workspace, out, "--num-layers", "2"))
    assert "already exists; pass --overwrite" in message and str(out) in message
    assert [p.name for p in out.iterdir()] == ["mine.txt"]  # untouched
    assert leftovers(tmp_path, "out") == []


def test_unknown_criterion_in_score(workspace, capsys) -> None:
    message = run_bad(capsys, ["-q", "score", str(workspace["model"]), "--criterion", "simdiff,block_influense"])
    assert "Did you mean 'block_influence'" in message


def scores_of(out: Path) -> dict:
    return json.loads((out / METADATA_FILE).read_text())["scores"]


def test_prune_is_deterministic(workspace, tmp_path, capsys) -> None:
    """One seed -> identical simdiff.json scores; another seed -> different random-criterion scores."""
    runs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        out = tmp_path / name
        assert main(prune_args(workspace, out, "--num-layers", "2", "--seed", seed)) == 0
        runs[name] = json.loads((out / METADATA_FILE).read_text())
    stdout = capsys.readouterr().out
    assert "removed layers" in stdout and "6 -> 4 layers" in stdout
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert {"simdiff", "block_influence", "random"} <= set(a["scores"])
    assert a["scores"] == b["scores"]
    assert a["removed_layers"] == b["removed_layers"] and len(a["removed_layers"]) == 2
    assert a["kept_layers"] == [i for i in range(6) if i not in a["removed_layers"]]
    assert a["criterion"] == "simdiff"
    assert a["scores"]["random"] != c["scores"]["random"]
    # the seed also draws the calibration windows, so the raw statistics change (rank-normalised scores may not)
    assert a["statistics"]["layer"]["mean_cos"] != c["statistics"]["layer"]["mean_cos"]
    assert a["statistics"]["layer"]["mean_cos"] == b["statistics"]["layer"]["mean_cos"]
    assert not leftovers(tmp_path, "a") and (workspace["model"] / "config.json").is_file()


def test_score_writes_table_json_and_plot(workspace, tmp_path, capsys) -> None:
    json_file, png = tmp_path / "scores.json", tmp_path / "scores.png"
    args = ["-q", "score", str(workspace["model"]), "--criterion", "simdiff,block_influence,angular_block",
            "--calib", str(workspace["calib"]), *CALIB, "--json", str(json_file), "--plot", str(png)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "simdiff" in table and "block_influence" in table
    document = json.loads(json_file.read_text())
    assert set(document["scores"]) == {"simdiff", "block_influence", "angular_block"}
    assert all(len(v) == 6 for v in document["scores"].values())
    assert "versions" in document and "command" in document
    assert png.read_bytes()[:4] == b"\x89PNG"
