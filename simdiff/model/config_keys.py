"""Which list-valued entries of a model description (a transformers config, GGUF metadata) hold one entry per
decoder layer: known keys by name, anything else of that length refused unless the user names it
(``--slice-config-key``). Surgery slices or remaps exactly these; the save check verifies them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from simdiff.core.errors import SimdiffError
from simdiff.model.layers import num_layers_in_config


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
