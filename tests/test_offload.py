"""Layer-wise offload gives the in-memory statistics under a memory cap; --device-map auto runs on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import data_dir, save_tiny, tiny_model

from simdiff.cli import main
from simdiff.collect.hooks import collect_layer_statistics
from simdiff.collect.offload import collect_layer_statistics_offloaded, module_bytes
from simdiff.data import batches
from simdiff.errors import SimdiffError

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

CALIB = ["--samples", "4", "--calib-seq-len", "24", "--calib-batch-size", "2"]



def calibration_batches() -> list:
    ids = torch.randint(4, 256, (5, 20), generator=torch.Generator().manual_seed(0))
    return batches(ids, 2)  # 3 batches, the last one smaller


def assert_same_statistics(a: dict, b: dict, rel: float = 1e-6) -> None:
    for key in ("tokens", "mean_cos", "mssd_absolute", "masd_absolute", "mssd_relative", "masd_relative"):
        np.testing.assert_allclose(b[key], a[key], rtol=rel, atol=0, err_msg=key)
    assert a["angular"].keys() == b["angular"].keys()
    for n in a["angular"]:
        np.testing.assert_allclose(b["angular"][n], a["angular"][n], rtol=rel, atol=0, err_msg=f"angular {n}")


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_layerwise_equals_in_memory_under_a_cap_the_model_exceeds(family):
    model = tiny_model(family, num_layers=8)
    data = calibration_batches()
    reference = collect_layer_statistics(model, data, block_sizes=[1, 3])
    # The cap: one layer plus the carried activations, with 10% slack; the whole model does not fit in it.
    _, probe = collect_layer_statistics_offloaded(model, data, block_sizes=[1, 3])
    cap = int(1.1 * (probe.largest_layer_bytes + probe.activation_bytes))
    assert module_bytes(model) > cap
    stats, report = collect_layer_statistics_offloaded(model, data, block_sizes=[1, 3], max_device_bytes=cap)
    assert report.peak_device_bytes <= cap
    assert_same_statistics(reference.to_dict(), stats.to_dict())
    with pytest.raises(SimdiffError, match="budget"):
        collect_layer_statistics_offloaded(model, data, max_device_bytes=probe.largest_layer_bytes)


def test_layerwise_with_bypassed_layers_matches_in_memory():
    from simdiff.surgery import bypass_layers

    model = tiny_model("qwen3", num_layers=6)
    data = calibration_batches()
    active = [0, 1, 3, 5]
    with bypass_layers(model, [2, 4]):
        reference = collect_layer_statistics(model, data, active_layers=active)
        stats, _ = collect_layer_statistics_offloaded(model, data, active_layers=active)
    np.testing.assert_allclose(stats.mean_cos[active], reference.mean_cos[active], rtol=1e-6)
    np.testing.assert_allclose(stats.mssd("relative")[active], reference.mssd("relative")[active], rtol=1e-6)
    assert stats.tokens[2] == 0 and stats.tokens[4] == 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("offload")
    text = (data_dir() / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:20_000]
    (root / "calib.txt").write_text(text, encoding="utf-8")
    return {"model": save_tiny("llama", root / "llama"), "calib": root / "calib.txt", "root": root}


def score_json(ws: dict[str, Path], name: str, *extra: str) -> dict:
    out = ws["root"] / f"{name}.json"
    argv = ["-q", "score", str(ws["model"]), "--calib", str(ws["calib"]), *CALIB, "--criterion",
            "simdiff,block_influence,angular_block,mssd,masd", "--block-size", "2", "--json", str(out), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_cli_offload_and_device_map_give_the_in_memory_scores(checkpoint):
    plain = score_json(checkpoint, "plain")
    offloaded = score_json(checkpoint, "offloaded", "--offload", "layerwise", "--device", "cpu")
    mapped = score_json(checkpoint, "mapped", "--device-map", "auto")
    for other in (offloaded, mapped):
        assert_same_statistics(plain["statistics"]["layer"], other["statistics"]["layer"])
        for name, values in plain["scores"].items():
            np.testing.assert_allclose(other["scores"][name], values, rtol=1e-6)


def test_cli_prune_with_offload_removes_the_same_layers(checkpoint):
    runs = {}
    for name, extra in {"plain": [], "offloaded": ["--offload", "layerwise"]}.items():
        out = checkpoint["root"] / f"pruned-{name}"
        argv = ["-q", "prune", str(checkpoint["model"]), "--calib", str(checkpoint["calib"]), *CALIB,
                "--num-layers", "2", "--out", str(out), *extra]
        assert main(argv) == 0
        runs[name] = json.loads((out / "simdiff.json").read_text())["removed_layers"]
    assert runs["plain"] == runs["offloaded"]


def test_cli_offload_refuses_criteria_that_need_the_whole_model(checkpoint, capsys):
    argv = ["-q", "score", str(checkpoint["model"]), "--calib", str(checkpoint["calib"]), *CALIB,
            "--criterion", "ppl_skip", "--offload", "layerwise"]
    assert main(argv) == 2
    assert "--offload layerwise" in capsys.readouterr().err
