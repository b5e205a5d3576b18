"""Atomic, verified saving: write to a temporary directory, reload with plain transformers, then rename."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from simdiff.errors import SimdiffError
from simdiff.progress import progress

log = logging.getLogger(__name__)

METADATA_FILE = "simdiff.json"


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that determine results."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("simdiff", "torch", "transformers", "accelerate", "safetensors", "lm_eval", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def command_line() -> str:
    """The exact command that is running (``simdiff ...`` for the console script)."""
    argv = list(sys.argv)
    if argv and os.path.basename(argv[0]) in {"simdiff", "__main__.py"}:
        argv[0] = "simdiff"
    return " ".join(argv)


def provenance() -> dict:
    """Versions, command and time, for every JSON result."""
    return {
        "versions": package_versions(),
        "command": command_line(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Validate an output path before any work is done."""
    path = Path(out).expanduser()
    if path.exists() and not overwrite:
        raise SimdiffError(f"output {str(path)!r} already exists; pass --overwrite or choose another --out")
    if path.exists() and not path.is_dir():
        raise SimdiffError(f"output {str(path)!r} exists and is not a directory")
    return path


@torch.no_grad()
def verify_reload(folder: Path, reference: nn.Module | None = None, tokenizer=None, atol: float = 1e-3) -> None:
    """Reload ``folder`` with plain ``AutoModelForCausalLM``, generate with the KV cache, compare logits."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    reloaded.eval()
    vocab = reloaded.config.vocab_size
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids if tokenizer is not None else None
    if ids is None or ids.shape[1] == 0:
        ids = torch.arange(1, 6).unsqueeze(0) % vocab
    generated = reloaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                                  do_sample=False, use_cache=True, pad_token_id=reloaded.config.eos_token_id or 0)
    if generated.shape[1] != ids.shape[1] + 4:
        raise SimdiffError(f"reloaded model in {folder} did not generate 4 new tokens")
    if reference is not None:
        device = next(reference.parameters()).device
        expected = reference(ids.to(device)).logits.float().cpu()
        actual = reloaded(ids).logits.float()
        if not torch.allclose(expected, actual, atol=atol, rtol=1e-3):
            diff = (expected - actual).abs().max().item()
            raise SimdiffError(f"reloaded model's logits differ from the in-memory model's by {diff:.3g}")


def write_model(model: nn.Module, tokenizer, folder: Path, metadata: dict, verify: bool = True) -> None:
    """Write weights, tokenizer, ``simdiff.json`` and a model card into ``folder``; verify by a reload."""
    from simdiff.report.card import drop_stale_config_name, write_model_card
    from simdiff.surgery import check_config_consistent

    check_config_consistent(model)  # refuse to write a config that would not rebuild this model
    steps = ["weights", "tokenizer", "metadata", "verify"] if verify else ["weights", "tokenizer", "metadata"]
    for step in progress(steps, desc="saving", leave=False):
        if step == "weights":
            model.save_pretrained(folder)
        elif step == "tokenizer" and tokenizer is not None:
            tokenizer.save_pretrained(folder)
        elif step == "metadata":
            (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
            write_model_card(folder, metadata)
            drop_stale_config_name(folder)
        elif step == "verify":
            verify_reload(folder, model, tokenizer)


def save_model(model: nn.Module, tokenizer, out: str | os.PathLike, metadata: dict, overwrite: bool = False,
               verify: bool = True) -> Path:
    """Save ``model`` + tokenizer + ``simdiff.json`` + model card to ``out`` atomically, verified by a reload."""
    target = check_output_dir(out, overwrite)
    with atomic_directory(target, overwrite) as tmp:
        write_model(model, tokenizer, tmp, metadata, verify)
    log.info("saved %s", target)
    return target


@contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out``; on success it replaces ``out``, on error it is deleted.

    Readers never see a half-written ``out``: it appears (or is replaced) by one rename at the end.
    """
    target = check_output_dir(out, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    _make_readable(tmp)
    try:
        yield tmp
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_readable(folder: Path) -> None:
    """mkdtemp creates 0700 folders; give the output the permissions of a normal mkdir (umask applies)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)


def _replace_dir(src: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(src, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, target)
