"""``recover``: LoRA fine-tuning of a (pruned) model, merged into a vanilla checkpoint, with perplexity before/after."""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from simdiff.collect.nll import NLL
from simdiff.config.recover import RecoverConfig
from simdiff.config.settings import Evaluation
from simdiff.core.errors import SimdiffError
from simdiff.core.outputs import OutputDir, check_not_protected, check_output_dir, claim_output_dir
from simdiff.data import bos_token_id, contiguous_windows, load_text, tokenize_text
from simdiff.data.text import NAMED_DATASETS, read_text_file, text_digest, text_files
from simdiff.model.checks import check_seq_len
from simdiff.model.load import load_model, resolve_model_path
from simdiff.recover.checkpoint import check_checkpoint_files, read_trainer, resolve_checkpoint
from simdiff.recover.data import TRAIN_SPLIT, training_text
from simdiff.recover.lora import attach_lora, count_parameters, merge
from simdiff.recover.train import TrainResult, distributed_nll, make_accelerator, train_lora
from simdiff.store.lineage import input_metadata
from simdiff.store.save import METADATA_FILE, provenance, write_model

log = logging.getLogger(__name__)

PLOT_FILE = "recovery_loss.png"
EVAL_SOURCE = "wikitext2"
EVAL_SPLIT = "test"


@dataclass
class RecoverResult:
    """Perplexity before/after, the training history and where the output went."""

    out: Path | None
    perplexity_before: float
    perplexity_after: float
    eval_tokens: int
    train: TrainResult
    metadata: dict = field(default_factory=dict)


def evaluation_windows(tokenizer, evaluation: Evaluation) -> torch.Tensor:
    """Contiguous WikiText-2 *test* windows (the first ``max_tokens`` tokens), never used for training."""
    ids = tokenize_text(tokenizer, load_text(EVAL_SOURCE, split=EVAL_SPLIT, root=evaluation.data_dir))
    return contiguous_windows(ids, evaluation.seq_len, bos_token_id(tokenizer), evaluation.max_tokens)


def check_not_evaluation_text(source: str, data_root: str | None) -> None:
    """Refuse to train on the WikiText-2 test text that the before/after perplexity is measured on.

    Decided by content (SHA-256 of each training file's text), so a renamed copy is caught like the original;
    both releases (raw ``wikitext2`` and tokenised ``wikitext2-tok``) count where they can be read.
    """
    if source == EVAL_SOURCE:
        return  # its validation split
    evaluation = set()
    for name in NAMED_DATASETS:
        try:
            evaluation.add(text_digest(load_text(name, split=EVAL_SPLIT, root=data_root)))
        except SimdiffError:
            if name == EVAL_SOURCE:
                raise
    for path in text_files(source):
        if text_digest(read_text_file(path)) in evaluation:
            raise SimdiffError(f"--data {str(path)!r} holds the WikiText-2 test split, which recovery is evaluated "
                               "on; train on wikitext2 (its validation split) or another text")


def default_checkpoint_dir(out: Path) -> Path:
    """Checkpoints live beside the output: ``OUT.checkpoints/``."""
    return out.with_name(out.name + ".checkpoints")


def recover(model_name: str, out: str | Path, config: RecoverConfig | None = None,
            evaluation: Evaluation | None = None, merged: bool = True, overwrite: bool = False,
            checkpoint_dir: str | Path | None = None, resume: str | None = None,
            dtype: str = "auto") -> RecoverResult:
    """LoRA-train ``model_name`` on ``config.data`` and save a merged checkpoint (or the adapter) to ``out``."""
    config = config or RecoverConfig()
    evaluation = evaluation or Evaluation(batch_size=config.batch_size, data_dir=config.data_dir)
    if evaluation.seq_len is None:  # default: the training window
        evaluation = replace(evaluation, seq_len=config.seq_len)
    if evaluation.max_tokens < 1:
        raise SimdiffError(f"--max-tokens must be >= 1, got {evaluation.max_tokens}")
    out_path = check_output_dir(out, overwrite, [model_name])
    check_not_evaluation_text(config.data, evaluation.data_dir)
    ckpt_dir = Path(checkpoint_dir).expanduser() if checkpoint_dir else default_checkpoint_dir(out_path)
    check_not_protected(ckpt_dir, [model_name], flag="--checkpoint-dir")
    if ckpt_dir.resolve().is_relative_to(out_path.resolve()):  # the output replaces everything inside it
        raise SimdiffError(f"--checkpoint-dir {str(ckpt_dir)!r} lies inside --out {str(out_path)!r}; put the "
                           "checkpoints beside it (the default is OUT.checkpoints)")
    resume_path = resolve_checkpoint(resume, ckpt_dir) if resume else None
    if resume_path is not None:  # fail before any work when the files are damaged or the settings differ
        check_checkpoint_files(resume_path)
        config.check_resumable(read_trainer(resume_path)["config"])
    accelerator = make_accelerator()
    # the main process claims --out before any work (it alone writes under `accelerate launch`)
    claim = claim_output_dir(out_path, overwrite, [model_name]) if accelerator.is_main_process else nullcontext()
    with claim:
        if not accelerator.is_main_process:  # one process reports under `accelerate launch`
            logging.getLogger("simdiff").setLevel(logging.WARNING)
        model, tokenizer = load_model(model_name, dtype=dtype)
        check_seq_len(model, config.seq_len, "--train-seq-len")
        check_seq_len(model, evaluation.seq_len, "--eval-seq-len")
        model.to(accelerator.device)
        # LoRA's B matrices start at zero, so the wrapped model computes exactly what the input model does.
        peft_model = attach_lora(model, config)
        parameters = count_parameters(peft_model)  # (trainable, total), before merging removes the adapters
        text = training_text(tokenizer, config.data, config.seq_len, config.heldout_windows, config.data_dir)
        eval_windows = evaluation_windows(tokenizer, evaluation)
        before = distributed_nll(accelerator, peft_model, eval_windows, evaluation.batch_size, "perplexity before")
        log.info("WikiText-2 test perplexity before recovery: %.3f (%d tokens)", before.perplexity, before.tokens)
        result = train_lora(peft_model, text, config, accelerator, ckpt_dir, resume_path)
        final = merge(result.model) if merged else result.model
        after = distributed_nll(accelerator, final, eval_windows, evaluation.batch_size, "perplexity after")
        log.info("WikiText-2 test perplexity after recovery: %.3f", after.perplexity)
        recovery = recovery_record(model_name, config, result, before, after, evaluation, merged, dtype,
                                   parameters)
        metadata = {**input_metadata(model_name), "recovery": recovery}
        saved = None
        if accelerator.is_main_process:
            saved = _save(final, tokenizer, claim, metadata, result.history, merged, model_name)
    accelerator.wait_for_everyone()
    return RecoverResult(saved, before.perplexity, after.perplexity, before.tokens, result, metadata)


def recovery_record(model_name: str, config: RecoverConfig, result: TrainResult, before: NLL, after: NLL,
                    evaluation: Evaluation, merged: bool, dtype: str, parameters: tuple[int, int]) -> dict:
    """The ``recovery`` section of ``simdiff.json``: settings, loss curves, perplexity before/after."""
    return {
        "base_model": model_name,
        "merged": merged,
        "training_text": f"{config.data} ({TRAIN_SPLIT} split)" if config.data == EVAL_SOURCE else config.data,
        "settings": {**config.to_dict(), "warmup_steps": config.warmup, "schedule": "cosine with linear warm-up",
                     "optimizer": "AdamW", "dtype": dtype},
        "trainable_parameters": parameters[0],
        "total_parameters": parameters[1],
        "processes": result.processes,
        "resumed_from_step": result.start_step,
        "train_seconds": round(result.seconds, 2),
        "loss_curve": result.history["train"],
        "heldout_curve": result.history["heldout"],
        "perplexity": {"dataset": f"{EVAL_SOURCE} {EVAL_SPLIT}", "tokens": before.tokens,
                       "seq_len": evaluation.seq_len, "before": before.perplexity, "after": after.perplexity},
        **provenance(),
    }


def _save(model: nn.Module, tokenizer, claim: OutputDir, metadata: dict, history: dict, merged: bool,
          model_name: str) -> Path:
    """Write the output in a temporary folder (verified), add the loss plot, then rename it into place."""
    from simdiff.recover.plot import plot_loss_curves

    with claim.staging() as staging:
        if merged:
            write_model(model, tokenizer, staging, metadata)
        else:
            save_adapter(model, tokenizer, staging, metadata, model_name)
        plot_loss_curves(history, staging / PLOT_FILE, title=f"LoRA recovery: {model_name}")
        _append_card(staging, metadata["recovery"])
    log.info("saved %s", claim.path)
    return claim.path


def save_adapter(model: nn.Module, tokenizer, folder: Path, metadata: dict, model_name: str) -> Path:
    """Save the LoRA adapter (peft format) + tokenizer + ``simdiff.json`` + a card, verified by reloading onto
    the base. ``base_model_name_or_path`` is a hub id or an absolute path, so the adapter loads from anywhere."""
    from simdiff.store.card import base_reference, write_adapter_card

    base = base_reference(model_name)
    for config in model.peft_config.values():
        config.base_model_name_or_path = base
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    write_adapter_card(folder, metadata, base)  # peft's save_pretrained wrote an empty template
    verify_adapter(folder, model, model_name)
    return folder


@torch.no_grad()
def verify_adapter(folder: Path, reference: nn.Module, model_name: str, atol: float = 1e-3) -> None:
    """Reload the base model plus the saved adapter with peft and compare logits with ``reference``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_name), dtype="auto")
    reloaded = PeftModel.from_pretrained(base, folder).eval()
    ids = torch.arange(1, 9).unsqueeze(0) % base.config.vocab_size
    expected = reference(input_ids=ids.to(next(reference.parameters()).device)).logits.float().cpu()
    actual = reloaded(input_ids=ids).logits.float()
    if not torch.allclose(expected, actual, atol=atol, rtol=1e-3):
        diff = (expected - actual).abs().max().item()
        raise SimdiffError(f"reloaded adapter's logits differ from the trained model's by {diff:.3g}")


def _append_card(folder: Path, recovery: dict) -> None:
    ppl = recovery["perplexity"]
    what = "merged into the weights" if recovery["merged"] else "kept as a peft adapter (adapter_model.safetensors)"
    lines = [
        "",
        "## Recovery",
        "",
        f"LoRA rank {recovery['settings']['rank']} ({what}), {recovery['settings']['steps']} steps "
        f"on {recovery['training_text']}.",
        f"WikiText-2 test perplexity ({ppl['tokens']} tokens, windows of {ppl['seq_len']}): "
        f"{ppl['before']:.2f} before, {ppl['after']:.2f} after. Loss curves: `{PLOT_FILE}`.",
        "",
    ]
    card = folder / "README.md"
    previous = card.read_text(encoding="utf-8") if card.is_file() else ""
    card.write_text(previous + "\n".join(lines), encoding="utf-8")
