"""The LoRA training loop: accelerate data parallel, warm-up + cosine schedule, clipping, held-out loss, resume."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from simdiff.collect.nll import NLL, nll_over
from simdiff.config.recover import RecoverConfig
from simdiff.core.progress import progress
from simdiff.data import batches
from simdiff.recover.checkpoint import load_checkpoint, save_checkpoint
from simdiff.recover.data import TrainingText
from simdiff.recover.lora import adapter_state, load_adapter_state

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """The trained peft model (unwrapped, eval mode) and what happened."""

    model: nn.Module
    history: dict = field(default_factory=lambda: {"train": [], "heldout": []})
    start_step: int = 0
    seconds: float = 0.0
    processes: int = 1


def make_accelerator():
    """An ``accelerate.Accelerator``: one process here, several under ``accelerate launch``."""
    from accelerate import Accelerator

    return Accelerator()


def distributed_nll(accelerator, model: nn.Module, windows: torch.Tensor, batch_size: int,
                    desc: str | None = None) -> NLL:
    """NLL over ``windows``, each process scoring its own share; sums are reduced over processes."""
    share = windows[accelerator.process_index :: accelerator.num_processes]
    desc = desc if accelerator.is_main_process else None
    local = nll_over(model, batches(share, batch_size), desc=desc) if len(share) else NLL()
    sums = torch.tensor([local.total, float(local.tokens)], dtype=torch.float64, device=accelerator.device)
    sums = accelerator.reduce(sums, reduction="sum")
    return NLL(float(sums[0]), int(sums[1]))


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier at 0-based ``step``: linear warm-up to 1 (first step > 0), then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _schedule(optimizer, config: RecoverConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, warmup=config.warmup,
                                                                          total=config.steps))


def _step_seed(config: RecoverConfig, step: int, process: int) -> int:
    """Seed for dropout at ``step``: the same whether or not the run was resumed."""
    return (config.seed * 1_000_003 + step * 1_009 + process) % (2**63)


def _micro_losses(accelerator, model, ids: torch.Tensor, config: RecoverConfig) -> torch.Tensor:
    """Forward/backward of one optimiser step's windows in ``grad_accum`` micro-batches; mean loss."""
    total = torch.zeros((), device=accelerator.device)
    chunks = ids.split(config.batch_size)
    for micro, chunk in enumerate(chunks):
        chunk = chunk.to(accelerator.device)
        sync = micro == len(chunks) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
            accelerator.backward(loss / len(chunks))
        total += loss.detach()
    return total / len(chunks)


def train_lora(model: nn.Module, text: TrainingText, config: RecoverConfig, accelerator=None,
               checkpoint_dir: Path | None = None, resume: Path | None = None) -> TrainResult:
    """Train the adapters of peft ``model`` for ``config.steps`` optimiser steps (continuing ``resume``)."""
    accelerator = accelerator or make_accelerator()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = _schedule(optimizer, config)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    result = TrainResult(unwrapped, processes=accelerator.num_processes)
    if resume is not None:
        state, trainer = load_checkpoint(resume)
        config.check_resumable(trainer["config"])
        load_adapter_state(unwrapped, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        result.start_step, result.history = trainer["step"], trainer["history"]
        log.info("resumed from %s at step %d", resume, result.start_step)
    per_process = config.batch_size * config.grad_accum
    per_step = per_process * accelerator.num_processes
    steps = range(result.start_step, config.steps)
    bar = progress(steps, desc="recover") if accelerator.is_main_process else steps
    started = time.perf_counter()
    if config.eval_every and len(text.heldout) and result.start_step == 0:  # where training starts from
        _heldout(accelerator, model, unwrapped, text, config, 0, result.history)
    model.train()
    for step in bar:
        torch.manual_seed(_step_seed(config, step, accelerator.process_index))
        mine = text.step_indices(step, per_step, config.seed).view(accelerator.num_processes, per_process)
        lr = optimizer.param_groups[0]["lr"]
        loss = _micro_losses(accelerator, model, text.train[mine[accelerator.process_index]], config)
        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        mean = float(accelerator.reduce(loss, reduction="mean"))
        done = step + 1
        result.history["train"].append({"step": done, "loss": mean, "lr": lr, "grad_norm": float(grad_norm)})
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{mean:.3f}", lr=f"{lr:.2e}")
        if config.eval_every and len(text.heldout) and (done % config.eval_every == 0 or done == config.steps):
            _heldout(accelerator, model, unwrapped, text, config, done, result.history)
        if checkpoint_dir is not None and config.checkpoint_every and (
                done % config.checkpoint_every == 0 or done == config.steps):
            _checkpoint(accelerator, unwrapped, optimizer, scheduler, config, done, result.history, checkpoint_dir)
    result.seconds = time.perf_counter() - started
    unwrapped.eval()
    return result


def _heldout(accelerator, model, unwrapped, text: TrainingText, config: RecoverConfig, step: int,
             history: dict) -> None:
    model.eval()
    nll = distributed_nll(accelerator, unwrapped, text.heldout, config.batch_size)
    model.train()
    history["heldout"].append({"step": step, "loss": nll.mean})
    log.info("step %d: held-out loss %.4f (perplexity %.2f)", step, nll.mean, nll.perplexity)


def _checkpoint(accelerator, unwrapped, optimizer, scheduler, config: RecoverConfig, step: int, history: dict,
                folder: Path) -> None:
    if accelerator.is_main_process:
        state = {"adapter": adapter_state(unwrapped), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict()}
        save_checkpoint(folder, step, state, {"config": config.to_dict(), "history": history},
                        keep=config.keep_checkpoints)
    accelerator.wait_for_everyone()
