"""Model loading and decoder-layer discovery."""

from simdiff.core.cache import BUILTIN_MODELS, cache_dir
from simdiff.model.layers import DecoderLayers, find_decoder_layers, num_layers_in_config
from simdiff.model.load import load_model, model_device, resolve_model_path

__all__ = [
    "BUILTIN_MODELS",
    "DecoderLayers",
    "cache_dir",
    "find_decoder_layers",
    "load_model",
    "model_device",
    "num_layers_in_config",
    "resolve_model_path",
]
