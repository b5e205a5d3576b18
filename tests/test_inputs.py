"""Checked inputs: damaged checkpoints, bad options, bad data and unusable hubs give one line and exit 2.

Every case here failed on the code before these checks (a traceback-free exit 1, a late error, or a wrong
model with exit 0); see docs/reliability.md for the table.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import CALIB, run_bad
from tiny import (
    calibration_text,
    data_dir,
    save_tiny,
    tiny_config,
    tiny_tokenizer,
)
from transformers import AutoModelForCausalLM

from simdiff.cli.main import main
from simdiff.collect.stats import LayerStatistics

WEIGHTS = "model.safetensors"


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_weights(folder: Path, drop: str | None = None, add: str | None = None) -> None:
    tensors = load_file(folder / WEIGHTS)
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.zeros(2, 2)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def copy_of(good: Path, root: Path, name: str) -> Path:
    return Path(shutil.copytree(good, root / name))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A good tiny llama (6 layers) and one damaged copy per case."""
    root = tmp_path_factory.mktemp("inputs")
    good = save_tiny("llama", root / "good")
    made = {"good": good}
    made["config more layers"] = copy_of(good, root, "more")
    edit_config(made["config more layers"], num_hidden_layers=8)
    made["config fewer layers"] = copy_of(good, root, "fewer")
    edit_config(made["config fewer layers"], num_hidden_layers=4)
    gpt2 = save_tiny("gpt2", root / "gpt2")
    edit_config(gpt2, n_layer=4)
    made["gpt2 config fewer layers"] = gpt2
    moe = save_tiny("qwen3_moe", root / "moe")
    edit_config(moe, num_hidden_layers=8, mlp_only_layers=[1])
    made["moe config more layers"] = moe
    made["no weights"] = copy_of(good, root, "noweights")
    (made["no weights"] / WEIGHTS).unlink()
    made["truncated weights"] = copy_of(good, root, "truncated")
    data = (good / WEIGHTS).read_bytes()
    (made["truncated weights"] / WEIGHTS).write_bytes(data[: len(data) // 2])
    made["invalid config json"] = copy_of(good, root, "badjson")
    (made["invalid config json"] / "config.json").write_text('{"model_type": "llama",')
    made["config is a list"] = copy_of(good, root, "list")
    (made["config is a list"] / "config.json").write_text("[]")
    made["no tokenizer"] = copy_of(good, root, "notok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (made["no tokenizer"] / name).unlink()
    made["missing tensor"] = copy_of(good, root, "missing")
    edit_weights(made["missing tensor"], drop="model.layers.2.mlp.up_proj.weight")
    made["unexpected tensor"] = copy_of(good, root, "unexpected")
    edit_weights(made["unexpected tensor"], add="model.extra.weight")
    made["tokenizer larger than embedding"] = small_vocab_checkpoint(root / "smallvocab")
    made["custom code"] = copy_of(good, root, "custom")
    edit_config(made["custom code"], model_type="tinycustom", architectures=["TinyCustomForCausalLM"],
                auto_map={"AutoConfig": "configuration_tiny.TinyConfig",
                          "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"})
    made["missing shard"] = sharded_without_a_shard(good, root / "sharded")
    return made


def small_vocab_checkpoint(folder: Path) -> Path:
    """A consistent checkpoint whose embedding has 200 rows, saved with the 256-token tiny tokenizer."""
    config = tiny_config("llama")
    config.vocab_size = 200
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def sharded_without_a_shard(good: Path, folder: Path) -> Path:
    model = AutoModelForCausalLM.from_pretrained(good)
    model.save_pretrained(folder, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    (folder / sorted(set(index["weight_map"].values()))[-1]).unlink()
    return folder


BAD_CHECKPOINTS = {
    # defect 4: config and weights disagree (was pruned and "verified" with exit 0)
    "config more layers": "config.json declares 8 decoder layers but the weights hold 6",
    "config fewer layers": "config.json declares 4 decoder layers but the weights hold 6",
    "gpt2 config fewer layers": r"declares 4 decoder layers but the weights hold 6 \(transformer\.h\.0\.\.5\)",
    "moe config more layers": "declares 8 decoder layers but the weights hold 6",
    "missing tensor": r"1 tensors missing \(model\.layers\.2\.mlp\.up_proj\.weight\)",
    "unexpected tensor": r"1 unexpected \(model\.extra\.weight\)",
    "missing shard": r"shard .*model-\d+-of-\d+\.safetensors listed in model\.safetensors\.index\.json is missing",
    # were exit 1 with a raw exception name
    "no weights": "holds config.json but no weights",
    "truncated weights": "model.safetensors is truncated",
    "invalid config json": r"config\.json is not valid JSON",
    "config is a list": r"config\.json holds a JSON list; a transformers config is a JSON object",
    "no tokenizer": "cannot load the tokenizer of .*missing or damaged",
    "tokenizer larger than embedding": "the tokenizer has 256 tokens but the embedding has 200 rows",
    "custom code": "needs its own Python code .*--trust-remote-code",
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_before_work(case, checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    message = run_bad(capsys, ["-q", "prune", str(checkpoints[case]), "--num-layers", "1", *CALIB,
                               "--out", str(out)])
    assert re.search(BAD_CHECKPOINTS[case], message), message
    assert not out.exists()


def test_good_checkpoints_pass_the_checks(checkpoints):
    """The checks accept consistent checkpoints, including tied embeddings and the smallest shard layout."""
    from simdiff.model import load_model

    tied = checkpoints["good"].parent / "tied"
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    AutoModelForCausalLM.from_config(config).save_pretrained(tied)
    tiny_tokenizer().save_pretrained(tied)
    assert "lm_head.weight" not in load_file(tied / WEIGHTS)
    for folder in (checkpoints["good"], tied):
        model, _ = load_model(str(folder))
        assert model.config.num_hidden_layers == 6


def test_loading_info_check_refuses_what_transformers_only_warns_about(checkpoints):
    """Hub models are checked after download from transformers' loading report (defect 4 there too)."""
    from simdiff.core.errors import SimdiffError
    from simdiff.model.checks import check_loading_info

    _, loading = AutoModelForCausalLM.from_pretrained(checkpoints["config more layers"], output_loading_info=True)
    with pytest.raises(SimdiffError, match=r"missing \(model\.layers\.6\."):
        check_loading_info(loading, "org/name")
    _, loading = AutoModelForCausalLM.from_pretrained(checkpoints["good"], output_loading_info=True)
    check_loading_info(loading, "org/name")


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("texts")
    good = calibration_text()
    files = {"calib": root / "calib.txt", "null": root / "null.jsonl", "empty": root / "empty.jsonl",
             "latin1": root / "latin1.txt", "binary": root / "binary.txt", "number": root / "number.jsonl"}
    files["calib"].write_text(good, encoding="utf-8")
    files["null"].write_text(json.dumps({"text": good}) + "\n" + '{"text": null}\n', encoding="utf-8")
    files["empty"].write_text(json.dumps({"text": good}) + "\n\n" + '{"text": "  "}\n', encoding="utf-8")
    files["number"].write_text('{"text": 5}\n', encoding="utf-8")
    files["latin1"].write_bytes(good[:2000].encode("utf-8") + "café".encode("latin-1"))
    files["binary"].write_bytes(b"\x00" * 4096)
    return files


BAD_OPTIONS = {
    # name: (extra args, message pattern)
    "device banana": (["--device", "banana"], "unknown --device 'banana'; use cpu, cuda"),
    "negative seed": (["--seed", "-1"], "--seed must be >= 0, got -1"),
    "alpha out of range": (["--alpha", "1.5"], r"--alpha must lie in \[0, 1\] or be auto, got 1.5"),
    "beta out of range": (["--beta", "-0.1"], r"--beta must lie in \[0, 1\], got -0.1"),
    "negative keep": (["--keep-first", "-1"], "--keep-first/--keep-last must be >= 0"),
    "keep leaves nothing": (["--keep-first", "3", "--keep-last", "3"], "only 0 are removable"),
    # defect 8: windows longer than the model's positions were accepted silently
    "seq-len above max positions": (["--calib-seq-len", "200"], "--calib-seq-len 200 exceeds the model's maximum of 128"),
    "jsonl null text": (["--calib", "{null}"], r"null\.jsonl:2: 'text' is null, not a string"),
    "jsonl empty text": (["--calib", "{empty}"], r"empty\.jsonl:3: 'text' is empty"),
    "jsonl number text": (["--calib", "{number}"], r"number\.jsonl:1: 'text' is 5, not a string"),
    "non-UTF-8 text": (["--calib", "{latin1}"], r"latin1\.txt is not UTF-8 text"),
    "binary text": (["--calib", "{binary}"], r"binary\.txt holds NUL bytes"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option_is_refused_before_the_calibration_pass(case, checkpoints, texts, tmp_path, capsys,
                                                          monkeypatch):
    """Detected before any statistics are collected (the pass would raise instead of reporting)."""
    import simdiff.selection.evidence

    def no_pass(*args, **kwargs):
        raise AssertionError("the calibration pass started")

    monkeypatch.setattr(simdiff.selection.evidence, "gather_evidence", no_pass)
    monkeypatch.setattr("simdiff.workflows.api.gather_evidence", no_pass)
    extra, pattern = BAD_OPTIONS[case]
    extra = [str(texts[a[1:-1]]) if a.startswith("{") else a for a in extra]
    args = ["-q", "prune", str(checkpoints["good"]), "--num-layers", "1", "--calib", str(texts["calib"]),
            "--samples", "4", "--calib-batch-size", "2", "--out", str(tmp_path / "out")]
    if "--calib-seq-len" not in extra:
        args += ["--calib-seq-len", "32"]
    message = run_bad(capsys, args + extra)
    assert re.search(pattern, message), message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(checkpoints, capsys):
    message = run_bad(capsys, ["-q", "score", str(checkpoints["good"]), "--device", "cuda", *CALIB])
    assert "--device cuda asked for, but CUDA is not available here" in message


def test_seq_len_above_max_positions_in_eval_and_recover(checkpoints, texts, tmp_path, capsys):
    model = str(checkpoints["good"])
    message = run_bad(capsys, ["-q", "eval", model, "--ppl", "wikitext2", "--eval-seq-len", "129"])
    assert "--eval-seq-len 129 exceeds the model's maximum of 128 positions" in message
    message = run_bad(capsys, ["-q", "recover", model, "--out", str(tmp_path / "r"), "--data", str(texts["calib"]),
                               "--train-seq-len", "32", "--eval-seq-len", "256"])
    assert "--eval-seq-len 256 exceeds the model's maximum of 128 positions" in message


def test_no_data_dir_while_offline(checkpoints, capsys, monkeypatch):
    monkeypatch.delenv("SIMDIFF_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    message = run_bad(capsys, ["-q", "score", str(checkpoints["good"]), *CALIB])
    assert "WikiText-2 is not available: no --data-dir" in message and "wikitext-2/{valid,test}.txt" in message


def test_recover_refuses_a_copy_of_the_evaluation_text(checkpoints, tmp_path, capsys):
    """Defect 6: the guard compares content (SHA-256), so a renamed byte-identical copy is refused too."""
    copy = tmp_path / "my_corpus" / "notes.txt"
    copy.parent.mkdir()
    shutil.copyfile(data_dir() / "wikitext-2" / "test.txt", copy)
    (tmp_path / "my_corpus" / "other.txt").write_text("Some other text. " * 200)
    for data in (copy, copy.parent):
        message = run_bad(capsys, ["-q", "recover", str(checkpoints["good"]), "--out", str(tmp_path / "out"),
                                   "--data", str(data), "--train-seq-len", "32", "--steps", "1"])
        assert "notes.txt' holds the WikiText-2 test split" in message
    assert not (tmp_path / "out").exists()


def test_hub_id_while_offline_fails_fast(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = run_bad(capsys, ["-q", "score", "someorg/somemodel", *CALIB])
    assert "hub model 'someorg/somemodel' is not in the local cache and HF_HUB_OFFLINE is set" in message


def test_hub_unreachable_fails_fast(capsys, monkeypatch):
    """Online but the endpoint refuses connections: one probe, no retries, one line."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    message = run_bad(capsys, ["-q", "score", "someorg/somemodel", "--revision", "v1.0", *CALIB])
    assert "cannot reach http://127.0.0.1:9 to download 'someorg/somemodel' at revision 'v1.0'" in message


def test_revision_needs_a_hub_id(checkpoints, capsys):
    message = run_bad(capsys, ["-q", "score", str(checkpoints["good"]), "--revision", "main", *CALIB])
    assert "--revision 'main' applies to hub ids" in message


def test_tasks_offline_say_how_to_provide_the_data(checkpoints, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    message = run_bad(capsys, ["-q", "eval", str(checkpoints["good"]), "--ppl", "", "--tasks", "hellaswag",
                               "--limit", "2"])
    assert "lm-eval task 'hellaswag' needs its dataset, which is not in the Hugging Face datasets cache" in message
    assert "run it once online" in message


@pytest.mark.parametrize("content, pattern", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a `simdiff eval --json` result"),
    (None, "no such file"),
])
def test_bad_baseline_json_before_evaluation(content, pattern, checkpoints, tmp_path, capsys, monkeypatch):
    import simdiff.cli.evaluate

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluation started")

    monkeypatch.setattr(simdiff.cli.evaluate, "evaluate_model", no_evaluation)
    baseline = tmp_path / "dense.json"
    if content is not None:
        baseline.write_text(content)
    message = run_bad(capsys, ["-q", "eval", str(checkpoints["good"]), "--baseline", str(baseline)])
    assert pattern in message and "dense.json" in message


@pytest.mark.parametrize("damage, pattern", [
    ("trainer.json", r"trainer\.json is damaged \(not valid JSON\)"),
    ("state.pt", r"state\.pt is missing"),
    ("corrupt state.pt", r"state\.pt is damaged"),
])
def test_resume_from_damaged_checkpoint_names_the_file(damage, pattern, checkpoints, texts, tmp_path, capsys):
    from simdiff.config.recover import RecoverConfig

    step = tmp_path / "ckpt" / "step-0000001"
    step.mkdir(parents=True)
    config = RecoverConfig(data=str(texts["calib"]), seq_len=32).to_dict()
    (step / "trainer.json").write_text(json.dumps({"step": 1, "config": config, "history": {}}))
    torch.save({"adapter": {}, "optimizer": {}, "scheduler": {}}, step / "state.pt")
    if damage == "trainer.json":
        (step / "trainer.json").write_text("{broken")
    elif damage == "state.pt":
        (step / "state.pt").unlink()
    else:
        (step / "state.pt").write_bytes(b"not a torch archive")
    message = run_bad(capsys, ["-q", "recover", str(checkpoints["good"]), "--out", str(tmp_path / "out"),
                               "--data", str(texts["calib"]), "--train-seq-len", "32", "--checkpoint-dir",
                               str(tmp_path / "ckpt"), "--resume"])
    assert re.search(pattern, message) and str(step) in message, message


@pytest.mark.parametrize("dtype, advice, not_said", [
    (torch.float32, "already ran in float32", "--dtype float32"),
    (torch.float16, "--dtype float32 or bfloat16 instead of float16", "already ran"),
    (torch.bfloat16, "--dtype float32 instead of bfloat16", "already ran"),
])
def test_non_finite_advice_depends_on_the_dtype(dtype, advice, not_said):
    from simdiff.core.errors import SimdiffError

    stats = LayerStatistics(2)
    x = torch.ones(3, 2)
    stats.add_layer(1, x, torch.full((3, 2), float("nan")))
    with pytest.raises(SimdiffError) as raised:
        stats.check_finite(dtype=dtype)
    assert advice in str(raised.value) and not_said not in str(raised.value)


def test_internal_error_is_one_line_with_the_verbose_hint(checkpoints, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr("simdiff.workflows.api.score", broken)
    assert main(["-q", "score", str(checkpoints["good"]), *CALIB]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "simdiff: error: RuntimeError: first line second line (run with -v for the traceback)"
    assert "second line" not in "".join(err[:-1])


def fake_hub_cache(root: Path, repo: str, revision: str, checkpoint: Path) -> Path:
    """A Hugging Face hub cache holding ``checkpoint`` as ``repo`` at the ref ``revision`` only."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / revision).write_text(commit)
    shutil.copytree(checkpoint, folder / "snapshots" / commit)
    return root


def test_revision_selects_the_cached_hub_snapshot(checkpoints, tmp_path):
    """--revision reaches transformers: the cached ref loads offline, another ref is refused at once."""
    import os
    import subprocess
    import sys

    cache = fake_hub_cache(tmp_path / "hub", "someorg/tiny", "v1", checkpoints["good"])
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "simdiff", "-q", "score", "someorg/tiny", "--criterion", "block_influence",
               *CALIB, "--revision"]
    good = subprocess.run([*command, "v1"], env=env, capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    assert "block_influence" in good.stdout
    bad = subprocess.run([*command, "v2"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "simdiff: error: hub model 'someorg/tiny' at revision 'v2' is not in the local cache and HF_HUB_OFFLINE is "
        "set: download it once online, or give a local model directory")
