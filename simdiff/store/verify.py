"""Check a written checkpoint against the in-memory model it came from, without loading a second copy.

Four checks, each refusing the save with one line naming what differs:

1. **weights**: the written safetensors files (one file or shards) are streamed tensor by tensor and
   compared with the in-memory state dict as transformers writes it (tied copies dropped, weight
   conversions such as fused MoE experts reverted): the same names, shapes, dtypes and bytes. Parameters
   accelerate offloaded to CPU or disk (meta tensors) are read back through its hooks one at a time.
   Peak memory is the model plus one tensor.
2. **config**: the written ``config.json`` builds, on the meta device, exactly the in-memory model's
   parameters (:func:`simdiff.surgery.layers.check_config_consistent`) and names its dtype.
3. **layer indices**: every ``layer_idx`` inside decoder layer j equals j (the KV cache is indexed by it).
4. **KV cache**: greedy decoding with the KV cache gives the tokens of greedy decoding without it.

The last two run on the in-memory model, on whatever device and in whatever dtype it is; none compares
logits across kernels, so a valid bfloat16 prune made on a GPU passes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from simdiff.core.errors import SimdiffError
from simdiff.model.layers import find_decoder_layers
from simdiff.model.load import model_device

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# A greedy token may differ between the cached and uncached paths only at a rounding tie: both paths rank the
# same two tokens first, swapped, and on each path the top-2 margin is within the logits' rounding, i.e.
# max(TIE_ULPS x the unit in the last place of the dtype at the best logit, TIE_RELATIVE_FLOOR x the best logit).
# benchmarks/kv_cache_ties.py measures how far the top-2 margin moves between the paths: at most 5.0 ulps in
# bfloat16 (SmolLM2-135M, CPU, 4 prompts x 16 steps), so 10 ulps leave 2x for other kernels; bfloat16 at logit 20:
# 10 x 0.125 = 1.25 nats (the former 16 eps x the largest logit allowed 2.5, for any token). Float32 rounding is
# far below the accumulated kernel differences (20.7 eps over 30 layers), so its floor is relative: 1e-4 x the
# best logit.
TIE_ULPS = 10
TIE_RELATIVE_FLOOR = 1e-4


def verify_saved(model: nn.Module, folder: Path, tokenizer=None, new_tokens: int = 8) -> None:
    """Run every check of this module on ``model`` and the checkpoint written to ``folder``."""
    check_written_weights(model, folder)
    check_written_config(model, folder)
    check_layer_indices(model)
    check_cached_generation(model, prompt_ids(model, tokenizer), new_tokens)


# -- 1. weights ----------------------------------------------------------------------------------------
def expected_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` writes, by name: tied copies dropped, weight conversions reverted."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    return revert_weight_conversion(model, state)


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: the shards its index names, or the single file."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise SimdiffError(f"no {SINGLE_FILE} or {INDEX_FILE} was written to {folder}")


def written_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every written tensor, one at a time.

    Each tensor is read with the file opened for it alone: the file's memory map is released after every
    tensor, so at most one tensor's pages are resident (a file kept open would map in every page read).
    """
    from safetensors import safe_open

    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()
        for name in names:
            with safe_open(str(path), framework="pt") as f:
                tensor = f.get_tensor(name)
            yield name, tensor


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two CPU tensors of the same dtype and shape (NaNs and -0.0 included)."""
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def readable(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or, for a parameter accelerate offloaded (``--device-map`` onto CPU or disk: a meta tensor whose
    data its hook loads on each call), the data read back through that hook's weights map, as ``save_pretrained``
    reads it (one tensor at a time)."""
    if tensor.device.type != "meta":
        return tensor
    from transformers.integrations.accelerate import load_offloaded_parameter

    try:
        return load_offloaded_parameter(model, name)
    except (ValueError, KeyError) as exc:
        raise SimdiffError(f"in-memory tensor {name!r} is on the meta device and no accelerate hook holds its data; "
                           "the written file cannot be checked against it") from exc


def check_written_weights(model: nn.Module, folder: Path) -> None:
    """Every written tensor equals its in-memory counterpart in name, shape, dtype and bytes."""
    expected = expected_state_dict(model)
    seen: set[str] = set()
    for name, actual in written_tensors(folder):
        if name not in expected:
            raise SimdiffError(f"the written checkpoint holds {name!r}, which the in-memory model does not have")
        want = readable(model, name, expected[name])
        if actual.dtype != want.dtype or actual.shape != want.shape:
            raise SimdiffError(f"written tensor {name!r} is {actual.dtype} {tuple(actual.shape)}, the in-memory one "
                               f"{want.dtype} {tuple(want.shape)}")
        if not same_bytes(actual, want.detach().cpu()):
            raise SimdiffError(f"written tensor {name!r} differs from the in-memory model's (bytes differ)")
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise SimdiffError(f"the written checkpoint lacks {len(missing)} tensors of the model, e.g. {missing[0]!r}")


# -- 2. config -----------------------------------------------------------------------------------------
def check_written_config(model: nn.Module, folder: Path) -> None:
    """The written config.json rebuilds the in-memory model's parameters and records its dtype."""
    from transformers import AutoConfig

    from simdiff.model.checks import check_config_consistent

    config = AutoConfig.from_pretrained(folder)
    check_config_consistent(model, config, source=f"config.json written to {folder}")
    dtype = next(model.parameters()).dtype
    if getattr(config, "dtype", None) not in (None, dtype):
        raise SimdiffError(f"config.json written to {folder} says dtype {config.dtype}, the weights are {dtype}")


# -- 3. layer indices ----------------------------------------------------------------------------------
def check_layer_indices(model: nn.Module) -> None:
    """Every ``layer_idx`` attribute inside decoder layer j is j."""
    for position, layer in enumerate(find_decoder_layers(model).modules):
        for name, module in layer.named_modules():
            index = getattr(module, "layer_idx", None)
            if isinstance(index, int) and index != position:
                where = f"{name}.layer_idx" if name else "layer_idx"
                raise SimdiffError(f"decoder layer {position} has {where} = {index}; the KV cache would mix layers")


# -- 4. KV cache ---------------------------------------------------------------------------------------
def prompt_ids(model: nn.Module, tokenizer=None, text: str = "The quick brown fox jumps over") -> torch.Tensor:
    """``[1, T]`` token ids of ``text`` (or of a fixed id range without a tokenizer) on the model's device."""
    vocab = model.config.get_text_config().vocab_size
    ids = tokenizer(text, return_tensors="pt").input_ids if tokenizer is not None else None
    if ids is None or ids.shape[1] < 2:
        ids = (torch.arange(4, 12) % vocab).unsqueeze(0)
    return ids.to(model_device(model))


@torch.no_grad()
def greedy_with_cache(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_tokens`` greedy tokens after ``ids``, each step feeding one token and the KV cache, and the logits
    each step chose from (``[1, new_tokens, vocab]``, in the model's dtype)."""
    from simdiff.model.checks import cache_kwarg

    key = cache_kwarg(model)
    out = model(input_ids=ids, use_cache=True)
    steps = [out.logits[:, -1]]
    tokens = [steps[-1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        out = model(input_ids=tokens[-1], use_cache=True, **{key: getattr(out, key)})
        steps.append(out.logits[:, -1])
        tokens.append(steps[-1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1), torch.stack(steps, dim=1)


def rounding_unit(value: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype`` numbers at ``|value|`` (its unit in the last place); 0 for integer dtypes."""
    if not dtype.is_floating_point:
        return 0.0
    info = torch.finfo(dtype)
    return info.eps * 2.0 ** math.floor(math.log2(max(abs(value), info.tiny)))


def tie_tolerance(best: float, dtype: torch.dtype) -> float:
    """How far apart two logits near ``best`` may be and still count as a rounding tie (see ``TIE_ULPS``)."""
    return max(TIE_ULPS * rounding_unit(best, dtype), TIE_RELATIVE_FLOOR * abs(best))


def is_rounding_tie(uncached: torch.Tensor, cached: torch.Tensor, dtype: torch.dtype) -> bool:
    """At one step (``[vocab]`` float logits of each path): the two paths rank the same two tokens first, swapped,
    and each path's top-2 margin is within the rounding of ``dtype`` at the best logit."""
    u_top, c_top = uncached.topk(2), cached.topk(2)
    if u_top.indices.tolist() != c_top.indices.flip(0).tolist():
        return False
    best = max(abs(float(u_top.values[0])), abs(float(c_top.values[0])))
    margins = (float(u_top.values[0] - u_top.values[1]), float(c_top.values[0] - c_top.values[1]))
    return max(margins) <= tie_tolerance(best, dtype)


@torch.no_grad()
def check_cached_generation(model: nn.Module, ids: torch.Tensor, new_tokens: int = 8) -> None:
    """Greedy decoding with the KV cache gives the tokens greedy decoding without a cache gives.

    Without a cache, greedy decoding picks, at each step, the argmax of a full forward over everything
    so far; so one uncached forward over the prompt and the cached tokens gives every uncached choice
    for the same prefix, and the two sequences are equal iff every cached token is that argmax. A
    difference is tolerated only at a rounding tie (:func:`is_rounding_tie`, ``TIE_ULPS``): the margin
    between the two best tokens is measured at that step, on both paths, in the logits' own dtype.
    """
    try:
        cached, cached_logits = greedy_with_cache(model, ids, new_tokens)
    except (RuntimeError, IndexError) as exc:
        raise SimdiffError(f"greedy decoding with the KV cache fails on the pruned model: {exc}") from exc
    sequence = torch.cat([ids, cached[:, :-1]], dim=1)
    raw = model(input_ids=sequence, use_cache=False).logits[:, ids.shape[1] - 1:]
    logits, dtype = raw.float(), raw.dtype
    uncached = logits.argmax(-1)
    if torch.equal(uncached, cached):
        return
    steps = (cached != uncached).flatten().nonzero().flatten().tolist()
    for step in steps:
        u, c = logits.flatten(0, 1)[step], cached_logits.float().flatten(0, 1)[step]
        if not is_rounding_tie(u, c, dtype):
            token = int(cached.flatten()[step])
            gap = float(u.max() - u[token])
            raise SimdiffError(f"greedy decoding with the KV cache picks token {token} at step {step}, without it "
                               f"{int(uncached.flatten()[step])} (logit gap {gap:.3g}, a rounding tie is within "
                               f"{tie_tolerance(float(u.max()), dtype):.3g}); the pruned model's cache is "
                               "inconsistent")
    log.info("KV-cache check: %d rounding ties between cached and uncached greedy tokens", len(steps))
