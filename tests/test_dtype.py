"""Native dtype: a bfloat16 checkpoint is loaded, scored and saved as bfloat16; statistics are float32 whatever it is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny import (
    tiny_model,
    tiny_tokenizer,
    write_calibration_text,
)

from simdiff.cli.main import main
from simdiff.collect.hooks import StatisticsRecorder, collect_layer_statistics
from simdiff.data import batches
from simdiff.model.load import load_model
from simdiff.store.verify import safetensors_files

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# bfloat16 keeps 8 significant bits: every stored hidden state is rounded by up to 2^-8 = 0.39 % relative.
# The statistics are means of |y - x|, (y - x)^2, cos and arccos over many tokens, so their relative error
# is about twice the inputs' (squares) plus what 6 layers of bfloat16 arithmetic add; measured worst case
# 1.5e-3 on llama, gemma3, gpt2 and qwen3 (64-token windows). 1e-2 is 2.5 bfloat16 ulps: roundoff passes,
# a statistic of the wrong tensors (another layer, another batch) does not.
BF16_RTOL = 1e-2
MEANS = ("mean_cos", "mssd_absolute", "masd_absolute", "mssd_relative", "masd_relative")


def save_bf16_checkpoint(model_type: str, folder: Path) -> Path:
    tiny_model(model_type, num_layers=6).to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def written_dtypes(folder: Path) -> set[str]:
    dtypes = set()
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt") as f:
            dtypes |= {str(f.get_slice(name).get_dtype()) for name in f.keys()}  # noqa: SIM118
    return dtypes


def test_bf16_checkpoint_pruned_by_the_cli_comes_out_bf16(tmp_path):
    model = save_bf16_checkpoint("llama", tmp_path / "bf16")
    calib = tmp_path / "calib.txt"
    write_calibration_text(calib)
    out = tmp_path / "pruned"
    argv = ["-q", "prune", str(model), "--calib", str(calib), "--samples", "4", "--calib-seq-len", "32",
            "--num-layers", "2", "--out", str(out)]  # no --dtype: the checkpoint's own
    assert main(argv) == 0
    assert written_dtypes(out) == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    metadata = json.loads((out / "simdiff.json").read_text())
    assert metadata["settings"]["dtype"] == "auto" and metadata["num_layers_after"] == 4
    statistics = metadata["statistics"]["layer"]
    assert all(np.isfinite(statistics["mssd_relative"]))


def test_statistics_of_bf16_hidden_states_are_computed_in_float32():
    """Given the same bfloat16 hidden states, the sums equal those of their exact float32 copies, bit for bit."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 64, generator=generator).to(torch.bfloat16)
    y = (x.float() + 0.1 * torch.randn(3, 40, 64, generator=generator)).to(torch.bfloat16)
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 30:] = 0
    sums = []
    for a, b in ((x, y), (x.float(), y.float())):
        recorder = StatisticsRecorder(2, block_sizes=[2])
        recorder.start_batch(mask)
        recorder.record(0, a, b)
        recorder.record(1, b, a)
        sums.append(recorder.stats.to_dict())
    assert sums[0] == sums[1]
    assert recorder.stats.sums["sq"].dtype == np.float64


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_bf16_statistics_match_float32_within_bf16_rounding(model_type, tmp_path):
    folder = save_bf16_checkpoint(model_type, tmp_path / model_type)
    native, _ = load_model(str(folder))  # dtype auto
    upcast, _ = load_model(str(folder), dtype="float32")  # the same weights, exactly, in float32
    assert next(native.parameters()).dtype == torch.bfloat16 and next(upcast.parameters()).dtype == torch.float32
    data = batches(torch.randint(4, 256, (8, 64), generator=torch.Generator().manual_seed(0)), 4)
    low, high = (collect_layer_statistics(m, data, block_sizes=[2]).to_dict() for m in (native, upcast))
    for key in MEANS:
        np.testing.assert_allclose(low[key], high[key], rtol=BF16_RTOL, atol=0, err_msg=key)
    np.testing.assert_allclose(low["angular"]["2"], high["angular"]["2"], rtol=BF16_RTOL, atol=0)
