"""Check a written checkpoint against the in-memory model it came from, without loading a second copy.

Four checks, each refusing the save with one line naming what differs:

1. **weights**: the written safetensors files (one file or shards) are streamed tensor by tensor and
   compared with the in-memory state dict as transformers writes it (tied copies dropped, weight
   conversions such as fused MoE experts reverted): the same names, shapes, dtypes and bytes. Peak memory
   is the model plus one tensor.
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
# A greedy token may differ between the cached and uncached paths only at a rounding tie: where the uncached
# logits of the two tokens are within max(TIE_EPS_UNITS x eps of the model's dtype, TIE_RELATIVE_FLOOR) x the
# largest logit. On SmolLM2-135M (CPU, benchmarks/kv_cache_ties.py) cached and uncached logits differ by at
# most 5.4 eps in bfloat16 and 2.5e-6 (20.7 eps, accumulated over 30 layers) in float32, relative to the
# largest logit; the margins (3x, 40x) leave room for other kernels (GPU attention) before a valid save is refused.
TIE_EPS_UNITS = 16
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


def check_written_weights(model: nn.Module, folder: Path) -> None:
    """Every written tensor equals its in-memory counterpart in name, shape, dtype and bytes."""
    expected = expected_state_dict(model)
    seen: set[str] = set()
    for name, actual in written_tensors(folder):
        if name not in expected:
            raise SimdiffError(f"the written checkpoint holds {name!r}, which the in-memory model does not have")
        want = expected[name]
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
def greedy_with_cache(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``new_tokens`` greedy tokens after ``ids``, each step feeding one token and the KV cache."""
    from simdiff.model.checks import cache_kwarg

    key = cache_kwarg(model)
    out = model(input_ids=ids, use_cache=True)
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        out = model(input_ids=tokens[-1], use_cache=True, **{key: getattr(out, key)})
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def check_cached_generation(model: nn.Module, ids: torch.Tensor, new_tokens: int = 8) -> None:
    """Greedy decoding with the KV cache gives the tokens greedy decoding without a cache gives.

    Without a cache, greedy decoding picks, at each step, the argmax of a full forward over everything
    so far; so one uncached forward over the prompt and the cached tokens gives every uncached choice
    for the same prefix, and the two sequences are equal iff every cached token is that argmax. A
    difference is tolerated only at a rounding tie (see ``TIE_EPS_UNITS``).
    """
    try:
        cached = greedy_with_cache(model, ids, new_tokens)
    except (RuntimeError, IndexError) as exc:
        raise SimdiffError(f"greedy decoding with the KV cache fails on the pruned model: {exc}") from exc
    sequence = torch.cat([ids, cached[:, :-1]], dim=1)
    logits = model(input_ids=sequence, use_cache=False).logits[:, ids.shape[1] - 1:].float()
    uncached = logits.argmax(-1)
    if torch.equal(uncached, cached):
        return
    dtype = next(model.parameters()).dtype
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    best = logits.max(-1).values
    gap = best - logits.gather(-1, cached.unsqueeze(-1)).squeeze(-1)
    tolerance = max(TIE_EPS_UNITS * eps, TIE_RELATIVE_FLOOR) * best.abs().clamp_min(1.0)
    beyond = (gap > tolerance).flatten().nonzero()
    if len(beyond):
        step = int(beyond[0])
        raise SimdiffError(f"greedy decoding with the KV cache picks token {int(cached.flatten()[step])} at step "
                           f"{step}, without it {int(uncached.flatten()[step])} (logit gap "
                           f"{float(gap.flatten()[step]):.3g}); the pruned model's cache is inconsistent")
    ties = int((cached != uncached).sum())
    log.info("KV-cache check: %d rounding ties between cached and uncached greedy tokens", ties)
