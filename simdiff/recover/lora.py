"""peft LoRA adapters: attach, read/write the trainable weights, merge into a vanilla model."""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from simdiff.config.recover import RecoverConfig
from simdiff.core.errors import SimdiffError

log = logging.getLogger(__name__)


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise SimdiffError("recovery needs peft: `pip install simdiff[recover]` (or `pip install peft`)") from exc
    return peft


def attach_lora(model: nn.Module, config: RecoverConfig) -> nn.Module:
    """Wrap ``model`` in a peft LoRA model whose only trainable weights are the adapters."""
    peft = _peft()
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=config.rank, lora_alpha=config.alpha,
                           lora_dropout=config.dropout, target_modules=config.modules(), bias="none")
    try:
        with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            wrapped = peft.get_peft_model(model, lora)
    except ValueError as exc:
        raise SimdiffError(f"--target-modules {config.target_modules!r} does not fit this model: {exc}") from exc
    trainable, total = count_parameters(wrapped)
    log.info("LoRA rank %d on %s: %d trainable of %d parameters (%.2f%%)", config.rank, config.target_modules,
             trainable, total, 100 * trainable / total)
    return wrapped


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (adapter) weights by parameter name, on the CPU."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter weights into ``model``; the names must match its trainable parameters exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise SimdiffError(f"checkpoint adapter does not match the model (missing {missing[:3]}, "
                           f"unexpected {extra[:3]}); resume with the same model and LoRA settings")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(p.device, p.dtype))


def merge(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and return the plain transformers model (eval mode)."""
    merged = model.merge_and_unload()
    merged.eval()
    return merged
