"""Remove decoder layers for real, or bypass them temporarily in place.

Removal rebuilds the layer list, renumbers every ``layer_idx`` inside the kept layers, sets the config's
layer count and slices (or remaps) every per-layer config entry, then checks that the config now builds
exactly the pruned model's structure. Bypassing swaps chosen layers for identity modules and restores
them on exit; layer positions do not move, so per-position config (``layer_types``) stays right.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from simdiff.errors import SimdiffError
from simdiff.model.layers import find_decoder_layers, num_layers_in_config

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class PerLayerKeys:
    """Which list-valued keys of a model description hold per-layer data, by name.

    ``positional``: one entry per layer, sliced to the kept layers. ``indices``: lists of layer indices, remapped
    to the new numbering (removed layers dropped). ``never``: lists that are not per-layer even when their length
    equals the layer count (``never_prefixes``: key prefixes of such lists). Any other list exactly as long as the
    layer count is refused (:func:`per_layer_action`) unless the user names it (``--slice-config-key``).
    """

    positional: frozenset[str]
    indices: frozenset[str] = frozenset()
    never: frozenset[str] = frozenset()
    never_prefixes: tuple[str, ...] = ()


# transformers configs: the list keys their docstrings document as per-layer (configuration_*.py).
CONFIG_KEYS = PerLayerKeys(
    positional=frozenset({
        "layer_types",  # attention kind of each layer (sliding/full/linear/conv/...): gemma2/3, qwen3_next, lfm2, ...
        "mlp_layer_types",  # dense or sparse MLP of each layer (deepseek_v32, ernie4_5 MoE, dots, ...)
        "indexer_types",  # sparse-attention indexer of each layer (glm_moe_dsa, mistral_large4, ...)
        "layers_block_type",  # mamba/attention/MoE of each layer (nemotron_h)
        "no_rope_layers",  # 1 = RoPE, 0 = NoPE, per layer (smollm3, llama4)
        "activation_sparsity_pattern",  # gemma3n
        "layer_rope_theta",  # RoPE theta of each layer
        "num_attention_heads_per_layer",
        "swiglu_limits",  # per-layer gate/up clamp (step3p7)
    }),
    indices=frozenset({
        "mlp_only_layers",  # qwen2_moe, qwen3_moe, qwen3_next: layers with a dense MLP
        "moe_layers",  # llama4: layers with MoE
        "attn_layer_indices",  # bamba: layers with full attention
        "cross_attention_layers",  # mllama
        "rope_scaling_layers",  # molmo2: layers with scaled RoPE
        "local_layer_ids",  # sliding-window layers
    }),
    never=frozenset({"architectures", "eos_token_id", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens"}),
)
# GGUF metadata ({arch} is the file's architecture): the arrays llama.cpp reads one entry per block.
GGUF_KEYS = PerLayerKeys(
    positional=frozenset({
        "{arch}.feed_forward_length", "{arch}.attention.head_count", "{arch}.attention.head_count_kv",
        "{arch}.attention.sliding_window_pattern", "{arch}.activation_sparsity_scale", "{arch}.swiglu_clamp_exp",
        "{arch}.swiglu_clamp_shexp", "xielu.alpha_p", "xielu.alpha_n", "xielu.beta", "xielu.eps",
    }),
    never=frozenset({"{arch}.rope.dimension_sections", "{arch}.classifier.output_labels"}),
    never_prefixes=("general.", "tokenizer.", "split.", "clip.", "GGUF."),
)
# Config integers counting the first k layers of a special kind (recounted over the kept layers).
LEADING_LAYER_COUNTS = ("first_k_dense_replace",)
SLICE_FLAG = "--slice-config-key"


def per_layer_action(key: str, length: int, count: int, keys: PerLayerKeys, sliced: Collection[str] = (),
                     arch: str = "", what: str = "config key") -> str | None:
    """What removal does to the list ``key`` of ``length`` entries in a description of ``count`` layers:
    ``"slice"``, ``"remap"`` (layer indices) or None (left alone). ``sliced``: keys the user named with
    ``--slice-config-key``. An unknown list of exactly ``count`` entries is refused: it may be per-layer."""
    def named(names: Collection[str]) -> bool:
        return key in {name.format(arch=arch) for name in names}

    if named(keys.indices):
        return "remap"
    if named(keys.positional) or key in sliced:
        return "slice"
    if named(keys.never) or key.startswith(keys.never_prefixes) or length != count:
        return None
    raise SimdiffError(f"{what} {key!r} is a list of {count} entries, one per layer or not: simdiff slices only the "
                       f"keys it knows as per-layer; if it holds one entry per layer, pass {SLICE_FLAG} {key}")


def check_sliced_keys(present: dict[str, int], count: int, sliced: Collection[str], what: str = "config") -> None:
    """Every key named by ``--slice-config-key`` is a list of ``count`` entries in ``present`` (key -> length)."""
    for key in sliced:
        if present.get(key) != count:
            found = "has no such list" if key not in present else f"has {present[key]} entries there"
            raise SimdiffError(f"{SLICE_FLAG} {key}: the model's {what} {found}, and the model has {count} layers; "
                               "name only lists with one entry per layer")


def config_lists(config) -> dict[str, int]:
    """Top-level list-valued config keys and their lengths."""
    return {k: len(v) for k, v in vars(config).items() if isinstance(v, (list, tuple)) and not k.startswith("_")}


def check_config_sliceable(config, sliced: Collection[str] = ()) -> None:
    """Before any work: every list of the config that removal must touch is known or named (``sliced``)."""
    count = num_layers_in_config(config)
    lists = config_lists(config)
    check_sliced_keys(lists, count, sliced)
    for key, length in lists.items():
        per_layer_action(key, length, count, CONFIG_KEYS, sliced)

class SkippedLayer(nn.Module):
    """Stands in for a bypassed decoder layer: returns its input hidden states unchanged."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def validate_layer_indices(indices: Sequence[int], num_layers: int) -> list[int]:
    """Sorted unique indices, checked to lie in range and to leave at least one layer."""
    unique = sorted(set(int(i) for i in indices))
    bad = [i for i in unique if not 0 <= i < num_layers]
    if bad:
        raise SimdiffError(f"layer indices {bad} out of range: the model has layers 0..{num_layers - 1}")
    if len(unique) >= num_layers:
        raise SimdiffError(f"cannot remove all {num_layers} layers; keep at least one")
    return unique


@contextmanager
def bypass_layers(model: nn.Module, indices: Sequence[int]) -> Iterator[nn.Module]:
    """Within the block, the chosen decoder layers pass their input through unchanged; restored on exit."""
    decoder = find_decoder_layers(model)
    chosen = validate_layer_indices(indices, len(decoder)) if indices else []
    originals = {i: decoder.modules[i] for i in chosen}
    try:
        for i in chosen:
            decoder.modules[i] = SkippedLayer(i)
        yield model
    finally:
        for i, layer in originals.items():
            decoder.modules[i] = layer


def renumber_layer_indices(layers: Sequence[nn.Module]) -> None:
    """Set every ``layer_idx`` attribute inside layer j (attention, the layer itself, ...) to j."""
    for new_index, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index


def _sparse_step_as_index_list(config) -> None:
    """Turn a ``decoder_sparse_step`` pattern into an explicit ``mlp_only_layers`` list for the kept layers."""
    step = getattr(config, "decoder_sparse_step", None)
    if not isinstance(step, int) or step == 1 or not hasattr(config, "mlp_only_layers"):
        return
    dense_old = {i for i in range(num_layers_in_config(config)) if (i + 1) % step != 0}
    config.mlp_only_layers = sorted(set(config.mlp_only_layers) | dense_old)
    config.decoder_sparse_step = 1


def update_config_for_kept_layers(config, kept: list[int], sliced: Collection[str] = ()) -> list[str]:
    """Make ``config`` describe only the ``kept`` layers (original indices); returns the keys changed.

    ``sliced``: further keys holding one entry per layer (``--slice-config-key``); see :data:`CONFIG_KEYS`."""
    check_config_sliceable(config, sliced)
    old_count = num_layers_in_config(config)
    changed = ["num_hidden_layers"]
    _sparse_step_as_index_list(config)
    new_index = {old: new for new, old in enumerate(kept)}
    for key, value in list(vars(config).items()):
        if key.startswith("_"):
            continue
        if key in LEADING_LAYER_COUNTS and isinstance(value, int):
            setattr(config, key, sum(1 for i in kept if i < value))
            changed.append(key)
        elif isinstance(value, (list, tuple)):
            action = per_layer_action(key, len(value), old_count, CONFIG_KEYS, sliced)
            if action == "remap":
                setattr(config, key, type(value)(new_index[i] for i in value if i in new_index))
            elif action == "slice":
                setattr(config, key, type(value)(value[i] for i in kept))
            if action is not None:
                changed.append(key)
    config.num_hidden_layers = len(kept)
    return changed


def _structure(model: nn.Module) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


# Module attributes not compared by the per-layer settings check: the run's (training mode), and layer_idx, which
# removal renumbers and simdiff.verify.check_layer_indices checks with its own message.
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
            "simdiff.surgery (CONFIG_KEYS / LEADING_LAYER_COUNTS)"
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


def renumber_device_map(model: nn.Module, layers_path: str, kept: list[int]) -> None:
    """Keep accelerate's ``hf_device_map`` (``--device-map``) naming the model's modules: entries of removed layers
    dropped, kept layers renamed to their new index. (Each layer keeps its hooks, whose offloaded weights stay
    addressed by the original names.)"""
    device_map = getattr(model, "hf_device_map", None)
    if not isinstance(device_map, dict):
        return
    new_index = {old: new for new, old in enumerate(kept)}
    prefix = layers_path + "."
    renamed = {}
    for name, device in device_map.items():
        index, dot, rest = name.removeprefix(prefix).partition(".")
        if not name.startswith(prefix) or not index.isdigit():
            renamed[name] = device
        elif int(index) in new_index:
            renamed[f"{prefix}{new_index[int(index)]}{dot}{rest}"] = device
    model.hf_device_map = renamed


def remove_layers(model: nn.Module, indices: Sequence[int], sliced: Collection[str] = ()) -> list[int]:
    """Remove decoder layers ``indices`` (original numbering) from ``model`` in place; return the kept ones.

    ``sliced``: config keys beyond :data:`CONFIG_KEYS` that hold one entry per layer (``--slice-config-key``).

    The model is modified in place (load a fresh copy if you need the dense one too); its on-disk
    checkpoint is never touched.
    """
    decoder = find_decoder_layers(model)
    removed = validate_layer_indices(indices, len(decoder))
    check_config_sliceable(model.config, sliced)  # before the model is touched
    kept = [i for i in range(len(decoder)) if i not in set(removed)]
    new_layers = nn.ModuleList([decoder.modules[i] for i in kept])
    renumber_layer_indices(new_layers)
    decoder.replace(new_layers)
    renumber_device_map(model, decoder.path, kept)
    changed = update_config_for_kept_layers(model.config, kept, sliced)
    log.info("removed layers %s; config keys updated: %s", removed, ", ".join(changed))
    check_config_consistent(model)
    return kept
