"""The memory benchmark's checkpoint writer makes a valid sharded bfloat16 checkpoint without a model in memory."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_scale.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("memory_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_checkpoint_is_sharded_bf16_and_loads(tmp_path) -> None:
    bench = load_benchmark()
    sizes = bench.write_random_checkpoint(tmp_path, bench.TINY, shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text(encoding="utf-8"))
    assert len(sizes) == len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] < sum(sizes)  # the tensor bytes, without the headers
    model, loading = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto", output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, stored once
    assert "lm_head.weight" not in index["weight_map"]
    largest_tensor = max(p.numel() * 2 for p in model.parameters())
    assert max(sizes) < max(20_000, largest_tensor) + 10_000  # a shard exceeds the limit only by one tensor
