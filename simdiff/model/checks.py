"""Checks on a checkpoint and the run's inputs, done before any weight is loaded or any pass starts.

A local checkpoint is read from its headers only: ``config.json`` (valid JSON object), the safetensors headers
(or the shard index), and the tokenizer. The expected tensors come from the config, built on the meta device,
so a config that disagrees with its weights (a wrong layer count, missing or foreign tensors, a tokenizer larger
than the embedding) is refused with one line instead of loading half-random weights.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from simdiff.core.errors import SimdiffError
from simdiff.model.config_keys import CONFIG_KEYS, SLICE_FLAG
from simdiff.model.layers import find_decoder_layers, num_layers_in_config

log = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
SHOWN = 3  # example names shown in an error message


def read_config_json(folder: Path) -> dict:
    """``config.json`` of a local checkpoint as a dict; a clear error when it is not a JSON object."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise SimdiffError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise SimdiffError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                           "fix or replace the file") from exc
    if not isinstance(config, dict):
        raise SimdiffError(f"{path} holds a JSON {type(config).__name__}; a transformers config is a JSON object")
    return config


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header (no tensor data is read); refuses truncated files."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or length > size - 8:
            raise SimdiffError(f"{path} is truncated or not a safetensors file ({size} bytes); "
                               "copy or download it again")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SimdiffError(f"{path} has a corrupt safetensors header; copy or download it again") from exc
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    end = 8 + length + max((info["data_offsets"][1] for info in tensors.values()), default=0)
    if end > size:
        raise SimdiffError(f"{path} is truncated: its header describes {end} bytes but the file has {size}; "
                           "copy or download it again")
    return {name: tuple(info["shape"]) for name, info in tensors.items()}


def pytorch_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a ``pytorch_model.bin`` (memory-mapped: the tensor data is not read)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a damaged archive
        raise SimdiffError(f"{path} cannot be read ({type(exc).__name__}); copy or download it again") from exc
    return {name: tuple(t.shape) for name, t in state.items()}


def _sharded_shapes(index: Path, read: Callable[[Path], dict[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SimdiffError(f"{index} is not a valid shard index (a JSON object with a weight_map)") from exc
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        if not path.is_file():
            raise SimdiffError(f"shard {path} listed in {index.name} is missing; copy or download it again")
        shapes.update(read(path))
    return shapes


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor stored in a local checkpoint folder (single file or shards)."""
    if (folder / SAFETENSORS).is_file():
        return safetensors_shapes(folder / SAFETENSORS)
    if (folder / SAFETENSORS_INDEX).is_file():
        return _sharded_shapes(folder / SAFETENSORS_INDEX, safetensors_shapes)
    if (folder / PYTORCH).is_file():
        return pytorch_shapes(folder / PYTORCH)
    if (folder / PYTORCH_INDEX).is_file():
        return _sharded_shapes(folder / PYTORCH_INDEX, pytorch_shapes)
    raise SimdiffError(f"{folder} holds config.json but no weights ({SAFETENSORS}, {SAFETENSORS_INDEX} or "
                       f"{PYTORCH}); copy the complete checkpoint")


def meta_model(config, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM ``config`` describes, on the meta device (no memory, no initialisation)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise SimdiffError(f"model_type {config.model_type!r} is not a causal LM that transformers can load "
                           f"({str(exc).splitlines()[0]}); simdiff prunes decoder-only causal LMs") from exc


def _key_renamer(model: nn.Module) -> Callable[[str], tuple[str, bool]]:
    """Map a checkpoint key to the model's key as transformers' loader does: ``(name, converted)``.

    ``converted`` marks keys that a weight converter merges or reshapes (e.g. per-expert MoE weights), whose
    stored shape differs from the model's. Uses transformers' conversion tables where this version has them.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # an older transformers stores checkpoints under the model's own names
        return lambda key: (key, False)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()

    def rename(key: str) -> tuple[str, bool]:
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        return name, pattern is not None

    return rename


def _matches(name: str, patterns) -> bool:
    return any(re.search(p, name) for p in patterns or ())


def _examples(names: set[str]) -> str:
    shown = sorted(names)[:SHOWN]
    return ", ".join(shown) + (", ..." if len(names) > SHOWN else "")


def check_layer_count(model: nn.Module, stored: set[str], where: str) -> None:
    """The decoder layers present in the weights must be exactly those the config declares."""
    layers = find_decoder_layers(model)
    path, configured = layers.path, len(layers)
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.")
    found = sorted({int(m.group(1)) for key in stored if (m := pattern.match(key))})
    if found != list(range(configured)):
        held = f"{len(found)} ({path}.{found[0]}..{found[-1]})" if found else "none"
        raise SimdiffError(f"{where}: config.json declares {configured} decoder layers but the weights hold {held}; "
                           "the config and the weights disagree (fix num_hidden_layers or use the matching weights)")


def check_weights_match(model: nn.Module, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Refuse layer-count disagreement, missing or unexpected tensors (tied weights aside), and wrong shapes."""
    rename = _key_renamer(model)
    renamed = {}
    converted = set()
    for key, shape in shapes.items():
        name, was_converted = rename(key)
        renamed[name] = shape
        if was_converted:
            converted.add(name)
    check_layer_count(model, set(renamed), where)
    if getattr(model.config, "quantization_config", None):
        return  # quantized tensors (qweight, scales, ...) are named and shaped unlike the meta model's
    state = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    missing = {n for n in parameters - set(renamed) - tied
               if not _matches(n, model._keys_to_ignore_on_load_missing)}
    unexpected = {n for n in set(renamed) - set(state) if not _matches(n, model._keys_to_ignore_on_load_unexpected)}
    if missing or unexpected:
        parts = [f"{len(missing)} tensors missing ({_examples(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({_examples(unexpected)})" if unexpected else ""]
        raise SimdiffError(f"{where}: the weights do not match config.json: {', '.join(p for p in parts if p)}; "
                           "the checkpoint is incomplete or belongs to another architecture")
    wrong = {n: (renamed[n], tuple(state[n].shape)) for n in set(renamed) - converted
             if n in state and tuple(state[n].shape) != renamed[n]}
    if wrong:
        name, (stored, expected) = sorted(wrong.items())[0]
        raise SimdiffError(f"{where}: tensor {name} has shape {list(stored)} in the weights but config.json implies "
                           f"{list(expected)} ({len(wrong)} tensors differ); the config and the weights disagree")


def check_loading_info(loading: dict, where: str) -> None:
    """After transformers loaded weights it could not check beforehand: no missing, unexpected or resized tensor."""
    problems = {kind: set(loading.get(f"{kind}_keys") or ()) for kind in ("missing", "unexpected", "mismatched")}
    if any(problems.values()):
        shown = ", ".join(f"{len(keys)} {kind} ({_examples({str(k) for k in keys})})"
                          for kind, keys in problems.items() if keys)
        raise SimdiffError(f"{where}: the weights do not match its config: {shown}; the checkpoint is incomplete "
                           "or belongs to another architecture")


def check_vocabulary(model: nn.Module, tokenizer, where: str) -> None:
    """Every token id the tokenizer can produce must have an embedding row."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise SimdiffError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the embedding has {rows} rows "
                           "(vocab_size); ids past the embedding would crash or read garbage: use the model's own "
                           "tokenizer or resize the embeddings")


def max_positions(config) -> int | None:
    """The longest sequence the model accepts (``max_position_embeddings`` or its alias), if the config says."""
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_seq_len(model: nn.Module, seq_len: int, flag: str = "--calib-seq-len") -> None:
    """Refuse windows longer than the model's maximum positions (an error, never a silent clamp)."""
    limit = max_positions(model.config)
    if limit is not None and seq_len > limit:
        raise SimdiffError(f"{flag} {seq_len} exceeds the model's maximum of {limit} positions "
                           f"(max_position_embeddings); use {flag} {limit} or less")


def check_device(device: str | None) -> None:
    """A device name torch knows and this machine has (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ...)."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SimdiffError(f"unknown --device {device!r}; use cpu, cuda, cuda:N or mps") from exc
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise SimdiffError(f"--device {device} asked for, but CUDA is not available here (torch "
                               f"{torch.__version__}); use --device cpu or install a CUDA build of torch")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise SimdiffError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise SimdiffError(f"--device {device} asked for, but MPS is not available here; use --device cpu")


def _structure(model: nn.Module) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


# Module attributes not compared by the per-layer settings check: the run's (training mode), and layer_idx, which
# removal renumbers and simdiff.store.verify.check_layer_indices checks with its own message.
NOT_COMPARED = frozenset({"training", "gradient_checkpointing", "layer_idx"})


def layer_settings(layer: nn.Module) -> dict[str, object]:
    """The plain settings (int, float, str, bool, None) of every module inside one decoder layer, by dotted name:
    attention kind, sliding window, RoPE use, head counts, ... (what a per-layer config entry decides)."""
    out = {}
    for name, module in layer.named_modules():
        for attr, value in vars(module).items():
            if attr.startswith("_") or attr in NOT_COMPARED:
                continue
            if value is None or isinstance(value, (bool, int, float, str)):
                out[f"{name}.{attr}" if name else attr] = value
    return out


def _check_per_layer_lengths(config, count: int, source: str) -> None:
    for key, value in vars(config).items():
        if not isinstance(value, (list, tuple)):
            continue
        if (key in CONFIG_KEYS.positional or key.endswith("layer_types")) and len(value) != count:
            raise SimdiffError(f"{source}: {key} has {len(value)} entries for {count} layers")
        if key in CONFIG_KEYS.indices and any(not 0 <= i < count for i in value if isinstance(i, int)):
            raise SimdiffError(f"{source}: {key} = {list(value)} names layers outside 0..{count - 1}")


def check_config_consistent(model: nn.Module, config=None, source: str = "the pruned config") -> None:
    """Raise unless ``type(model)(config)`` builds exactly ``model``: the same parameters, per-layer lists of the
    layer count, and in every decoder layer the same settings (:func:`layer_settings`: attention kind, sliding
    window, ... which parameter shapes do not show).

    ``config`` defaults to ``model.config``; ``source`` names it in the error (e.g. a written config.json).
    """
    config = model.config if config is None else config
    count = num_layers_in_config(config)
    _check_per_layer_lengths(config, count, source)
    with torch.device("meta"):
        rebuilt = type(model)(copy.deepcopy(config))
    expected, actual = _structure(rebuilt), _structure(model)
    if expected != actual:
        missing = sorted(set(actual) ^ set(expected))[:3]
        shapes = [k for k in set(actual) & set(expected) if actual[k] != expected[k]][:3]
        raise SimdiffError(
            f"{source} (model_type {config.model_type!r}) would not rebuild the pruned model "
            f"(differing parameters: {missing or shapes}); this architecture needs a config rule in "
            "simdiff.model.config_keys (CONFIG_KEYS / LEADING_LAYER_COUNTS)"
        )
    for j, (want, have) in enumerate(zip(find_decoder_layers(rebuilt).modules, find_decoder_layers(model).modules)):
        want_settings, have_settings = layer_settings(want), layer_settings(have)
        differing = [k for k in sorted(set(want_settings) | set(have_settings))
                     if want_settings.get(k, "absent") != have_settings.get(k, "absent")]
        if differing:
            key = differing[0]
            raise SimdiffError(
                f"{source} (model_type {config.model_type!r}) builds decoder layer {j} with {key} = "
                f"{want_settings.get(key, 'absent')!r}, the pruned model's is {have_settings.get(key, 'absent')!r}; "
                f"a per-layer config entry was not sliced right (name it with {SLICE_FLAG} if it is one)")


def cache_kwarg(model: nn.Module) -> str:
    """The forward argument taking the KV cache: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
