"""Models to benchmark: loaded checkpoints, random-weight architectures, and pruned copies.

Speed does not depend on weight values, so an architecture can be benchmarked from its config alone
(``--random-weights``): a built-in shape name (``llama-3.1-8b``), a ``config.json`` file or a model folder.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn

from simdiff.core.errors import SimdiffError, did_you_mean
from simdiff.model.layers import find_decoder_layers
from simdiff.model.load import parse_dtype
from simdiff.surgery.layers import remove_layers

log = logging.getLogger(__name__)

# Public architecture shapes (config.json of each model family); weights are never needed.
SHAPES: dict[str, dict] = {
    "llama-3.1-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    },
}


def load_config(spec: str):
    """A transformers config from a built-in shape name, a config.json file or a model folder."""
    from transformers import AutoConfig

    if spec in SHAPES:
        values = dict(SHAPES[spec])
        return AutoConfig.for_model(values.pop("model_type"), **values)
    path = Path(spec).expanduser()
    if path.is_file():
        values = json.loads(path.read_text(encoding="utf-8"))
        if "model_type" not in values:
            raise SimdiffError(f"{spec} has no model_type; give a transformers config.json")
        return AutoConfig.for_model(values.pop("model_type"), **values)
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path)
    raise SimdiffError(f"--random-weights {spec!r}: give a built-in shape ({', '.join(SHAPES)}), a config.json "
                       f"file or a model folder.{did_you_mean(spec, list(SHAPES))}")


def random_model(spec: str, dtype: str = "float32", device: str | None = None, seed: int = 0,
                 attn_implementation: str | None = None) -> nn.Module:
    """A causal LM of the architecture ``spec`` with random (normally initialised) weights, built on ``device``."""
    from transformers import AutoModelForCausalLM

    config = load_config(spec)
    torch.manual_seed(seed)
    kwargs = {"dtype": parse_dtype(dtype) if dtype != "auto" else torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()


def layers_to_remove(num_layers: int, count: int) -> list[int]:
    """The ``count`` layers just before the last one (where similarity criteria usually cut)."""
    if not 0 < count < num_layers - 1:
        raise SimdiffError(f"--remove {count}: give 1..{num_layers - 2} for a model of {num_layers} layers")
    return list(range(num_layers - 1 - count, num_layers - 1))


def pruned_copy(model: nn.Module, count: int) -> tuple[nn.Module, list[int]]:
    """A deep copy of ``model`` with ``count`` decoder layers removed (which ones does not matter for speed)."""
    indices = layers_to_remove(len(find_decoder_layers(model)), count)
    pruned = copy.deepcopy(model)
    remove_layers(pruned, indices)
    return pruned.eval(), indices
