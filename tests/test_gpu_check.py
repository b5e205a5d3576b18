"""benchmarks/gpu_check.py --tiny: the GPU check's code, every step, on a tiny shape on CPU (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]

# Hand arithmetic for the tiny shape (hidden 64, 4 heads of 16, 2 KV heads, MLP 224, vocab 512, untied head):
# q 64*64 + k 64*32 + v 64*32 + o 64*64 + MLP 3*64*224 + two RMSNorms 2*64 per decoder layer.
LAYER = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 224 + 2 * 64
HEAD_AND_NORM = 512 * 64 + 64


def test_tiny_dry_run_scores_prunes_saves_reloads_and_benchmarks(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--workdir",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])  # one JSON line, last
    assert result["num_layers"] == 8 and len(result["removed_layers"]) == 3 and result["num_layers_after"] == 5
    assert result["reloaded_dtype"] == "bfloat16" and result["reloaded_layers"] == 5
    assert result["reloaded_logits_equal"] is True
    assert result["ceiling"] == (8 * LAYER + HEAD_AND_NORM) / (5 * LAYER + HEAD_AND_NORM)
    figures = {"prefill_b1x64", "prefill_b4x32", "decode_b1_static_none", "decode_b4_static"}
    assert figures <= set(result)
    assert result["scoring"]["windows"] == 8
    with safe_open(str(tmp_path / "pruned" / "model.safetensors"), framework="pt") as f:
        names = f.keys()
        assert {str(f.get_slice(name).get_dtype()) for name in names} == {"BF16"}
        assert sum(".layers.4.mlp.up_proj" in name for name in names) == 1
        assert not any(".layers.5." in name for name in names)
    if result["apply"] != "not available":  # simdiff apply from disk gives the in-memory removal's checkpoint
        assert result["apply"]["tensors_identical"] and result["apply"]["config_equal"], result["apply"]
