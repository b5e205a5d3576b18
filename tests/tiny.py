"""Tiny random models of every supported family, and a tiny tokenizer trained offline."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
VOCAB = 256

# model_type -> extra config kwargs (on top of the shared tiny sizes)
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 8},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": 4},
    "gemma3_text": {"head_dim": 8, "sliding_window": 4},
    "phi3": {},
    "gpt2": {"n_embd": 32, "n_layer": 6, "n_head": 4, "n_positions": 128},
    "gpt_neox": {"rotary_pct": 0.5},
    "opt": {"ffn_dim": 64, "word_embed_proj_dim": 32},
    "qwen3_moe": {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                  "mlp_only_layers": [1], "decoder_sparse_step": 1},
}
SHARED = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 6,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
          "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}


def data_dir() -> Path:
    """The shared real data (``$SIMDIFF_DATA_DIR`` or ``../shared/data`` beside the checkout)."""
    path = Path(os.environ.get("SIMDIFF_DATA_DIR") or REPO.parent / "shared" / "data")
    assert (path / "wikitext-2" / "valid.txt").is_file(), f"shared data not found at {path}"
    return path


def calibration_text(chars: int = 20_000) -> str:
    """The first ``chars`` characters of WikiText-2 validation: enough real text for tiny calibration runs."""
    return (data_dir() / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:chars]


def write_calibration_text(path: Path) -> Path:
    """:func:`calibration_text` written to ``path`` (a .txt calibration source)."""
    path.write_text(calibration_text(), encoding="utf-8")
    return path


def tiny_workspace(root: Path) -> dict[str, Path]:
    """A tiny llama checkpoint and a calibration text under ``root``."""
    return {"root": root, "model": save_tiny("llama", root / "llama"),
            "calib": write_calibration_text(root / "calib.txt")}


def tiny_config(model_type: str, num_layers: int = 6):
    kwargs = {**SHARED, **FAMILIES[model_type]}
    kwargs["num_hidden_layers"] = num_layers
    if model_type == "gpt2":
        kwargs["n_layer"] = num_layers
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", num_layers: int = 6, seed: int = 0):
    """A randomly initialised tiny causal LM of ``model_type`` in eval mode (float32, eager attention)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_layers), attn_implementation="eager")
    return model.eval()


TOKENIZER_FILE = Path(__file__).resolve().parent / "data" / "tiny_tokenizer.json"


@functools.cache
def _tokenizer_json() -> str:
    """The committed tiny tokenizer (BPE training is not reproducible across processes: tied merges)."""
    return TOKENIZER_FILE.read_text(encoding="utf-8")


def train_tiny_tokenizer_json() -> str:
    """How tests/data/tiny_tokenizer.json was made (run once; the result differs between runs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:200])
    text = (data_dir() / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:200_000]
    tok.train_from_iterator(text.splitlines(), trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 256-token byte-level BPE tokenizer trained on WikiText-2 (committed, offline); no BOS added."""
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny(model_type: str, folder: Path, num_layers: int = 6) -> Path:
    """Save a tiny model + tokenizer as a local checkpoint directory."""
    tiny_model(model_type, num_layers).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
